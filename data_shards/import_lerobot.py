"""LeRobot dataset (format v3.0, also v2.x) -> MegaVLA episodes. Read with pyarrow + PyAV; no lerobot.

The v3.0 layout (lerobot.datasets.utils / lerobot_dataset.py, codebase_version "v3.0")::

    meta/info.json                  fps, features {key: {dtype, shape, names}}, data_path, video_path
    meta/tasks.parquet              one row per task: column task_index, the task string is the
                                    pandas index (stored as column "__index_level_0__" / "task")
    meta/episodes/chunk-XXX/file-YYY.parquet   one row per episode: episode_index, length,
                                    dataset_from_index, dataset_to_index, data/chunk_index,
                                    data/file_index, videos/<key>/{chunk_index, file_index,
                                    from_timestamp, to_timestamp}, stats/... (not read)
    data/chunk-XXX/file-YYY.parquet frames of many episodes (one row group per episode as lerobot
                                    writes them): <state key>, <action key>, timestamp, frame_index,
                                    episode_index, index, task_index, and per image feature
                                    (``use_videos=False``) a struct<bytes, path> column of PNGs
    videos/<key>/chunk-XXX/file-YYY.mp4  many episodes per file (AV1 by default); episode e
                                    starts at its from_timestamp

Camera features are ``dtype: video`` (frames in the MP4s) or ``dtype: image`` (PNG bytes in the data
parquet). Metadata reading and the checks on the paths it names: import_lerobot_meta.py.

Format v2.x (v2.0 / v2.1) is read too: ``meta/tasks.jsonl`` ({task_index, task} per line),
``meta/episodes.jsonl`` ({episode_index, tasks, length}), one data file and one video per episode
at the ``data_path`` / ``video_path`` templates of info.json (``episode_chunk`` = index //
``chunks_size``), each video starting at 0. Other versions are refused.

Action spaces (``action_space``):

* ``joint`` (default, what most LeRobot robots record): embodiment ``robot/joint``; ``actions`` =
  the dataset's action vector as recorded (absolute joint/gripper targets, the dataset's own dim
  order and units), every dim supervised (``action_mask`` all True), also kept as
  ``joint_actions``; ``state`` = the state vector as recorded. Not mixed with end-effector
  embodiments in the norm stats.
* ``ee``: the state key holds the end-effector pose ``[x, y, z, rx, ry, rz, gripper]`` (metres,
  axis-angle, gripper in [0, 1]) in the robot base frame, taken as the ego frame (x forward,
  y left, z up). Embodiment ``robot/arm``; state and actions follow the project convention
  (data_shards/hands.py) via ``hands.ee_track_state_actions``; the recorded action vector is
  kept as ``joint_actions``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from . import hands

from .format import CAMERAS, Episode, Subtask, encode_jpeg, resize_with_pad
from .import_lerobot_meta import (CONVERT_HINT, SUPPORTED_VERSIONS, camera_features, list_episodes,  # noqa: F401
                                  load_info, load_tasks)
from .importing import ImportRefused, SkipEpisode, SourceEpisode, decode_video_frames

log = logging.getLogger(__name__)


@dataclass
class LeRobotOptions:
    root: str
    cameras: dict[str, str]  # our camera -> lerobot camera feature key (dtype video or image)
    state_key: str
    action_key: str
    action_space: str  # joint | ee
    fps: float  # the dataset's frame rate (info.json)
    stride: int  # keep every stride-th frame (--fps below the dataset's rate)
    dims: dict[str, int]  # state / actions: values per frame (info.json feature shape)
    image_size: int
    scene: int
    image_keys: tuple[str, ...] = ()  # camera features stored as PNG in the data parquet (dtype image)


# The last row groups read, per process: one entry, so memory stays at one row group per worker.
_ROW_GROUP_CACHE: dict[tuple, Any] = {}


def _leaf_column(pf, name: str) -> int:
    """The parquet leaf-column index of top-level column ``name`` (row-group statistics are per
    leaf; an Arrow field index is not one once nested columns -- lerobot's image structs, list
    columns -- come before it), or -1."""
    group = pf.metadata.row_group(0)
    return next((i for i in range(group.num_columns) if group.column(i).path_in_schema == name), -1)


def _episode_rows(path: Path, ep_index: int, what: str, columns: list[str]):
    """The rows of one episode (``columns`` of them that exist): only the row groups whose
    episode_index range covers it are read (row-group statistics), then the episode's contiguous
    rows are sliced out. (A dataset filter would be simpler but fails in pyarrow 21 on a
    fixed-size-list column that holds nulls.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise SkipEpisode(f"{what}: data file {path} is missing")
    try:
        pf = pq.ParquetFile(path)
        if "episode_index" not in pf.schema_arrow.names:
            raise SkipEpisode(f"{what}: {path} has no column 'episode_index'")
        col = _leaf_column(pf, "episode_index") if pf.metadata.num_row_groups else -1
        groups = []
        for g in range(pf.metadata.num_row_groups):
            stats = pf.metadata.row_group(g).column(col).statistics if col >= 0 else None
            if stats is None or not stats.has_min_max or stats.min <= ep_index <= stats.max:
                groups.append(g)
        read = [c for c in dict.fromkeys(columns + ["episode_index"]) if c in pf.schema_arrow.names]
        key = (str(path), path.stat().st_mtime_ns, tuple(groups), tuple(read))
        if key not in _ROW_GROUP_CACHE:  # consecutive episodes share a data file and row group
            _ROW_GROUP_CACHE.clear()
            _ROW_GROUP_CACHE[key] = (pf.read_row_groups(groups, columns=read) if groups
                                     else pf.schema_arrow.empty_table().select(read))
        table = _ROW_GROUP_CACHE[key]
    except SkipEpisode:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a corrupt file
        raise SkipEpisode(f"{what}: {path} is not a readable parquet file ({type(e).__name__}: "
                          f"{e}); re-download or re-export it") from None
    rows = np.flatnonzero(np.asarray(table.column("episode_index").to_numpy()) == ep_index)
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:
        return table.slice(int(rows[0]), int(rows.size))
    return table.take(pa.array(rows, pa.int64()))


def _image_frames(table, key: str, steps: np.ndarray, image_size: int, what: str) -> list[bytes]:
    """Rows ``steps`` of a lerobot image column (``struct<bytes, path>``, the PNG/JPEG bytes embedded
    by lerobot's embed_images), letterboxed to ``image_size`` and JPEG-encoded."""
    import io

    import pyarrow as pa
    from PIL import Image

    column = table.column(key).combine_chunks()
    if not pa.types.is_struct(column.type) or column.type.get_field_index("bytes") < 0:
        raise SkipEpisode(f"{what}: column {key!r} is {column.type}, not lerobot's image column "
                          "struct<bytes, path>")
    blobs = column.flatten()[column.type.get_field_index("bytes")]  # parent nulls count as null
    frames = []
    for t, row in enumerate(steps):
        data = blobs[int(row)].as_py()
        if not data:
            raise SkipEpisode(f"{what}: column {key!r} frame {t} holds no image bytes (a set written "
                              "without embedded images: re-export it with lerobot)")
        try:
            with Image.open(io.BytesIO(data)) as image:
                rgb = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise SkipEpisode(f"{what}: column {key!r} frame {t}: image does not decode "
                              f"({type(e).__name__}: {e})") from None
        frames.append(encode_jpeg(resize_with_pad(rgb, image_size)))
    return frames


def _width(feature: dict[str, Any]) -> int:
    return int(np.prod(feature.get("shape") or [1]))


def default_cameras(info: dict[str, Any]) -> dict[str, str]:
    """Map camera keys (video or image features) to our cameras by name: '*left*wrist*' / '*wrist*' /
    the first other key."""
    keys = camera_features(info)
    mapping: dict[str, str] = {}
    for key in keys:
        low = key.lower()
        if "wrist" in low or "hand" in low:
            cam = "left_wrist" if "left" in low else "right_wrist"
        else:
            cam = "head"
        if cam not in mapping:
            mapping[cam] = key
    ignored = sorted(set(keys) - set(mapping.values()))
    if ignored:
        log.warning("lerobot: camera keys %s not imported (only one per camera %s); map them with "
                    "--cameras", ignored, CAMERAS)
    return mapping


def output_stride(source_fps: float, fps: float | None, where: str) -> int:
    """Frames to advance per imported step so that the output runs at ``fps``."""
    if not fps or fps == source_fps:
        return 1
    stride = source_fps / fps
    if fps <= 0 or fps > source_fps or abs(stride - round(stride)) > 1e-6:
        raise ImportRefused(f"--fps {fps}: must divide the source frame rate {source_fps} of {where} "
                            f"(e.g. {source_fps / 2:g}, {source_fps / 3:g})")
    return int(round(stride))


def plan(root: str, cameras: dict[str, str] | None, state_key: str, action_key: str, action_space: str,
         fps: float | None, image_size: int, scene: int) -> tuple[LeRobotOptions, list[SourceEpisode]]:
    """Check the dataset before any work (refuse what cannot be read) and list its episodes."""
    path = Path(root)
    info = load_info(path)
    features = info["features"]
    for role, key in (("--state", state_key), ("--action", action_key)):
        if key not in features:
            raise ImportRefused(f"{path / 'meta/info.json'}: no feature {key!r} for {role}; "
                                f"features: {sorted(features)}")
    if action_space not in ("joint", "ee"):
        raise ImportRefused(f"--action-space={action_space!r}: choose joint or ee")
    if action_space == "ee" and list(features[state_key]["shape"]) != [7]:
        raise ImportRefused(f"--action-space ee needs {state_key!r} = [x, y, z, rx, ry, rz, gripper] "
                            f"(7 values); it has shape {features[state_key]['shape']}")
    cams = dict(cameras) if cameras else default_cameras(info)
    for cam, key in cams.items():
        if cam not in CAMERAS:
            raise ImportRefused(f"--cameras: unknown camera {cam!r}; choose from {CAMERAS}")
        if key not in camera_features(info):
            raise ImportRefused(f"--cameras {cam}={key}: {key!r} is not a camera feature (dtype video "
                                f"or image) of {path}; camera features: {camera_features(info)}")
    image_keys = tuple(sorted({k for k in cams.values() if features[k]["dtype"] == "image"}))
    video_keys = sorted(set(cams.values()) - set(image_keys))
    if video_keys and not info.get("video_path"):
        raise ImportRefused(f"{path / 'meta/info.json'}: video features {video_keys} but no video_path")
    opts = LeRobotOptions(root=str(path), cameras=cams, state_key=state_key, action_key=action_key,
                          action_space=action_space, fps=float(info["fps"]),
                          stride=output_stride(float(info["fps"]), fps, str(path)),
                          image_size=image_size, scene=scene, image_keys=image_keys,
                          dims={"state": _width(features[state_key]), "actions": _width(features[action_key])})
    tasks = load_tasks(path, info)
    episodes = []
    for row in list_episodes(path, info, video_keys):
        row["tasks"] = tasks
        episodes.append(SourceEpisode(f"episode {row['episode_index']}", (opts, row)))
    return opts, episodes


def convert(locator: tuple[LeRobotOptions, dict[str, Any]]) -> Episode:
    """One LeRobot episode -> Episode; SkipEpisode naming the file and field on bad input."""
    opts, row = locator
    root, ep_index, length = Path(opts.root), int(row["episode_index"]), int(row["length"])
    what = f"episode {ep_index}"
    data_rel = row["data"]
    columns = [opts.state_key, opts.action_key, "frame_index", "task_index", *opts.image_keys]
    table = _episode_rows(root / data_rel, ep_index, what, columns)
    absent = [c for c in columns if c not in table.column_names]
    if absent:
        raise SkipEpisode(f"{what}: {data_rel} has no column(s) {absent}")
    if table.num_rows != length:
        raise SkipEpisode(f"{what}: {data_rel} holds {table.num_rows} frames, meta/episodes says "
                          f"length {length}")
    order = np.argsort(np.asarray(table.column("frame_index").to_pylist()))
    arrays = {}
    for role, key in (("state", opts.state_key), ("actions", opts.action_key)):
        column = table.column(key)
        if column.null_count:
            raise SkipEpisode(f"{what}: {data_rel} column {key!r} ({role}) is null in "
                              f"{column.null_count} of {length} frames: frames but no {role}")
        flat = np.asarray(column.combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float32)
        if flat.size != length * opts.dims[role]:
            raise SkipEpisode(f"{what}: {data_rel} column {key!r} ({role}) holds {flat.size} values for "
                              f"{length} frames x {opts.dims[role]} dims (meta/info.json): frames "
                              f"without {role}")
        arr = flat.reshape(length, -1)[order][::opts.stride]
        if not np.isfinite(arr).all():
            raise SkipEpisode(f"{what}: {data_rel} column {key!r} ({role}) has "
                              f"{int((~np.isfinite(arr)).sum())} NaN/inf values")
        arrays[role] = arr
    task_index = int(table.column("task_index")[0].as_py())
    if task_index not in row["tasks"]:
        raise SkipEpisode(f"{what}: task_index {task_index} has no task in meta/tasks "
                          f"(known: {sorted(row['tasks'])})")
    frames = {}
    steps = arrays["actions"].shape[0]
    for cam, key in opts.cameras.items():
        if key in opts.image_keys:  # PNG in the data parquet (lerobot's use_videos=False)
            frames[cam] = _image_frames(table, key, order[::opts.stride], opts.image_size, f"{what}: {data_rel}")
            continue
        rel, start = row["videos"][key]
        frames[cam] = decode_video_frames(root / rel, start, steps, opts.fps, opts.image_size, f"{what} camera {key}",
                                          stride=opts.stride, fps_from="the rate is meta/info.json 'fps'")
    instruction = row["tasks"][task_index]
    common = dict(scene=opts.scene, task=task_index, episode=ep_index, instruction=instruction,
                  subtasks=[Subtask(instruction, 0, steps)], fps=opts.fps / opts.stride, frames=frames,
                  step_valid=np.ones(steps, bool), joint_actions=arrays["actions"],
                  extra={"source": "lerobot", "root": str(root), "episode_index": ep_index,
                         "action_space": opts.action_space, "cameras": opts.cameras})
    if opts.action_space == "joint":
        return Episode(embodiment="robot/joint", state=arrays["state"], actions=arrays["actions"],
                       action_mask=np.ones(arrays["actions"].shape[1], bool), **common)
    # The dataset's own pose encoding (position + axis-angle) is parsed here; what we store is
    # decided by hands.ee_track_state_actions (the project's one state/action representation).
    poses = np.tile(np.eye(4), (steps, 1, 1))
    poses[:, :3, 3] = arrays["state"][:, :3]
    poses[:, :3, :3] = Rotation.from_rotvec(arrays["state"][:, 3:6].astype(np.float64)).as_matrix()
    state, actions = hands.ee_track_state_actions(poses, arrays["state"][:, 6])
    return Episode(embodiment="robot/arm", state=state, actions=actions,
                   action_mask=np.ones(actions.shape[1], bool), **common)
