"""``megavla data view DIR [--episodes KEY ...] --out OUT``: see a shard set in a browser.

OUT/index.html lists every episode per shard set, embodiment and scene x task combo, and links a page
per rendered episode (OUT/episodes/KEY.html): the cameras as a video with a step slider, hand
keypoints drawn on a human episode's head camera, a strip of frames, the subtask timeline, and every
state/action dimension with the loss masks (view_media.py). Everything is relative files: open
index.html from disk, or copy OUT anywhere; no server, no network.

Episodes are read by the trainer's reader (shard_reader: the same manifest checks, tar parsing and
episode format checks); only the rendered episodes' frames and arrays are read, the others' meta.json
only. Without --episodes, the first episode of each combo is rendered, up to --max-episodes over
all embodiments; the rest are listed in the index, and a log line says how many were not rendered.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from tqdm import tqdm

from megavla.config.core import ConfigError
from megavla.data.mixture import combo_of_key
from megavla.data.shard_reader import read_manifest
from megavla.data.view_pages import episode_page, index_page
from megavla.data_shards.format import Episode, EpisodeFormatError, sample_to_episode
from megavla.data_shards.tar_reader import READ, SKIP, TarFormatError, group_members, iter_tar_members, map_shard
from megavla.data_shards.manifest import find_shard_sets, load_manifest
from megavla.overwrite import OutputExists, refuse_existing

log = logging.getLogger(__name__)

DEFAULT_MAX_EPISODES = 8
EPISODES_DIR = "episodes"


@dataclass
class Entry:
    """One episode as the index lists it (from its meta.json)."""
    key: str
    set_dir: str
    shard: str
    embodiment: str
    scene: int
    task: int
    episode: int
    steps: int
    instruction: str
    success: bool | None
    page: str | None = None   # relative to OUT, when rendered
    thumb: str | None = None  # relative to OUT, when rendered with cameras


class _Chooser:
    """Which episodes to read fully: the keys asked for, else the first of each (embodiment, combo)
    until `per_embodiment` and `total` are reached (0: every episode)."""

    def __init__(self, wanted: set[str] | None, total: int, embodiments: int):
        self.wanted, self.total = wanted, total
        self.per_embodiment = math.ceil(total / max(1, embodiments)) if total else 0
        self.counts: dict[str, int] = {}
        self.combos: set[tuple[str, str | None]] = set()

    def __call__(self, key: str) -> bool:
        if self.wanted is not None:
            return key in self.wanted
        if not self.total:
            return True
        slug = key.rsplit("_", 3)[0]
        combo = (slug, combo_of_key(key))
        if (sum(self.counts.values()) >= self.total or self.counts.get(slug, 0) >= self.per_embodiment
                or combo in self.combos):
            return False
        self.counts[slug] = self.counts.get(slug, 0) + 1
        self.combos.add(combo)
        return True


def _entry(meta: dict, key: str, set_dir: Path, shard: str) -> Entry:
    extra = meta.get("extra") or {}
    return Entry(key=key, set_dir=str(set_dir), shard=shard, embodiment=str(meta["embodiment"]),
                 scene=int(meta["scene"]), task=int(meta["task"]), episode=int(meta["episode"]),
                 steps=int(meta["num_steps"]), instruction=str(meta.get("instruction", "")),
                 success=extra.get("success") if isinstance(extra.get("success"), bool) else None)


def scan(sets: list[Path], wanted: set[str] | None, max_episodes: int
         ) -> tuple[list[Entry], dict[str, Episode], list[str]]:
    """(every episode's Entry, the chosen episodes read in full, problems met). A damaged shard or
    sample is a problem line (logged, listed in the index), not an abort: the rest is still shown."""
    shards_of = {set_dir: read_manifest(set_dir, need_stats=False)[0] for set_dir in sets}  # checks first
    embodiments = {e for s in sets for e in load_manifest(s)["totals"].get("embodiments", {})}
    choose = _Chooser(wanted, max_episodes, len(embodiments))
    entries: list[Entry] = []
    episodes: dict[str, Episode] = {}
    problems: list[str] = []
    seen: set[str] = set()
    for set_dir, shards in shards_of.items():
        for shard in shards:
            chosen: dict[str, bool] = {}
            groups = 0

            def mode(key: str, suffix: str, shard=shard, chosen=chosen) -> int:
                if key in shard.repeated or key in seen:
                    return SKIP
                if key not in chosen:
                    chosen[key] = choose(key)
                return READ if chosen[key] or suffix == "meta.json" else SKIP

            try:
                for group in group_members(iter_tar_members(map_shard(shard.path), shard.path, mode), shard.path):
                    key = group["__key__"]
                    groups += 1
                    if key in seen:
                        problems.append(f"{shard.path}: {key}: a second copy of the key in this shard, skipped")
                        continue
                    seen.add(key)
                    try:
                        if chosen.get(key):
                            ep = sample_to_episode(group, where=shard.path)
                            episodes[key] = ep
                        if "meta.json" not in group:
                            raise EpisodeFormatError(f"{shard.path}:{key}: missing member 'meta.json'")
                        entries.append(_entry(json.loads(group["meta.json"]), key, set_dir, shard.path))
                    except (EpisodeFormatError, ValueError, KeyError, TypeError) as e:
                        problems.append(f"{shard.path}: {key}: {type(e).__name__}: {e}; skipped")
            except (TarFormatError, OSError) as e:
                where = "" if shard.path in str(e) else f"{shard.path}: "
                problems.append(f"{where}{e}; the rest of this shard skipped ({groups} of the "
                                f"{shard.episodes} episodes the manifest lists in it read before)")
    for p in problems:
        log.warning("data view: %s", p)
    return entries, episodes, problems


def _clear_previous_view(out: Path) -> None:
    """--overwrite: remove what an earlier `data view` wrote here (index.html, episodes/)."""
    if out.is_file() or out.is_symlink():
        out.unlink()
        return
    (out / "index.html").unlink(missing_ok=True)
    if (out / EPISODES_DIR).is_dir():
        shutil.rmtree(out / EPISODES_DIR)


def render_episode(ep: Episode, entry: Entry, out: Path) -> None:
    """OUT/episodes/KEY.html and its media in OUT/episodes/KEY/."""
    from megavla.data import view_media

    media = out / EPISODES_DIR / ep.key
    media.mkdir(parents=True, exist_ok=True)
    cameras = [c for c in ("head", "left_wrist", "right_wrist") if c in ep.frames]
    files: dict = {"cameras": cameras}
    if cameras:
        frames, files["scale"], panel = view_media.episode_frames(ep, cameras)
        view_media.write_mp4(media / "cameras.mp4", frames, ep.fps)
        first_camera = [f[:, :panel] for f in frames]
        files["strip_steps"] = view_media.write_strip(media / "strip.jpg", first_camera)
        view_media.write_thumbnail(media / "thumb.jpg", first_camera[0])
        entry.thumb = f"{EPISODES_DIR}/{quote(ep.key)}/thumb.jpg"
    files["curves"] = view_media.write_curves(media / "curves.png", ep)
    page = out / EPISODES_DIR / f"{ep.key}.html"
    page.write_text(episode_page(ep, entry, quote(ep.key), files), encoding="utf-8")
    entry.page = f"{EPISODES_DIR}/{quote(ep.key)}.html"


def view(args) -> int:
    out = Path(args.out)
    try:
        if importlib.util.find_spec("av") is None:
            raise ValueError("megavla data view writes the camera videos with PyAV, which is not installed: "
                             "pip install 'megavla[import]' (or pip install av)")
        if args.max_episodes < 0:
            raise ValueError(f"--max-episodes={args.max_episodes}: must be >= 0 (0: every episode)")
        refuse_existing(out, args.overwrite, "files")  # before any reading
        sets, incomplete = find_shard_sets(args.dir)
        for d in incomplete:
            log.warning("%s: shard files but no manifest.json (an unfinished write): not shown", d)
        if not sets:
            raise ValueError(f"{args.dir}: no shard set (no manifest.json here or in subdirectories)")
        wanted = set(args.episodes) if args.episodes else None
        entries, episodes, problems = scan(sets, wanted, args.max_episodes)
        if wanted:
            missing = sorted(wanted - set(episodes))
            if missing:
                known = ", ".join(e.key for e in entries[:4])
                raise ValueError(f"--episodes: {len(missing)} keys not found (or unreadable, see above) in "
                                 f"{args.dir}: {', '.join(missing[:5])}; keys there look like: {known}")
    except (OutputExists, ConfigError, ValueError) as e:
        log.error("megavla data view: %s", e)
        return 2
    if args.overwrite:
        _clear_previous_view(out)
    out.mkdir(parents=True, exist_ok=True)
    by_key = {e.key: e for e in entries}
    for key in tqdm(list(episodes), desc="view", unit="ep", disable=args.no_progress):
        render_episode(episodes[key], by_key[key], out)
    not_rendered = len(entries) - len(episodes)
    if not_rendered:
        how = ("the first of each scene x task combo, at most "
               f"{args.max_episodes} in all" if not wanted else "those named by --episodes")
        log.info("data view: rendered %d of %d episodes (%s); %d listed in the index without a page "
                 "(render them with --episodes KEY ... or --max-episodes 0)", len(episodes), len(entries),
                 how, not_rendered)
    (out / "index.html").write_text(index_page(args.dir, sets, entries, problems, incomplete), encoding="utf-8")
    print(f"wrote {out / 'index.html'}: {len(episodes)} episode pages, {len(entries)} episodes listed"
          + (f", {len(problems)} problems (see the index)" if problems else "") + "; open it in a browser")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("view", help="HTML pages of a shard set: episodes per combo, videos, curves",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("dir", help="a shard set, or a directory holding several (e.g. synth's --out)")
    p.add_argument("--out", required=True, help="directory for index.html and the episode pages")
    p.add_argument("--episodes", nargs="+", metavar="KEY", help="render these episode keys "
                   "(e.g. robot-arm_s0000_t0001_e000000; the index lists them all)")
    p.add_argument("--max-episodes", type=int, default=DEFAULT_MAX_EPISODES,
                   help="without --episodes: render the first episode of each combo, at most this many "
                        "(0: every episode)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier view in --out")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=view)
