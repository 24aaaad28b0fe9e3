"""What a policy-server client sends: a robot/arm observation rendered by the mini world."""
from __future__ import annotations

from megavla.data_shards.miniworld import MiniWorld


def observation(seed=1, scene=0, task=0):
    world = MiniWorld(scene, task, "robot/arm", seed=seed, image_size=32)
    obs = {f"observation/images/{cam}": world.render(cam) for cam in world.cameras}
    return {**obs, "observation/state": world.ee_state(), "prompt": world.instruction}
