"""Shard-set layout and ``manifest.json``: what the writer produces and the reader relies on.

A **shard set** is one directory::

    <set>/shard-000000.tar     WebDataset tars, one sample per episode (format.episode_to_sample),
    <set>/shard-000001.tar     written with webdataset.TarWriter (ustar, mtime 0: same seed -> same bytes)
    <set>/norm_stats.json      per-embodiment normalization stats (see data_shards/stats.py)
    <set>/manifest.json        written LAST: its presence means the set is complete

``megavla data synth --out DIR`` writes **one shard set per embodiment family** — ``DIR/robot``
(``robot/*`` episodes) and ``DIR/human`` (``human/*``) — so a weighted mixture is just two sources::

    data.sources={robot: DIR/robot, human: DIR/human}  data.mixture.human=0.5

(the reader draws from each set by weight, with no per-sample embodiment filter, and each set
carries its own stats). Tools that take a ``DIR`` (inspect / stats / verify) accept a set or a
directory holding several sets (``find_shard_sets``).

``manifest.json`` (``format_version`` 1; paths are relative to the set directory)::

    {"format_version": 1,
     "episode_format_version": 2,                         data_shards.format.FORMAT_VERSION
     "shards": [{"path": "shard-000000.tar",
                 "samples": n, "episodes": n,              equal: one sample per episode
                 "steps": n, "valid_steps": n,             sum of T / of step_valid
                 "embodiments": {"robot/arm": n, ...},     episodes per embodiment
                 "combos": ["<scene>:<task>", ...],        sorted by (scene, task)
                 "first_key": "...", "last_key": "...",
                 "bytes": n, "sha256": "<hex>"}, ...],
     "totals": {"shards": n, "samples": n, "episodes": n, "steps": n, "valid_steps": n, "bytes": n,
                "embodiments": {"robot/arm": episodes},
                "steps_per_embodiment": {"robot/arm": steps},
                "combos": {"robot/arm": ["0:0", "0:1", ...]}},   scene x task combos per embodiment
     "target_shard_bytes": n,
     "episode_keys": {"path": "episode_keys.json",        the keys of every shard (below)
                      "episodes": n, "bytes": n, "sha256": "<hex>"},
     "generator": {...}}                                   how the episodes were made (synth args)

``episode_keys.json`` (beside the manifest, written before it) lists each shard's episode keys,
sorted: ``{"format_version": 1, "shards": {"shard-000000.tar": ["robot/arm/...", ...], ...}}``, one
line per shard. It lets the per-set check (data_shards/validate.py) see a key that two shards hold
without opening a shard: a worker reads only its own shards and could not see it. It is a file of its
own so that manifest.json stays small and readable (10^5 keys are ~3 MB; the manifest rows, first/last
key only, ~300 bytes per shard). Sets written before 2026-11-30 have no ``episode_keys``: they load,
without the cross-shard check (a warning; ``megavla data verify`` still finds repeats by reading).

A shard holds at most ``target_shard_bytes`` unless one episode alone is larger (then it is alone
in its shard).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from .format import CONVERT_HINT, FORMAT_VERSION

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
SHARD_PATTERN = "shard-{:06d}.tar"
SHARD_GLOB = "shard-*.tar"
EPISODE_KEYS_FILE = "episode_keys.json"
EPISODE_KEYS_VERSION = 1
SHARD_FIELDS = ("path", "samples", "episodes", "steps", "embodiments", "combos", "bytes", "sha256")


class ManifestError(ValueError):
    """A manifest is missing, unreadable or malformed; the message names the file and field."""


def embodiment_family(embodiment: str) -> str:
    """``robot/arm`` -> ``robot``: the shard set an episode goes to in ``megavla data synth``."""
    return embodiment.split("/", 1)[0]


def combo_sort_key(combo: str) -> tuple[int, ...]:
    return tuple(int(part) for part in combo.split(":"))


def shard_row(path: str, episodes: list[dict[str, Any]], num_bytes: int, sha256: str) -> dict[str, Any]:
    """One ``shards`` entry from per-episode facts (key, embodiment, combo, steps, valid_steps)."""
    embodiments: dict[str, int] = {}
    for e in episodes:
        embodiments[e["embodiment"]] = embodiments.get(e["embodiment"], 0) + 1
    return {
        "path": path,
        "samples": len(episodes),
        "episodes": len(episodes),
        "steps": sum(e["steps"] for e in episodes),
        "valid_steps": sum(e["valid_steps"] for e in episodes),
        "embodiments": dict(sorted(embodiments.items())),
        "combos": sorted({e["combo"] for e in episodes}, key=combo_sort_key),
        "first_key": episodes[0]["key"] if episodes else None,
        "last_key": episodes[-1]["key"] if episodes else None,
        "bytes": num_bytes,
        "sha256": sha256,
    }


def totals(rows: list[dict[str, Any]], combos_per_embodiment: dict[str, set[str]],
           steps_per_embodiment: dict[str, int]) -> dict[str, Any]:
    embodiments: dict[str, int] = {}
    for row in rows:
        for emb, n in row["embodiments"].items():
            embodiments[emb] = embodiments.get(emb, 0) + n
    return {
        "shards": len(rows),
        "samples": sum(r["samples"] for r in rows),
        "episodes": sum(r["episodes"] for r in rows),
        "steps": sum(r["steps"] for r in rows),
        "valid_steps": sum(r.get("valid_steps", r["steps"]) for r in rows),
        "bytes": sum(r["bytes"] for r in rows),
        "embodiments": dict(sorted(embodiments.items())),
        "steps_per_embodiment": dict(sorted(steps_per_embodiment.items())),
        "combos": {emb: sorted(c, key=combo_sort_key) for emb, c in sorted(combos_per_embodiment.items())},
    }


def encode_episode_keys(keys_per_shard: dict[str, list[str]]) -> tuple[bytes, dict[str, Any]]:
    """(bytes of ``episode_keys.json``, the manifest's ``episode_keys`` entry) for the keys of each
    shard (shard path -> keys, in manifest order). Deterministic: the same keys give the same bytes."""
    lines = [json.dumps(path) + ": " + json.dumps(sorted(keys), separators=(",", ":"))
             for path, keys in keys_per_shard.items()]
    text = ('{"format_version": %d, "shards": {\n' % EPISODE_KEYS_VERSION + ",\n".join(lines) + "\n}}\n")
    data = text.encode("utf-8")
    entry = {"path": EPISODE_KEYS_FILE, "episodes": sum(len(k) for k in keys_per_shard.values()),
             "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return data, entry


def load_episode_keys(set_dir: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, list[str]] | None:
    """Shard path -> its episode keys from ``episode_keys.json``; None for a set written before the
    file existed (no ``episode_keys`` in the manifest). ManifestError when the manifest names the file
    but it is missing, changed since the manifest was written, or does not match the shard rows."""
    entry = manifest.get("episode_keys")
    if entry is None:
        return None
    where = Path(set_dir) / MANIFEST_FILE
    fix = (f"restore it, write the set again, or delete the 'episode_keys' field of {where} to read the "
           "set without the cross-shard duplicate check")
    if not isinstance(entry, dict) or entry.get("path") != EPISODE_KEYS_FILE:
        raise ManifestError(f"{where}: field 'episode_keys' must be {{\"path\": \"{EPISODE_KEYS_FILE}\", ...}}, "
                            f"got {entry!r}")
    path = Path(set_dir) / EPISODE_KEYS_FILE
    try:
        with os.fdopen(open_regular_file(path), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing (manifest.json lists it); {fix}") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot be read ({e.strerror or e}); {fix}") from None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise ManifestError(f"{path}: sha256 differs from manifest.json's episode_keys.sha256 (changed "
                            f"since the set was written); {fix}")
    try:
        keys = json.loads(data)["shards"]
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{path}: not a key list ({type(e).__name__}: {e}); {fix}") from None
    for i, row in enumerate(manifest["shards"]):
        listed = keys.get(row["path"]) if isinstance(keys, dict) else None
        if not isinstance(listed, list) or len(listed) != row["episodes"]:
            got = "no list" if not isinstance(listed, list) else f"{len(listed)} keys"
            raise ManifestError(f"{path}: {row['path']!r} has {got}, manifest.json shards[{i}] has "
                                f"{row['episodes']} episodes; {fix}")
    return {row["path"]: keys[row["path"]] for row in manifest["shards"]}


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def shard_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a shard (missing, or not a regular file), or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "shard file missing"
    except OSError as e:
        return f"shard file cannot be examined ({e})"
    if not stat.S_ISREG(mode):
        return (f"not a regular file but a {file_kind(mode)}; a shard must be a regular tar file "
                "(replace it with the shard the manifest lists)")
    return None


def open_regular_file(path: str | os.PathLike) -> int:
    """``os.open`` for reading that never blocks on a FIFO (O_NONBLOCK) and refuses anything but a
    regular file (OSError naming what it is). The caller closes the descriptor."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"not a regular file but a {file_kind(mode)}", str(path))
    return fd


def read_regular_text(path: str | os.PathLike) -> str:
    """The text of a regular file (FileNotFoundError / OSError otherwise; never blocks on a FIFO)."""
    with os.fdopen(open_regular_file(path), "r", encoding="utf-8") as f:
        return f.read()


def load_manifest(set_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``<set_dir>/manifest.json``; ManifestError names the file, field and fix."""
    path = Path(set_dir) / MANIFEST_FILE
    try:
        text = read_regular_text(path)
    except FileNotFoundError:
        partial = sorted(p.name for p in Path(set_dir).glob("*.partial"))
        hint = (f" ({len(partial)} *.partial files: a write died midway; rerun the writer)"
                if partial else "")
        raise ManifestError(f"{path}: missing: not a complete shard set{hint}") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: a JSON {type(manifest).__name__}, not an object with format_version, "
                            "shards, ...; not a manifest a MegaVLA writer wrote: rerun the writer")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise ManifestError(f"{path}: format_version={manifest.get('format_version')!r}, this code "
                            f"reads {MANIFEST_VERSION}")
    if manifest.get("episode_format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: episode_format_version={manifest.get('episode_format_version')!r}; "
                            + CONVERT_HINT.format(v=FORMAT_VERSION))
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ManifestError(f"{path}: field 'shards' must be a list")
    for i, row in enumerate(shards):
        if not isinstance(row, dict):
            raise ManifestError(f"{path}: shards[{i}] must be an object with fields {list(SHARD_FIELDS)}")
        missing = [f for f in SHARD_FIELDS if f not in row]
        if missing:
            raise ManifestError(f"{path}: shards[{i}] lacks field(s) {missing}")
        if not isinstance(row["path"], str) or not row["path"]:
            raise ManifestError(f"{path}: shards[{i}].path={row['path']!r} must be a file name")
        if Path(row["path"]).is_absolute() or ".." in Path(row["path"]).parts:
            raise ManifestError(f"{path}: shards[{i}].path={row['path']!r} points outside the set; shard "
                                "paths must be relative to the set directory, without '..'")
    if "totals" not in manifest:
        raise ManifestError(f"{path}: field 'totals' missing")
    return manifest


def shard_paths(set_dir: str | os.PathLike) -> list[str]:
    """Absolute shard paths of a set, in manifest order (what a reader hands to webdataset)."""
    return [str(Path(set_dir) / row["path"]) for row in load_manifest(set_dir)["shards"]]


def find_shard_sets(root: str | os.PathLike, max_depth: int = 3) -> tuple[list[Path], list[Path]]:
    """(complete sets, incomplete dirs) under ``root``: dirs with a manifest.json, and dirs that
    hold shard tars or *.partial files but no manifest (an unfinished or crashed write)."""
    root = Path(root)
    if not root.is_dir():
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such directory")
        kind = "regular file" if root.is_file() else file_kind(root.stat().st_mode)
        hint = f" (its directory {root.parent} may be the set)" if root.name in (MANIFEST_FILE, "norm_stats.json") \
            or root.suffix == ".tar" else ""
        raise NotADirectoryError(f"{root}: is a {kind}, not a shard set; expected a shard set directory "
                                 f"(holding {MANIFEST_FILE}) or a directory of sets{hint}")
    complete: list[Path] = []
    incomplete: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        if (d / MANIFEST_FILE).is_file():
            complete.append(d)
            return
        if any(d.glob(SHARD_GLOB)) or any(d.glob("*.partial")):
            incomplete.append(d)
        if depth < max_depth:
            for sub in sorted(p for p in d.iterdir() if p.is_dir()):
                walk(sub, depth + 1)

    walk(root, 0)
    return complete, incomplete
