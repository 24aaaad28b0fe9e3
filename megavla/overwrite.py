"""The one overwrite rule of every command that writes output: an existing, non-empty output is
refused unless ``--overwrite`` is given, and the refusal comes before any work starts.

Where each command applies it:

* ``data synth`` / ``data convert`` / ``data import``: the shard writer refuses a finished set
  (data_shards/writer.py). ``data import`` is resumable by design: rerunning the same command
  continues an unfinished import; ``--overwrite`` starts over.
* ``tokenizer train``, ``data view --out``, ``experiment closed-loop --out``, ``experiment probe --out``:
  :func:`refuse_existing`.
* ``train`` / ``launch``: a run dir that holds a run needs ``--resume auto`` or ``--overwrite``
  (megavla/train/resume.py); ``sweep`` and ``experiment diversity|objectives`` resume by design.
* ``export``: megavla/train/export.py. ``demo`` writes only into a directory it owns (megavla/demo.py).
"""
from __future__ import annotations

from pathlib import Path


class OutputExists(FileExistsError, ValueError):
    """The output is there already and --overwrite was not given (a ValueError too: the CLIs report
    those as bad input, exit 2)."""


def existing_output(path: str | Path, patterns: tuple[str, ...] = ("*",)) -> list[str]:
    """What is at `path` now: [] for nothing or an empty directory, else names (a file: its own).
    `patterns`: only directory entries matching one of these globs count (a command that shares its
    output directory with others' files names the files it writes)."""
    path = Path(path)
    if path.is_dir():
        return sorted(p.name for p in path.iterdir() if any(p.match(g) for g in patterns))
    return [path.name] if path.exists() or path.is_symlink() else []


def refuse_existing(path: str | Path, overwrite: bool, what: str, patterns: tuple[str, ...] = ("*",)) -> None:
    """Raise OutputExists (one line: what is there, and the fix) unless `path` is absent or holds
    nothing matching `patterns`, or `overwrite` is set."""
    found = existing_output(path, patterns)
    if found and not overwrite:
        shown = ", ".join(found[:5]) + (f", ... ({len(found)} entries)" if len(found) > 5 else "")
        raise OutputExists(f"{path} already holds {what} ({shown}); pass --overwrite to replace it, "
                           "or choose another output path")
