"""The project's file primitives: one atomic file writer and one file digest.

The atomic writer: write a sibling temp file, fsync, rename over the target.

A reader (a resuming trainer, `sweep status`, a data loader) sees the old file or the new one,
never half of one. The temp name carries the pid so two writers never share a temp file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)   # only left when the write or rename failed
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    dumps_kwargs.setdefault("indent", 1)
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (shards and checkpoint files are too large to slurp)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
