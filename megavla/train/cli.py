"""`megavla train CONFIG [dotted.overrides ...] [--nproc N] [--resume auto|PATH]`

The config (file + overrides) is built and checked here, before any process starts: an unknown key,
ZeRO stage 5 or a negative lr is a clear error and exit code 2. Then:

- under torchrun / SLURM (RANK is set) or with --nproc 1: `run()` in this process;
- with --nproc N > 1: N local worker processes (gloo on CPU, nccl on GPU) with RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR/PORT set, each running `python -m megavla.train.entry`. SIGTERM / SIGUSR2 /
  SIGINT are forwarded to every worker; if one worker fails the others are stopped.

Exit codes: 0 done, 75 stopped by SIGTERM/SIGUSR2 after saving a checkpoint (resume with
`--resume auto`), 2 bad config, other = a worker's failure.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from megavla.config import ConfigError, Config, load_config, write_yaml

log = logging.getLogger(__name__)

FAIL_GRACE_S = 20.0   # after one worker fails, how long the others get before SIGKILL


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


def launch_local(nproc: int, worker_args: list[str], env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> int:
    """Start `command *worker_args` (default `python -m megavla.train.entry`) on ranks 0..nproc-1;
    return the exit code."""
    command = command or [sys.executable, "-m", "megavla.train.entry"]
    from .engine import free_port
    base = dict(os.environ, **(env or {}))
    base.update(WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                LOCAL_WORLD_SIZE=str(nproc))
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    procs = []
    for rank in range(nproc):
        procs.append(subprocess.Popen([*command, *worker_args],
                                      env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank))))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)}
    try:
        failed_at = None
        while True:
            polled = [p.poll() for p in procs]      # poll every worker (any() would stop early)
            if all(c is not None for c in polled):
                break
            codes = [c for c in polled if c is not None]
            if failed_at is None and any(c not in (0, 75) for c in codes):
                failed_at = time.monotonic()
                log.error("a worker exited with %s; stopping the others", codes)
                forward(signal.SIGTERM, None)
            if failed_at is not None and time.monotonic() - failed_at > FAIL_GRACE_S:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    codes = [p.returncode for p in procs]
    failures = [c for c in codes if c not in (0, 75)]
    if failures:
        return failures[0] if failures[0] > 0 else 128 - failures[0]   # -9 (SIGKILL) -> 137
    return 75 if 75 in codes else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megavla train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (e.g. configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides, e.g. train.lr=3e-4 train.zero_stage=3")
    parser.add_argument("--nproc", type=int, default=1, help="local processes (data-parallel ranks)")
    parser.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint dir")
    args = parser.parse_intermixed_args(argv)   # overrides may come after --nproc / --resume
    try:
        cfg = load_config(args.config, args.overrides)
        nproc = int(os.environ.get("WORLD_SIZE", args.nproc)) if "RANK" in os.environ else args.nproc
        check_launchable(cfg, nproc)
    except ConfigError as e:
        sys.stderr.write(f"megavla train: config error: {e}\n")
        return 2
    if "RANK" in os.environ or args.nproc == 1:
        from .engine import shutdown_distributed
        from .entry import run
        try:
            return run(cfg, resume=args.resume)
        finally:
            shutdown_distributed()
    run_dir = Path(cfg.train.run_dir)
    resolved = run_dir / "config.yaml"
    write_yaml(cfg, resolved)
    log.info("launching %d local processes; run dir %s", args.nproc, run_dir)
    worker_args = [str(resolved)] + (["--resume", args.resume] if args.resume else [])
    return launch_local(args.nproc, worker_args)
