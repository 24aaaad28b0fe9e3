"""The procedural tabletop mini-world: scenes x tasks, kinematic physics, rendering, success tests.

One world model for the shard generator (synth.py) and the closed-loop evaluator. The world is
driven by end-effector actions in the project convention (data_shards/hands.py; docs/data_format.md):
per arm ``[dx, dy, dz, rx, ry, rz, gripper]`` in the ego frame (the head camera's first-step pose,
x forward / y left / z up), gripper absolute, 0 open .. 1 closed.

World frame: table top is z = 0, x points away from the robot/person, y to its left; metres.
Scene ``s`` (any int >= 0) fixes layout, colours, background and camera jitter; task ``t`` in
[0, NUM_TASKS) picks one of 12 pick-and-place / push / pick-up tasks on that scene's objects, so
scene x task combos are enumerable. ``seed`` varies the episode (object jitter, start pose, human
head motion, hand size).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from . import hands

from . import render
from .embodiments import EMBODIMENT_IDS
from .format import CAMERAS

NUM_TASKS = 12
MAX_EPISODE_STEPS = 90  # scripted demos take 21-64 steps; evaluators may stop a policy here
PALETTE = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 220), "yellow": (230, 205, 40),
    "orange": (240, 135, 30), "purple": (135, 60, 185), "white": (235, 235, 235),
    "cyan": (40, 195, 210), "pink": (240, 120, 170), "black": (35, 35, 35),
}
TABLE_COLORS = ((150, 110, 70), (120, 120, 125), (180, 160, 130), (95, 75, 55), (170, 170, 160),
                (110, 130, 110), (140, 100, 110), (100, 110, 140))
BACKGROUNDS = ((200, 210, 220), (60, 60, 70), (220, 200, 180), (150, 180, 150), (180, 160, 200),
               (90, 110, 140), (230, 230, 230), (120, 90, 70))
SKIN_TONES = ((230, 190, 160), (200, 150, 110), (150, 100, 70), (110, 75, 55))
BLOCK_HALF = 0.025  # blocks are 5 cm cubes
BOWL_RADIUS, BOWL_HEIGHT = 0.06, 0.03
PAD_HALF = 0.05
WORKSPACE = np.array([[0.15, 0.85], [-0.45, 0.45], [0.0, 0.40]])
CONTACT_RADIUS = 0.012  # horizontal radius of the fingers / fingertips for pushing
# Grasp point along the approach axis, from the EE origin: the gripper grasps between its finger
# pads (origin); a hand's palm centre sits above the object it holds.
GRASP_OFFSET = {"robot/arm": 0.0, "human/ego": 0.035}
# Down-facing EE orientation with the fingers pointing forward (+x): z (approach) = -z_world.
R_DOWN = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])


@dataclass
class SceneSpec:
    scene: int
    table_color: tuple
    background: tuple
    stripes: tuple  # (count, angle, shade factor)
    colors: list[str]  # blocks 0-2, bowls 3-4, pad 5
    positions: np.ndarray  # [6, 2] xy
    head_eye_jitter: np.ndarray  # [3]
    head_roll: float  # head cameras are never quite level (keeps every rotation dim informative)


@dataclass
class TaskSpec:
    task: int
    kind: str  # pick_place | push | pick
    obj: int  # block index 0-2
    target: int  # bowl 3-4, pad 5, or -1
    instruction: str
    subtasks: list[str]


def scene_spec(scene: int) -> SceneSpec:
    if scene < 0:
        raise ValueError(f"scene={scene} must be >= 0")
    rng = np.random.default_rng([7919, scene])
    colors = list(rng.choice(list(PALETTE), size=6, replace=False))
    pos = np.zeros((6, 2))
    placed = 0
    while placed < 6:  # sequential rejection sampling, >= 12 cm between object centres
        for _ in range(200):
            pos[placed] = rng.uniform([0.34, -0.24], [0.66, 0.24])
            if placed == 0 or np.linalg.norm(pos[:placed] - pos[placed], axis=-1).min() > 0.12:
                placed += 1
                break
        else:
            placed = 0  # jammed: start over (rare; still deterministic per scene)
    return SceneSpec(scene=scene, table_color=TABLE_COLORS[rng.integers(len(TABLE_COLORS))],
                     background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
                     stripes=(int(rng.integers(0, 6)), float(rng.uniform(0, np.pi)),
                              float(rng.uniform(0.8, 0.95))),
                     colors=[str(c) for c in colors], positions=pos,
                     head_eye_jitter=rng.uniform(-0.03, 0.03, 3), head_roll=float(rng.uniform(-0.08, 0.08)))


def task_spec(scene: int, task: int) -> TaskSpec:
    if not 0 <= task < NUM_TASKS:
        raise ValueError(f"task={task} out of range: the mini-world has tasks 0..{NUM_TASKS - 1}")
    spec = scene_spec(scene)
    rng = np.random.default_rng([104729, scene])
    place = [(b, w) for b in range(3) for w in (3, 4)]
    pushes, picks = [(b, 5) for b in range(3)], [(b, -1) for b in range(3)]
    place, pushes, picks = ([lst[i] for i in rng.permutation(len(lst))] for lst in (place, pushes, picks))
    # Interleaved so that any K >= 3 covers all three kinds.
    order = "PUKPPUKPPUKP"
    queues = {"P": iter(place), "U": iter(pushes), "K": iter(picks)}
    kind = {"P": "pick_place", "U": "push", "K": "pick"}[order[task]]
    obj, target = [next(queues[k]) for k in order[:task + 1]][-1]
    c, ct = spec.colors[obj], spec.colors[target] if target >= 0 else ""
    if kind == "pick_place":
        instr = f"put the {c} block in the {ct} bowl"
        subs = [f"reach the {c} block", f"grasp the {c} block", f"move to the {ct} bowl",
                f"release the {c} block"]
    elif kind == "push":
        instr = f"push the {c} block onto the {ct} pad"
        subs = [f"move behind the {c} block", f"push the {c} block to the {ct} pad",
                "move back up"]
    else:
        instr = f"pick up the {c} block"
        subs = [f"reach the {c} block", f"grasp the {c} block", f"lift the {c} block"]
    return TaskSpec(task, kind, obj, target, instr, subs)


def yaw_rotation(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _roll(angle: float) -> np.ndarray:
    """Rotation about a camera's optical axis (camera z), as a 4x4 applied on the right."""
    out = np.eye(4)
    out[:3, :3] = yaw_rotation(angle)
    return out


