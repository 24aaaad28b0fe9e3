"""One run directory per run, and what the launcher reads back from it.

Layout (docs/architecture.md): ``config.yaml`` (resolved, written at submission) · ``launch.json``
(this module: job id, node list, git commit, status, requeues) · ``submitit/`` (job scripts and
per-rank logs) · ``checkpoints/<tag>/`` + ``checkpoints/latest`` and ``metrics.jsonl`` + ``tb/``
(written by the trainer). Which checkpoint counts is the trainer's own decision
(megavla.train.resume), never a second reading of `latest`.
"""
from __future__ import annotations

import fcntl
import glob
import json
import logging
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megavla.fileio import atomic_write_json

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LAUNCH_FILE = "launch.json"
METRICS_FILE = "metrics.jsonl"
SUBMITIT_DIR = "submitit"


def git_commit(repo: Path | None = None) -> str | None:
    """The code version a run was launched from (None outside a git checkout)."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def read_launch_record(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / LAUNCH_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        log.warning("%s is not valid JSON (%s); treating the run as never launched", path, e)
        return {}


def update_launch_record(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into launch.json under a file lock (the submitting process and the job's
    rank 0 both write it) and an atomic rename (a reader never sees half a file).

    ``append_event=dict`` appends to the ``events`` list; ``status_if=(...)`` sets ``status`` only
    when the current status is one of those (so a late "submitted" never hides "running").
    """
    event = fields.pop("append_event", None)
    status_if = fields.pop("status_if", None)
    path = Path(run_dir) / LAUNCH_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{LAUNCH_FILE}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = read_launch_record(run_dir)
        if status_if is not None and record.get("status") not in status_if:
            fields.pop("status", None)
        record.update(fields)
        if event is not None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            record.setdefault("events", []).append({"time": stamp, **event})
        atomic_write_json(path, record, sort_keys=True)
    return record


def latest_checkpoint(run_dir: str | Path) -> tuple[str, int] | None:
    """(tag, step) of the checkpoint the trainer's `--resume auto` would load, or None.

    The same decision as the trainer's (megavla.train.resume.newest_loadable), so a dangling
    `latest` or a damaged newest checkpoint shows what a resume will really use. Files are checked
    by size only: hashing every run's checkpoints would make `sweep status` read terabytes.
    """
    from megavla.train.resume import newest_loadable, read_step
    path, skipped = newest_loadable(Path(run_dir) / "checkpoints", verify=False)
    for problem in skipped:
        log.warning("damaged checkpoint (a resume skips it): %s", problem)
    return (path.name, read_step(path)) if path is not None else None


@dataclass
class MetricsSummary:
    step: int | None = None
    loss: float | None = None        # total training loss (loss/total)
    flow_loss: float | None = None   # the flow-matching loss alone (loss/flow): what the demo prints
    best_val: float | None = None
    lines: int = 0
    bad_lines: int = 0


