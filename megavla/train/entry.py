"""`run(cfg, resume)`: the per-process training entry point.

The same function runs under our local launcher (`megavla train --nproc N`), torchrun, or a SLURM
task (the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT and calls it on every
rank). Returns the process exit code: 0 done, EXIT_SIGNAL_SAVED (75) after a SIGUSR2 (preemption)
checkpoint (requeue + `--resume auto`), 128 + signal after a SIGINT/SIGTERM stop (checkpoint saved,
no requeue). What the user must fix raises a TrainingError (errors.py) on every rank.

Resume at another world size (or ZeRO stage): the checkpoint is converted once with DeepSpeed's
`ds_to_universal` (cached in `checkpoints/.universal/<tag>`) and loaded with
`checkpoint.load_universal`. Model and optimizer states carry over exactly; the per-rank loader
states cannot (they are streams of the old ranks), so the loader restarts with seed
`data.seed + step` (logged) and RNG states are reseeded per rank.
"""
from __future__ import annotations

import gc
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Callable

if __name__ == "__main__":      # a training worker process (the local launcher's command)
    gc.disable()
import torch
if __name__ == "__main__":
    # torch's ~250k module-level objects live as long as the process. Without this, the cyclic GC
    # scans them in each full collection: 3 of ~0.04 CPU-s while torch imports, more while the
    # rest imports and trains (issue 16: launch). Frozen, they are never scanned; what torch's import
    # left in cycles (~7k small objects) is kept. See gc.freeze: fork()ed loader workers share them.
    gc.freeze()
    gc.enable()

from megavla.config import Config, ConfigError, to_dict, write_yaml
from megavla.fileio import atomic_write_json

from . import checkpoint as ckpt
from .adapters import apply_lora_for_training, check_same_adapters, restore_frozen_parameters
from .engine import DistInfo, build_partitioned, create_engine, init_distributed, seed_everything, shutdown_distributed
from .metrics import LaunchClock
from .host_memory import end_build_phase, set_mmap_threshold, start_build_phase
from .errors import EXIT_TRAINING_ERROR, ResumeError, RunDirBusy, TrainingError
from .resume import ResumePlan, clear_run, plan_resume
from .run_lock import RunLock
from .optim import EMA, apply_freeze, set_schedule_step
from .safe_load import check_files, deepspeed_loads_are_safe
from .stop import EXIT_OK, EXIT_SIGNAL_SAVED  # noqa: F401 (exit codes: the launcher reads them here)
from .train_state import TrainState, batch_change, batch_layout
from .trainer import Trainer, mask_accounting

log = logging.getLogger("megavla.train.entry")   # also when run as __main__

ModelFactory = Callable[[Config], torch.nn.Module]
LoaderFactory = Callable[..., Any]   # (cfg, rank, world_size, seed, split) -> loader


def default_model_factory(cfg: Config) -> torch.nn.Module:
    from megavla.model.vla import build_model
    return build_model(cfg.model)


def load_tokenizers(cfg: Config):
    if not cfg.train.tokenizer_dir:
        return None, None
    from megavla.tokenizers.pair import load_tokenizers as load
    return load(cfg.train.tokenizer_dir)


def check_subtask_eos(cfg: Config, text_tok) -> None:
    """Subtask targets end in the text tokenizer's EOS; inference stops decoding the subtask at
    model.subtask_eos_id. If they differ, inference would decode past the subtask the actions were
    trained on (action_conditioning=subtask) and the subtask metrics would never see an end."""
    if text_tok is None or text_tok.eos_id < 0 or text_tok.eos_id == cfg.model.subtask_eos_id:
        return
    raise ConfigError(f"{cfg.train.tokenizer_dir}: the text tokenizer's eos_id is {text_tok.eos_id} but "
                      f"model.subtask_eos_id={cfg.model.subtask_eos_id}; set model.subtask_eos_id="
                      f"{text_tok.eos_id}")


def default_loader_factory(cfg: Config, rank: int, world_size: int, seed: int | None = None,
                           split: str = "train"):
    from megavla.data.pipeline import build_loader
    text_tok, fast_tok = load_tokenizers(cfg)
    check_subtask_eos(cfg, text_tok)
    from megavla.data.prompt import model_state_mode
    return build_loader(cfg.data, text_tok, fast_tok, rank=rank, world_size=world_size, seed=seed, split=split,
                        state_mode=model_state_mode(cfg.model))   # "text": the state in each prompt