def ee_yaw(R: np.ndarray) -> float:
    return float(np.arctan2(R[1, 0], R[0, 0]))


def _canonical_hand(hand: str) -> np.ndarray:
    """17 keypoints of an open hand in its own palm frame (palm_frames() of it is the identity)."""
    kp = np.array([
        [0.0, 0.0, 0.0], [0.02, 0.025, -0.01], [0.04, 0.04, -0.015], [0.06, 0.05, -0.02],
        [0.075, 0.055, -0.025], [0.09, 0.03, 0.0], [0.12, 0.032, -0.005], [0.14, 0.033, -0.01],
        [0.095, 0.01, 0.0], [0.13, 0.01, -0.005], [0.15, 0.01, -0.01],
        [0.09, -0.01, 0.0], [0.12, -0.011, -0.005], [0.14, -0.012, -0.01],
        [0.08, -0.03, 0.0], [0.10, -0.032, -0.005], [0.115, -0.033, -0.01]])
    if hand == "left":
        kp[:, 1] *= -1
    pose, valid = hands.palm_frames(kp, hand)
    assert valid
    return (kp - pose[:3, 3]) @ pose[:3, :3]


CANONICAL_HANDS = {h: _canonical_hand(h) for h in hands.HANDS}
_FINGERS = ((5, 6, 7), (8, 9, 10), (11, 12, 13), (14, 15, 16))


