"""``report_<name>.html`` beside an experiment's ``report_<name>.md``: the same tables and figures, plus
per evaluation cell a strip of its rollout videos (videos.py). Self-contained: relative links only
(figures, videos), inline CSS, no script, no server, no network; open it from the file system.

The Markdown is rendered by Python-Markdown (``markdown``, installed with tensorboard, a dependency
of this package) with its ``tables``, ``fenced_code`` and ``md_in_html`` extensions (the resolved
spec sits in a ``<details>`` block). Video cells come from the ``eval_<tag>.json`` files in the
experiment's run dirs: a cell is one run name without its ``_seed-<i>`` suffix (every training
seed of an arm together) and one evaluation tag (targets, seen).
"""
from __future__ import annotations

import html
import json
import logging
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

log = logging.getLogger(__name__)

EVAL_TAGS = ("targets", "seen")
STYLE = """
body { font-family: sans-serif; max-width: 1400px; margin: 1em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 3px 7px; text-align: left; }
th { background: #eee; }
img { max-width: 100%; }
pre { background: #f5f5f5; padding: 0.5em; overflow-x: auto; }
.strip { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; font-size: 0.8em; max-width: 400px; }
figcaption .success { color: #1a7f37; font-weight: bold; }
figcaption .failure { color: #c0392b; font-weight: bold; }
"""


def markdown_to_html(text: str) -> str:
    import markdown
    text = text.replace("<details>", '<details markdown="1">')
    return markdown.markdown(text, extensions=["tables", "fenced_code", "md_in_html"])


def video_cells(run_dirs: dict[str, Path], report_dir: Path, tags=EVAL_TAGS) -> dict[str, list[dict]]:
    """{cell title: [video entry + "src" relative to ``report_dir``]} from each run's eval_<tag>.json."""
    cells: dict[str, list[dict]] = {}
    for name, run_dir in run_dirs.items():
        for tag in tags:
            result = Path(run_dir) / f"eval_{tag}.json"
            if not result.is_file():
                continue
            seed = re.search(r"_seed-(\d+)$", name)
            for video in json.loads(result.read_text()).get("videos", []):
                src = os.path.relpath(Path(run_dir) / video["file"], report_dir)
                entry = {**video, "src": quote(Path(src).as_posix()), "run_seed": int(seed.group(1)) if seed else 0}
                cells.setdefault(f"{name[:seed.start()] if seed else name} · {tag}", []).append(entry)
    return cells


def _caption(v: dict) -> str:
    outcome = "success" if v["success"] else "failure"
    parts = [f"{v['scene']}:{v['task']}", f"start seed {v['seed']}", f"training seed {v.get('run_seed', 0)}",
             f'<span class="{outcome}">{outcome}</span>', f"progress {v['progress']:.2f}"]
    if v.get("did_another_task"):
        parts.append(f"did another task ({v['scene']}:{v['other_task']})")
    return " · ".join(parts)


def videos_html(cells: dict[str, list[dict]]) -> str:
    if not cells:
        return ""
    out = ["<h2>Rollout videos</h2>",
           "<p>Per evaluation cell, the first successes and failures (eval.videos_per_outcome of each; fewer "
           "when the cell had fewer). Every camera side by side, as the policy observed it; the band says "
           "the step, instruction, gripper and the episode's outcome.</p>"]
    for title, videos in cells.items():
        out.append(f"<h3>{html.escape(title)}</h3>")
        out.append('<div class="strip">')
        for v in videos:
            out.append(f'<figure><video controls muted preload="metadata" src="{html.escape(v["src"])}"></video>'
                       f"<figcaption>{_caption(v)}</figcaption></figure>")
        out.append("</div>")
    return "\n".join(out)


def write_html_report(md_path: str | Path, run_dirs: dict[str, Path] | None = None) -> Path:
    """``report_<name>.html`` beside ``md_path``; logs any local link that does not resolve."""
    md_path = Path(md_path)
    body = markdown_to_html(md_path.read_text())
    cells = video_cells(run_dirs or {}, md_path.parent)
    title = html.escape(md_path.read_text().split("\n", 1)[0].lstrip("# ").strip() or md_path.stem)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n{videos_html(cells)}\n</body></html>\n")
    path = md_path.with_suffix(".html")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page)
    os.replace(tmp, path)
    missing = [link for link in local_links(page) if not (path.parent / link).exists()]
    if missing:
        log.warning("%s: %d links do not resolve: %s", path, len(missing), missing[:5])
    log.info("html report: %s (%d video cells, %d videos)", path, len(cells), sum(map(len, cells.values())))
    return path


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("src", "href") and value:
                self.links.append(value)


def local_links(page: str) -> list[str]:
    """Every src / href of ``page`` that is a relative file link (unquoted); page anchors left out."""
    parser = _Links()
    parser.feed(page)
    out = []
    for link in parser.links:
        parsed = urlparse(link)
        if parsed.scheme or parsed.netloc or link.startswith("#"):
            continue
        out.append(unquote(parsed.path))
    return out
