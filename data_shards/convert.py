"""Convert a shard set written in episode format v1 (axis-angle state) to v2 (6D rotation state).

v1 stored the state per arm as ``[x, y, z, rx, ry, rz, gripper]``; v2 stores
``[x, y, z, r00, r10, r20, r01, r11, r21, gripper]`` (data_shards/hands.py pose_to_state). The
conversion is exact: the axis-angle vector is turned into its rotation matrix and the first two
columns are written. Everything else (actions, masks, frames, keypoints, meta) is copied unchanged;
the writer recomputes the norm stats and the manifest, so the new set is complete and verified by
the same rules as a freshly generated one. The source set is only read.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np

from . import hands
from .format import FORMAT_VERSION, sample_to_episode
from .manifest import MANIFEST_FILE, ManifestError
from .verify import Problem, iter_tar_samples
from .writer import ShardSetWriter

log = logging.getLogger(__name__)


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def upgrade_sample(sample: dict, where: str) -> dict:
    """One raw v1 tar sample -> the same sample in v2 (state rewritten, meta version and dims)."""
    meta = json.loads(sample["meta.json"])
    if meta.get("format_version") != 1:
        raise ManifestError(f"{where}:{sample.get('__key__')}: format_version="
                            f"{meta.get('format_version')!r}, expected 1 to convert")
    state = _npy(sample["state.npy"])
    arm = hands.ARM_DIM
    if state.ndim != 2 or state.shape[1] % arm:
        raise ManifestError(f"{where}:{sample.get('__key__')}.state.npy: shape {state.shape} is not "
                            f"[T, {arm} x arms]; not a v1 end-effector state, cannot convert")
    new_state = hands.axis_angle_state_to_6d(state, arms=state.shape[1] // arm)
    meta.update(format_version=FORMAT_VERSION, state_dim=int(new_state.shape[1]))
    out = dict(sample)
    out["meta.json"] = json.dumps(meta).encode()
    out["state.npy"] = _npy_bytes(new_state)
    return out


def convert_v1_set(src: str | Path, dst: str | Path, overwrite: bool = False) -> dict:
    """Read the v1 set ``src``, write the v2 set ``dst``; returns the new manifest."""
    src, dst = Path(src), Path(dst)
    manifest_path = src / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ManifestError(f"{manifest_path}: missing: not a complete shard set")
    manifest = json.loads(manifest_path.read_text())
    version = manifest.get("episode_format_version")
    if version == FORMAT_VERSION:
        raise ManifestError(f"{manifest_path}: already episode format v{FORMAT_VERSION}; nothing to convert")
    if version != 1:
        raise ManifestError(f"{manifest_path}: episode_format_version={version!r}; only v1 converts")
    if dst.resolve() == src.resolve():
        raise ManifestError(f"{dst}: the output must be a new directory (the source is only read)")
    generator = dict(manifest.get("generator") or {})
    generator["converted_from"] = {"path": str(src.resolve()), "episode_format_version": 1}
    problems: list[Problem] = []
    count = 0
    with ShardSetWriter(dst, target_shard_bytes=int(manifest.get("target_shard_bytes") or 64 * 2**20),
                        generator=generator, overwrite=overwrite) as writer:
        for row in manifest["shards"]:
            path = src / row["path"]
            for sample in iter_tar_samples(path, problems):
                if sample.get("__error__"):
                    break
                writer.write(sample_to_episode(upgrade_sample(sample, str(path)), where=str(path)))
                count += 1
            if problems:
                raise ManifestError(f"{path}: {problems[0]}; the source set is damaged (megavla data "
                                    "verify), nothing was converted")
    log.info("converted %d episodes: %s (v1) -> %s (v%d)", count, src, dst, FORMAT_VERSION)
    return json.loads((dst / MANIFEST_FILE).read_text())
