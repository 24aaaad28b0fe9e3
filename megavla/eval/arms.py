"""The diversity experiment's arms, seeds and positive-control data.

Per diversity level and training seed, from that seed's pretraining checkpoint of the level:

    robot              finetune on robot data of the finetune combos (mixture.human = 0)
    robot+human        + human data of the targets (mixture.human = human_weight)
    robot+human+grip   the same with data.human_gripper=closure          (levels in grip_levels)
    control            robot demonstrations of the targets instead of    (levels in control_levels)
                       human ones, as many episodes and the same weight: the positive control, what
                       this scale can learn about the targets when the robot itself shows them

Seed i of a level in ``seed_levels`` sets train.seed and data.seed to the config's own + i, for its
pretraining and every arm (experiments.seed_overrides); run and sweep names get ``_seed-i``; seed 0
is the config as written, so a one-seed experiment names its runs as before.
"""
from __future__ import annotations

import logging
from pathlib import Path

from megavla.config import ConfigError
from megavla.data_shards.synth import episode_rng

from . import closed_loop, offline
from . import experiments as ex
from .stats import wilson_interval

log = logging.getLogger(__name__)

ARMS = ("robot", "robot+human", "robot+human+grip", "control")


def control_episodes_per_combo(world: ex.WorldSpec) -> int:
    return world.control_episodes_per_combo or world.human_episodes_per_combo


def forbidden_start_seeds(spec: ex.ExperimentSpec) -> set[int]:
    """World seeds of every evaluation start state (closed loop) and held-out offline episode of the
    targets: positive-control demonstrations must not show any of them."""
    world, ev = spec.world, spec.eval
    seeds = closed_loop.eval_seeds(ev.episodes_per_combo)
    for combo in world.targets:
        for e in range(ev.offline_episodes_per_combo):
            rng = episode_rng("robot/arm", *closed_loop.parse_combo(combo), e, offline.HELDOUT_SEED)
            seeds.add(int(rng.integers(2**31)))  # synth.rollout's first draw: the episode's world seed
    return seeds


def prepare_data(spec: ex.ExperimentSpec, root: Path) -> dict[str, str]:
    """experiments.prepare_data (robot + human shard sets, tokenizers) plus, when the spec has
    control_levels, the positive-control set (``data["control"]``): what `megavla experiment`
    trains on. Here, not in experiments.py, because the control set is this module's."""
    data = ex.prepare_data(spec, root)
    if spec.control_levels:
        data["control"] = str(write_control_set(spec, root / "control"))
    return data


def write_control_set(spec: ex.ExperimentSpec, out: Path) -> Path:
    """Robot demonstrations of the targets for the positive control arm (refused if one would start
    where an evaluation episode starts)."""
    world = spec.world
    return ex._write_set(out, "robot/arm", list(world.targets), control_episodes_per_combo(world), world,
                      forbid_world_seeds=forbidden_start_seeds(spec))


def seeds_at(spec: ex.ExperimentSpec, level: float) -> int:
    """Training runs per arm at ``level``."""
    return spec.seeds if not spec.seed_levels or level in spec.seed_levels else 1


def arm_sweeps(spec: ex.ExperimentSpec, level: float, seed_index: int, data: dict) -> list[dict]:
    """The finetune sweeps of one level and seed: name, grid, extra overrides, extra sources."""
    seed, suffix, w = ex.seed_overrides(spec, seed_index), ex.seed_suffix(seed_index), spec.human_weight
    out = [{"name": f"div-{level:g}{suffix}", "grid": {"data.mixture.human": [0.0, w]}, "extra": seed, "sources": {}}]
    if level in spec.grip_levels:
        out.append({"name": f"div-{level:g}_grip{suffix}", "grid": {"data.mixture.human": [w]},
                    "extra": ["data.human_gripper=closure", *seed], "sources": {}})
    if level in spec.control_levels:
        if "control" not in data:
            raise ConfigError("control_levels is set but the data has no control set; rerun prepare_data")
        out.append({"name": f"div-{level:g}_control{suffix}", "grid": {"data.mixture.control": [w]},
                    "extra": ["data.mixture.human=0.0", *seed], "sources": {"control": data["control"]}})
    return out


def arm_of(cfg) -> str:
    """Which arm a finished run's config belongs to."""
    if cfg.data.mixture.get("control", 0.0) > 0.0:
        return "control"
    if cfg.data.mixture.get("human", 0.0) == 0.0:
        return "robot"
    return "robot+human+grip" if cfg.data.human_gripper == "closure" else "robot+human"


def run_level(spec: ex.ExperimentSpec, data: dict, root: Path, level: float, inits: list, launch: list[str]
              ) -> dict[str, list[Path]]:
    """Train every arm of ``level`` for each seed (``inits[i]``: seed i's pretraining checkpoint or
    None); {arm: [run dir per seed]}. A sweep of several runs takes ``parallel_runs`` at a time; the
    one-run sweeps (grip, control) run ``parallel_runs`` sweeps at a time, so no core idles on them."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(init, sweep) for i, init in enumerate(inits) for sweep in arm_sweeps(spec, level, i, data)]

    def train(job):
        init, sweep = job
        return ex.finetune(spec, data, root, sweep["name"], init, sweep["grid"], sweep["extra"], launch,
                           sources=sweep["sources"])

    single = [len(next(iter(job[1]["grid"].values()))) == 1 and len(job[1]["grid"]) == 1 for job in jobs]
    results: list = [None] * len(jobs)
    for k, job in enumerate(jobs):
        if not single[k]:
            results[k] = train(job)
    with ThreadPoolExecutor(max_workers=max(1, spec.parallel_runs)) as pool:
        done = pool.map(train, [job for job, one in zip(jobs, single) if one])
        for k in [k for k, one in enumerate(single) if one]:
            results[k] = next(done)
    runs: dict[str, list[Path]] = {}
    for sweep_runs in results:
        for run in sweep_runs:
            runs.setdefault(arm_of(run.cfg), []).append(Path(run.cfg.train.run_dir))
    return runs


def pool_evals(evals: list[dict]) -> dict:
    """One evaluation of an arm from its seeds' evaluations: closed-loop counts pooled (each episode
    tagged with its training seed, ``run_seed``), offline errors averaged. One seed: as it is."""
    if len(evals) == 1:
        return evals[0]
    detail = [{**e, "run_seed": i} for i, ev in enumerate(evals) for e in ev["closed_loop"]["episodes_detail"]]
    k, n = sum(e["success"] for e in detail), len(detail)
    per_combo: dict[str, list] = {}
    for e in detail:
        per_combo.setdefault(f"{e['scene']}:{e['task']}", []).append(e["success"])
    block = lambda s, m: {"successes": s, "episodes": m, "success_rate": s / m, "ci95": list(wilson_interval(s, m))}  # noqa: E731
    offs = [ev["offline"] for ev in evals]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"run_dir": evals[0]["run_dir"], "run_dirs": [ev["run_dir"] for ev in evals], "seeds": len(evals),
            "closed_loop": {**block(k, n), "per_combo": {c: block(sum(v), len(v)) for c, v in per_combo.items()},
                            "episodes_detail": detail},
            "offline": {"action_mse": mean([o["action_mse"] for o in offs]),
                        "baselines": {b: mean([o.get("baselines", {}).get(b, float("nan")) for o in offs])
                                      for b in offs[0].get("baselines", {})}}}
