"""Small hand-built episodes for the shard tests (the mini-world generator is tested elsewhere).

Also usable as a stand-in generator for the CLI (``--generator helpers.toy_episodes:fake_generate_episode``):
``fake_generate_episode`` has the signature of ``data_shards.synth.generate_episode``.
"""
from __future__ import annotations

import numpy as np
import simplejpeg

from megavla.data_shards.format import Episode, Subtask

ROBOT_CAMERAS = ("head", "left_wrist")
HUMAN_CAMERAS = ("head",)


def jpeg(rng: np.random.Generator, size: int) -> bytes:
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return simplejpeg.encode_jpeg(image, quality=80)


def make_episode(embodiment: str = "robot/arm", scene: int = 0, task: int = 0, episode: int = 0,
                 steps: int = 8, image_size: int = 16, seed: int = 0) -> Episode:
    """Deterministic toy episode: robot has 2 cameras and a supervised gripper (dim 6); human has
    the head camera, a masked gripper holding placeholder 0, and one invalid (dropout) step."""
    rng = np.random.default_rng([seed, scene, task, episode, 0 if embodiment.startswith("robot") else 1])
    human = embodiment.startswith("human")
    actions = rng.normal(0.0, 0.05, (steps, 7)).astype(np.float32)
    actions[:, 6] = 0.0 if human else rng.integers(0, 2, steps)
    action_mask = np.ones(7, bool)
    step_valid = np.ones(steps, bool)
    if human:
        action_mask[6] = False
        step_valid[steps // 2] = False
        actions[steps // 2] = 1e3  # finite placeholder at the dropout: must not reach the stats
    state = rng.normal(scene, 1.0, (steps, 8)).astype(np.float32)
    cameras = HUMAN_CAMERAS if human else ROBOT_CAMERAS
    return Episode(
        embodiment=embodiment, scene=scene, task=task, episode=episode,
        instruction=f"do task {task} in scene {scene}",
        subtasks=[Subtask("reach", 0, steps // 2), Subtask("grasp", steps // 2, steps)], fps=10.0,
        state=state, actions=actions, action_mask=action_mask, step_valid=step_valid,
        frames={cam: [jpeg(rng, image_size) for _ in range(steps)] for cam in cameras},
        hand_keypoints=rng.normal(0, 0.1, (steps, 2, 17, 3)).astype(np.float32) if human else None,
        head_pose=np.tile(np.eye(4, dtype=np.float32), (steps, 1, 1)) if human else None,
    )


def fake_generate_episode(embodiment, scene, task, episode, image_size=224, cameras=None, seed=0):
    return make_episode(embodiment, scene, task, episode, steps=6, image_size=image_size, seed=seed)


def crashing_generate_episode(embodiment, scene, task, episode, image_size=224, cameras=None, seed=0):
    if (scene, task, episode) == (1, 0, 1):
        raise RuntimeError("simulated generator crash")
    return fake_generate_episode(embodiment, scene, task, episode, image_size, cameras, seed)
