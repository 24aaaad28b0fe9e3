"""Which checkpoint: the one decision shared by the trainer (`entry.run`), `megavla sweep status`,
export, evaluation and serving (`newest_loadable`; `checkpoint_for` for a path any of them is given).
Pure Python (no torch), so it is cheap to import and to unit-test.

Rules (docs/launching.md, "Stopping, preemption and failures"):
- A checkpoint is loadable when its `trainer_state.json` parses and every file its `manifest.json`
  lists is there with the recorded size (and sha256, when `verify=True`). Checkpoints saved before
  manifests existed have none and are loaded unverified.
- `--resume auto`: the newest loadable checkpoint; damaged newer ones are skipped with a warning that
  names the damaged file. No loadable checkpoint in a run dir that shows progress (checkpoints,
  `latest`, metrics) is an error; an unused run dir starts fresh.
- `--resume PATH`: that checkpoint, or an error naming the damaged file.
- No `--resume`: a run dir that shows progress is an error unless `--overwrite` is given (which
  clears checkpoints, metrics and tensorboard logs first).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from megavla.fileio import sha256_file

from .errors import ResumeError

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
METRICS_FILE = "metrics.jsonl"


@dataclass
class ResumePlan:
    path: Path | None                  # checkpoint to load; None = start at step 0
    step: int = 0
    skipped: list[str] = field(default_factory=list)   # damaged checkpoints passed over, one line each
    verified: bool = True              # False: loaded without a manifest (saved by an older version)
    overwrite: bool = False            # clear the run dir's checkpoints/metrics before starting
    message: str = ""                  # one line for the log

    def to_json(self) -> dict:
        return {"path": str(self.path) if self.path else None, "step": self.step, "skipped": self.skipped,
                "verified": self.verified, "overwrite": self.overwrite, "message": self.message}

    @classmethod
    def from_json(cls, d: dict) -> "ResumePlan":
        return cls(**{**d, "path": Path(d["path"]) if d["path"] else None})


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: Path) -> int:
    m = TAG_RE.match(path.name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint directory (expected a name like step_000120)")
    return int(m.group(1))


def committed_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Every committed (renamed) checkpoint dir, oldest first, whether or not it is intact."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)), key=step_of)


# ---- manifests ----------------------------------------------------------------------------------

def file_digests(root: Path, names: list[str], workers: int = 4) -> dict[str, dict]:
    """name -> {"size", "sha256"} for files under `root` (hashlib releases the GIL: threads help)."""
    def one(name: str) -> tuple[str, dict]:
        f = root / name
        return name, {"size": f.stat().st_size, "sha256": sha256_file(f)}
    with ThreadPoolExecutor(max(1, min(workers, len(names)))) as pool:
        return dict(pool.map(one, names))


def files_under(root: Path) -> list[str]:
    """Relative paths of every file below `root`, sorted (the manifest's and the hash split's order)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def check_checkpoint(path: Path, *, verify: bool = True) -> str | None:
    """None if `path` is loadable, else what is wrong, naming the file."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return f"{state_file} is missing"
    try:
        int(json.loads(state_file.read_text())["step"])
    except (ValueError, UnicodeDecodeError) as e:     # JSONDecodeError is a ValueError
        return f"{state_file} is not valid JSON ({e}): truncated?"
    except (KeyError, TypeError):
        return f"{state_file} has no integer 'step'"
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        return None                    # saved before manifests existed: nothing to check against
    try:
        files = json.loads(manifest_file.read_text())["files"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        return f"{manifest_file} is unreadable ({e})"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing (the manifest lists {meta['size']} bytes)"
        size = f.stat().st_size
        if size != meta["size"]:
            return f"{f} has {size} bytes, the manifest says {meta['size']} (truncated or overwritten)"
    if verify:
        got = file_digests(path, sorted(files), workers=min(8, os.cpu_count() or 1))
        for name, meta in files.items():
            if got[name]["sha256"] != meta["sha256"]:
                return f"{path / name} does not match its sha256 in the manifest (corrupted)"
    return None


def read_step(path: Path) -> int:
    return int(json.loads((path / STATE_FILE).read_text())["step"])


def newest_loadable(ckpt_dir: Path, *, verify: bool = True) -> tuple[Path | None, list[str]]:
    """(newest loadable checkpoint or None, one line per damaged newer checkpoint skipped).

    Newest by step, not by `latest`: the pointer moves after the rename, so a newer committed
    checkpoint than `latest` names means the saver died between the two, and it is complete."""
    skipped = []
    for candidate in reversed(committed_checkpoints(ckpt_dir)):
        problem = check_checkpoint(candidate, verify=verify)
        if problem is None:
            return candidate, skipped
        skipped.append(problem)
    return None, skipped


class NoLoadableCheckpoint(ResumeError, ValueError):
    """A path that names no loadable checkpoint (a ResumeError for the trainer, a ValueError for
    export / eval / serve); the message names what is damaged or missing."""


def is_checkpoint_dir(path: Path) -> bool:
    """One checkpoint (step_NNNNNN, or any directory holding a trainer_state.json)."""
    return TAG_RE.match(path.name) is not None or (path / STATE_FILE).exists()


def checkpoint_for(path: str | Path, *, verify: bool = True) -> tuple[Path, list[str]]:
    """The checkpoint that `path` means, for every reader (resume, eval, export, serve): a
    checkpoint directory is itself, if loadable; a run directory (its `checkpoints/`) or a
    checkpoints directory means its newest loadable checkpoint by step (`newest_loadable`: a
    lagging `latest` is not followed, damaged newer ones are skipped and returned, one line each).
    Raises NoLoadableCheckpoint naming the damage or what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise NoLoadableCheckpoint(f"{path}: no such directory; give a run dir, its checkpoints dir or a "
                                   f"checkpoint dir like {path / 'checkpoints' / tag_for(100)}")
    if is_checkpoint_dir(path):
        problem = check_checkpoint(path, verify=verify)
        if problem is not None:
            raise NoLoadableCheckpoint(f"damaged checkpoint: {problem}. Pass an older checkpoint, or the run "
                                       f"dir {path.parent.parent} to take its newest intact one")
        return path, []
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    newest, skipped = newest_loadable(ckpt_dir, verify=verify)
    if newest is None:
        damaged = f" (damaged: {' | '.join(skipped)})" if skipped else ""
        raise NoLoadableCheckpoint(f"{ckpt_dir}: holds no loadable checkpoint{damaged}; give a run dir, its "
                                   f"checkpoints dir or a checkpoint dir like {ckpt_dir / tag_for(100)}")
    return newest, skipped


