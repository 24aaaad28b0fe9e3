"""The goal-directed progress rubric: how far an episode got on the task it was *instructed* to do.

Fixed before any run that uses it (docs/results.md, "Rubric (fixed before any run)"); changing it
means a new rubric version, not a retune. Scored from an episode's trace (traces.py), world frame:

    stage 1  approach (0.25)  the first block the grasp point comes within APPROACH_RADIUS of (3D,
                              block centre) is the instructed block
    stage 2  grasp (0.25)     pick / pick-place: the instructed block is grasped, at or after the
                              approach; push: the instructed block is pushed (a contact event)
    stage 3  move (0.25 x f)  f = the largest fraction of the way to the goal the block has covered
                              after stage 2: pick-place / push, horizontal distance from its start to
                              the instructed bowl / pad, down to the success radius; pick, height from
                              resting to the lift height the success test asks for
    stage 4  done (0.25)      the task's own success test held (MiniWorld.success)

A stage counts only when the one before it did, so the score is 0.25 x (stages met) + 0.25 x f in
[0, 1]: 1 for the scripted expert, 0 for holding still. **Did another task** is its own outcome:
the target did not succeed and the episode *ended* with a sibling task's success test true (the
seen finetune combos of the same scene, the tasks the robot data showed); such an episode scores 0,
since it went for something it was not asked to do. A sibling that is a prefix of the target (pick
up the block a pick-place target must carry) never counts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from megavla.data_shards.miniworld import BLOCK_HALF, BOWL_RADIUS, PAD_HALF, TaskSpec, task_spec

from .traces import LoadedTrace

RUBRIC_VERSION = 1
APPROACH_RADIUS = 0.05  # m: twice the grasp window (2.5 cm), above the push contact reach (4.2 cm)
LIFT_HEIGHT = 0.08  # the pick task's success height (MiniWorld.success)
STAGE_WEIGHT = 0.25


def task_done(spec: TaskSpec, blocks: np.ndarray, held: int, bowls: np.ndarray, pad: np.ndarray) -> bool:
    """MiniWorld.success for any task of the scene, from one trace row (blocks [3, >=3], held block)."""
    block = blocks[spec.obj]
    if spec.kind == "pick":
        return held == spec.obj and block[2] > LIFT_HEIGHT
    if held == spec.obj:
        return False
    if spec.kind == "pick_place":
        return bool(np.linalg.norm(block[:2] - bowls[spec.target - 3, :2]) < BOWL_RADIUS - 0.01)
    return bool(np.linalg.norm(block[:2] - pad[:2]) < PAD_HALF - 0.005)


def _goal_fraction(spec: TaskSpec, trace: LoadedTrace, rows: slice) -> float:
    """Largest fraction of the way to the goal the instructed block covered over ``rows``."""
    path = trace.blocks[rows, spec.obj, :3].astype(np.float64)
    if len(path) == 0:
        return 0.0
    start = trace.blocks[0, spec.obj, :3].astype(np.float64)
    if spec.kind == "pick":
        covered = (path[:, 2] - start[2]) / (LIFT_HEIGHT - BLOCK_HALF)
    else:
        goal, radius = ((trace.bowls[spec.target - 3], BOWL_RADIUS - 0.01) if spec.kind == "pick_place"
                        else (trace.pad, PAD_HALF - 0.005))
        d0 = float(np.linalg.norm(start[:2] - goal[:2]))
        d = np.linalg.norm(path[:, :2] - goal[:2], axis=-1)
        covered = (d0 - d) / max(d0 - radius, 1e-6)
    return float(np.clip(covered.max(), 0.0, 1.0))


def _is_prefix(sibling: TaskSpec, target: TaskSpec) -> bool:
    return sibling.kind == "pick" and target.kind == "pick_place" and sibling.obj == target.obj


@dataclass
class EpisodeScore:
    scene: int
    task: int
    seed: int
    progress: float  # the rubric score in [0, 1] (0 when did_another_task)
    approached: bool
    grasped: bool  # grasped, or pushed for a push task
    goal_fraction: float
    done: bool
    did_another_task: bool
    other_task: int | None  # the sibling task it completed
    first_block: int | None  # the first block approached within APPROACH_RADIUS
    closest_block: int  # the block the grasp point came closest to over the episode
    instructed_min_distance: float  # m


def score_episode(trace: LoadedTrace, task: int | None = None, siblings=()) -> EpisodeScore:
    """The rubric for ``task`` (default: the trace's own) in the trace's scene; ``siblings``: task
    ids of the same scene whose completion counts as "did another task"."""
    task = trace.task if task is None else task
    spec = task_spec(trace.scene, task)
    grip = trace.ee[:, :3].astype(np.float64)
    dist = np.linalg.norm(trace.blocks[:, :, :3] - grip[:, None, :], axis=-1)  # [T, 3]
    near = np.argwhere(dist <= APPROACH_RADIUS)
    first_block = int(near[0, 1]) if len(near) else None
    approach_row = int(near[0, 0]) if len(near) else None
    approached = first_block == spec.obj
    kind = "contact" if spec.kind == "push" else "grasp"
    rows = [r for r, k, b in trace.events if k == kind and b == spec.obj and approached and r >= approach_row]
    grasped = bool(rows)
    fraction = _goal_fraction(spec, trace, slice(rows[0], None)) if grasped else 0.0
    done = grasped and any(task_done(spec, trace.blocks[r], int(trace.held[r]), trace.bowls, trace.pad)
                           for r in range(rows[0], len(trace.held)))
    other = None
    if not done and not task_done(spec, trace.blocks[-1], int(trace.held[-1]), trace.bowls, trace.pad):
        for t in siblings:
            sib = task_spec(trace.scene, t)
            if t != task and not _is_prefix(sib, spec) and task_done(sib, trace.blocks[-1], int(trace.held[-1]),
                                                                      trace.bowls, trace.pad):
                other = int(t)
                break
    progress = 0.0 if other is not None else STAGE_WEIGHT * (approached + grasped + fraction + done)
    return EpisodeScore(trace.scene, task, trace.seed, float(progress), approached, grasped, fraction, done,
                        other is not None, other, first_block, int(dist.min(axis=0).argmin()),
                        float(dist[:, spec.obj].min()))


def siblings_of(scene: int, combos: list[str]) -> list[int]:
    """Task ids of ``combos`` ("scene:task") in ``scene``: the sibling tasks of a target there."""
    out = []
    for c in combos:
        s, t = (int(x) for x in c.split(":"))
        if s == scene:
            out.append(t)
    return out


def score_cell(traces: list[LoadedTrace], seen_combos: list[str] = ()) -> dict:
    """Rubric scores of a cell's episodes (each on its own task, siblings = seen combos of its scene),
    with per-stage rates. JSON-ready."""
    scores = [score_episode(tr, siblings=siblings_of(tr.scene, list(seen_combos))) for tr in traces]
    n = max(1, len(scores))
    return {"rubric_version": RUBRIC_VERSION, "episodes": len(scores),
            "mean_progress": float(np.mean([s.progress for s in scores])) if scores else 0.0,
            "rates": {k: sum(getattr(s, k) for s in scores) / n
                      for k in ("approached", "grasped", "done", "did_another_task")},
            "scores": [asdict(s) for s in scores]}