def hand_keypoints(pose: np.ndarray, closure: float, hand: str, scale: float) -> np.ndarray:
    """World keypoints [17, 3] of a hand with palm pose ``pose`` and finger curl ``closure``."""
    kp = CANONICAL_HANDS[hand] * scale
    kp = kp.copy()
    curl = Rotation.from_rotvec([0.0, -1.3 * closure, 0.0]).as_matrix()  # bends +x toward +z
    for mcp, pip, dip in _FINGERS:
        kp[[pip, dip]] = (kp[[pip, dip]] - kp[mcp]) @ curl.T + kp[mcp]
    kp[[3, 4]] += closure * (kp[6] - kp[4]) * np.array([[0.5], [0.8]])  # thumb toward index
    return kp @ pose[:3, :3].T + pose[:3, 3]


@dataclass
class WorldState:
    ee: np.ndarray  # [arms, 4, 4] world poses
    gripper: np.ndarray  # [arms]
    blocks: np.ndarray  # [3, 3] centres
    block_yaw: np.ndarray  # [3]
    held: list[int]  # per arm: held block or -1
    held_offset: list  # per arm: block pose in the EE frame
    t: int = 0
    hand_scale: float = 1.0
    extras: dict = field(default_factory=dict)


class MiniWorld:
    """``MiniWorld(scene, task, embodiment, seed, image_size)``; ``reset()``, ``step(action)``,
    ``render(camera)``, ``success()``. Robot: one right arm, 7-dim actions, cameras head /
    right_wrist / left_wrist (the parked left arm's wrist camera: a fixed side view). Human:
    two hands, 14-dim actions, head camera only (the head moves)."""

    def __init__(self, scene: int, task: int, embodiment: str = "robot/arm", seed: int = 0,
                 image_size: int = 224):
        if embodiment not in ("robot/arm", "human/ego"):
            raise ValueError(f"embodiment={embodiment!r}: the mini-world has 'robot/arm' and "
                             f"'human/ego' (known ids: {sorted(EMBODIMENT_IDS)})")
        self.scene, self.task, self.embodiment = scene, task, embodiment
        self.seed, self.image_size = seed, image_size
        self.spec, self.task_spec = scene_spec(scene), task_spec(scene, task)
        self.human = embodiment == "human/ego"
        self.arms = 2 if self.human else 1
        self.action_dim = hands.ARM_DIM * self.arms
        self.state_dim = hands.ARM_STATE_DIM * self.arms
        self.cameras = ("head",) if self.human else CAMERAS
        self.grasp_offset = GRASP_OFFSET[embodiment]
        self.instruction, self.subtasks = self.task_spec.instruction, self.task_spec.subtasks
        self.reset()

    # ---------------------------------------------------------------- episode setup ----------
    def reset(self) -> dict:
        rng = np.random.default_rng([self.seed, EMBODIMENT_IDS[self.embodiment], self.scene,
                                     self.task, 31337])
        pos = self.spec.positions + rng.uniform(-0.02, 0.02, (6, 2))
        self.bowls = np.concatenate([pos[3:5], np.zeros((2, 1))], axis=-1)
        self.pad = np.array([*pos[5], 0.0])
        blocks = np.concatenate([pos[:3], np.full((3, 1), BLOCK_HALF)], axis=-1)
        ee = np.tile(np.eye(4), (self.arms, 1, 1))
        ee[0, :3, :3] = yaw_rotation(rng.uniform(-0.2, 0.2)) @ R_DOWN
        ee[0, :3, 3] = [0.3 + rng.uniform(-0.03, 0.03), rng.uniform(-0.08, 0.08),
                        0.2 + rng.uniform(-0.03, 0.03)]
        if self.human:  # left hand rests on the table near the left edge
            ee[1, :3, :3] = yaw_rotation(rng.uniform(-0.5, 0.1)) @ R_DOWN
            ee[1, :3, 3] = [0.3 + rng.uniform(-0.03, 0.03), 0.32 + rng.uniform(-0.03, 0.03), 0.045]
        self.state = WorldState(ee=ee, gripper=np.zeros(self.arms), blocks=blocks,
                                block_yaw=rng.uniform(-0.7, 0.7, 3), held=[-1] * self.arms,
                                held_offset=[None] * self.arms,
                                hand_scale=float(rng.uniform(0.9, 1.1)))
        self.head_motion = (rng.uniform(0, 2 * np.pi, 6), rng.uniform(0.15, 0.35, 6))
        self.skin = SKIN_TONES[rng.integers(len(SKIN_TONES))]
        self.sleeve = tuple(int(c) for c in rng.integers(20, 235, 3))
        self.ego = hands.ego_frame(self.head_pose(0))
        self.ego_inv = np.linalg.inv(self.ego)
        self._static_layers: dict = {}
        return self.observe()

    def head_pose(self, t: int | None = None) -> np.ndarray:
        """Camera-to-world pose of the head camera at step t (static for the robot)."""
        if not self.human:
            return render.look_at(np.array([0.15, 0.0, 0.52]) + self.spec.head_eye_jitter,
                                  [0.55, 0.0, 0.0]) @ _roll(self.spec.head_roll)
        t = self.state.t if t is None else t
        base = render.look_at(np.array([0.08, 0.0, 0.38]) + self.spec.head_eye_jitter,
                              [0.55, 0.0, 0.0]) @ _roll(-self.spec.head_roll)
        phase, freq = self.head_motion
        wobble = np.sin(freq * t + phase)
        motion = np.eye(4)
        motion[:3, :3] = Rotation.from_rotvec(wobble[:3] * [0.04, 0.05, 0.02]).as_matrix()
        motion[:3, 3] = wobble[3:] * 0.01
        return base @ motion

    # ---------------------------------------------------------------- dynamics ---------------
    def contact_point(self, arm: int) -> np.ndarray:
        ee = self.state.ee[arm]
        return ee[:3, 3] + self.grasp_offset * ee[:3, 2]

    def step(self, action) -> dict:
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (self.action_dim,) or not np.isfinite(a).all():
            raise ValueError(f"action: expected {self.action_dim} finite values for "
                             f"{self.embodiment}, got shape {a.shape}")
        s = self.state
        for arm in range(self.arms):
            sl = a[arm * hands.ARM_DIM:(arm + 1) * hands.ARM_DIM]
            start = self.contact_point(arm)
            new = self.ego @ hands.apply_ee_delta(self.ego_inv @ s.ee[arm], sl[:6])
            new[:3, 3] = np.clip(new[:3, 3], WORKSPACE[:, 0], WORKSPACE[:, 1])
            floor = 0.018 - self.grasp_offset * new[2, 2]  # fingertips / palm stay above the table
            new[2, 3] = max(new[2, 3], floor)
            s.ee[arm] = new
            if s.held[arm] >= 0:
                block = new @ s.held_offset[arm]
                s.blocks[s.held[arm]] = block[:3, 3]
                s.block_yaw[s.held[arm]] = ee_yaw(block[:3, :3])
            else:
                self._push(arm, start)
            self._gripper(arm, float(np.clip(sl[6], 0.0, 1.0)))
        s.t += 1
        return self.observe()

    def _push(self, arm: int, start: np.ndarray) -> None:
        """Kinematic pushing: low, closed fingers moving from ``start`` sweep blocks ahead of
        them along the motion, keeping each block's sideways offset (stable straight pushes).
        Open fingers straddle a block instead, so grasping from above never pushes."""
        s, p = self.state, self.contact_point(arm)
        if p[2] > 2 * BLOCK_HALF + 0.005 or s.gripper[arm] < 0.5:
            return
        motion = p[:2] - start[:2]
        length = np.linalg.norm(motion)
        if length < 1e-9:
            return
        m, reach = motion / length, CONTACT_RADIUS + BLOCK_HALF * 1.2
        for b in range(3):
            if b in s.held:
                continue
            rel = s.blocks[b, :2] - p[:2]
            along = float(rel @ m)
            perp = rel - along * m
            if np.linalg.norm(perp) >= reach or float((s.blocks[b, :2] - start[:2]) @ m) <= 0:
                continue
            ahead = np.sqrt(reach**2 - float(perp @ perp))
            if along < ahead:
                s.blocks[b, :2] = p[:2] + perp + m * ahead

    def _gripper(self, arm: int, g: float) -> None:
        s = self.state
        was_closed, s.gripper[arm] = s.gripper[arm] >= 0.5, g
        if g >= 0.5 and not was_closed and s.held[arm] < 0:
            p = self.contact_point(arm)
            for b in range(3):
                if (b not in s.held and np.linalg.norm(s.blocks[b, :2] - p[:2]) < 0.025
                        and abs(s.blocks[b, 2] - p[2]) < 0.025):
                    block = np.eye(4)
                    block[:3, :3], block[:3, 3] = yaw_rotation(s.block_yaw[b]), s.blocks[b]
                    s.held[arm], s.held_offset[arm] = b, np.linalg.inv(s.ee[arm]) @ block
                    break
        elif g < 0.5 and s.held[arm] >= 0:
            b, s.held[arm] = s.held[arm], -1
            in_bowl = np.linalg.norm(self.bowls[:, :2] - s.blocks[b, :2], axis=-1) < BOWL_RADIUS
            s.blocks[b, 2] = BLOCK_HALF + (0.005 if in_bowl.any() else 0.0)

    def success(self) -> bool:
        s, spec = self.state, self.task_spec
        block = s.blocks[spec.obj]
        if spec.kind == "pick":
            return s.held[0] == spec.obj and block[2] > 0.08
        if spec.obj in s.held:
            return False
        if spec.kind == "pick_place":
            return bool(np.linalg.norm(block[:2] - self.bowls[spec.target - 3, :2]) < BOWL_RADIUS - 0.01)
        return bool(np.linalg.norm(block[:2] - self.pad[:2]) < PAD_HALF - 0.005)

    # ---------------------------------------------------------------- observation ------------
    def ee_state(self) -> np.ndarray:
        """float32 [state_dim]: per arm EE pose in the ego frame (position, 6D rotation) + gripper."""
        vec = hands.pose_to_state(self.ego_inv @ self.state.ee)
        return np.concatenate([vec, self.state.gripper[:, None]], axis=-1).reshape(-1).astype(np.float32)

    def hand_keypoints_world(self) -> np.ndarray:
        s = self.state
        return np.stack([hand_keypoints(s.ee[h], s.gripper[h], hands.HANDS[h], s.hand_scale)
                         for h in range(self.arms)])

    def observe(self) -> dict:
        """Cheap observation (no rendering): state + instruction; images come from ``images()``."""
        return {"state": self.ee_state(), "instruction": self.instruction}

    def images(self, cameras=None) -> dict[str, np.ndarray]:
        """Rendered views {camera: uint8 [R, R, 3]} of ``cameras`` this embodiment has (default all)."""
        return {c: self.render(c) for c in (self.cameras if cameras is None else cameras)
                if c in self.cameras}

    def camera(self, name: str) -> render.Camera:
        if name not in self.cameras:
            raise ValueError(f"camera {name!r} is not on {self.embodiment}; it has {self.cameras}")
        if name == "head":
            return render.Camera(self.head_pose(), 70.0 if self.human else 60.0, self.image_size)
        if name == "left_wrist":  # parked left arm: fixed side view
            eye = np.array([0.5, 0.45, 0.32]) + self.spec.head_eye_jitter
            return render.Camera(render.look_at(eye, [0.5, -0.05, 0.0]), 65.0, self.image_size)
        ee = self.state.ee[0]
        x, z, p = ee[:3, 0], ee[:3, 2], ee[:3, 3]
        pose = render.look_at(p - 0.11 * z + 0.06 * x, p + 0.1 * z + 0.03 * x, up=x)
        return render.Camera(pose, 80.0, self.image_size)

    def render(self, camera: str) -> np.ndarray:
        """uint8 [image_size, image_size, 3] view of the current state from ``camera``."""
        spec, s = self.spec, self.state
        cam = self.camera(camera)
        static = camera == "left_wrist" or (camera == "head" and not self.human)
        if static and camera in self._static_layers:
            frame = render.Frame(cam, spec.background, base=self._static_layers[camera])
        else:
            frame = self._draw_table(cam)
            if static:
                self._static_layers[camera] = frame.image.copy()
        shadow = tuple(int(ch * 0.6) for ch in spec.table_color)
        for arm in range(self.arms):  # shadows tell the height of the hand / gripper
            p = self.contact_point(arm)
            frame.flat(render.circle([p[0], p[1], 0.002], 0.025 + 0.05 * p[2], 12), shadow)
        poses = np.tile(np.eye(4), (3, 1, 1))
        c, si = np.cos(s.block_yaw), np.sin(s.block_yaw)
        poses[:, 0, 0], poses[:, 0, 1], poses[:, 1, 0], poses[:, 1, 1] = c, -si, si, c
        poses[:, :3, 3] = s.blocks
        colors = np.array([PALETTE[spec.colors[b]] for b in range(3)], float)
        for b, items in enumerate(frame.boxes_items(poses, np.full((3, 3), BLOCK_HALF), colors)):
            frame.add_group(s.blocks[b], items)
        if self.human:
            for arm, kp in enumerate(self.hand_keypoints_world()):
                items = render.hand_items(frame, kp, s.ee[arm], s.hand_scale, self.skin, self.sleeve)
                frame.add_group(kp[8], items, bias=-0.02)
        else:
            half_gap = 0.012 if s.held[0] < 0 else BLOCK_HALF + 0.004  # closed: on the block
            # The wrist camera sits behind its own gripper: the gripper is always in front there.
            bias = -10.0 if camera == "right_wrist" else -0.02
            frame.add_group(s.ee[0][:3, 3], render.gripper_items(frame, s.ee[0], s.gripper[0], half_gap),
                            bias=bias)
        return frame.finish()

    def _draw_table(self, cam: render.Camera) -> render.Frame:
        """Background, table, stripes and pad: static per episode (cached for static cameras)."""
        spec = self.spec
        frame = render.Frame(cam, spec.background)
        frame.flat(np.array([[-0.3, -0.9, 0], [1.3, -0.9, 0], [1.3, 0.9, 0], [-0.3, 0.9, 0]]),
                   spec.table_color)
        count, angle, factor = spec.stripes
        u, v = np.array([np.cos(angle), np.sin(angle), 0]), np.array([-np.sin(angle), np.cos(angle), 0])
        centre = np.array([0.5, 0.0, 0.0])
        for k in range(count):  # texture stripes: a scene-specific table pattern
            c = centre + v * (k - count / 2) * 0.16
            frame.flat(np.stack([c - u * 0.8, c + u * 0.8, c + u * 0.8 + v * 0.05, c - u * 0.8 + v * 0.05]),
                       tuple(ch * factor for ch in spec.table_color))
        sq = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]]) * PAD_HALF
        frame.flat(self.pad + sq + [0, 0, 0.001], PALETTE[spec.colors[5]])
        for w in range(2):
            render.draw_bowl(frame, self.bowls[w], BOWL_RADIUS, BOWL_HEIGHT, PALETTE[spec.colors[3 + w]])
        return frame
