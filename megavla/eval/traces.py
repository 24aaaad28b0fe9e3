"""Per-step traces of closed-loop episodes: what the arm and the blocks did, compact, beside the result.

Binary success says whether an episode ended well; a trace says what the policy went for. Every
closed-loop evaluation records one :class:`EpisodeTrace` per episode (world frame, metres), and the
traces of one evaluation cell are written to one ``.npz`` beside its result JSON
(``eval_<tag>.json`` -> ``traces_<tag>.npz``), float32 arrays concatenated over episodes:

    steps [N]           per episode: recorded rows = executed steps + 1 (row 0 is the start state)
    offsets [N + 1]     episode i's rows are ``offsets[i]:offsets[i + 1]``
    ee [R, 4]           grasp point x, y, z (world.contact_point) and EE yaw, per row
    gripper_cmd [R]     the gripper value the policy commanded on the step that led to this row
                        (row 0: the start state's gripper)
    gripper [R]         the gripper state after the step (0 open .. 1 closed)
    blocks [R, 3, 4]    each block's centre x, y, z and yaw
    held [R] int8       index of the block the gripper holds, -1 none
    events [E, 4] int32 (episode, row, kind, block): kind 0 grasp, 1 release, 2 contact (a block that
                        is not held moved: a push)
    bowls [N, 2, 3], pad [N, 3], success [N] bool, meta (a JSON string: scene, task, seed per episode)

The file holds numbers and one JSON string only (no pickles): ``load_traces`` reads it with
``allow_pickle=False``. Size: about 90 rows x 22 floats x 4 bytes = 8 KB per episode, compressed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megavla.data_shards.miniworld import MiniWorld, ee_yaw

EVENT_KINDS = ("grasp", "release", "contact")
# A block that is not held and moves farther than this in one step was pushed (kinematic world:
# blocks never move on their own; a release sets a block down by at most 5 mm, vertically).
CONTACT_MOVE = 1e-4


@dataclass
class EpisodeTrace:
    scene: int
    task: int
    seed: int
    bowls: np.ndarray  # [2, 3]
    pad: np.ndarray  # [3]
    ee: list = field(default_factory=list)
    gripper_cmd: list = field(default_factory=list)
    gripper: list = field(default_factory=list)
    blocks: list = field(default_factory=list)
    held: list = field(default_factory=list)
    events: list = field(default_factory=list)  # (row, kind, block)
    success: bool = False

    @classmethod
    def start(cls, world: MiniWorld) -> "EpisodeTrace":
        trace = cls(world.scene, world.task, world.seed, world.bowls.copy(), world.pad.copy())
        trace.record(world, float(world.state.gripper[0]))
        return trace

    def record(self, world: MiniWorld, gripper_cmd: float) -> None:
        """Append the world's state after a step (or the start state) and the events that step caused."""
        s = world.state
        self.ee.append([*world.contact_point(0), ee_yaw(s.ee[0][:3, :3])])
        self.gripper_cmd.append(gripper_cmd)
        self.gripper.append(float(s.gripper[0]))
        blocks = np.concatenate([s.blocks, s.block_yaw[:, None]], axis=-1)
        self.blocks.append(blocks.copy())
        self.held.append(int(s.held[0]))
        row = len(self.held) - 1
        if row == 0:
            return
        before, now = self.held[-2], self.held[-1]
        if before < 0 <= now:
            self.events.append((row, 0, now))
        elif now < 0 <= before:
            self.events.append((row, 1, before))
        moved = np.linalg.norm(blocks[:, :2] - self.blocks[-2][:, :2], axis=-1) > CONTACT_MOVE
        for b in np.flatnonzero(moved):
            if b != now and b != before:
                self.events.append((row, 2, int(b)))

    @property
    def rows(self) -> int:
        return len(self.held)

    def loaded(self) -> "LoadedTrace":
        """The trace as load_traces returns it from a file (no file needed)."""
        a = self.arrays()
        return LoadedTrace(self.scene, self.task, self.seed, self.success, a["ee"], a["gripper_cmd"], a["gripper"],
                           a["blocks"], a["held"], self.bowls.astype(np.float32), self.pad.astype(np.float32),
                           [(r, EVENT_KINDS[k], b) for r, k, b in self.events])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"ee": np.asarray(self.ee, np.float32), "gripper_cmd": np.asarray(self.gripper_cmd, np.float32),
                "gripper": np.asarray(self.gripper, np.float32), "blocks": np.asarray(self.blocks, np.float32),
                "held": np.asarray(self.held, np.int8)}