def code_version() -> str:
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def _setup_logging(rank: int) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _write_norm_stats(cfg: Config, path: Path) -> None:
    """The merged normalization stats of the training sources (inference needs them)."""
    if not cfg.data.sources:      # toy loaders in tests read no shard sets
        log.info("no data.sources: no norm_stats.json written to the run dir")
        return
    from megavla.data.normalize import load_norm_stats, merge_norm_stats
    stats = merge_norm_stats([load_norm_stats(Path(d) / "norm_stats.json") for d in cfg.data.sources.values()])
    atomic_write_json(path, stats, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def _rank0_decides(dist: DistInfo, decide: Callable[[], dict]) -> dict:
    """Run `decide` on rank 0 only and give its JSON result to every rank (a TrainingError raised
    there is re-raised on every rank, so all ranks stop together with one message)."""
    from .metrics import allgather_json
    result: dict = {}
    if dist.rank == 0:
        try:
            result = {"ok": decide()}
        except TrainingError as e:
            result = {"error": str(e), "kind": type(e).__name__}
    result = allgather_json(result if dist.rank == 0 else {}, dist.device)[0]
    if "error" in result:
        kind = {c.__name__: c for c in (ResumeError, RunDirBusy)}.get(result["kind"], TrainingError)
        raise kind(result["error"])
    return result["ok"]


def batch_accounting(model: torch.nn.Module):
    """(valid tokens, training FLOPs) of a CPU micro-batch for the VLA (megavla.model.flops: the
    batch's own token counts, not the config's nominal lengths); None for other models (tests' toys:
    then tokens are counted from the masks and no FLOPs / MFU are logged)."""
    from megavla.model.vla import VLA
    if not isinstance(model, VLA):
        return None
    from megavla.model.flops import batch_flops, batch_tokens, coefficients
    mcfg = model.cfg
    # from the built model's layer shapes, before ZeRO-3 could partition them (the fallback, a
    # meta-device build, imports torch._dynamo + sympy: ~1.3 CPU-s in the first step)
    coefficients(mcfg, model)
    return lambda batch: (batch_tokens(mcfg, batch), batch_flops(mcfg, batch, insulated=model.insulated))


def restore(engine, plan: ResumePlan, saved: TrainState, cfg: Config, dist: DistInfo) -> dict | None:
    """Load the checkpoint into the engine, set the schedule and RNG; returns the loader state
    (None: the loader starts over, reseeded)."""
    layout_changed = saved.layout_differs(dist.world_size, cfg.train.zero_stage)
    universal = layout_changed and saved.zero_stage > 0
    load_dir = (ckpt.universal_dir(plan.path) if universal else plan.path).parent
    with deepspeed_loads_are_safe():     # DeepSpeed unpickles with weights_only=False: see safe_load.py
        load_path, _ = engine.load_checkpoint(str(load_dir), tag=plan.path.name)
    if load_path is None:
        raise ResumeError(f"DeepSpeed could not load {plan.path} (see the warning above)")
    if universal:
        restore_frozen_parameters(engine.module, plan.path)
    set_schedule_step(engine.lr_scheduler, plan.step, cfg.train)
    if not layout_changed and saved.has_rank_state:
        saved.restore_rng()
        return saved.loader
    if not layout_changed:      # only an unverified (pre-manifest) checkpoint can lack it
        log.warning("rank %d: %s has no rank_%05d.json: RNG and loader reseeded, the resume is not exact",
                    dist.rank, plan.path, dist.rank)
    seed_everything(cfg.train.seed * 1000 + dist.rank + 7919 * plan.step)
    return None


def run(cfg: Config, resume: str | None = None, *, overwrite: bool = False,
        model_factory: ModelFactory | None = None, loader_factory: LoaderFactory | None = None) -> int:
    """Train on this process's rank. `resume`: None (fresh; a run dir with progress is an error
    unless `overwrite`), "auto" (newest loadable checkpoint), or a checkpoint path; see resume.py.
    The factories replace the real model / loader (tests use toy ones); they receive the resolved
    Config. Raises a TrainingError (the same on every rank) for what the user must fix."""
    launch = LaunchClock()
    launch.mark("imports")
    model_factory = model_factory or default_model_factory
    loader_factory = loader_factory or default_loader_factory
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        # One intra-op thread per core this rank owns. Oversubscribed OpenMP threads spin-wait: on a
        # busy 2-core box, 2 threads per process measured 10x slower steps (3.2 s vs 0.3 s, tiny preset).
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, ((os.cpu_count() or 1) // local) - (1 if local == 1 else 0)))
    # Before the model, engine and loader allocate anything (see host_memory: heap fragmentation).
    set_mmap_threshold(cfg.train.malloc_mmap_threshold_kb)
    dist = init_distributed(cfg.train.dist_backend)
    _setup_logging(dist.rank)
    launch.mark("process_group")
    run_dir = cfg.train.require_run_dir()     # unset: a ConfigError, never a run in the working dir
    lock = RunLock(run_dir)

    def decide() -> dict:
        lock.acquire()
        try:
            plan = plan_resume(run_dir, resume, overwrite=overwrite)
            if plan.path is not None:    # refuse a file that could run code, before anything is built
                check_files(plan.path, ckpt.universal_dir(plan.path))
        except TrainingError:
            lock.release()
            raise
        return plan.to_json()

    plan = ResumePlan.from_json(_rank0_decides(dist, decide))
    try:
        return _train(cfg, plan, dist, model_factory, loader_factory, launch)
    finally:
        lock.release()


def _train(cfg: Config, plan: ResumePlan, dist: DistInfo, model_factory: ModelFactory,
           loader_factory: LoaderFactory, launch: LaunchClock) -> int:
    run_dir = Path(cfg.train.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    saved = TrainState.read(plan.path, dist.rank) if plan.path else None
    if saved is not None:     # before this run's config.yaml replaces the run dir's
        check_same_adapters({"config": saved.config}, plan.path, cfg)
    if dist.rank == 0:
        for line in plan.skipped:
            log.warning("damaged checkpoint skipped: %s", line)
        log.info("%s", plan.message)
        if plan.overwrite:
            clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(cfg, run_dir / "config.yaml")
        _write_norm_stats(cfg, run_dir / "norm_stats.json")
    if saved is not None and plan.step >= cfg.train.steps:
        # Every rank got the same plan, so all return here together.
        if dist.rank == 0:
            log.info("%s is at step %d >= train.steps=%d: nothing to train (no model, engine or loader built)",
                     plan.path, plan.step, cfg.train.steps)
        return EXIT_OK

    # Freed build-time tensors go back to the OS (host_memory: the build phase), until the engine is up.
    build_phase = start_build_phase(cfg.train.malloc_mmap_threshold_kb)
    if cfg.train.compile != "none":   # before the build: DeepSpeed's "do not trace" marks stay real
        from megavla.model.compile import import_compiler
        import_compiler()
    # Identical initial weights on every rank; then per-rank streams for noise / timestep sampling.
    if saved is None:   # a fresh run reads its initial weights: they must exist (a resume reads its own)
        cfg.train.check_initial_weights()
    seed_everything(cfg.train.seed)
    if cfg.train.zero_stage == 3 and cfg.train.zero3_init:
        model = build_partitioned(model_factory, cfg, cfg.data.batch_size, dist.world_size)
    else:
        model = model_factory(cfg)
    if cfg.train.pretrained and saved is None:   # a fresh run; a resume loads its own weights
        from megavla.model.pretrained import load_pretrained   # PaliGemma or LeRobot / openpi π0(.5)
        load_pretrained(model, cfg.train.pretrained, strict=cfg.train.pretrained_strict)
    if cfg.train.init_from and saved is None:    # a MegaVLA run's weights (a finetune); see warm_start.py
        from .warm_start import load_init_weights
        load_init_weights(model, cfg.train.init_from)
    if cfg.train.lora.enabled:
        # after the pretrained load (adapters start at B = 0: the loaded model's output); a resume
        # builds the same adapters, and the checkpoint then restores them with everything else
        apply_lora_for_training(model, cfg)
    apply_freeze(model, cfg.train.freeze)
    if cfg.train.compile != "none":   # in place: parameter names and checkpoints stay the eager ones
        from megavla.model.compile import compile_model
        compile_model(model, cfg.train.compile, cfg.train.zero_stage)
    n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    frozen = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if not p.requires_grad)
    if dist.rank == 0:
        log.info("model: %.2fM parameters (%.2fM frozen)", n_params / 1e6, frozen / 1e6)
    seed_everything(cfg.train.seed * 1000 + dist.rank)
    accounting = batch_accounting(model)
    launch.mark("model")

    layout_changed = saved is not None and saved.layout_differs(dist.world_size, cfg.train.zero_stage)
    universal = layout_changed and saved.zero_stage > 0
    if universal:
        ckpt.convert_to_universal(plan.path, dist.rank)
    engine, _, _ = create_engine(model, cfg.train, cfg.data.batch_size, dist, load_universal=universal)
    layout = batch_layout(cfg.data.batch_size, engine.gradient_accumulation_steps(), dist.world_size)
    state = TrainState(batch=layout, world_size=dist.world_size, zero_stage=cfg.train.zero_stage,
                       precision=cfg.train.precision, config=to_dict(cfg), code_version=code_version())

    start_step = 0
    loader_state = None
    events: list[dict] = []
    if plan.path is not None:
        loader_state = restore(engine, plan, saved, cfg, dist)
        start_step = state.step = plan.step
        state.skipped_nonfinite = saved.skipped_nonfinite
        changed = batch_change(saved.batch, layout)
        if changed:
            if dist.rank == 0:
                log.warning("resume at step %d changes the batch: %s", start_step,
                            ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
            events.append({"step": start_step, "event": "batch_changed", **changed})
        if dist.rank == 0:
            log.info("resumed from %s at step %d%s", plan.path, start_step,
                     " (world size / ZeRO stage changed: universal checkpoint, loader reseeded)"
                     if layout_changed else "")

    end_build_phase(build_phase, cfg.train.zero_stage)
    launch.mark("engine")
    loader_seed = None if (loader_state is not None or not plan.path) else cfg.data.seed + start_step
    loader = loader_factory(cfg, dist.rank, dist.world_size, loader_seed, "train")
    if loader_state is not None:
        loader.load_state_dict(loader_state)
    launch.mark("loader")
    val_factory = None
    if cfg.train.val_every and cfg.data.val_sources:
        val_factory = lambda: loader_factory(cfg, dist.rank, dist.world_size, cfg.data.seed, "val")  # noqa: E731

    ema = None
    if cfg.train.ema_decay:
        ema = EMA(engine.module, cfg.train.ema_decay)
        if plan.path is not None and (plan.path / "ema.safetensors").is_file():
            from safetensors.torch import load_file
            ema.shadow.update(load_file(str(plan.path / "ema.safetensors")))

    trainer = Trainer(cfg, engine, loader, dist, state,
                      batch_accounting=accounting or mask_accounting(int(getattr(model, "tokens_per_image", 0))),
                      val_loader_factory=val_factory, ema=ema, events=events, launch=launch)
    code = trainer.fit()
    if dist.rank == 0:
        log.info("done at step %d: tensorboard logs in %s, checkpoints in %s", trainer.step,
                 run_dir / "tb", ckpt_dir)
    # The process group stays up (DeepSpeed caches its groups, so a second run() in this process
    # reuses it); process-level callers end it with engine.shutdown_distributed().
    return code


def report_training_error(e: TrainingError) -> int:
    """One line on rank 0 (every rank raised the same error), no traceback."""
    if os.environ.get("RANK", "0") == "0":
        log.error("%s", e)
    return EXIT_TRAINING_ERROR


def worker_main() -> int:
    """`python -m megavla.train.entry CONFIG_YAML [--resume X] [--overwrite]` on each rank (used by
    the local launcher)."""
    import argparse

    from megavla.config import load_config
    parser = argparse.ArgumentParser(prog="megavla.train.entry")
    parser.add_argument("config")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return run_then_shutdown(lambda: run(load_config(args.config), resume=args.resume, overwrite=args.overwrite))


def run_then_shutdown(train: Callable[[], int]) -> int:
    """A rank's whole life after argument parsing: train, report a TrainingError (raised alike on
    every rank) as one line, and end the process group so that no rank exits under a peer."""
    try:
        code = train()
    except TrainingError as e:
        code = report_training_error(e)
    except BaseException:
        shutdown_distributed(wait_for_peers=False)
        raise
    shutdown_distributed()
    return code


if __name__ == "__main__":
    raise SystemExit(worker_main())
