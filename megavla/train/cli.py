"""`megavla train CONFIG [dotted.overrides ...] [--nproc N] [--resume auto|PATH] [--overwrite]`

The config (file + overrides), the paths it names and the run dir (lock, what to resume) are checked
here, before any process starts: an unknown key, an unset train.run_dir, no data.sources, a missing
shard dir, a run dir in use or inside `megavla demo`'s output, or objectives that need tokenizers
without train.tokenizer_dir is one line on stderr and exit code 2. Then:

- under torchrun / SLURM (RANK is set) or with --nproc 1: `run()` in this process;
- with --nproc N > 1: N local worker processes (gloo on CPU, nccl on GPU) with RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR/PORT set, each running `python -m megavla.train.entry`, each in its own
  process group (a terminal's Ctrl-C reaches only this launcher, which forwards it once).
  SIGTERM / SIGUSR2 / SIGINT are forwarded to every worker; workers get SIGTERM if the launcher
  dies. If one worker fails the others are stopped; the log names the failing rank, its exit code
  or signal and the tail of its output (all of it in RUN_DIR/logs/rank_N.log).

A hand-run ends with a summary: first -> last flow loss, steps, latest checkpoint, tensorboard dir.

Exit codes: 0 done, 75 saved after SIGUSR2 (a preemption: resume with `--resume auto`), 130 / 143
saved after Ctrl-C / SIGTERM (a stop), 1 a training error (message above), 2 bad config or paths,
other = the first failing worker's code (128 + N: killed by signal N).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from megavla.config import ConfigError, Config, load_config, write_yaml
# The one local launcher (launch/local.py); the checks `megavla launch` and sweeps run too (preflight.py).
from megavla.launch.local import CLEAN_EXITS, launch_local

from .preflight import check_launchable, check_paths, check_run_dir, check_trainable, nothing_to_train

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None, *, demo_run: bool = False) -> int:
    """``demo_run``: `megavla demo`'s own segments, the one caller allowed to train inside its output."""
    parser = argparse.ArgumentParser(prog="megavla train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (e.g. configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides, e.g. train.lr=3e-4 train.zero_stage=3")
    parser.add_argument("--nproc", type=int, default=1, help="local processes (data-parallel ranks)")
    parser.add_argument("--resume", default=None,
                        help="'auto' (newest intact checkpoint; fresh if the run dir is unused) or a checkpoint dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run dir that already holds a run (deletes its checkpoints and metrics)")
    args = parser.parse_intermixed_args(argv)   # overrides may come after --nproc / --resume
    from .errors import TrainingError
    in_job = "RANK" in os.environ
    try:
        cfg = load_config(args.config, args.overrides)
        nproc = int(os.environ.get("WORLD_SIZE", args.nproc)) if in_job else args.nproc
        cfg.train.require_run_dir()
        check_paths(cfg)
        check_launchable(cfg, nproc)
        if not in_job or os.environ["RANK"] == "0":
            plan = check_run_dir(cfg, args.resume, args.overwrite, demo_run=demo_run)
            message = plan.message
            if not in_job and nothing_to_train(cfg, args.resume, args.overwrite, plan):
                log.info("%s is at step %d >= train.steps=%d: nothing to train, no process started",
                         plan.path, plan.step, cfg.train.steps)
                return 0
        warning = check_trainable(cfg)
        from megavla.config.checks import check_config
        check_config(cfg)   # model vs data vs tokenizers vs shard sets (megavla/config/checks.py)
    except (ConfigError, TrainingError) as e:
        sys.stderr.write(f"megavla train: {'config error: ' if isinstance(e, ConfigError) else ''}{e}\n")
        return 2
    if warning and (not in_job or os.environ["RANK"] == "0"):
        log.warning("%s", warning)
    if in_job or args.nproc == 1:
        from .entry import run, run_then_shutdown
        code = run_then_shutdown(lambda: run(cfg, resume=args.resume, overwrite=args.overwrite))
    else:
        code = _launch(cfg, args, message)
    if code in CLEAN_EXITS and not demo_run and (not in_job or os.environ["RANK"] == "0"):
        print_summary(Path(cfg.train.run_dir), code)
    return code


def print_summary(run_dir: Path, code: int) -> None:
    """The closing lines of a hand-run `megavla train` (the demo prints the same, plus its curve)."""
    from .metrics import run_summary
    summary = run_summary(run_dir)
    if summary is None:
        return
    how = "done" if code == 0 else f"stopped (exit {code}); continue with --resume auto"
    print(f"\ntraining {how}:")
    for line in summary.lines:
        print(line)


def _launch(cfg: Config, args: argparse.Namespace, message: str) -> int:
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "config.yaml"
    write_yaml(cfg, resolved)
    log.info("launching %d local processes; run dir %s; %s", args.nproc, run_dir, message)
    worker_args = [str(resolved)] + (["--resume", args.resume] if args.resume else []) + \
        (["--overwrite"] if args.overwrite else [])
    return launch_local(args.nproc, worker_args, log_dir=run_dir / "logs")
