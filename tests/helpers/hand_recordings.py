"""Small writers of human hand recordings for the importer tests: EgoDex-schema HDF5 (h5py) and
NPZ + MP4 (PyAV), made from mini-world human episodes so the expected actions are known.

EgoDex schema followed (the published layout and its public readers): ``transforms/<joint>``
float [N, 4, 4] world-from-joint (ARKit world), ``transforms/camera`` the head camera (ARKit axes:
x right, y up, looking along -z), ``confidences/<joint>`` float [N], ``camera/intrinsic`` [3, 3],
file attributes ``llm_description`` (+ ``llm_description2`` / ``which_llm_description``).
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import simplejpeg

from megavla.data_shards import hands
from megavla.data_shards.format import Episode
from megavla.data_shards.import_egodex import ARKIT_TO_OPENCV, mediapipe21_joint_names

BODY_JOINTS = ("hip", "spine1", "neck1", "leftShoulder", "rightShoulder", "leftForearm", "rightForearm")


def write_mp4(path: Path, frames: list[np.ndarray], fps: float) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "g": "10"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def episode_images(ep: Episode) -> list[np.ndarray]:
    return [simplejpeg.decode_jpeg(jpg) for jpg in ep.frames["head"]]


def world_joints21(ep: Episode) -> np.ndarray:
    """[T, 2, 21, 3] world positions: the episode's 17 keypoints (head-camera frame -> world) plus
    the four non-thumb fingertips extrapolated from their last bone (EgoDex has them; we drop them)."""
    kp = ep.hand_keypoints.astype(np.float64)
    head = ep.head_pose.astype(np.float64)
    world17 = np.einsum("tij,thkj->thki", head[:, :3, :3], kp) + head[:, None, None, :3, 3]
    T = kp.shape[0]
    out = np.full((T, 2, 21, 3), np.nan)
    out[:, :, hands.MEDIAPIPE_INDEX] = world17
    for tip in (8, 12, 16, 20):  # tip = dip + (dip - pip)
        out[:, :, tip] = 2 * out[:, :, tip - 1] - out[:, :, tip - 2]
    return out


def write_egodex_episode(directory: Path, index: int, ep: Episode, description: str,
                         fps_video: float = 30.0, camera_axes: str = "arkit", drop: tuple = (),
                         nan_frames: dict | None = None, confidence: dict | None = None,
                         video_frames: int | None = None, description2: str | None = None) -> Path:
    """``directory/<index>.hdf5`` + ``<index>.mp4`` for a mini-world human episode.

    drop: joint names left out; nan_frames: joint -> frames whose transform is NaN;
    confidence: joint -> (frames, value); video_frames: write only that many video frames.
    """
    import h5py

    directory.mkdir(parents=True, exist_ok=True)
    joints = world_joints21(ep)
    T = joints.shape[0]
    camera = ep.head_pose.astype(np.float64)
    if camera_axes == "arkit":
        camera = camera @ ARKIT_TO_OPENCV
    path = directory / f"{index}.hdf5"
    with h5py.File(path, "w") as f:
        tr, cf = f.create_group("transforms"), f.create_group("confidences")
        tr.create_dataset("camera", data=camera.astype(np.float32))
        f.create_group("camera").create_dataset("intrinsic", data=np.array(
            [[736.6339, 0.0, 960.0], [0.0, 736.6339, 540.0], [0.0, 0.0, 1.0]], np.float32))
        for h, side in enumerate(hands.HANDS):
            for j, name in enumerate(mediapipe21_joint_names(side)):
                if name in drop:
                    continue
                pose = np.tile(np.eye(4), (T, 1, 1))
                pose[:, :3, 3] = joints[:, h, j]
                conf = np.where(np.isfinite(joints[:, h, j]).all(-1), 0.95, 0.0)
                for frame in (nan_frames or {}).get(name, ()):
                    pose[frame] = np.nan
                if name in (confidence or {}):
                    frames, value = confidence[name]
                    conf[list(frames)] = value
                tr.create_dataset(name, data=pose.astype(np.float32))
                cf.create_dataset(name, data=conf.astype(np.float32))
        for name in BODY_JOINTS:  # upper-body joints the importer must ignore
            tr.create_dataset(name, data=np.tile(np.eye(4, dtype=np.float32), (T, 1, 1)))
            cf.create_dataset(name, data=np.ones(T, np.float32))
        f.attrs["llm_description"] = description
        if description2 is not None:
            f.attrs["llm_description2"] = description2
            f.attrs["which_llm_description"] = 2
    images = episode_images(ep)
    write_mp4(directory / f"{index}.mp4", images[: video_frames or T], fps_video)
    return path


def write_npz_episode(path: Path, ep: Episode, **extra) -> None:
    """``path`` (.npz) + the head video beside it: the --keypoints route's input for ``ep``."""
    np.savez(path, hand_keypoints=ep.hand_keypoints, head_pose=ep.head_pose,
             instruction=np.array(ep.instruction), fps=np.array(ep.fps), task=np.array(ep.task),
             scene=np.array(ep.scene), **extra)
    write_mp4(path.with_suffix(".mp4"), episode_images(ep), ep.fps)
