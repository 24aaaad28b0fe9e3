"""The paper's experiments as sweeps of ordinary training runs (launch.sweep), plus evaluation.

Mini-world layout of one experiment (``ExperimentSpec.world``)::

    scenes x tasks combos; T = target combos (``targets``); F = robot finetune combos
    data/robot   robot episodes of every combo except T          (T never has robot data)
    data/human   human episodes of T only                        (the target is shown by humans)
    pretrain     robot, diversity_fraction f of the non-target combos (nested subsets, mixture.human=0)
    finetune     include_combos F + T, from the pretrain checkpoint of level f:
                 robot only (mixture.human=0) | robot + human (mixture.human=human_weight; 1 = 50/50)
    evaluate     the robot on T: closed-loop success (Wilson 95%) + offline action error on
                 held-out robot episodes of T

Every training run goes through ``launch.sweep.submit_sweep`` (local executor by default, SLURM
with ``--executor slurm``), so re-running a command skips finished runs and resumes interrupted
ones; evaluations are cached in each run dir (``eval_<tag>.json``, keyed by the evaluation settings).
A finetune run is an ordinary training run whose config sets ``train.init_from`` (the pretraining
checkpoint; empty for level 0). Run dirs made before that field carry an ``init_from.json`` instead;
``adopt_legacy_init`` moves it into their config.yaml before a re-run (see finetune.py).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megavla.config import ConfigError, config_from_mapping, to_dict
from megavla.config.core import apply_overrides, load
from megavla.config.shipped import resolve_preset
from megavla.data_shards.synth import EXPERT_VERSION, generate_episode

from . import closed_loop, offline
from .threads import inference_threads_scope
from .traces import save_traces, traces_path
from .videos import VideoRecorder, clear_videos, siblings_by_scene, videos_dir

log = logging.getLogger(__name__)

# EvalSpec fields that do not change an evaluation's numbers (left out of the eval cache key).
REPORT_ONLY_EVAL_KEYS = {"min_episodes_per_cell", "seen_reference_combos", "competence_threshold", "alpha",
                         "probe", "probe_episodes_per_combo", "probe_steps_per_episode", "cpu_threads",
                         "videos_per_outcome"}


@dataclass
class WorldSpec:
    scenes: int = 8
    tasks: int = 6
    robot_episodes_per_combo: int = 3
    # Robot episodes on each finetune combo (0 = robot_episodes_per_combo): the task-specific robot
    # data of the finetune stage; the competence gate is measured on these combos.
    finetune_episodes_per_combo: int = 0
    human_episodes_per_combo: int = 6
    # Positive control arm: robot demonstrations of each target (0 = as many as the human ones), in a
    # shard set of their own that only the control arm reads; start states disjoint from evaluation's.
    control_episodes_per_combo: int = 0
    # Target combos ("scene:task"): robot data never shows them; human data shows only them.
    targets: list[str] = field(default_factory=lambda: ["0:0", "0:1"])
    # Robot finetune combos; empty = the non-target combos of the target scenes.
    finetune_combos: list[str] = field(default_factory=list)
    image_size: int = 32
    seed: int = 0
    shard_size_mb: float = 8.0


@dataclass
class EvalSpec:
    # Closed-loop episodes per evaluated combo; a cell (one success rate in a report: a level x
    # condition over the targets, or the seen-combo gate) must total >= min_episodes_per_cell.
    episodes_per_combo: int = 20
    min_episodes_per_cell: int = 20
    max_steps: int = 90
    execute_k: int = 5
    flow_steps: int = 10
    # Scale of the flow's starting noise when evaluating (1 = sample as trained; 0 = deterministic).
    noise_scale: float = 1.0
    offline_episodes_per_combo: int = 2
    offline_steps_per_episode: int = 8
    motion_threshold: float = 0.1
    probe: bool = True
    probe_episodes_per_combo: int = 2
    probe_steps_per_episode: int = 6
    # Competence gate: each level's robot-only finetuned policy is evaluated on this many of its
    # (seen) finetune combos (0 = all of them); below competence_threshold success, the level gets
    # no transfer verdict (failing the targets says nothing about transfer if it fails seen tasks too).
    seen_reference_combos: int = 1
    competence_threshold: float = 0.6
    # Significance level of the robot+human vs robot comparison (two-sided Fisher exact test,
    # Holm-corrected across the gated levels).
    alpha: float = 0.05
    # torch CPU threads while evaluating: a tiny model's per-step matmuls are microseconds, and with
    # more threads than free cores OpenMP spin-waits dominate (measured: one closed-loop episode
    # 19 CPU-s with 2 threads on the loaded 2-core box, 0.56 CPU-s with 1). 0 = leave torch's setting;
    # null = the rule of every in-process inference (megavla/eval/threads.py): OMP_NUM_THREADS when set, else 1.
    cpu_threads: int | None = None
    # Rollout videos kept per evaluation cell (run x combos): the first k successes and the first k
    # failures (videos.py; ~30 KB per 35-step episode at 32 px). 0 = none. Filming leaves the numbers as they are.
    videos_per_outcome: int = 2

    def validate(self) -> None:
        if not 0.0 <= self.competence_threshold <= 1.0:
            raise ConfigError(f"eval.competence_threshold={self.competence_threshold} must be a success rate in [0, 1]")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"eval.alpha={self.alpha} must be in (0, 1), e.g. 0.05")
        if self.noise_scale < 0:
            raise ConfigError(f"eval.noise_scale={self.noise_scale} must be >= 0 (1 = as trained, 0 = deterministic)")
        if self.videos_per_outcome < 0:
            raise ConfigError(f"eval.videos_per_outcome={self.videos_per_outcome} must be >= 0 (0 = no videos)")
        if self.episodes_per_combo <= 0 or self.min_episodes_per_cell < 1 or self.seen_reference_combos < 0:
            raise ConfigError(f"eval.episodes_per_combo={self.episodes_per_combo} and eval.min_episodes_per_cell="
                              f"{self.min_episodes_per_cell} must be positive, eval.seen_reference_combos="
                              f"{self.seen_reference_combos} >= 0")


@dataclass
class ExperimentSpec:
    world: WorldSpec = field(default_factory=WorldSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    diversity_levels: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    pretrain_steps: int = 600
    finetune_steps: int = 300
    # mixture weight of the human source in co-finetuning, robot weighs 1 (1.0 = the paper's 50/50).
    human_weight: float = 1.0
    # Local executor: training runs of one sweep that run at the same time (each uses one CPU
    # thread for a tiny model; 2 keeps both cores of a 2-core box busy). SLURM: the array's
    # parallelism.
    parallel_runs: int = 2
    # Training config shared by every run (a mapping of the run config: data / model / train / launch).
    train_config: dict = field(default_factory=dict)
    # Dotted overrides for every run, applied last (knobs: data.cameras, data.chunk_length, ...).
    overrides: list[str] = field(default_factory=list)
    # Arms beside robot-only and robot+human (diversity experiment), at these diversity levels:
    # control = robot demonstrations of the targets instead of human ones (what this scale can learn
    # about the targets at all); grip = robot+human with data.human_gripper=closure.
    control_levels: list[float] = field(default_factory=lambda: [0.0, 1.0])
    grip_levels: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # Every arm of a level in seed_levels (empty = every level) is trained `seeds` times (pretraining
    # included): seed i sets train.seed and data.seed to the config's own + i; other levels train once.
    seeds: int = 1
    seed_levels: list[float] = field(default_factory=list)

    def validate(self) -> None:
        if not self.diversity_levels or any(not 0.0 <= f <= 1.0 for f in self.diversity_levels):
            raise ConfigError(f"diversity_levels={self.diversity_levels} must be fractions in [0, 1]")
        for name in ("control_levels", "grip_levels", "seed_levels"):
            extra = [f for f in getattr(self, name) if f not in self.diversity_levels]
            if extra:
                raise ConfigError(f"{name}={getattr(self, name)}: {extra} not among diversity_levels="
                                  f"{self.diversity_levels}; an arm runs at a level the experiment trains")
        if self.seeds < 1:
            raise ConfigError(f"seeds={self.seeds} must be >= 1 (training runs per arm)")
        # The run config every run starts from, checked by the run config's own rules (keys, values,
        # model vs data sizes) now rather than when the first sweep loads it, after the shard sets
        # were written (placeholder paths where the runs get the generated sets).
        try:
            config_from_mapping(run_config(self, {"robot": "robot", "human": "human", "tokenizers": "tokenizers"}, []))
        except ConfigError as e:
            raise ConfigError(f"train_config + overrides (every run's config): {e}") from None
        if not self.world.targets:
            raise ConfigError("world.targets is empty; name the target combos, e.g. ['0:0']")
        ev = self.eval
        for cell, combos in (("target", self.world.targets), ("seen-combo (competence gate)", seen_combos(self))):
            if combos and ev.episodes_per_combo * len(combos) < ev.min_episodes_per_cell:
                raise ConfigError(
                    f"eval.episodes_per_combo={ev.episodes_per_combo} x {len(combos)} {cell} combos = "
                    f"{ev.episodes_per_combo * len(combos)} closed-loop episodes per cell, below "
                    f"eval.min_episodes_per_cell={ev.min_episodes_per_cell}: a success rate from so few "
                    "episodes cannot separate the conditions. Raise eval.episodes_per_combo (or, for a "
                    "smoke test only, lower eval.min_episodes_per_cell)")


def load_spec(preset: str | Path, overrides: list[str] = ()) -> ExperimentSpec:
    """A preset name (configs/experiments/<name>.yaml, shipped as megavla.configs) or a YAML path, plus
    dotted overrides: the run config's loader (megavla.config.core.load), so the same override syntax,
    unknown-key errors and messages."""
    return load(ExperimentSpec, resolve_preset("experiments", preset), overrides)


# ------------------------------------------------------------------------------------ data ----
def all_combos(world: WorldSpec) -> list[str]:
    return [f"{s}:{t}" for s in range(world.scenes) for t in range(world.tasks)]


def finetune_combos(world: WorldSpec) -> list[str]:
    if world.finetune_combos:
        return list(world.finetune_combos)
    scenes = {closed_loop.parse_combo(c)[0] for c in world.targets}
    return [c for c in all_combos(world) if c not in world.targets and closed_loop.parse_combo(c)[0] in scenes]


def seen_combos(spec: ExperimentSpec) -> list[str]:
    """The finetune combos the competence gate evaluates (eval.seen_reference_combos of them; 0 = all)."""
    combos = finetune_combos(spec.world)
    n = spec.eval.seen_reference_combos
    return combos[:n] if n else combos


def _write_set(out: Path, embodiment: str, combos: list[str], per_combo: int, world: WorldSpec,
               more: dict[str, int] | None = None, forbid_world_seeds: set[int] = frozenset()) -> Path:
    """``per_combo`` episodes of every combo, ``more[combo]`` where given; an episode whose world seed
    (its start state) is in ``forbid_world_seeds`` stops the write with an error."""
    from megavla.data_shards.writer import ShardSetWriter
    more = {c: n for c, n in (more or {}).items() if n != per_combo}
    generator = {"generator": "megavla.eval.experiments (data_shards.synth.generate_episode)",
                 "embodiment": embodiment, "combos": combos, "episodes_per_combo": per_combo,
                 "image_size": world.image_size, "seed": world.seed, "expert_version": EXPERT_VERSION}
    if more:
        generator["episodes_per_combo_override"] = more
    if (out / "manifest.json").is_file():
        stored = json.loads((out / "manifest.json").read_text()).get("generator")
        if stored != generator:
            raise ConfigError(f"{out}: holds a shard set made with other world settings ({stored}); the "
                              f"spec asks for {generator}. Use a new --out for a changed world")
        log.info("data: %s exists with the same settings; reused", out)
        return out
    with ShardSetWriter(out, target_shard_bytes=int(world.shard_size_mb * 2**20), generator=generator,
                        overwrite=True) as writer:
        for combo in combos:
            s, t = closed_loop.parse_combo(combo)
            for e in range(more.get(combo, per_combo)):
                ep = generate_episode(embodiment, s, t, e, image_size=world.image_size, seed=world.seed)
                if ep.extra["world_seed"] in forbid_world_seeds:
                    raise ConfigError(f"{out}: episode {e} of {combo} would start from world seed "
                                      f"{ep.extra['world_seed']}, an evaluation start state; change world.seed")
                writer.write(ep)
    return out


def prepare_data(spec: ExperimentSpec, root: Path) -> dict[str, str]:
    """Shard sets + tokenizers (FAST trained for the runs' chunk length) under ``root``; the
    positive-control set is arms.prepare_data's (the experiment commands call that)."""
    from megavla.tokenizers.pair import train_tokenizers
    world = spec.world
    universe = all_combos(world)
    bad = [c for c in world.targets + finetune_combos(world) if c not in universe]
    if bad:
        raise ConfigError(f"world.targets / finetune_combos {bad} are outside the {world.scenes} x "
                          f"{world.tasks} world")
    robot = _write_set(root / "robot", "robot/arm", [c for c in universe if c not in world.targets],
                       world.robot_episodes_per_combo, world,
                       {c: world.finetune_episodes_per_combo for c in finetune_combos(world)
                        if world.finetune_episodes_per_combo > 0})
    human = _write_set(root / "human", "human/ego", list(world.targets), world.human_episodes_per_combo, world)
    chunk = int(run_config(spec, {}, []).get("data", {}).get("chunk_length", 10))
    tok = root / f"tokenizers_H{chunk}"
    if not (tok / "fast.json").is_file():
        train_tokenizers([robot, human], tok, chunk_length=chunk)
    return {"robot": str(robot), "human": str(human), "tokenizers": str(tok)}


# ---------------------------------------------------------------------------------- sweeps ----
def run_config(spec: ExperimentSpec, data: dict, extra: list[str]) -> dict:
    """The mapping every run starts from: spec.train_config + data paths + overrides."""
    base = json.loads(json.dumps(spec.train_config))
    if data:
        base.setdefault("data", {})["sources"] = {"robot": data["robot"], "human": data["human"]}
        base.setdefault("train", {})["tokenizer_dir"] = data["tokenizers"]
    mapping = apply_overrides(base, [*extra, *spec.overrides])
    # The model's chunk length must follow the data's (a knob given as data.chunk_length).
    if "chunk_length" in mapping.get("data", {}):
        mapping.setdefault("model", {})["chunk_length"] = mapping["data"]["chunk_length"]
    return mapping


def write_sweep(path: Path, base: dict, out_dir: Path, grid: dict, overrides: list[str]) -> Path:
    """A sweep file for launch.sweep (base config written beside it): the exact configs used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    base_file = path.with_name(path.stem + ".base.yaml")
    base_file.write_text(yaml.safe_dump(base, sort_keys=False))
    path.write_text(yaml.safe_dump({"base": base_file.name, "out_dir": str(out_dir.resolve()),
                                    "overrides": overrides, "grid": grid}, sort_keys=False))
    return path


def run_sweep(path: Path, launch_overrides: list[str], parallel: int = 1) -> list:
    """Submit (local: run, ``parallel`` at a time) the sweep's unfinished runs; returns its SweepRun list."""
    from megavla.launch.sweep import expand, submit_sweep
    submit_sweep(path, launch_overrides, array_parallelism=parallel)
    return expand(path, launch_overrides)[1]


def finished_checkpoint(run) -> Path:
    from megavla.launch import rundir
    run_dir = Path(run.cfg.train.run_dir)
    ckpt = rundir.latest_checkpoint(run_dir)
    if ckpt is None or ckpt[1] < run.cfg.train.steps:
        if run.cfg.launch.executor == "slurm" and rundir.run_state(run_dir, run.cfg.train.steps) in ("queued", "running"):
            raise RuntimeError(f"run {run_dir} is queued or running on SLURM; re-run this command once "
                               f"`megavla sweep status {run_dir.parent}` shows it finished")
        raise RuntimeError(f"run {run_dir} did not finish (checkpoint {ckpt}); see its submitit/ logs "
                           f"and re-run the command to resume it")
    return run_dir / "checkpoints" / ckpt[0]


def seed_overrides(spec: ExperimentSpec, index: int) -> list[str]:
    """Training run ``index`` of an arm: train.seed and data.seed (model init and noise; data order)
    are the config's own + index; index 0 is the config as written (no override)."""
    if index == 0:
        return []
    cfg = run_config(spec, {}, [])
    return [f"train.seed={int(cfg.get('train', {}).get('seed', 0)) + index}",
            f"data.seed={int(cfg.get('data', {}).get('seed', 0)) + index}"]


def seed_suffix(index: int) -> str:
    return "" if index == 0 else f"_seed-{index}"


def pretrain(spec: ExperimentSpec, data: dict, root: Path, levels: list[float], launch: list[str],
             seed_index: int = 0) -> dict:
    """{level: checkpoint dir or None (level 0 = no pretraining)}, for training seed ``seed_index``."""
    out: dict = {level: None for level in levels if level <= 0.0}
    positive = sorted({float(level) for level in levels if level > 0.0})
    if positive:
        base = run_config(spec, data, [f"train.steps={spec.pretrain_steps}", "data.mixture.robot=1.0",
                                       "data.mixture.human=0.0", *seed_overrides(spec, seed_index)])
        suffix = seed_suffix(seed_index)
        sweep = write_sweep(root / "sweeps" / f"pretrain{suffix}.yaml", base, root / "runs" / f"pretrain{suffix}",
                            {"data.diversity_fraction": positive}, [])
        for run in run_sweep(sweep, launch, spec.parallel_runs):
            out[run.cfg.data.diversity_fraction] = finished_checkpoint(run)
    return out


def finetune_config(spec: ExperimentSpec, data: dict, extra: list[str], sources: dict | None = None,
                    init: Path | None = None) -> dict:
    """The base config of a finetune sweep: robot F + human T data (plus ``sources``), ``extra``
    overrides, initial weights from ``init`` (``train.init_from``; None: random initial weights)."""
    base = run_config(spec, data, [f"train.steps={spec.finetune_steps}", "data.mixture.robot=1.0", *extra])
    base.setdefault("data", {})["include_combos"] = sorted(set(finetune_combos(spec.world)) | set(spec.world.targets))
    base["data"].setdefault("sources", {}).update(sources or {})
    if init is not None:
        base.setdefault("train", {})["init_from"] = str(init)
    return base


def finetune(spec: ExperimentSpec, data: dict, root: Path, name: str, init: Path | None,
             grid: dict, extra: list[str], launch: list[str], sources: dict | None = None) -> list:
    """One finetune sweep (robot F + human T data, plus ``sources``) initialised from ``init``; returns its runs."""
    base = finetune_config(spec, data, extra, sources, init)
    out_dir = root / "runs" / "finetune" / name
    sweep = write_sweep(root / "sweeps" / f"finetune_{name}.yaml", base, out_dir, grid, [])
    from megavla.launch.sweep import expand

    from .finetune import adopt_legacy_init
    for run in expand(sweep, launch)[1]:
        adopt_legacy_init(run.cfg.train.run_dir, run.cfg.train.steps)
    runs = run_sweep(sweep, launch, spec.parallel_runs)
    for run in runs:
        finished_checkpoint(run)
    return runs


# ------------------------------------------------------------------------------ evaluation ----
def evaluate_run(spec: ExperimentSpec, run_dir: Path, combos: list[str], subtask: bool = False,
                 tag: str = "targets") -> dict:
    """Closed-loop success + offline error of one finished run on ``combos`` (cached in
    ``eval_<tag>.json``; recomputed when the evaluation settings change)."""
    from .policy import resolve_checkpoint_dir
    ev = spec.eval
    # The checkpoint is part of the key: a run resumed to more steps is evaluated again.
    # Only settings that change the numbers: a new gate threshold or alpha must not re-run episodes.
    settings = {"combos": combos, "subtask": subtask, "checkpoint": str(resolve_checkpoint_dir(run_dir)),
                **{k: v for k, v in to_dict(ev).items() if k not in REPORT_ONLY_EVAL_KEYS}}
    cache = run_dir / f"eval_{tag}.json"
    trace_file, video_dir = traces_path(cache), videos_dir(cache)
    if cache.is_file():
        saved = json.loads(cache.read_text())
        # An evaluation without its per-step traces (older runs) is run again: the progress rubric needs them;
        # so is one without the videos asked for (a changed eval.videos_per_outcome, or deleted files).
        if (saved.get("settings") == settings and trace_file.is_file()
                and saved.get("videos_per_outcome", 0) == ev.videos_per_outcome
                and all((run_dir / v["file"]).is_file() for v in saved.get("videos", []))):
            return saved
    traces: list = []
    recorder = None
    if ev.videos_per_outcome:
        clear_videos(video_dir)  # siblings: the seen tasks whose completion is "did another task" (rubric)
        recorder = VideoRecorder(video_dir, per_outcome=ev.videos_per_outcome,
                                 siblings=siblings_by_scene(finetune_combos(spec.world)))
    with inference_threads_scope(ev.cpu_threads):
        result = _evaluate(spec, run_dir, combos, subtask, settings, traces, recorder)
    save_traces(traces, trace_file)
    result["traces"] = trace_file.name
    result["videos_per_outcome"], result["videos"] = ev.videos_per_outcome, recorder.videos if recorder else []
    cache.write_text(json.dumps(result, indent=1))
    return result


def _evaluate(spec: ExperimentSpec, run_dir: Path, combos: list[str], subtask: bool, settings: dict,
              traces: list, videos=None) -> dict:
    from .policy import VLAPolicy, load_checkpoint
    ev = spec.eval
    loaded = load_checkpoint(run_dir)
    image_size = loaded.cfg.data.image_size
    execute_k = min(ev.execute_k, loaded.cfg.data.chunk_length)  # a short chunk (knob H) caps k
    if execute_k != ev.execute_k:
        log.info("%s: executing %d actions per chunk (chunk length %d < eval.execute_k=%d)", run_dir,
                 execute_k, loaded.cfg.data.chunk_length, ev.execute_k)
    policy = VLAPolicy(loaded, execute_k=execute_k, num_steps=ev.flow_steps, noise_scale=ev.noise_scale)
    result = {"settings": settings, "run_dir": str(run_dir), "checkpoint": str(loaded.path), "step": loaded.step,
              "weights": loaded.weights}
    result["closed_loop"] = closed_loop.evaluate(policy, combos, ev.episodes_per_combo, image_size=image_size,
                                                 max_steps=ev.max_steps, traces=traces, videos=videos)
    episodes = offline.heldout_episodes(combos, ev.offline_episodes_per_combo, image_size=image_size,
                                        cameras=tuple(loaded.cfg.data.cameras))
    result["offline"] = offline.evaluate_offline(loaded, episodes, ev.offline_steps_per_episode, ev.flow_steps,
                                                 subtask=subtask, motion_threshold=ev.motion_threshold,
                                                 noise_scale=ev.noise_scale)
    return result
