"""``megavla experiment competence RUN``: where a policy's grasps land, and whether it looks.

Per combo, from closed-loop episodes on the evaluation's own start states (traces.py):

* **closing point**: where the grasp point is when the gripper command first crosses 0.5 (pick and
  pick-place; a push closes at the start, so its line gives the closest low pass by the block),
  relative to the instructed block: horizontal distance (median, and the share inside the world's
  2.5 cm grasp window) and the height above the block's centre.
* **jitter slope**: the horizontal closing error (close point - block) regressed on the block's
  per-episode jitter (its start - its scene's nominal spot), x and y pooled, each centred. -1: the
  arm goes where the block usually is (it does not look); 0: it follows the block (it looks).
* **colour-word swap sensitivity**: at each episode's start, the predicted chunk (normalized units,
  mean |Δ| over the chunk and the arm's pose dims) when the instructed block's colour word is
  replaced by each other block colour of the scene, beside the same for the verb ("put" <-> "push",
  "pick up" -> "push"), the reference of a word the data certainly made it read.
"""
from __future__ import annotations

import logging

import numpy as np
from scipy import stats as sps

from megavla.data_shards.miniworld import BLOCK_HALF, MiniWorld, scene_spec, task_spec

from . import closed_loop
from .traces import LoadedTrace

log = logging.getLogger(__name__)

GRASP_WINDOW = 0.025  # MiniWorld._gripper: a close within 2.5 cm (horizontal and vertical) grasps
POSE_DIMS = slice(0, 6)


def closing_error(trace: LoadedTrace) -> dict | None:
    """{"row", "offset" [3] (grasp point - instructed block), "jitter" [2]} of the first close, or of
    the closest low pass for a push; None when the gripper never closes / never passes low."""
    spec = task_spec(trace.scene, trace.task)
    block = trace.blocks[:, spec.obj, :3].astype(np.float64)
    grip = trace.ee[:, :3].astype(np.float64)
    if spec.kind == "push":
        low = np.flatnonzero(grip[:, 2] <= 2 * BLOCK_HALF + 0.005)
        if not len(low):
            return None
        row = int(low[np.argmin(np.linalg.norm(grip[low, :2] - block[low, :2], axis=-1))])
    else:
        cmd = trace.gripper_cmd
        closes = np.flatnonzero((cmd[1:] >= 0.5) & (cmd[:-1] < 0.5)) + 1
        if not len(closes):
            return None
        row = int(closes[0])
    nominal = scene_spec(trace.scene).positions[spec.obj]
    # The close is decided with the block where it was before the step (a grasp moves nothing).
    before = max(row - 1, 0)
    return {"row": row, "offset": grip[row] - block[before], "jitter": block[0, :2] - nominal}


def jitter_slope(errors: list[dict]) -> dict:
    """OLS slope of the horizontal closing error on the block's jitter, x and y pooled, each centred."""
    if len(errors) < 3:
        return {"slope": None, "stderr": None, "n": len(errors)}
    err = np.array([e["offset"][:2] for e in errors])
    jit = np.array([e["jitter"] for e in errors])
    x = (jit - jit.mean(0)).reshape(-1)
    y = (err - err.mean(0)).reshape(-1)
    if np.allclose(x, 0):
        return {"slope": None, "stderr": None, "n": len(errors)}
    fit = sps.linregress(x, y)
    return {"slope": float(fit.slope), "stderr": float(fit.stderr), "n": len(errors)}


def swap_instructions(scene: int, task: int) -> dict[str, list[str]]:
    """{"colour": instructions with the instructed block's colour replaced, "verb": with the verb replaced}."""
    spec, colours = task_spec(scene, task), scene_spec(scene).colors
    own = colours[spec.obj]
    colour = [spec.instruction.replace(f"{own} block", f"{c} block") for b, c in enumerate(colours[:3]) if b != spec.obj]
    verbs = {"pick_place": ("put the", "push the"), "push": ("push the", "put the"), "pick": ("pick up the", "push the")}
    old, new = verbs[spec.kind]
    return {"colour": colour, "verb": [spec.instruction.replace(old, new, 1)]}


