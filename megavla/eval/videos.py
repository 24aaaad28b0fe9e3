"""Rollout videos of closed-loop episodes: MP4 (H.264, PyAV), all cameras side by side, text drawn in.

What a trace (traces.py) says in numbers, a video shows: the frames are ``MiniWorld.render`` of every
camera at every step, the function and image size the policy observes (render is a pure function of
the world state, so at the steps where the policy queried, the tile is the image it got), upscaled
with nearest neighbour so 32-pixel renders stay visible. Frame i is the world after step i (frame 0
is the start state), as trace row i. A band on top says the step, the instruction, the gripper
command and state (and the block it holds), and the episode's outcome: success or failure, the
goal-directed progress of rubric.py, and "did another task" when the evaluation knows the sibling
tasks (the experiments' seen finetune combos).

Which episodes are filmed (:class:`VideoRecorder`): the first N per combo (``megavla experiment
closed-loop --videos N``), or up to k successes and k failures per evaluation cell (the experiments,
``eval.videos_per_outcome``). An episode is filmed only while it may still be kept, and its frames
are encoded as soon as it ends (memory: one episode's frames). Runs that ask for no video pay nothing.

Codec: H.264 (libx264, yuv420p, +faststart), which Debian's Chromium plays (``canPlayType``
'probably'; tests/test_eval_videos.py plays them in the browser when it is installed).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from megavla.data_shards.miniworld import MiniWorld

from .traces import EpisodeTrace

log = logging.getLogger(__name__)

FPS = 10
MIN_TILE = 128  # px: a camera tile is upscaled (integer factor) to at least this
BAND = 50  # px: the text band above the tiles
FONT_SIZE = 11


def videos_dir(result_json: str | Path) -> Path:
    """``.../eval_targets.json`` -> ``.../videos_targets/`` (``x.json`` -> ``x.videos/`` otherwise)."""
    p = Path(result_json)
    if p.name.startswith("eval_") and p.suffix == ".json":
        return p.with_name("videos_" + p.name[len("eval_"):-len(".json")])
    return p.with_name(p.stem + ".videos")


def siblings_by_scene(combos: list[str]) -> dict[int, list[int]]:
    """{scene: task ids} of "scene:task" combos (VideoRecorder's ``siblings``)."""
    out: dict[int, list[int]] = {}
    for combo in combos:
        scene, task = (int(x) for x in combo.split(":"))
        out.setdefault(scene, []).append(task)
    return out


@dataclass
class EpisodeFilm:
    """The frames and trace of one filmed episode (camera order = world.cameras)."""
    world: MiniWorld
    index: int
    trace: EpisodeTrace | None = None
    frames: list = field(default_factory=list)  # per row: [C, R, R, 3] uint8

    def record(self, world: MiniWorld, gripper_cmd: float | None = None) -> None:
        """The world's views now (and its trace row): call at the start and after every step."""
        if self.trace is None:
            self.trace = EpisodeTrace.start(world)
        else:
            self.trace.record(world, gripper_cmd)
        self.frames.append(np.stack([world.render(c) for c in world.cameras]))


class VideoRecorder:
    """Chooses the episodes of one evaluation to film and writes their MP4s into ``out_dir``.

    ``first_per_combo`` N: the first N episodes of every combo. ``per_outcome`` k: up to k successes
    and k failures over the whole evaluation (one report cell), the first of each that occur.
    ``siblings`` {scene: task ids}: the tasks whose completion is "did another task" (rubric.py).
    ``videos``: one JSON-ready entry per written file (path relative to ``out_dir``'s parent)."""

    def __init__(self, out_dir: str | Path, *, first_per_combo: int = 0, per_outcome: int = 0,
                 siblings: dict[int, list[int]] | None = None, fps: int = FPS):
        if (first_per_combo > 0) == (per_outcome > 0):
            raise ValueError(f"VideoRecorder: give exactly one of first_per_combo ({first_per_combo}) and "
                             f"per_outcome ({per_outcome}) > 0")
        self.out_dir, self.fps = Path(out_dir), fps
        self.first_per_combo, self.per_outcome = first_per_combo, per_outcome
        self.siblings = siblings
        self.started: dict[tuple[int, int], int] = {}
        self.kept = {True: 0, False: 0}
        self.videos: list[dict] = []
        self.dropped = 0

    def begin(self, world: MiniWorld) -> EpisodeFilm | None:
        """A film for this episode, or None when no outcome could still be kept (nothing rendered)."""
        combo = (world.scene, world.task)
        index = self.started.get(combo, 0)
        self.started[combo] = index + 1
        if self.first_per_combo:
            return EpisodeFilm(world, index) if index < self.first_per_combo else None
        if min(self.kept.values()) >= self.per_outcome:
            return None
        return EpisodeFilm(world, index)

    def end(self, film: EpisodeFilm | None, success: bool) -> None:
        if film is None:
            return
        if self.per_outcome and self.kept[success] >= self.per_outcome:
            self.dropped += 1  # its outcome's quota is full: not kept
            return
        self.kept[success] += 1
        self.videos.append(self.write(film, success))

    def write(self, film: EpisodeFilm, success: bool) -> dict:
        from .rubric import score_episode
        w, trace = film.world, film.trace
        trace.success = success
        score = score_episode(trace.loaded(), siblings=(self.siblings or {}).get(w.scene, ()))
        outcome = {"success": success, "progress": score.progress,
                   "did_another_task": score.did_another_task if self.siblings is not None else None,
                   "other_task": score.other_task}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        name = (f"combo-{w.scene}-{w.task}_ep-{film.index:03d}_seed-{w.seed}_"
                f"{'success' if success else 'failure'}.mp4")
        path = self.out_dir / name
        frames = [compose_frame(film.frames[i], w, trace, i, outcome) for i in range(len(film.frames))]
        encode_mp4(frames, path, self.fps)
        return {"file": f"{self.out_dir.name}/{name}", "scene": w.scene, "task": w.task, "seed": w.seed,
                "episode": film.index, "frames": len(frames), "bytes": path.stat().st_size, **outcome}


def _font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels (a long instruction must not run off)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def outcome_text(outcome: dict, world: MiniWorld) -> str:
    parts = ["SUCCESS" if outcome["success"] else "FAILURE", f"progress {outcome['progress']:.2f}"]
    if outcome.get("did_another_task"):
        from megavla.data_shards.miniworld import task_spec
        parts.append(f"did another task: {task_spec(world.scene, outcome['other_task']).instruction}")
    elif outcome.get("did_another_task") is False:
        parts.append("no other task")
    return " · ".join(parts)


def compose_frame(views: np.ndarray, world: MiniWorld, trace: EpisodeTrace, row: int, outcome: dict) -> np.ndarray:
    """One video frame: the cameras' views side by side under a text band (uint8 [H, W, 3], even sizes)."""
    scale = max(1, math.ceil(MIN_TILE / views.shape[1]))
    tiles = views.repeat(scale, axis=1).repeat(scale, axis=2)
    strip = np.concatenate(list(tiles), axis=1)
    height, width = BAND + strip.shape[0], strip.shape[1]
    canvas = Image.new("RGB", (width + width % 2, height + height % 2), (16, 16, 16))
    canvas.paste(Image.fromarray(strip), (0, BAND))
    draw, font = ImageDraw.Draw(canvas), _font()
    held = trace.held[row]
    holds = f", holds the {world.spec.colors[held]} block" if held >= 0 else ""
    state = "closed" if trace.gripper[row] >= 0.5 else "open"
    line1 = f"step {row}/{len(trace.held) - 1}   gripper cmd {trace.gripper_cmd[row]:.2f}, {state}{holds}"
    colour = (90, 220, 110) if outcome["success"] else (240, 110, 90)
    draw.text((4, 2), _fit(draw, line1, font, width - 8), fill=(235, 235, 235), font=font)
    draw.text((4, 17), _fit(draw, world.instruction, font, width - 8), fill=(250, 220, 120), font=font)
    draw.text((4, 32), _fit(draw, outcome_text(outcome, world), font, width - 8), fill=colour, font=font)
    for i, cam in enumerate(world.cameras):
        draw.text((i * tiles.shape[2] + 3, height - FONT_SIZE - 4), cam, fill=(255, 255, 255), font=_font(9))
    return np.asarray(canvas)


def encode_mp4(frames: list[np.ndarray], path: str | Path, fps: int = FPS) -> Path:
    """H.264 MP4 of a rollout (megavla.media.write_h264_mp4; crf 28 keeps a cell's videos small)."""
    from megavla.media import write_h264_mp4
    return write_h264_mp4(path, frames, fps, crf=28)


def clear_videos(out_dir: Path) -> int:
    """Remove the MP4s a previous evaluation wrote into ``out_dir`` (a re-run replaces its videos);
    returns how many. Other files are left alone and named in the log."""
    if not out_dir.is_dir():
        return 0
    removed, others = 0, []
    for f in out_dir.iterdir():
        if f.suffix == ".mp4" and f.name.startswith("combo-"):
            f.unlink()
            removed += 1
        else:
            others.append(f.name)
    if removed:
        log.info("%s: removed %d videos of an earlier evaluation", out_dir, removed)
    if others:
        log.warning("%s: left %d files that are not this evaluation's videos: %s", out_dir, len(others), others[:5])
    return removed
