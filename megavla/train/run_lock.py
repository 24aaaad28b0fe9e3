"""One run per run directory: a lock file naming its holder (host, pid, SLURM job id).

Two trainers on one run dir would interleave their curves in metrics.jsonl and overwrite each
other's checkpoints. The lock is a file created with O_EXCL; it is taken over only when its holder
is provably gone: the same SLURM job (a requeue of the holder itself), a pid that no longer runs on
this host (or runs a different process: pid reuse), or a SLURM job that is no longer in the queue.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

from megavla.fileio import atomic_write_json

from .errors import RunDirBusy

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): tells a live
    holder from a new process that reused its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S")}


def slurm_job_queued(job_id: str) -> bool | None:
    """Is the SLURM job still pending or running? True/False from squeue; None when squeue cannot
    tell (no SLURM here). Also what `sweep status` asks (launch.rundir.job_alive)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return False if "Invalid job id" in out.stderr else None
    return out.stdout.strip() not in ("", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def why_gone(holder: dict, mine: dict) -> str | None:
    """Why the holder is provably not running any more, or None if it may still be."""
    job = holder.get("slurm_job_id")
    if job and job == mine["slurm_job_id"]:
        return f"same SLURM job {job} (requeued)"
    if holder.get("host") == mine["host"]:
        pid = int(holder.get("pid", -1))
        start = _proc_start(pid)
        if start is None:
            return f"pid {pid} is not running"
        if holder.get("pid_start") and start != holder["pid_start"]:
            return f"pid {pid} is now another process"
        return None
    if job and slurm_job_queued(job) is False:
        return f"SLURM job {job} is no longer queued or running"
    return None


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


class RunLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.mine = me()
        self.held = False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}      # being written, or cut by a crash: not provably gone

    def check(self) -> None:
        """Raise RunDirBusy if a live run holds the lock (what `acquire` would refuse)."""
        holder = self.holder()
        if holder is None or why_gone(holder, self.mine) is not None:
            return
        self._refuse(holder)

    def _refuse(self, holder: dict) -> None:
        who = describe(holder) if holder else "a process that left an unreadable lock"
        raise RunDirBusy(
            f"run dir {self.path.parent} is in use by {who}: a second run would interleave metrics.jsonl "
            f"and overwrite its checkpoints. Wait for it or stop it (scancel / kill); if it is gone, "
            f"delete {self.path}")

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self.holder()
            reason = why_gone(holder, self.mine) if holder else None
            if reason is None:
                self._refuse(holder or {})
            log.warning("taking over the run dir lock of %s: %s", describe(holder), reason)
            atomic_write_json(self.path, self.mine)
            if self.holder() != self.mine:      # another process took it over at the same moment
                self._refuse(self.holder() or {})
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(self.mine, f)
        self.held = True
        return self

    def release(self) -> None:
        if self.held and self.holder() == self.mine:
            self.path.unlink(missing_ok=True)
        self.held = False
