"""What makes a directory `megavla demo`'s output: a marker file, checked by the demo (it claims
only a directory that is its own) and by `megavla train` / `megavla launch` (they refuse a run
dir inside one, which the demo restarts on every invocation). A module of its own so that those
checks (megavla/train/preflight.py) need not import the demo command.
"""
from __future__ import annotations

import json
from pathlib import Path

import megavla

MARKER_FILE = "megavla-demo.json"
# What the demo writes into OUT (and the `megavla export` line it prints suggests).
DEMO_ENTRIES = {MARKER_FILE, "shards", "tokenizers", "run", "export"}


def demo_output_holding(path: str | Path) -> Path | None:
    """The `megavla demo` output directory that `path` is, or lies inside (None: not a demo's)."""
    path = Path(path).resolve()
    for candidate in (path, *path.parents):
        if (candidate / MARKER_FILE).is_file():
            return candidate
    return None


class NotDemoOutput(ValueError):
    """--out holds files the demo did not write."""


def claim_output_dir(out: Path) -> None:
    """Make `out` the demo's (marker file), or raise NotDemoOutput when it holds another command's
    files. A directory with only the demo's own entries (one written before the marker) is adopted."""
    if (out / MARKER_FILE).is_file():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES) if out.is_dir() else []
    if foreign:
        raise NotDemoOutput(f"--out {out} holds files the demo did not write ({', '.join(foreign[:5])}"
                            f"{', ...' if len(foreign) > 5 else ''}): another command's output. Pick another "
                            f"--out (e.g. --out runs/demo2); the demo never writes into a directory it does not own")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).write_text(json.dumps({"written_by": "megavla demo", "version": megavla.__version__,
                                               "entries": sorted(DEMO_ENTRIES - {MARKER_FILE})}) + "\n")