def traces_path(result_json: str | Path) -> Path:
    """``.../eval_targets.json`` -> ``.../traces_targets.npz`` (``x.json`` -> ``x.traces.npz`` otherwise)."""
    p = Path(result_json)
    if p.name.startswith("eval_") and p.suffix == ".json":
        return p.with_name("traces_" + p.name[len("eval_"):-len(".json")] + ".npz")
    return p.with_name(p.stem + ".traces.npz")


def save_traces(traces: list[EpisodeTrace], path: str | Path) -> Path:
    """One compressed .npz for the traces of one cell (written to a temp name, then renamed)."""
    if not traces:
        raise ValueError(f"{path}: no episode traces to save")
    path = Path(path)
    steps = np.array([t.rows for t in traces], np.int32)
    per = [t.arrays() for t in traces]
    events = [(i, *ev) for i, t in enumerate(traces) for ev in t.events]
    meta = {"format": 1, "episodes": [{"scene": t.scene, "task": t.task, "seed": t.seed} for t in traces]}
    out = {k: np.concatenate([a[k] for a in per]) for k in per[0]}
    out.update(steps=steps, offsets=np.concatenate([[0], np.cumsum(steps)]).astype(np.int64),
               events=np.asarray(events, np.int32).reshape(-1, 4),
               bowls=np.stack([t.bowls for t in traces]).astype(np.float32),
               pad=np.stack([t.pad for t in traces]).astype(np.float32),
               success=np.array([t.success for t in traces], bool), meta=np.array(json.dumps(meta)))
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **out)
    os.replace(tmp, path)
    return path


@dataclass
class LoadedTrace:
    """One episode of a loaded trace file (arrays as saved: float32, world frame)."""
    scene: int
    task: int
    seed: int
    success: bool
    ee: np.ndarray  # [T, 4]
    gripper_cmd: np.ndarray  # [T]
    gripper: np.ndarray  # [T]
    blocks: np.ndarray  # [T, 3, 4]
    held: np.ndarray  # [T]
    bowls: np.ndarray  # [2, 3]
    pad: np.ndarray  # [3]
    events: list[tuple[int, str, int]]  # (row, kind name, block)

    def first(self, kind: str, block: int | None = None) -> int | None:
        """Row of the first event of ``kind`` (on ``block`` when given), None when there is none."""
        rows = [r for r, k, b in self.events if k == kind and (block is None or b == block)]
        return min(rows) if rows else None


def load_traces(path: str | Path) -> list[LoadedTrace]:
    """The episodes of a trace file, in evaluation order; a file that is not one says so."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable trace file ({e}); `megavla experiment` writes them "
                         "beside eval_<tag>.json") from None
    missing = {"steps", "offsets", "ee", "gripper_cmd", "gripper", "blocks", "held", "events", "bowls", "pad",
               "success", "meta"} - set(data)
    if missing:
        raise ValueError(f"{path}: trace file lacks {sorted(missing)}")
    meta = json.loads(str(data["meta"]))["episodes"]
    off = data["offsets"]
    events: list[list] = [[] for _ in meta]
    for ep, row, kind, block in data["events"].tolist():
        events[ep].append((row, EVENT_KINDS[kind], block))
    out = []
    for i, m in enumerate(meta):
        sl = slice(int(off[i]), int(off[i + 1]))
        out.append(LoadedTrace(m["scene"], m["task"], m["seed"], bool(data["success"][i]), data["ee"][sl],
                               data["gripper_cmd"][sl], data["gripper"][sl], data["blocks"][sl],
                               data["held"][sl], data["bowls"][i], data["pad"][i], events[i]))
    return out
