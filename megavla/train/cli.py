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
import collections
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from megavla.config import ConfigError, Config, load_config, write_yaml

log = logging.getLogger(__name__)

FAIL_GRACE_S = 20.0   # after one worker fails, how long the others get before SIGKILL
TAIL_LINES = 20
# Worker exits that are not failures: done, saved for a requeue, saved after a Ctrl-C / SIGTERM stop.
CLEAN_EXITS = (0, 75, 128 + signal.SIGINT, 128 + signal.SIGTERM)


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
    from megavla.demo import demo_output_holding
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


def _die_with_parent() -> None:
    """In the worker before exec: SIGTERM when the launcher dies (Linux prctl PR_SET_PDEATHSIG),
    so workers in their own process group are never orphaned."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class _Pump(threading.Thread):
    """Copies one worker's output to our stderr (and its log file), keeping the last lines."""

    def __init__(self, stream, log_file: Path | None) -> None:
        super().__init__(daemon=True)
        self.stream, self.log_file = stream, log_file
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def run(self) -> None:
        out = open(self.log_file, "ab") if self.log_file else None
        partial = b""
        try:
            while chunk := os.read(self.stream.fileno(), 65536):
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
                if out:
                    out.write(chunk)
                    out.flush()
                lines = (partial + chunk).replace(b"\r", b"\n").split(b"\n")
                partial = lines.pop()
                self.tail.extend(x.decode(errors="replace") for x in lines if x.strip())
        finally:
            if partial.strip():
                self.tail.append(partial.decode(errors="replace"))
            if out:
                out.close()


def launch_local(nproc: int, worker_args: list[str], env: dict[str, str] | None = None,
                 command: list[str] | None = None, log_dir: Path | None = None) -> int:
    """Start `command *worker_args` (default `python -m megavla.train.entry`) on ranks 0..nproc-1;
    return the exit code (see the module docstring)."""
    command = command or [sys.executable, "-m", "megavla.train.entry"]
    from .engine import free_port
    base = dict(os.environ, **(env or {}))
    base.update(WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                LOCAL_WORLD_SIZE=str(nproc))
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # `python -m` puts the working directory first on sys.path; run from a MegaVLA checkout, its
    # top-level `kernels/` would shadow Hugging Face's `kernels` that transformers imports (3.11+).
    base.setdefault("PYTHONSAFEPATH", "1")
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    procs, pumps = [], []
    for rank in range(nproc):
        p = subprocess.Popen([*command, *worker_args], env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=0,
                             preexec_fn=_die_with_parent)
        pump = _Pump(p.stdout, log_dir / f"rank_{rank}.log" if log_dir else None)
        pump.start()
        procs.append(p)
        pumps.append(pump)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)}
    failures: list[tuple[int, int]] = []      # (rank, code) in the order they were seen
    try:
        failed_at = None
        while True:
            polled = [p.poll() for p in procs]      # poll every worker (any() would stop early)
            for rank, c in enumerate(polled):
                if c is not None and c not in CLEAN_EXITS and rank not in (r for r, _ in failures):
                    failures.append((rank, c))
            if all(c is not None for c in polled):
                break
            if failed_at is None and failures:
                failed_at = time.monotonic()
                rank, c = failures[0]
                log.error("rank %d failed (%s); stopping the other ranks", rank, _describe(c))
                forward(signal.SIGTERM, None)
            if failed_at is not None and time.monotonic() - failed_at > FAIL_GRACE_S:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for pump in pumps:
            pump.join(timeout=5)
    codes = [p.returncode for p in procs]
    if failures:
        rank, c = failures[0]
        where = f" (full log: {log_dir / f'rank_{rank}.log'})" if log_dir else ""
        log.error("rank %d failed first: %s; the others: %s. Last lines of rank %d%s:\n%s", rank, _describe(c),
                  ", ".join(f"rank {r} {_describe(x)}" for r, x in enumerate(codes) if r != rank) or "none",
                  rank, where, "\n".join(f"  | {line}" for line in pumps[rank].tail))
        return c if c > 0 else 128 - c   # -9 (SIGKILL) -> 137
    for clean in (75, 128 + signal.SIGINT, 128 + signal.SIGTERM):
        if clean in codes:
            return clean
    return 0


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
