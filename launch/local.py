"""The local launcher: N worker processes on this machine, what torchrun would start.

`launch_local(nproc, worker_args)` runs `python -m megavla.train.entry *worker_args` (or any
`command`) on ranks 0..N-1 with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set (gloo on CPU,
nccl on GPU), each in its own process group (a terminal's Ctrl-C reaches only this launcher, which
forwards it once). SIGTERM / SIGUSR2 / SIGINT are forwarded to every worker; workers get SIGTERM
if the launcher dies. If one worker fails the others are stopped; the log names the failing rank,
its exit code or signal and the tail of its output (all of it in LOG_DIR/rank_N.log).

It returns 0 when every rank finished, else the first clean stop among 75 (saved after SIGUSR2: a
preemption), 130 / 143 (saved after Ctrl-C / SIGTERM), else the first failing worker's code (128 +
N: killed by signal N). `megavla train --nproc N` uses it; `megavla launch` and sweeps go through
submitit (launch/executor.py), whose local executor stands in for SLURM (requeue included).
"""
from __future__ import annotations

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

log = logging.getLogger(__name__)

FAIL_GRACE_S = 20.0   # after one worker fails, how long the others get before SIGKILL
TAIL_LINES = 20
# Worker exits that are not failures: done, saved for a requeue, saved after a Ctrl-C / SIGTERM stop.
CLEAN_EXITS = (0, 75, 128 + signal.SIGINT, 128 + signal.SIGTERM)


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
    from megavla.train.engine import free_port
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
