"""A LeRobot dataset's metadata: info.json, tasks, the episode list and where each episode's files are.

Split from import_lerobot.py (which converts frames); the on-disk layout is described there.

Paths come from the dataset: the ``data_path`` / ``video_path`` templates of meta/info.json, filled
with indices from meta/episodes and video keys from info.json's features. A dataset is someone else's
file, so every path it names must stay inside the dataset root: a template is refused before any
work when it uses anything but its plain fields (``{x.attr}`` / ``{x[0]}`` reach into Python
objects) or when a path it gives is absolute or climbs out with ``..``. The check is on the path as
written (normalized, symlinks not followed): the Hugging Face cache keeps a snapshot's files as
symlinks to blobs outside it, and those are the dataset's own files.
"""
from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any

from .importing import ImportRefused, SkipEpisode

SUPPORTED_VERSIONS = ("v3.0", "v2.1", "v2.0")
CONVERT_HINT = ("or convert it with lerobot: `python -m lerobot.datasets.v30.convert_dataset_v21_to_v30 "
                "--repo-id=<id>` (in an environment with lerobot installed)")
# The fields lerobot fills into each template (lerobot.datasets.utils DEFAULT_DATA_PATH / _VIDEO_PATH).
TEMPLATE_FIELDS = {"v3.0": {"data_path": ("chunk_index", "file_index"),
                            "video_path": ("video_key", "chunk_index", "file_index")},
                   "v2": {"data_path": ("episode_chunk", "episode_index"),
                          "video_path": ("video_key", "episode_chunk", "episode_index")}}
IMAGE_DTYPES = ("video", "image")  # camera features: frames in video files / PNG bytes in the data parquet


