"""What each pretraining-diversity level shows the robot of the targets' parts (the diversity report).

Diversity can only help transfer through what the extra pretraining combos teach. A mini-world task is
a motion (pick_place / push / pick), an instructed block and, for pick_place / push, a goal (a bowl or the
pad), each named by a colour word. For every level and target this counts the robot pretraining combos
(the same ``select_combos`` draw the pretrain runs make) that share each part with the target: the block's
colour instructed, the colour merely present in the scene, the motion, motion + colour, the goal's colour
as the goal, motion + goal, and the exact instruction. Counted from the world's definition, so it needs
no run and is the same for every seed.
"""
from __future__ import annotations

from dataclasses import dataclass

from megavla.data.mixture import select_combos
from megavla.data_shards.miniworld import scene_spec, task_spec

from .closed_loop import parse_combo

PARTS = ("colour", "colour in scene", "motion", "motion + colour", "goal", "motion + goal", "instruction")


@dataclass(frozen=True)
class TaskParts:
    motion: str
    colour: str  # the instructed block's colour word
    goal: str  # the goal's colour word ("" for pick)
    instruction: str
    scene_colours: frozenset  # every object colour in the scene


def task_parts(combo: str) -> TaskParts:
    scene, task = parse_combo(combo)
    spec, ts = scene_spec(scene), task_spec(scene, task)
    return TaskParts(ts.kind, spec.colors[ts.obj], spec.colors[ts.target] if ts.target >= 0 else "",
                     ts.instruction, frozenset(spec.colors))


def shared_parts(target: TaskParts, combos: list[str]) -> dict[str, int]:
    """{part: number of ``combos`` sharing it with ``target``} (PARTS order)."""
    seen = [task_parts(c) for c in combos]
    has_goal = bool(target.goal)
    return {"colour": sum(p.colour == target.colour for p in seen),
            "colour in scene": sum(target.colour in p.scene_colours for p in seen),
            "motion": sum(p.motion == target.motion for p in seen),
            "motion + colour": sum(p.motion == target.motion and p.colour == target.colour for p in seen),
            "goal": sum(has_goal and p.goal == target.goal for p in seen),
            "motion + goal": sum(has_goal and p.motion == target.motion and p.goal == target.goal for p in seen),
            "instruction": sum(p.instruction == target.instruction for p in seen)}


def pretrain_combos(universe: list[str], level: float, data_cfg: dict) -> list[str]:
    """The combos a pretrain run at ``level`` keeps (data.diversity_seed / include / exclude as configured)."""
    return sorted(select_combos(universe, level, int(data_cfg.get("diversity_seed", 0)),
                                data_cfg.get("include_combos") or (), data_cfg.get("exclude_combos") or ()))


def coverage_rows(targets: list[str], universe: list[str], levels: list[float], data_cfg: dict) -> list[dict]:
    """One row per (level, target): the pretraining combo count and the shared-part counts."""
    rows = []
    for level in sorted(levels):
        combos = pretrain_combos(universe, level, data_cfg) if level > 0 else []
        for target in targets:
            parts = task_parts(target)
            rows.append({"level": level, "target": target, "task": parts.instruction, "has_goal": bool(parts.goal),
                         "pretrain_combos": len(combos), **shared_parts(parts, combos)})
    return rows


def coverage_markdown(rows: list[dict]) -> str:
    head = ["pretrain diversity", "combos", "target", *PARTS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['level']:.0%}", r["pretrain_combos"], f"{r['target']} ({r['task']})",
                 *[r[p] if r["has_goal"] or p not in ("goal", "motion + goal") else "n/a" for p in PARTS]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
