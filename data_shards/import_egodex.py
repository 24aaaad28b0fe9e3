"""EgoDex recordings (Apple Vision Pro, ARKit skeleton) -> ``human/ego`` episodes.

Layout: ``<SRC>/<task_name>/<n>.hdf5`` beside ``<n>.mp4`` (SRC = a part directory such as
``part1``, or one task directory). Per the published schema, each ``.hdf5`` holds

* ``transforms/<joint>``: float [N, 4, 4] world-from-joint poses (ARKit world frame, metres), for
  ``camera`` and the upper-body/hand skeleton (``leftHand``, ``leftThumbKnuckle``, ...,
  ``rightLittleFingerTip``);
* ``confidences/<joint>``: float [N] tracking confidence in [0, 1] (hand/body joints);
* ``camera/intrinsic``: [3, 3] (not needed here);
* file attributes ``llm_description`` (the task in words), for reversible tasks also
  ``llm_description2`` with ``which_llm_description`` (1 or 2) saying which one applies.

Mapping (documented in docs/data_format.md): joint positions are the translations of the
transforms; the 21 MediaPipe-ordered points ``<side>Hand`` (wrist), thumb Knuckle /
IntermediateBase / IntermediateTip / Tip, and for index, middle, ring and little finger Knuckle /
IntermediateBase / IntermediateTip / Tip, go through ``hands.mediapipe21_to_17`` (the four non-thumb
tips are dropped). The camera transform is the head pose. ARKit cameras look along -z with y up;
the format wants OpenCV axes (z forward, y down), so ``camera_axes="arkit"`` right-multiplies by
diag(1, -1, -1). ``auto`` (default) picks, per episode, the convention that puts the tracked wrists
in front of the camera, and records it in ``extra.camera_axes``.

A joint whose dataset is absent is NaN for the whole episode (named in ``extra.missing_joints``;
an episode without any valid palm is skipped with that list). NaN transforms and joints with
confidence below ``min_confidence`` become NaN keypoints: hands_to_actions' masking path.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import hands

from .format import Episode
from .import_hands import HumanClip, human_episode
from .import_lerobot import output_stride
from .importing import ImportRefused, SkipEpisode, SourceEpisode

log = logging.getLogger(__name__)

EGODEX_FPS = 30.0
_FINGER_PARTS = ("Knuckle", "IntermediateBase", "IntermediateTip", "Tip")
ARKIT_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


def mediapipe21_joint_names(side: str) -> list[str]:
    """EgoDex joint names of one hand (``side`` = left | right) in MediaPipe 21-point order."""
    names = [f"{side}Hand"] + [f"{side}Thumb{p}" for p in _FINGER_PARTS]
    for finger in ("Index", "Middle", "Ring", "Little"):
        names += [f"{side}{finger}Finger{p}" for p in _FINGER_PARTS]
    return names


# hands.HANDS order: hand 0 = right, 1 = left. The 17 joints each hand contributes, by our index.
EGODEX_JOINTS_17 = {side: [mediapipe21_joint_names(side)[i] for i in hands.MEDIAPIPE_INDEX]
                    for side in ("right", "left")}


@dataclass
class EgoDexOptions:
    root: str
    image_size: int
    min_confidence: float
    stride: int
    camera_axes: str  # auto | arkit | opencv


def _natural_key(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path)))


def plan(src: str, fps: float | None, image_size: int, min_confidence: float,
         camera_axes: str) -> tuple[EgoDexOptions, list[SourceEpisode]]:
    root = Path(src)
    if not root.is_dir():
        raise ImportRefused(f"{src}: not a directory (expected an EgoDex part or task directory)")
    if camera_axes not in ("auto", "arkit", "opencv"):
        raise ImportRefused(f"--camera-axes={camera_axes!r}: choose auto, arkit or opencv")
    files = sorted(root.rglob("*.hdf5"), key=_natural_key)
    if not files:
        raise ImportRefused(f"{src}: no *.hdf5 files (expected <task>/<n>.hdf5 + <n>.mp4)")
    opts = EgoDexOptions(root=str(root), image_size=image_size, min_confidence=min_confidence,
                         stride=output_stride(EGODEX_FPS, fps, src), camera_axes=camera_axes)
    tasks = sorted({f.parent.name for f in files})
    episodes = [SourceEpisode(str(f.relative_to(root)), (opts, str(f), i, tasks.index(f.parent.name)))
                for i, f in enumerate(files)]
    return opts, episodes


def _instruction(attrs, task_dir: str) -> str:
    def text(key: str) -> str | None:
        value = attrs.get(key)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return str(value).strip() if value is not None and str(value).strip() else None

    which = attrs.get("which_llm_description")
    if which is not None and int(which) == 2 and text("llm_description2"):
        return text("llm_description2")
    return text("llm_description") or task_dir.replace("_", " ")


def _read_joint(f, group: str, name: str, n: int, path: Path) -> np.ndarray | None:
    if group not in f or name not in f[group]:
        return None
    data = np.asarray(f[group][name], dtype=np.float64)
    expected = (n, 4, 4) if group == "transforms" else (n,)
    if data.shape != expected:
        raise SkipEpisode(f"{path}: {group}/{name} has shape {data.shape}, expected {expected} "
                          "(one entry per camera frame)")
    return data


def convert(locator: tuple[EgoDexOptions, str, int, int]) -> Episode:
    import h5py  # optional dependency (extra "import")

    opts, path_str, index, task_id = locator
    path = Path(path_str)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise SkipEpisode(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        if "transforms" not in f or "camera" not in f["transforms"]:
            raise SkipEpisode(f"{path}: no transforms/camera dataset (the head pose); not an "
                              "EgoDex episode file")
        camera = np.asarray(f["transforms"]["camera"], dtype=np.float64)
        n = camera.shape[0]
        if camera.shape != (n, 4, 4) or n == 0:
            raise SkipEpisode(f"{path}: transforms/camera has shape {camera.shape}, expected [N, 4, 4]")
        world = np.full((n, 2, hands.NUM_KEYPOINTS, 3), np.nan)
        conf = np.ones((n, 2, hands.NUM_KEYPOINTS))
        missing = []
        for h, side in enumerate(hands.HANDS):
            for k, joint in enumerate(EGODEX_JOINTS_17[side]):
                pose = _read_joint(f, "transforms", joint, n, path)
                if pose is None:
                    missing.append(joint)
                    continue
                world[:, h, k] = pose[:, :3, 3]
                c = _read_joint(f, "confidences", joint, n, path)
                if c is not None:
                    conf[:, h, k] = c
        instruction = _instruction(f.attrs, path.parent.name)
    if missing:
        log.debug("%s: joints absent: %s", path, missing)
    axes = opts.camera_axes
    if axes == "auto":
        axes = _detect_axes(camera, world)
    head = camera @ ARKIT_TO_OPENCV if axes == "arkit" else camera
    cam_from_world = rigid_inverse(np.where(np.isfinite(head), head, np.eye(4)))
    keypoints = np.einsum("tij,thkj->thki", cam_from_world[:, :3, :3], world) + cam_from_world[:, None, None, :3, 3]
    keypoints[~np.isfinite(head).all(axis=(1, 2))] = np.nan
    s = opts.stride
    clip = HumanClip(name=str(path), keypoints=keypoints[::s], head_pose=head[::s],
                     confidence=conf[::s], video=path.with_suffix(".mp4"), video_fps=EGODEX_FPS,
                     video_fps_from=f"EgoDex records at {EGODEX_FPS:g} fps", stride=s, instruction=instruction, scene=0, task=task_id, episode=index,
                     extra={"source": "egodex", "file": str(path), "task_dir": path.parent.name,
                            "camera_axes": axes, "missing_joints": missing})
    try:
        return human_episode(clip, opts.image_size, opts.min_confidence)
    except SkipEpisode as e:
        if missing:
            raise SkipEpisode(f"{e} (joints absent from the file: {missing})") from None
        raise


def _detect_axes(camera: np.ndarray, world: np.ndarray) -> str:
    """The camera convention under which the tracked wrists lie in front of the camera (z > 0)."""
    inv = rigid_inverse(np.where(np.isfinite(camera), camera, np.eye(4)))
    wrists = world[:, :, hands.KP["wrist"]]  # [N, 2, 3]
    depth = np.einsum("tj,thj->th", inv[:, 2, :3], wrists) + inv[:, 2, 3, None]  # raw camera z
    depth = depth[np.isfinite(camera).all(axis=(1, 2))]
    depth = depth[np.isfinite(depth)]
    if not depth.size:
        return "arkit"  # nothing tracked: the episode is skipped later anyway
    return "opencv" if np.median(depth) > 0 else "arkit"


def rigid_inverse(poses: np.ndarray) -> np.ndarray:
    """[..., 4, 4] rigid transforms -> their inverses [R^T, -R^T t] (no LAPACK call: a worker
    once spun for 15 min in np.linalg.inv on an oversubscribed machine)."""
    out = np.zeros_like(poses)
    rt = np.swapaxes(poses[..., :3, :3], -1, -2)
    out[..., :3, :3] = rt
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", rt, poses[..., :3, 3])
    out[..., 3, 3] = 1.0
    return out