def read_parquet(path: Path, what: str, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    if not path.is_file():
        raise SkipEpisode(f"{what}: file {path} is missing")
    try:
        return pq.read_table(path, columns=columns)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a corrupt file
        raise SkipEpisode(f"{what}: {path} is not a readable parquet file ({type(e).__name__}: "
                          f"{e}); re-download or re-export it") from None


def _check_template(info_path: Path, info: dict[str, Any], key: str) -> None:
    """Refuse a template that is not a string of literal text and the plain fields lerobot fills."""
    template = info[key]
    allowed = TEMPLATE_FIELDS["v3.0" if info["codebase_version"] == "v3.0" else "v2"][key]
    if not isinstance(template, str):
        raise ImportRefused(f"{info_path}: {key} is {type(template).__name__}, not a path template string")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ImportRefused(f"{info_path}: {key}={template!r} is not a valid template ({e})") from None
    for _, name, spec, conversion in parts:
        if name is not None and (name not in allowed or conversion or "{" in (spec or "")):
            raise ImportRefused(f"{info_path}: {key}={template!r}: field {{{name}}} is not one of "
                                f"{['{%s}' % f for f in allowed]} (plain fields only, as lerobot writes them)")


def fill_path(root: Path, info: dict[str, Any], key: str, **fields: Any) -> str:
    """``info[key]`` filled with ``fields``: a path relative to ``root`` that stays inside it, or
    ImportRefused naming meta/info.json, the key and the path it gave."""
    template = info[key]
    try:
        rel = template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise ImportRefused(f"{root / 'meta/info.json'}: {key}={template!r} cannot be filled with "
                            f"{fields} ({type(e).__name__}: {e})") from None
    norm = os.path.normpath(rel)
    if os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise ImportRefused(f"{root / 'meta/info.json'}: {key}={template!r} gives {rel!r}, a file outside "
                            f"the dataset root {root}: refused (a dataset names only files under its own "
                            f"directory); fix {key} in meta/info.json")
    return norm


def load_info(root: Path) -> dict[str, Any]:
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise ImportRefused(f"{path}: missing; {root} is not a LeRobot dataset directory "
                            "(expected meta/info.json, meta/tasks.parquet, meta/episodes/, data/)")
    try:
        info = json.loads(path.read_text())
    except ValueError as e:
        raise ImportRefused(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise ImportRefused(f"{path}: a JSON {type(info).__name__}, not an object")
    version = info.get("codebase_version")
    if version not in SUPPORTED_VERSIONS:
        raise ImportRefused(f"{path}: codebase_version={version!r}; this importer reads "
                            f"{SUPPORTED_VERSIONS}; {CONVERT_HINT}")
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise ImportRefused(f"{path}: field {key!r} missing")
    for key in ("data_path", "video_path"):
        if info.get(key) is not None:
            _check_template(path, info, key)
    return info


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ImportRefused(f"{path}: missing (a v2.x LeRobot dataset lists its tasks and episodes there)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ImportRefused(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def load_tasks(root: Path, info: dict[str, Any]) -> dict[int, str]:
    if info["codebase_version"] != "v3.0":
        return {int(r["task_index"]): str(r["task"]) for r in _jsonl(root / "meta" / "tasks.jsonl")}
    path = root / "meta" / "tasks.parquet"
    try:
        table = read_parquet(path, "meta/tasks.parquet")
    except SkipEpisode as e:
        raise ImportRefused(str(e)) from None
    names = table.column_names
    pandas_meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    index_cols = [c for c in pandas_meta.get("index_columns", []) if isinstance(c, str)]
    text_col = "task" if "task" in names else (index_cols[0] if index_cols else None)
    if "task_index" not in names or text_col not in names:
        raise ImportRefused(f"{path}: expected columns 'task_index' and the task text (column "
                            f"'task' or the pandas index), found {names}")
    return {int(i): str(t) for i, t in zip(table.column("task_index").to_pylist(),
                                            table.column(text_col).to_pylist())}


def list_episodes(root: Path, info: dict[str, Any], video_keys: list[str]) -> list[dict[str, Any]]:
    """Per episode: episode_index, length, the data file and (video file, start s) per video key;
    every file inside ``root`` (fill_path)."""
    if info["codebase_version"] != "v3.0":
        chunk = int(info.get("chunks_size") or 1000)
        episodes = []
        for row in sorted(_jsonl(root / "meta" / "episodes.jsonl"), key=lambda r: r["episode_index"]):
            where = dict(episode_index=row["episode_index"], episode_chunk=row["episode_index"] // chunk)
            episodes.append({"episode_index": row["episode_index"], "length": row["length"],
                             "data": fill_path(root, info, "data_path", **where),
                             "videos": {k: (fill_path(root, info, "video_path", video_key=k, **where), 0.0)
                                        for k in video_keys}})
        return episodes
    try:
        return _v3_locations(root, info, video_keys)
    except KeyError as e:
        raise ImportRefused(f"{root / 'meta/episodes'}: episode rows lack field {e}") from None


def _v3_locations(root: Path, info: dict[str, Any], video_keys: list[str]) -> list[dict[str, Any]]:
    return [{"episode_index": r["episode_index"], "length": r["length"],
             "data": fill_path(root, info, "data_path", chunk_index=r["data/chunk_index"],
                               file_index=r["data/file_index"]),
             "videos": {k: (fill_path(root, info, "video_path", video_key=k,
                                      chunk_index=r[f"videos/{k}/chunk_index"],
                                      file_index=r[f"videos/{k}/file_index"]),
                            float(r[f"videos/{k}/from_timestamp"])) for k in video_keys}}
            for r in _episode_index_rows(root)]


def _episode_index_rows(root: Path) -> list[dict[str, Any]]:
    """Episode rows (without stats columns) from every meta/episodes parquet file, by index."""
    import pyarrow.parquet as pq

    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise ImportRefused(f"{root / 'meta' / 'episodes'}: no chunk-*/file-*.parquet files")
    rows: list[dict[str, Any]] = []
    for path in files:
        try:
            names = pq.read_schema(path).names
        except Exception as e:  # noqa: BLE001
            raise ImportRefused(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        wanted = [n for n in names if not n.startswith("stats/")]
        try:
            table = read_parquet(path, "meta/episodes", columns=wanted)
        except SkipEpisode as e:  # the episode list itself: nothing can be planned without it
            raise ImportRefused(str(e)) from None
        rows.extend(table.to_pylist())
    if not rows:
        raise ImportRefused(f"{root / 'meta' / 'episodes'}: no episode rows in {len(files)} file(s)")
    missing = [k for k in ("episode_index", "length", "data/chunk_index", "data/file_index")
               if k not in rows[0]]
    if missing:
        raise ImportRefused(f"{files[0]}: episode rows lack {missing}")
    return sorted(rows, key=lambda r: r["episode_index"])


def camera_features(info: dict[str, Any]) -> list[str]:
    """Feature keys that hold camera frames: video files or PNG images in the data parquet."""
    return [k for k, f in info["features"].items() if isinstance(f, dict) and f.get("dtype") in IMAGE_DTYPES]