def swap_sensitivity(policy, loaded, combo: str, seeds: list[int], image_size: int) -> dict[str, float]:
    """Mean |Δ chunk| (normalized units, pose dims) at the start states ``seeds`` per kind of swap."""
    scene, task = closed_loop.parse_combo(combo)
    out: dict[str, list[float]] = {"colour": [], "verb": []}
    for seed in seeds:
        world = MiniWorld(scene, task, seed=seed, image_size=image_size)
        base = _normalized(loaded, policy.plan(world), world.embodiment)
        for kind, texts in swap_instructions(scene, task).items():
            for text in texts:
                world.instruction = text
                other = _normalized(loaded, policy.plan(world), world.embodiment)
                out[kind].append(float(np.abs(other - base)[:, POSE_DIMS].mean()))
            world.instruction = task_spec(scene, task).instruction
    return {k: float(np.mean(v)) for k, v in out.items() if v}


def _normalized(loaded, chunk: np.ndarray, embodiment: str) -> np.ndarray:
    return chunk if loaded.normalizer is None else np.asarray(loaded.normalizer.normalize(chunk, embodiment))


def combo_competence(traces: list[LoadedTrace]) -> dict:
    """The closing-point and jitter numbers of one combo's traces."""
    errors = [e for e in (closing_error(t) for t in traces) if e is not None]
    horizontal = [float(np.linalg.norm(e["offset"][:2])) for e in errors]
    return {"episodes": len(traces), "successes": sum(t.success for t in traces),
            "kind": task_spec(traces[0].scene, traces[0].task).kind, "closes": len(errors),
            "median_close_distance": float(np.median(horizontal)) if horizontal else None,
            "within_grasp_window": (sum(h < GRASP_WINDOW for h in horizontal) / len(horizontal)) if horizontal else None,
            "median_height_above_block": float(np.median([e["offset"][2] for e in errors])) if errors else None,
            "jitter": jitter_slope(errors)}


def competence(run: str, combos: list[str], episodes_per_combo: int, *, execute_k: int = 5, flow_steps: int = 10,
               noise_scale: float = 0.0, max_steps: int = 90, swap_episodes: int = 3) -> dict:
    """Closed-loop episodes of ``run`` on ``combos`` (the evaluation's start states), traced and measured."""
    from .policy import VLAPolicy, load_checkpoint
    loaded = load_checkpoint(run)
    size = loaded.cfg.data.image_size
    policy = VLAPolicy(loaded, execute_k=min(execute_k, loaded.cfg.data.chunk_length), num_steps=flow_steps,
                       noise_scale=noise_scale)
    out = {"run": str(run), "checkpoint": str(loaded.path), "step": loaded.step, "combos": {}}
    for combo in combos:
        traces: list = []
        closed_loop.evaluate(policy, [combo], episodes_per_combo, image_size=size, max_steps=max_steps,
                             progress=False, traces=traces)
        loaded_traces = [t.loaded() for t in traces]
        entry = combo_competence(loaded_traces)
        seeds = sorted(closed_loop.eval_seeds(min(swap_episodes, episodes_per_combo)))
        entry["swap_sensitivity"] = swap_sensitivity(policy, loaded, combo, seeds, size)
        out["combos"][combo] = entry
    return out


def competence_lines(result: dict) -> list[str]:
    """The command's printed table, one line per combo (distances in cm)."""
    def cm(v, spec=".1f"):
        return "n/a" if v is None else f"{100 * v:{spec}} cm"

    def num(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [f"competence of {result['checkpoint']} (step {result['step']})",
             "combo  kind        success  closes  median close dist  in 2.5 cm  height above  jitter slope (±se, n)"
             "  colour swap  verb swap"]
    for combo, e in result["combos"].items():
        j, s = e["jitter"], e["swap_sensitivity"]
        slope = "n/a" if j["slope"] is None else f"{j['slope']:+.2f} (±{j['stderr']:.2f}, {j['n']})"
        lines.append(f"{combo:<6} {e['kind']:<11} {str(e['successes']) + '/' + str(e['episodes']):<8} "
                     f"{e['closes']:<7} {cm(e['median_close_distance']):<18} {num(e['within_grasp_window'], '.2f'):<10} "
                     f"{cm(e['median_height_above_block'], '+.1f'):<13} {slope:<22} "
                     f"{num(s.get('colour'), '.4f'):<12} {num(s.get('verb'), '.4f')}")
    return lines
