"""HTML of `megavla data view` (view.py): the index and the episode pages. Plain strings, inline CSS
and a few lines of JavaScript (step slider, cursor on the timeline and curves, click to seek): each
page works from a file:// URL with no server and no network access."""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

import numpy as np

from megavla.data_shards.format import Episode

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 6px; } h2 { font-size: 16px; margin: 22px 0 6px; }
a { color: #0754a8; } .muted { color: #666; } .warn { color: #a33; }
table { border-collapse: collapse; background: #fff; } td, th { border: 1px solid #ddd; padding: 3px 8px;
  text-align: left; vertical-align: top; } th { background: #f0f0f0; }
.facts td:first-child { color: #666; } .instr { font-size: 16px; margin: 8px 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; } .card { width: 200px; background: #fff;
  border: 1px solid #ddd; text-decoration: none; color: #222; font-size: 12px; }
.card img { display: block; width: 200px; } .card div { padding: 4px 6px; }
.track { position: relative; display: inline-block; cursor: pointer; }
.cursor { position: absolute; top: 0; bottom: 0; width: 2px; margin-left: -1px; background: #e00;
  pointer-events: none; }
.timeline { width: 100%; max-width: 1000px; height: 30px; background: #eee; display: block; }
.seg { position: absolute; top: 0; height: 100%; box-sizing: border-box; border-right: 2px solid #fff;
  overflow: hidden; white-space: nowrap; font-size: 11px; padding: 7px 4px; color: #fff; }
.bad { position: absolute; bottom: 0; height: 6px; background: #d00; }
.curves img, .strip { display: block; max-width: 100%; }
video { background: #000; height: 300px; max-width: 100%; display: block; }
.top { display: flex; flex-wrap: wrap; gap: 20px; align-items: flex-start; }
#scrub { width: 240px; vertical-align: middle; }
"""
SEGMENT_COLORS = ("#3b75af", "#e1812c", "#3a923a", "#c03d3e", "#9372b2", "#845b53", "#d684bd", "#7f7f7f")

SCRIPT = """
const v = document.getElementById('video'), scrub = document.getElementById('scrub');
const T = +scrub.max + 1, fps = +scrub.dataset.fps;
const subtasks = JSON.parse(document.getElementById('subtasks').textContent);
function show(t) {
  scrub.value = t;
  document.getElementById('step').textContent = t;
  const s = subtasks.find(s => t >= s.start && t < s.end);
  document.getElementById('subtask').textContent = s ? s.text : '-';
  for (const track of document.querySelectorAll('.track')) {
    const x0 = +track.dataset.x0, x1 = +track.dataset.x1;
    track.querySelector('.cursor').style.left = (100 * (x0 + (x1 - x0) * (t + 0.5) / T)) + '%';
  }
}
const stepNow = () => Math.max(0, Math.min(T - 1, Math.floor(v ? v.currentTime * fps + 1e-3 : +scrub.value)));
function seek(t) { if (v) { v.pause(); v.currentTime = (t + 0.5) / fps; } show(t); }
scrub.addEventListener('input', () => seek(+scrub.value));
for (const track of document.querySelectorAll('.track')) {
  track.addEventListener('click', e => {
    const r = track.getBoundingClientRect(), x0 = +track.dataset.x0, x1 = +track.dataset.x1;
    const f = ((e.clientX - r.left) / r.width - x0) / (x1 - x0);
    seek(Math.max(0, Math.min(T - 1, Math.floor(f * T))));
  });
}
if (v) {
  v.addEventListener('seeked', () => show(stepNow()));
  (function follow() { if (!v.paused) show(stepNow()); requestAnimationFrame(follow); })();
}
show(0);
"""


def _page(title: str, body: str, script: str = "") -> str:
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n"
            + (f"<script>{script}</script>\n" if script else "") + "</body></html>\n")


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs where `mask` is True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def episode_page(ep: Episode, entry, media: str, files: dict) -> str:
    """The page of one episode; `media`: its media folder relative to the page; `files`: what
    view.render_episode wrote (cameras, strip steps, curve geometry)."""
    T = ep.num_steps
    invalid = int((~ep.step_valid).sum())
    masked = [i for i, m in enumerate(ep.action_mask.tolist()) if not m]
    facts = [("embodiment", ep.embodiment), ("scene x task", f"{ep.scene} x {ep.task} (episode {ep.episode})"),
             ("steps", f"{T} at {ep.fps:g} fps ({T / ep.fps:.1f} s)"),
             ("state / action dims", f"{ep.state.shape[1]} / {ep.actions.shape[1]}"),
             ("action dims without loss", f"{masked or 'none'} (action_mask False)"),
             ("steps without loss", f"{invalid} (step_valid False)"),
             ("outcome", {True: "success", False: "failure", None: "not recorded"}[entry.success]),
             ("shard", f"{entry.shard}")]
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in facts)
    body = [f'<p><a href="../index.html">&larr; all episodes</a></p><h1>{escape(ep.key)}</h1>',
            f'<p class="instr">&ldquo;{escape(ep.instruction)}&rdquo;</p><div class="top"><div>']
    cams = files["cameras"]
    note = f'<p class="muted">Cameras: {escape(", ".join(cams) or "none stored")}.</p>'
    if cams:
        if ep.hand_keypoints is not None:
            note += ('<p class="muted" style="max-width:520px">Hand keypoints (right magenta, left cyan) '
                     'projected on the head camera with the mini-world head camera\'s 70&deg; pinhole; '
                     'imported recordings store no intrinsics, so there the overlay is approximate. Steps '
                     'where the tracker lost a hand say so in the frame.</p>')
        body.append(f'<video id="video" src="{media}/cameras.mp4" controls muted preload="auto" playsinline>'
                    '</video>')
    body.append(f'<p>step <input type="range" id="scrub" min="0" max="{T - 1}" value="0" data-fps="{ep.fps:g}"> '
                f'<b id="step">0</b> / {T - 1} &nbsp; subtask: <b id="subtask">-</b></p></div>'
                f'<div><table class="facts">{rows}</table>{note}</div></div>')
    segs = []
    for i, s in enumerate(ep.subtasks):
        color = SEGMENT_COLORS[i % len(SEGMENT_COLORS)]
        segs.append(f'<div class="seg" title="{escape(s.text)}: steps {s.start}-{s.end - 1}" style="left:'
                    f'{100 * s.start / T:.3f}%;width:{100 * (s.end - s.start) / T:.3f}%;background:{color}">'
                    f'{escape(s.text)}</div>')
    for a, b in _spans(~ep.step_valid):
        segs.append(f'<div class="bad" title="steps {a}-{b - 1}: step_valid False (no loss)" '
                    f'style="left:{100 * a / T:.3f}%;width:{100 * (b - a) / T:.3f}%"></div>')
    body.append('<h2>Subtasks</h2><div class="track timeline" data-x0="0" data-x1="1">'
                + "".join(segs) + '<div class="cursor"></div></div>'
                + ('<p class="muted">Red ticks: steps without loss (step_valid False).</p>' if invalid else ""))
    if "strip_steps" in files:
        body.append(f'<h2>{escape(cams[0])} camera at steps {", ".join(map(str, files["strip_steps"]))}</h2>'
                    f'<img class="strip" src="{media}/strip.jpg" alt="frames of {escape(ep.key)}">')
    c = files["curves"]
    body.append('<h2>State and actions per dimension</h2><p class="muted">Dashed grey: action dims with '
                'no loss (action_mask False); red bands: steps with no loss; dotted: subtask boundaries. '
                'Click to seek.</p>'
                f'<div class="track curves" data-x0="{c["x0"]}" data-x1="{c["x1"]}"><img src="{media}/curves.png" '
                f'width="{round(c["width"])}" alt="state and action curves"><div class="cursor"></div></div>')
    body.append(f'<h2>meta.json extra</h2><pre>{escape(json.dumps(ep.extra, indent=1, sort_keys=True))}</pre>')
    subtasks = json.dumps([{"text": s.text, "start": s.start, "end": s.end} for s in ep.subtasks])
    subtasks = subtasks.replace("</", "<\\/")  # a subtask text cannot close the script element
    body.append(f'<script type="application/json" id="subtasks">{subtasks}</script>')
    return _page(f"{ep.key} - megavla data view", "\n".join(body), SCRIPT)


def index_page(root: str, sets: list[Path], entries: list, problems: list[str], incomplete: list[Path]) -> str:
    rendered = [e for e in entries if e.page]
    body = [f"<h1>Episodes in {escape(str(root))}</h1>",
            f"<p>{len(entries)} episodes in {len(sets)} shard sets; {len(rendered)} have a page "
            "(`megavla data view DIR --episodes KEY ...` renders others).</p>"]
    if problems or incomplete:
        items = [f"<li>{escape(p)}</li>" for p in problems]
        items += [f"<li>{escape(str(d))}: shard files but no manifest.json (unfinished write), not shown</li>"
                  for d in incomplete]
        body.append(f'<h2 class="warn">Skipped ({len(items)})</h2><ul class="warn">{"".join(items)}</ul>')
    if rendered:
        cards = "".join(
            f'<a class="card" href="{e.page}"><img src="{e.thumb}" alt="{escape(e.key)}">'
            f"<div><b>{escape(e.embodiment)}</b> scene {e.scene} task {e.task}<br>{escape(e.instruction)}</div></a>"
            for e in rendered if e.thumb)
        plain = [e for e in rendered if not e.thumb]
        body.append(f'<h2>Episode pages</h2><div class="gallery">{cards}</div>')
        if plain:
            body.append("<p>" + ", ".join(f'<a href="{e.page}">{escape(e.key)}</a>' for e in plain) + "</p>")
    for set_dir in sets:
        mine = [e for e in entries if e.set_dir == str(set_dir)]
        for emb in sorted({e.embodiment for e in mine}):
            combos: dict[tuple[int, int], list] = {}
            for e in mine:
                if e.embodiment == emb:
                    combos.setdefault((e.scene, e.task), []).append(e)
            rows = []
            for (scene, task), eps in sorted(combos.items()):
                known = [e.success for e in eps if e.success is not None]
                success = f"{sum(known)}/{len(known)}" if known else "-"
                instructions = sorted({e.instruction for e in eps})
                links = " ".join(f'<a href="{e.page}">{e.episode}</a>' if e.page else
                                 f'<span class="muted" title="{escape(e.key)}">{e.episode}</span>' for e in eps)
                rows.append(f"<tr><td>{scene}</td><td>{task}</td><td>{escape(' / '.join(instructions))}</td>"
                            f"<td>{len(eps)}</td><td>{sum(e.steps for e in eps)}</td><td>{success}</td>"
                            f"<td>{links}</td></tr>")
            n = sum(len(v) for v in combos.values())
            body.append(f"<h2>{escape(str(set_dir))}: {escape(emb)} &mdash; {n} episodes, {len(combos)} "
                        "scene x task combos</h2><table><tr><th>scene</th><th>task</th><th>instruction</th>"
                        "<th>episodes</th><th>steps</th><th>success</th><th>episodes (linked: has a page)</th>"
                        f"</tr>{''.join(rows)}</table>")
    return _page(f"{root} - megavla data view", "\n".join(body))
