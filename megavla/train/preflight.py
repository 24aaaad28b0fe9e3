"""What `megavla train`, `megavla launch` and every run of a sweep check before any process starts
or any job is submitted: the paths a run reads, the world size, the shard sets, the tokenizers its
objectives need, the run dir (its lock, what will be resumed, not inside `megavla demo`'s output).

Each raises a ConfigError (or a TrainingError from the run dir checks) whose one line names the
key and the fix; model vs data vs tokenizer dimensions are megavla/config/checks.py's.
"""
from __future__ import annotations

from pathlib import Path

from megavla.config import Config, ConfigError


def check_launchable(cfg: Config, nproc: int) -> None:
    """Checks that need the world size (the config alone cannot know it)."""
    from .engine import grad_accum_steps
    try:
        grad_accum_steps(cfg.train, cfg.data.batch_size, nproc)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} must be >= 1")
    # The reader's per-set checks (manifest, shard paths, norm stats), before any process starts.
    from megavla.data_shards.validate import ShardSetError, check_shard_set, cross_shard_message
    for field, sources in (("sources", cfg.data.sources), ("val_sources", cfg.data.val_sources)):
        for name, directory in sources.items():
            try:
                info = check_shard_set(directory, need_stats=cfg.data.normalization != "none")
            except ShardSetError as e:
                raise ConfigError(f"data.{field}.{name}: {e}") from None
            if info.duplicates and cfg.data.on_bad_sample == "fail":  # the reader would refuse it too
                raise ConfigError(f"data.{field}.{name}: {cross_shard_message(directory, info.duplicates[0])} "
                                  f"[{len(info.duplicates)} keys repeated across shards; data.on_bad_sample=fail]")


def check_paths(cfg: Config) -> None:
    """Every path the run will read exists (found in seconds here, not after the model is built)."""
    for field in ("sources", "val_sources"):
        for name, path in getattr(cfg.data, field).items():
            if not Path(path).is_dir():
                raise ConfigError(f"data.{field}.{name}={path}: no such directory (a shard set written by "
                                  f"`megavla data synth` or an importer)")
    tok = cfg.train.tokenizer_dir
    if tok and not Path(tok).is_dir():
        raise ConfigError(f"train.tokenizer_dir={tok}: no such directory (written by `megavla tokenizer train`)")
    cfg.train.check_initial_weights()


def tokenizer_dependents(cfg: Config) -> list[str]:
    """What this config trains that needs train.tokenizer_dir (empty: nothing but instruction text).
    Without tokenizers the pipeline yields no text, subtask or FAST tokens (data/collate.py)."""
    m = cfg.model
    needs = []
    if m.subtask_weight > 0:
        needs.append(f"the subtask loss (model.subtask_weight={m.subtask_weight:g}: no subtask targets)")
    if m.fast_weight > 0:
        needs.append(f"the FAST loss (model.fast_weight={m.fast_weight:g}: no action tokens, only its end marker)")
    if m.action_conditioning == "subtask":
        needs.append("subtask conditioning (model.action_conditioning=subtask: inference would decode a "
                     "subtask the model never learned)")
    return needs


def check_trainable(cfg: Config) -> str | None:
    """The config names data to train on and the tokenizers its objectives need. Raises a
    ConfigError (one line: key and fix); returns a warning line for what runs but loses something.

    A missing tokenizer dir is refused, not warned about, when an objective depends on it: the
    default config trains flow + FAST + subtask with subtask conditioning, and without tokenizers
    two of the three losses train nothing while the run looks healthy (a warning would scroll away
    among the ranks' start-up lines). Flow-only training without language stays possible."""
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: name the shard sets to train on, e.g. data.sources.robot=DATA/robot "
                          "data.sources.human=DATA/human (directories written by `megavla data synth` or "
                          "`megavla data import`)")
    if cfg.train.tokenizer_dir:
        return None
    needs = tokenizer_dependents(cfg)
    if needs:
        raise ConfigError(
            f"train.tokenizer_dir is not set, so this run would train without {'; '.join(needs)}; and the model "
            "would read no instruction text. Train the tokenizers (`megavla tokenizer train --shards DATA --out "
            "DATA/tokenizers`) and pass train.tokenizer_dir=DATA/tokenizers, or, for flow-only training without "
            "language, set model.subtask_weight=0 model.fast_weight=0 model.action_conditioning=instruction")
    return ("train.tokenizer_dir is not set: the model reads no instruction text (the prompt is ignored); "
            "flow-only training as configured")


def check_run_dir(cfg: Config, resume: str | None, overwrite: bool, *, demo_run: bool = False):
    """The run dir's lock and what will be resumed (sizes only; rank 0 also checks sha256 later).
    Returns the ResumePlan; raises a TrainingError (a ConfigError for a run dir that is not the
    run's own: inside `megavla demo`'s output, which the demo restarts on every invocation)."""
    from megavla.demo_output import demo_output_holding
    from .resume import plan_resume
    from .run_lock import RunLock
    run_dir = cfg.train.require_run_dir()
    demo_out = demo_output_holding(run_dir)
    if demo_out is not None and not demo_run:
        raise ConfigError(f"train.run_dir={run_dir} is inside {demo_out}, the output directory of `megavla demo` "
                          f"(which starts its run there afresh each time): pick a directory of its own, e.g. "
                          f"train.run_dir=runs/mine")
    RunLock(cfg.train.run_dir).check()
    return plan_resume(cfg.train.run_dir, resume, overwrite=overwrite, verify=False)


def nothing_to_train(cfg: Config, resume: str | None, overwrite: bool, plan) -> bool:
    """The resumed checkpoint already reached train.steps: then no worker process is started (each
    would import torch and DeepSpeed and join a process group, ~2 CPU-s, to return at once).
    Decided on the verified plan, the one rank 0 will make (a damaged newest checkpoint would send
    the run back to an older one)."""
    if plan.path is None or plan.step < cfg.train.steps:
        return False
    from .resume import plan_resume
    verified = plan_resume(cfg.train.run_dir, resume, overwrite=overwrite, verify=True)
    return verified.path is not None and verified.step >= cfg.train.steps
