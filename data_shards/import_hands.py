"""Human recordings with 3D hand keypoints -> ``human/ego`` episodes; the ``megavla data import keypoints`` route.

``human_episode`` is the one builder for every hand source (EgoDex, the NPZ route of any tracker):
keypoints [T, 2, 17, 3] in the head-camera frame (OpenCV axes, metres; hand 0 right, 1 left; NaN =
not tracked) + camera-to-world head poses [T, 4, 4] + the head-camera frames. State, actions,
action mask (gripper dims masked) and step_valid come from hands.hands_to_actions (data_shards/hands.py),
the same function the mini-world's human episodes use; keypoints below ``min_confidence`` become
NaN first, which is that function's masking path (a step without both palms is invalid).

The NPZ route (``megavla data import keypoints SRC``): SRC holds, per episode, ``<name>.npz`` and
the head-camera video ``<name>.mp4`` beside it. NPZ arrays (np.savez, no pickled objects):

==========================  ==================================================================
``hand_keypoints``          float [T, 2, 17, 3]: the 17-keypoint layout of docs/data_format.md
``head_pose``               float [T, 4, 4]: camera-to-world pose of the head camera (OpenCV axes)
``instruction``             str (0-d array): the task, e.g. ``np.array("put the cup away")``
``fps``                     optional float: frame rate of keypoints and video (default --fps 10)
``keypoint_confidence``     optional float [T, 2, 17] in [0, 1]
``task``, ``scene``         optional int: scene x task ids for diversity subsets (default: the
                            instruction's rank among the sorted instructions / 0)
==========================  ==================================================================

Frame t of the video belongs to keypoints t (the video must have at least T frames).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import hands

from .format import Episode, Subtask
from .importing import ImportRefused, SkipEpisode, SourceEpisode, decode_video_frames

log = logging.getLogger(__name__)

DEFAULT_MIN_CONFIDENCE = 0.5


@dataclass
class HumanClip:
    """What a hand source provides for one episode (all arrays already at the output rate)."""
    name: str
    keypoints: np.ndarray  # [T, 2, 17, 3] head-camera frame; NaN = not tracked
    head_pose: np.ndarray  # [T, 4, 4]
    confidence: np.ndarray | None  # [T, 2, 17] or None
    video: Path
    video_fps: float  # frame rate of the video file
    video_fps_from: str  # where video_fps came from, for messages: a field or option that exists
    stride: int  # video frames per step
    instruction: str
    scene: int
    task: int
    episode: int
    extra: dict[str, Any]


def human_episode(clip: HumanClip, image_size: int, min_confidence: float) -> Episode:
    """One HumanClip -> a ``human/ego`` Episode (module docstring); SkipEpisode on bad input."""
    T = clip.keypoints.shape[0]
    if clip.keypoints.shape != (T, 2, hands.NUM_KEYPOINTS, 3) or T == 0:
        raise SkipEpisode(f"{clip.name}: hand_keypoints shape {clip.keypoints.shape}, expected "
                          f"[T, 2, {hands.NUM_KEYPOINTS}, 3] with T > 0")
    if clip.head_pose.shape != (T, 4, 4):
        raise SkipEpisode(f"{clip.name}: head_pose shape {clip.head_pose.shape}, expected [{T}, 4, 4] "
                          "(one pose per keypoint frame)")
    keypoints = np.array(clip.keypoints, dtype=np.float64)
    low = 0
    if clip.confidence is not None:
        if clip.confidence.shape != (T, 2, hands.NUM_KEYPOINTS):
            raise SkipEpisode(f"{clip.name}: keypoint_confidence shape {clip.confidence.shape}, "
                              f"expected [{T}, 2, {hands.NUM_KEYPOINTS}]")
        dropped = ~(clip.confidence >= min_confidence)  # NaN confidence counts as low
        low = int((dropped & np.isfinite(keypoints).all(-1)).sum())
        keypoints[dropped] = np.nan
    try:
        converted = hands.hands_to_actions(keypoints, clip.head_pose)
    except ValueError as e:
        raise SkipEpisode(f"{clip.name}: {e}") from None
    if not converted.step_valid.any():
        raise SkipEpisode(f"{clip.name}: no valid step: no frame has both palms tracked (wrist and "
                          f"four knuckles of each hand; frames without a palm: "
                          f"{converted.invalid_poses}, keypoints under confidence {min_confidence}: {low})")
    frames = decode_video_frames(clip.video, 0.0, T, clip.video_fps, image_size,
                                 f"{clip.name} video", stride=clip.stride, fps_from=clip.video_fps_from)
    extra = dict(clip.extra)
    extra.update(invalid_steps=converted.num_invalid_steps, frames_without_palm=converted.invalid_poses,
                 low_confidence_keypoints=low, min_confidence=min_confidence)
    return Episode(embodiment="human/ego", scene=clip.scene, task=clip.task, episode=clip.episode,
                   instruction=clip.instruction, subtasks=[Subtask(clip.instruction, 0, T)],
                   fps=clip.video_fps / clip.stride, state=converted.state, actions=converted.actions,
                   action_mask=converted.action_mask, step_valid=converted.step_valid,
                   frames={"head": frames}, hand_keypoints=keypoints.astype(np.float32),
                   head_pose=np.asarray(clip.head_pose, np.float32), extra=extra)


# ------------------------------------------------------------------------------ the NPZ route
@dataclass
class KeypointsOptions:
    fps: float
    image_size: int
    min_confidence: float


def _npz_scalar(data, key: str, path: Path, kind):
    value = data[key]
    if value.shape != ():
        raise SkipEpisode(f"{path}: '{key}' must be a scalar, got shape {value.shape}")
    return kind(value.item())


def plan_keypoints(src: str, fps: float, image_size: int,
                   min_confidence: float) -> tuple[KeypointsOptions, list[SourceEpisode]]:
    root = Path(src)
    files = sorted(root.rglob("*.npz")) if root.is_dir() else ([root] if root.suffix == ".npz" else [])
    if not files:
        raise ImportRefused(f"{src}: no *.npz episode files (expected <name>.npz + <name>.mp4 per episode)")
    # Default task ids: rank of the instruction among all instructions (read before any work).
    instructions = {}
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as data:
                instructions[path] = str(data["instruction"].item()) if "instruction" in data else None
        except Exception as e:  # noqa: BLE001 - a corrupt file is skipped later with its reason
            instructions[path] = None
            log.debug("%s: unreadable while planning (%s)", path, e)
    ranks = {text: i for i, text in enumerate(sorted({t for t in instructions.values() if t}))}
    opts = KeypointsOptions(fps=fps, image_size=image_size, min_confidence=min_confidence)
    episodes = [SourceEpisode(str(p.relative_to(root) if root.is_dir() else p.name),
                              (opts, str(p), i, ranks.get(instructions[p], -1)))
                for i, p in enumerate(files)]
    return opts, episodes


def convert_keypoints(locator: tuple[KeypointsOptions, str, int, int]) -> Episode:
    opts, path_str, index, task_rank = locator
    path = Path(path_str)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise SkipEpisode(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    with data:
        missing = [k for k in ("hand_keypoints", "head_pose", "instruction") if k not in data]
        if missing:
            raise SkipEpisode(f"{path}: missing array(s) {missing} (see `megavla data import keypoints -h`)")
        fps = _npz_scalar(data, "fps", path, float) if "fps" in data else opts.fps
        clip = HumanClip(
            name=str(path), keypoints=np.asarray(data["hand_keypoints"], np.float64),
            head_pose=np.asarray(data["head_pose"], np.float64),
            confidence=np.asarray(data["keypoint_confidence"], np.float64)
            if "keypoint_confidence" in data else None,
            video=path.with_suffix(".mp4"), video_fps=fps, stride=1,
            video_fps_from=(f"the rate is {path.name}'s 'fps' array" if "fps" in data else
                            f"{path.name} has no 'fps' array: set one, or pass the rate with --fps"),
            instruction=_npz_scalar(data, "instruction", path, str),
            scene=_npz_scalar(data, "scene", path, int) if "scene" in data else 0,
            task=_npz_scalar(data, "task", path, int) if "task" in data else task_rank,
            episode=index, extra={"source": "keypoints", "file": str(path)})
    if clip.task < 0:
        raise SkipEpisode(f"{path}: no usable instruction")
    return human_episode(clip, opts.image_size, opts.min_confidence)
