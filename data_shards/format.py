"""One episode <-> the members of one WebDataset tar sample. Shared by the writer and the reader.

One tar sample holds one whole episode (see docs/data_format.md for why): the reader draws several
timesteps per decoded episode and decodes only the JPEG frames it uses.

Members of sample ``<key>`` (``<key>`` = ``<embodiment-slug>_<scene>_<task>_<episode>``):

=========================  =====================================================================
``<key>.meta.json``        embodiment, scene, task, instruction, subtasks, fps, cameras, dims, ...
``<key>.state.npy``        float32 [T, S]
``<key>.actions.npy``      float32 [T, A]   relative end-effector actions (format convention)
``<key>.action_mask.npy``  bool [A]         supervised action dims (gripper off for human data)
``<key>.step_valid.npy``   bool [T]         False where the action is unknown (tracker dropout)
``<key>.joint_actions.npy`` float32 [T, J]  optional, robot only
``<key>.hand_keypoints.npy`` float32 [T, 2, 17, 3] human only: 3D keypoints, head-camera frame
``<key>.head_pose.npy``    float32 [T, 4, 4] human only: camera-to-world pose of the head camera
``<key>.<cam>.<t>.jpg``    JPEG frame t (4 digits) of camera ``cam`` (only for present cameras)
=========================  =====================================================================
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

from .embodiments import EMBODIMENT_IDS

# 2: state orientation as the first two rotation-matrix columns (10 numbers per arm); 1 had
# axis-angle (7 per arm), which flips sign near a half turn. v1 sets are refused with the fix
# (`megavla data convert`, data_shards/convert.py), never read as if they were v2.
FORMAT_VERSION = 2
CONVERT_HINT = ("episode format v1 stores the state orientation as axis-angle, this code reads v{v} "
                "(6D rotation columns, docs/data_format.md); convert the set with `megavla data "
                "convert OLD_DIR --out NEW_DIR` or regenerate it")
CAMERAS = ("head", "left_wrist", "right_wrist")
ARRAY_KEYS = ("state", "actions", "action_mask", "step_valid", "joint_actions", "hand_keypoints",
              "head_pose")
REQUIRED_ARRAYS = ("state", "actions", "action_mask", "step_valid")


class EpisodeFormatError(ValueError):
    """A sample does not follow the episode format; the message names the key and member."""


@dataclass
class Subtask:
    text: str
    start: int  # first step (inclusive)
    end: int  # last step (exclusive)


@dataclass
class Episode:
    embodiment: str
    scene: int
    task: int
    episode: int
    instruction: str
    subtasks: list[Subtask]
    fps: float
    state: np.ndarray  # float32 [T, S]
    actions: np.ndarray  # float32 [T, A]
    action_mask: np.ndarray  # bool [A]
    step_valid: np.ndarray  # bool [T]
    frames: dict[str, list[bytes]]  # camera -> T JPEG-encoded frames (absent camera: no key)
    joint_actions: np.ndarray | None = None
    hand_keypoints: np.ndarray | None = None
    head_pose: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata, kept in meta.json

    @property
    def num_steps(self) -> int:
        return int(self.actions.shape[0])

    @property
    def key(self) -> str:
        slug = self.embodiment.replace("/", "-")
        return f"{slug}_s{self.scene:04d}_t{self.task:04d}_e{self.episode:06d}"

    @property
    def combo(self) -> str:
        """The scene x task combination, as used by diversity subsets and manifests."""
        return f"{self.scene}:{self.task}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


# The header np.save writes for a plain little-endian C-order array (format 1.0). np.load parses it
# with ast.literal_eval, ~60-100 us per array -- per episode that was more than the tar walk of its
# members; this regex + frombuffer takes a few us. Anything else goes through np.load.
_NPY_SIMPLE = re.compile(rb"\{'descr': '([<|][a-z][0-9]+)', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \}")


def _npy_fast(data: bytes) -> np.ndarray | None:
    if data[:8] != b"\x93NUMPY\x01\x00" or len(data) < 10:
        return None
    end = 10 + int.from_bytes(data[8:10], "little")
    match = _NPY_SIMPLE.match(data, 10, end)
    if match is None:
        return None
    dtype = np.dtype(match.group(1).decode())
    if dtype.kind not in "biuf":
        return None
    shape = tuple(int(x) for x in match.group(2).split(b",") if x.strip())
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - end != count * dtype.itemsize:
        return None   # let np.load report the truncation
    return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape).copy()


def _npy_load(data: bytes, where: str) -> np.ndarray:
    try:
        fast = _npy_fast(bytes(data))
        if fast is not None:
            return fast
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is a format error with a location
        raise EpisodeFormatError(f"{where}: not a readable .npy array ({e})") from None


def episode_to_sample(ep: Episode) -> dict[str, Any]:
    """Members of one tar sample (webdataset TarWriter input)."""
    validate_episode(ep)
    meta = {
        "format_version": FORMAT_VERSION,
        "embodiment": ep.embodiment,
        "scene": ep.scene,
        "task": ep.task,
        "episode": ep.episode,
        "instruction": ep.instruction,
        "subtasks": [{"text": s.text, "start": s.start, "end": s.end} for s in ep.subtasks],
        "fps": ep.fps,
        "num_steps": ep.num_steps,
        "cameras": {cam: cam in ep.frames for cam in CAMERAS},
        "state_dim": int(ep.state.shape[1]),
        "action_dim": int(ep.actions.shape[1]),
        "extra": ep.extra,
    }
    sample: dict[str, Any] = {"__key__": ep.key, "meta.json": json.dumps(meta).encode()}
    for name in ARRAY_KEYS:
        value = getattr(ep, name)
        if value is not None:
            sample[f"{name}.npy"] = _npy_bytes(value)
    for cam, frames in ep.frames.items():
        for t, jpg in enumerate(frames):
            sample[f"{cam}.{t:04d}.jpg"] = jpg
    return sample


def sample_to_episode(sample: dict[str, Any], where: str = "") -> Episode:
    """Parse a raw tar sample (bytes members). JPEG frames stay encoded; decode only what is used.

    Raises EpisodeFormatError naming ``where`` (shard path) + key + member on any problem.
    """
    key = sample.get("__key__", "?")
    loc = f"{where}:{key}" if where else key
    if "meta.json" not in sample:
        raise EpisodeFormatError(f"{loc}: missing member 'meta.json'")
    try:
        meta = json.loads(sample["meta.json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise EpisodeFormatError(f"{loc}: meta.json is not valid JSON ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise EpisodeFormatError(f"{loc}.meta.json: format_version={meta.get('format_version')!r}; "
                                 + CONVERT_HINT.format(v=FORMAT_VERSION))
    arrays: dict[str, np.ndarray | None] = {}
    for name in ARRAY_KEYS:
        member = f"{name}.npy"
        if member in sample:
            arrays[name] = _npy_load(sample[member], f"{loc}.{member}")
        elif name in REQUIRED_ARRAYS:
            raise EpisodeFormatError(f"{loc}: missing member '{member}'")
        else:
            arrays[name] = None
    frames: dict[str, list[bytes]] = {}
    # "__frames__": cameras whose frames a reader located as one sequence (megavla/data/member_index.py)
    located = sample.get("__frames__", {})
    for cam, present in meta.get("cameras", {}).items():
        if present:
            steps = int(meta["num_steps"])
            if cam in located:
                frames[cam] = located[cam][:steps]
                missing = list(range(len(frames[cam]), steps))
            else:
                frames[cam] = [sample.get(f"{cam}.{t:04d}.jpg") for t in range(steps)]
                missing = [t for t, f in enumerate(frames[cam]) if f is None]
            if missing:
                raise EpisodeFormatError(f"{loc}: missing member '{cam}.{missing[0]:04d}.jpg' "
                                         f"({len(missing)} frames of camera {cam} missing)")
    try:
        ep = Episode(
            embodiment=meta["embodiment"], scene=int(meta["scene"]), task=int(meta["task"]),
            episode=int(meta["episode"]), instruction=meta["instruction"],
            subtasks=[Subtask(**s) for s in meta["subtasks"]], fps=float(meta["fps"]),
            frames=frames, extra=meta.get("extra", {}), **arrays,  # type: ignore[arg-type]
        )
    except (KeyError, TypeError) as e:
        raise EpisodeFormatError(f"{loc}: meta.json lacks or misnames field {e}") from None
    validate_episode(ep, loc)
    return ep


def validate_episode(ep: Episode, loc: str = "") -> None:
    """Shapes, dtypes and finiteness. NaN/inf in state or actions is an error, never passed on."""
    loc = loc or ep.key
    T = ep.num_steps

    def fail(member: str, msg: str) -> None:
        raise EpisodeFormatError(f"{loc}.{member}: {msg}")

    if ep.embodiment not in EMBODIMENT_IDS:
        fail("meta.json", f"unknown embodiment {ep.embodiment!r}; known: {sorted(EMBODIMENT_IDS)}")
    if ep.actions.ndim != 2 or ep.state.ndim != 2:
        fail("actions.npy", f"actions {ep.actions.shape} and state {ep.state.shape} must be [T, dim]")
    if T == 0:
        fail("actions.npy", "the episode is empty (0 steps): nothing to train on; drop it in the converter")
    if ep.state.shape[0] != T:
        fail("state.npy", f"has {ep.state.shape[0]} steps, actions have {T}")
    if ep.action_mask.shape != (ep.actions.shape[1],) or ep.action_mask.dtype != np.bool_:
        fail("action_mask.npy", f"must be bool [{ep.actions.shape[1]}], got {ep.action_mask.dtype} "
                                f"{ep.action_mask.shape}")
    if ep.step_valid.shape != (T,) or ep.step_valid.dtype != np.bool_:
        fail("step_valid.npy", f"must be bool [{T}], got {ep.step_valid.dtype} {ep.step_valid.shape}")
    for name in ("state", "actions"):
        arr = getattr(ep, name)
        if arr.dtype != np.float32:
            fail(f"{name}.npy", f"dtype {arr.dtype}, expected float32")
        if not np.isfinite(arr).all():
            fail(f"{name}.npy", f"{int((~np.isfinite(arr)).sum())} non-finite values (NaN/inf); "
                                "mark unknown steps in step_valid and store finite placeholders")
    if ep.hand_keypoints is not None and ep.hand_keypoints.shape != (T, 2, 17, 3):
        fail("hand_keypoints.npy", f"shape {ep.hand_keypoints.shape}, expected ({T}, 2, 17, 3)")
    if ep.head_pose is not None and ep.head_pose.shape != (T, 4, 4):
        fail("head_pose.npy", f"shape {ep.head_pose.shape}, expected ({T}, 4, 4)")
    for cam, frames in ep.frames.items():
        if cam not in CAMERAS:
            fail("meta.json", f"unknown camera {cam!r}; known: {CAMERAS}")
        if len(frames) != T:
            fail(f"{cam}.jpg", f"{len(frames)} frames for {T} steps")


# Stored frames: JPEG at this quality (synth, importers and the closed-loop policy encode alike, so
# a policy sees the artefacts it was trained on).
JPEG_QUALITY = 90


def encode_jpeg(image: np.ndarray) -> bytes:
    """RGB uint8 [H, W, 3] -> the JPEG bytes of one stored frame."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=JPEG_QUALITY, colorspace="RGB")


def resize_with_pad(rgb: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 3] -> [size, size, 3] keeping the aspect ratio, centred on zeros (openpi's
    resize_with_pad): a non-square camera is letterboxed, never stretched. Importers and the reader
    both resize through this."""
    height, width = rgb.shape[:2]
    if height == width:
        return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    out = np.zeros((size, size, 3), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR)
    return out