def progress_evidence(run_dir: Path) -> list[str]:
    """What in `run_dir` shows that a run already trained there (empty for an unused run dir)."""
    found = []
    ckpt_dir = run_dir / "checkpoints"
    latest = ckpt_dir / "latest"
    if latest.is_file() or latest.is_symlink():
        target = os.readlink(latest) if latest.is_symlink() else latest.read_text().strip()
        found.append(f"{latest} -> {target!r}")
    tags = [p.name for p in committed_checkpoints(ckpt_dir)]
    if tags:
        found.append(f"{len(tags)} checkpoint dir(s) ({', '.join(tags[-3:])})")
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        lines = metrics.read_text(errors="replace").splitlines()
        found.append(f"{metrics} ({len(lines)} lines)")
    return found


def _plan_for(path: Path, skipped: list[str], why: str) -> ResumePlan:
    verified = (path / MANIFEST_FILE).is_file()
    step = read_step(path)
    note = "" if verified else " (no manifest: saved by an older version, loaded unverified)"
    return ResumePlan(path, step, skipped, verified, message=f"resuming from {path} at step {step}{note}{why}")


def plan_resume(run_dir: str | Path, resume: str | None, *, overwrite: bool = False,
                verify: bool = True) -> ResumePlan:
    """Decide what this run starts from. Raises ResumeError naming what was found and the fix."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if overwrite:
        if resume is not None:
            raise ResumeError(f"--overwrite starts {run_dir} over; it cannot be combined with --resume {resume}")
        found = progress_evidence(run_dir)
        return ResumePlan(None, overwrite=True, message=(
            f"--overwrite: clearing {run_dir} ({'; '.join(found)}) and starting fresh" if found
            else f"--overwrite: {run_dir} holds no run; starting fresh"))
    if resume is None:
        found = progress_evidence(run_dir)
        if found:
            raise ResumeError(
                f"run dir {run_dir} already holds a run ({'; '.join(found)}). Continue it with "
                f"--resume auto, or start over with --overwrite (deletes its checkpoints and metrics)")
        return ResumePlan(None, message=f"fresh run in {run_dir}")
    if resume == "auto":
        path, skipped = newest_loadable(ckpt_dir, verify=verify)
        if path is not None:
            why = f"; skipped damaged newer checkpoint(s): {' | '.join(skipped)}" if skipped else ""
            return _plan_for(path, skipped, why)
        found = progress_evidence(run_dir)
        if found:
            damaged = f"; damaged: {' | '.join(skipped)}" if skipped else ""
            raise ResumeError(
                f"--resume auto: no loadable checkpoint in {ckpt_dir}, but {run_dir} shows progress "
                f"({'; '.join(found)}){damaged}. Restore a checkpoint, pass --resume PATH, or start over "
                f"with --overwrite")
        return ResumePlan(None, message=f"no checkpoint in {ckpt_dir}: starting fresh")
    if not Path(resume).is_dir():
        raise ResumeError(f"--resume {resume}: no such directory; use --resume auto or a checkpoint "
                          f"directory like {ckpt_dir / tag_for(100)}")
    try:
        path, skipped = checkpoint_for(resume, verify=verify)
    except NoLoadableCheckpoint as e:
        raise ResumeError(f"--resume {resume}: {e} (or --resume auto)") from None
    return _plan_for(path, skipped, "")


def clear_run(run_dir: Path) -> None:
    """--overwrite: remove what a previous run wrote (checkpoints, metrics, tensorboard logs)."""
    for name in ("checkpoints", "tb"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)
