"""One run directory per run, and what the launcher reads back from it.

Layout (docs/architecture.md): ``config.yaml`` (resolved, written at submission) · ``launch.json``
(this module: job id, node list, git commit, status, requeues) · ``submitit/`` (job scripts and
per-rank logs) · ``checkpoints/<tag>/`` + ``checkpoints/latest`` and ``metrics.jsonl`` + ``tb/``
(written by the trainer). Which checkpoint counts is the trainer's own decision
(megavla.train.resume), never a second reading of `latest`.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
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
    loss: float | None = None
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
    """Last step / last training loss / best validation loss from the trainer's metrics.jsonl.

    One JSON object per line with a ``step``; the training loss is ``loss/total`` (the trainer's
    key; ``loss`` also accepted), the validation loss ``val/loss/total`` (else the first key that
    starts with ``val`` and mentions ``loss``); best = the lowest over all lines.
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


def run_state(run_dir: str | Path, total_steps: int) -> str:
    """new | queued/running (job alive) | finished | interrupted (checkpoint, not done) | failed |
    unresumable (trained, but no loadable checkpoint: the trainer refuses to start over silently).
    A run trained by `megavla train` directly has no launch.json: its checkpoints still count."""
    record = read_launch_record(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and ckpt[1] >= total_steps:
        return "finished"
    if record.get("status") == "finished" and ckpt is None:
        return "finished"  # a trainer that keeps no checkpoint: trust the job's own report
    if record and job_alive(record):
        return "running" if record.get("status") in ("running", "requeued") else "queued"
    if ckpt is None:
        from megavla.train.resume import progress_evidence
        if progress_evidence(Path(run_dir)):
            return "unresumable"
    if record.get("status") == "failed":
        return "failed"
    return "interrupted" if ckpt is not None else "new"