def _first_number(record: dict, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def read_metrics(run_dir: str | Path) -> MetricsSummary:
    """Last step / last training loss / last flow loss / best validation loss from the trainer's
    metrics.jsonl.

    One JSON object per line with a ``step``; the training loss is ``loss/total`` (the trainer's
    key; ``loss`` also accepted), the flow loss ``loss/flow``, the validation loss
    ``val/loss/total`` (else the first key that starts with ``val`` and mentions ``loss``); best =
    the lowest over all lines.
    Unreadable lines (a write cut by preemption) are counted, not fatal.
    """
    summary = MetricsSummary()
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return summary
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError:
                summary.bad_lines += 1
                continue
            summary.lines += 1
            step = record.get("step")
            if isinstance(step, int):
                summary.step = step if summary.step is None else max(summary.step, step)
            loss = _first_number(record, ("loss/total", "loss", "train/loss", "train/loss/total"))
            if loss is not None:
                summary.loss = loss
            flow = _first_number(record, ("loss/flow",))
            if flow is not None:
                summary.flow_loss = flow
            val_keys = tuple(k for k in record if k.startswith("val") and "loss" in k)
            val = _first_number(record, ("val/loss/total", "val/loss", "val_loss", *val_keys))
            if val is not None and (summary.best_val is None or val < summary.best_val):
                summary.best_val = val
    if summary.bad_lines:
        log.warning("%s: skipped %d unreadable line(s) of %d", path, summary.bad_lines,
                    summary.lines + summary.bad_lines)
    return summary


def job_alive(record: dict[str, Any]) -> bool:
    """Is the job recorded in launch.json still queued or running? (squeue / local pid)."""
    job_id = record.get("job_id")
    if not job_id or record.get("status") in ("finished", "failed"):
        return False
    if record.get("executor") == "local":
        try:
            os.kill(int(job_id), 0)
        except (OSError, ValueError):
            return False
        return True
    from megavla.train.run_lock import slurm_job_queued   # torch-free: the run lock asks the same
    return slurm_job_queued(str(job_id)) is True


# Launch statuses of a job that has not reported an outcome yet (finished / failed / cancelled / requeued).
ACTIVE_STATUSES = ("submitting", "submitted", "running")


def one_line(text: str, limit: int = 400) -> str:
    """The first non-empty line of an error message, whitespace collapsed, at most ``limit`` chars."""
    line = next((x.strip() for x in str(text).splitlines() if x.strip()), "")
    line = " ".join(line.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def record_failure(run_dir: str | Path, error: str) -> None:
    """Mark the run failed with a one-line error, unless this attempt already recorded an outcome:
    the first rank to fail names the cause (its peers then fail on the broken process group)."""
    def failed_first(record: dict[str, Any]) -> dict[str, Any] | None:
        if record.get("status") not in (*ACTIVE_STATUSES, None):
            return None
        return {"status": "failed", "error": one_line(error)}
    _update_if(run_dir, failed_first)


def _update_if(run_dir: str | Path, decide) -> None:
    """``decide(record) -> fields or None``, applied under the launch.json lock."""
    path = Path(run_dir) / LAUNCH_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{LAUNCH_FILE}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = read_launch_record(run_dir)
        fields = decide(record)
        if fields:
            record.update(fields)
            atomic_write_json(path, record, sort_keys=True)


_EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b.*)$")
LOG_TAIL_BYTES = 65536


def last_exception_line(folder: Path, job_id: str) -> str | None:
    """The last ``SomeError: message`` line in the tail of a job's submitit stderr logs (a job that
    died before it could record its error: older launchers, a failure outside the trainer)."""
    found = None
    for path in sorted(folder.glob(f"{glob.escape(job_id)}_*log.err")):
        try:
            with path.open("rb") as f:
                f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
                tail = f.read().decode(errors="replace")
        except OSError:
            continue
        for line in tail.splitlines():
            m = _EXCEPTION_LINE.match(line.strip())
            if m:
                found = one_line(m.group(1))
    return found


def run_outcome(run_dir: str | Path, total_steps: int) -> tuple[str, str | None]:
    """(state, one-line error or None). States: new | queued/running (job alive) | finished |
    interrupted (checkpoint, not done) | failed (the job recorded an error, or ended without
    recording any outcome: killed, out of memory, a node lost) | unresumable (trained, but no
    loadable checkpoint: the trainer refuses to start over silently).
    A run trained by `megavla train` directly has no launch.json: its checkpoints still count."""
    record = read_launch_record(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and ckpt[1] >= total_steps:
        return "finished", None
    if record.get("status") == "finished" and ckpt is None:
        return "finished", None  # a trainer that keeps no checkpoint: trust the job's own report
    if record and job_alive(record):
        return ("running" if record.get("status") in ("running", "requeued") else "queued"), None
    if ckpt is None:
        from megavla.train.resume import progress_evidence
        if progress_evidence(Path(run_dir)):
            return "unresumable", None
    status = record.get("status")
    if status == "failed":
        return "failed", record.get("error") or "failed (no error recorded)"
    if status in ("submitted", "running") and record.get("job_id"):
        logs = Path(record.get("submitit_folder") or Path(run_dir) / SUBMITIT_DIR)
        raised = last_exception_line(logs, str(record["job_id"]))
        if raised:
            return "failed", f"{raised} (job {record['job_id']}; logs: {logs})"
        return "failed", (f"job {record['job_id']} ended while {status}, without recording an outcome "
                          f"(killed, out of memory, or failed before Python started); logs: {logs}")
    return ("interrupted" if ckpt is not None else "new"), None


def run_state(run_dir: str | Path, total_steps: int) -> str:
    """The state of :func:`run_outcome` alone."""
    return run_outcome(run_dir, total_steps)[0]
