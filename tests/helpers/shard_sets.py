"""Small shard sets for the reader tests, written with webdataset.TarWriter + format.episode_to_sample,
and the reader config of the resume tests.

Frames encode their identity (camera, timestep) in their pixel values so tests can check which frame a
sample decoded. Tokenizers are tiny stand-ins with the project's interface.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import simplejpeg
import webdataset as wds

from megavla.config.data import DataConfig
from megavla.data_shards.format import CAMERAS, FORMAT_VERSION, Episode, Subtask, episode_to_sample
from megavla.data_shards.manifest import MANIFEST_VERSION, encode_episode_keys, shard_row, totals

CAMERA_LEVEL = {"head": 40, "left_wrist": 120, "right_wrist": 200}


class TinyTextTokenizer:
    pad_id = 0

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = [3 + (ord(c) % 50) for c in text]
        return ([1] if add_bos else []) + ids + ([2] if add_eos else [])


class TinyFastTokenizer:
    def encode(self, chunk: np.ndarray) -> list[int]:
        assert chunk.ndim == 2
        return [int(v) for v in np.clip(np.round(chunk[::2].ravel() * 4) + 10, 0, 20)]


def frame_jpeg(level: int, size: int) -> bytes:
    img = np.full((size, size, 3), level, np.uint8)
    return simplejpeg.encode_jpeg(img, quality=95, colorspace="RGB")


def make_episode(scene: int, task: int, episode: int, *, human: bool = False, steps: int = 12,
                 state_dim: int = 4, action_dim: int = 5, image_size: int = 16,
                 cameras: tuple[str, ...] | None = None, seed: int = 0) -> Episode:
    rng = np.random.default_rng([seed, scene, task, episode, int(human)])
    cameras = cameras if cameras is not None else (("head",) if human else CAMERAS)
    # Frame t of camera c has the gray level CAMERA_LEVEL[c] + t, so a decoded sample reveals (c, t).
    frames = {cam: [frame_jpeg(CAMERA_LEVEL[cam] + t, image_size) for t in range(steps)] for cam in cameras}
    action_mask = np.ones(action_dim, bool)
    if human:
        action_mask[-1] = False  # gripper unsupervised for human data
    half = steps // 2
    return Episode(
        embodiment="human/ego" if human else "robot/arm", scene=scene, task=task, episode=episode,
        instruction=f"task {task} in scene {scene}",
        subtasks=[Subtask("reach the cube", 0, half), Subtask("lift the cube", half, steps)], fps=10.0,
        state=rng.normal(size=(steps, state_dim)).astype(np.float32),
        # actions[t, 0] = t identifies the step in a chunk (raw units, before normalization).
        actions=np.concatenate([np.arange(steps, dtype=np.float32)[:, None],
                                rng.normal(size=(steps, action_dim - 1)).astype(np.float32)], axis=1),
        action_mask=action_mask, step_valid=np.ones(steps, bool), frames=frames,
    )


def norm_stats_of(episodes: list[Episode]) -> dict:
    out: dict = {}
    for emb in sorted({e.embodiment for e in episodes}):
        eps = [e for e in episodes if e.embodiment == emb]
        entry: dict = {"num_steps": int(sum(e.num_steps for e in eps))}
        for kind in ("state", "actions"):
            x = np.concatenate([getattr(e, kind) for e in eps]).astype(np.float64)
            entry[kind] = {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
                           "q01": np.quantile(x, 0.01, axis=0).tolist(), "q99": np.quantile(x, 0.99, axis=0).tolist()}
        out[emb] = entry
    return out


def write_shard_set(directory: str | Path, episodes: list[Episode], per_shard: int = 4,
                    samples: list[dict] | None = None) -> Path:
    """Write ``episodes`` (or raw ``samples``, for bad-input tests) as shards + manifest + norm stats +
    episode_keys.json (the keys of ``episodes``, as ShardSetWriter lists them)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw = samples if samples is not None else [episode_to_sample(e) for e in episodes]
    shards = []
    keys: dict[str, list[str]] = {}
    for i in range(0, len(raw), per_shard):
        path = directory / f"shard-{i // per_shard:06d}.tar"
        chunk_eps = episodes[i : i + per_shard]
        with wds.TarWriter(str(path)) as sink:
            for s in raw[i : i + per_shard]:
                sink.write(s)
        data = path.read_bytes()
        facts = [{"key": e.key, "embodiment": e.embodiment, "combo": e.combo, "steps": e.num_steps,
                  "valid_steps": int(e.step_valid.sum())} for e in chunk_eps]
        shards.append(shard_row(path.name, facts, len(data), hashlib.sha256(data).hexdigest()))
        keys[path.name] = [e.key for e in chunk_eps]
    combos: dict[str, set[str]] = {}
    steps: dict[str, int] = {}
    for e in episodes:
        combos.setdefault(e.embodiment, set()).add(e.combo)
        steps[e.embodiment] = steps.get(e.embodiment, 0) + e.num_steps
    keys_bytes, keys_entry = encode_episode_keys(keys)
    (directory / keys_entry["path"]).write_bytes(keys_bytes)
    manifest = {"format_version": MANIFEST_VERSION, "episode_format_version": FORMAT_VERSION, "shards": shards,
                "totals": totals(shards, combos, steps), "episode_keys": keys_entry}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    (directory / "norm_stats.json").write_text(json.dumps(norm_stats_of(episodes)))
    return directory


def grid_episodes(scenes: int, tasks: int, per_combo: int, human: bool = False, **kw) -> list[Episode]:
    return [make_episode(s, t, e, human=human, **kw)
            for s in range(scenes) for t in range(tasks) for e in range(per_combo)]


def make_cfg(shard_sets, num_workers: int, **kw) -> DataConfig:
    """The reader config of the resume tests: a (robot, human) pair of shard sets mixed 0.6 / 0.4."""
    robot, human = shard_sets
    base = dict(sources={"robot": robot, "human": human}, mixture={"robot": 0.6, "human": 0.4},
                image_size=16, batch_size=4, num_workers=num_workers, chunk_length=4, max_action_dim=8,
                max_state_dim=6, shuffle_buffer=12, samples_per_episode=3, seed=7)
    base.update(kw)
    return DataConfig(**base)
