"""Human hand keypoints + head-camera pose -> end-effector actions in the robot convention.

Pure numpy (+ scipy Rotation). The end-effector convention defined here is THE convention of the
project: the mini-world's robot, its scripted expert, the closed-loop evaluator and the human data
all use ``ee_delta`` / ``apply_ee_delta`` below (docs/data_format.md explains it in prose).

Frames
------
* camera frame (OpenCV): x right, y down, z along the optical axis.
* ego frame E: the head camera's pose at the episode's first step, axes renamed so that x = forward
  (optical axis), y = left, z = up (camera -y). World pose of E: ``head_pose[0] @ CAMERA_FROM_EGO``.
  Every pose, state and action is expressed in E. Moving the whole scene together with the camera
  by a rigid G maps every world pose P to G P and head_pose[0] to G head_pose[0], so
  E^-1 P is unchanged: actions and states do not depend on where the world is. The policy sees the
  head camera, so motions in (a fixed copy of) its frame are what the images determine.
* end-effector (EE) frame, shared by the robot gripper and the human palm: origin at the palm
  centre / between the fingers; z = approach direction (out of the palm, i.e. down for a top grasp);
  x = along the fingers (wrist -> middle-finger MCP); y = z cross x.

Action per arm (7 numbers): ``[dx, dy, dz, rx, ry, rz, gripper]`` with
``p_{t+1} = p_t + d`` and ``R_{t+1} = Rot(r) @ R_t`` (r = axis-angle, ego axes, about the EE origin);
gripper is absolute in [0, 1], 0 = open, 1 = closed. ``actions[t]`` moves step t to step t+1; the
last step holds (zero delta). Right arm/hand = action dims 0-6, left = 7-13.

State per arm (10 numbers, episode format v2): ``[x, y, z, r00, r10, r20, r01, r11, r21, gripper]``
= EE position in E, the first two columns of the EE rotation matrix in E ("6D", Zhou et al. 2019),
gripper. Right = state dims 0-9, left = 10-19. Why not axis-angle (format v1): a grasp orientation
near a half turn from E has |r| near pi, where the axis-angle vector flips sign between
neighbouring steps (28 jumps > 1 rad in 2,869 mini-world steps); the 6D columns are a continuous
function of the rotation, so nearby poses always have nearby states. Actions stay axis-angle
*deltas*: one step rotates by a few degrees, far from the pi discontinuity.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

log = logging.getLogger(__name__)

# 17-keypoint layout: MediaPipe/OpenPose 21-point hand minus the 4 non-thumb fingertips (trackers
# are least reliable there and the palm frame does not need them). name, MediaPipe index.
KEYPOINTS = (
    ("wrist", 0), ("thumb_cmc", 1), ("thumb_mcp", 2), ("thumb_ip", 3), ("thumb_tip", 4),
    ("index_mcp", 5), ("index_pip", 6), ("index_dip", 7),
    ("middle_mcp", 9), ("middle_pip", 10), ("middle_dip", 11),
    ("ring_mcp", 13), ("ring_pip", 14), ("ring_dip", 15),
    ("pinky_mcp", 17), ("pinky_pip", 18), ("pinky_dip", 19),
)
KEYPOINT_NAMES = tuple(name for name, _ in KEYPOINTS)
MEDIAPIPE_INDEX = np.array([mp for _, mp in KEYPOINTS])
NUM_KEYPOINTS = len(KEYPOINTS)  # 17
KP = {name: i for i, name in enumerate(KEYPOINT_NAMES)}
PALM_KEYPOINTS = np.array([KP["wrist"], KP["index_mcp"], KP["middle_mcp"], KP["ring_mcp"],
                           KP["pinky_mcp"]])
HANDS = ("right", "left")  # order of the hand axis in hand_keypoints [T, 2, 17, 3]
ARM_DIM = 7  # action numbers per arm
ARM_STATE_DIM = 10  # state numbers per arm: position 3 + rotation 6D + gripper
HUMAN_ACTION_DIM = 2 * ARM_DIM
HUMAN_STATE_DIM = 2 * ARM_STATE_DIM
GRIPPER_DIMS = (6, 13)  # action dims
STATE_GRIPPER_DIMS = (9, 19)

# Rotation whose columns are the ego axes (forward, left, up) written in camera coordinates.
CAMERA_FROM_EGO = np.eye(4)
CAMERA_FROM_EGO[:3, :3] = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])

# Degeneracy thresholds: palm edges shorter than 5 mm, or palm width nearly parallel to the
# finger direction (sin < 0.1, about 6 degrees), cannot define an orientation.
MIN_PALM_EDGE = 5e-3
MIN_PALM_SIN = 0.1


def mediapipe21_to_17(keypoints21: np.ndarray) -> np.ndarray:
    """[..., 21, 3] MediaPipe/OpenPose hand keypoints -> [..., 17, 3] in this module's layout."""
    if keypoints21.shape[-2:] != (21, 3):
        raise ValueError(f"keypoints21: expected [..., 21, 3], got {keypoints21.shape}")
    return keypoints21[..., MEDIAPIPE_INDEX, :]


def ego_frame(head_pose0: np.ndarray) -> np.ndarray:
    """World pose [4, 4] of the ego frame, from the camera-to-world head pose at the first step."""
    return head_pose0 @ CAMERA_FROM_EGO


# ---------------------------------------------------------------- the action convention ------

def matrix_to_rot6d(rot: np.ndarray) -> np.ndarray:
    """[..., 3, 3] rotation matrices -> [..., 6] = first column then second column."""
    rot = np.asarray(rot)
    return np.concatenate([rot[..., :, 0], rot[..., :, 1]], axis=-1)


def rot6d_to_matrix(d6: np.ndarray) -> np.ndarray:
    """[..., 6] -> [..., 3, 3] by Gram-Schmidt (so a noisy / predicted 6D still gives a rotation)."""
    d6 = np.asarray(d6, dtype=np.float64)
    a, b = d6[..., :3], d6[..., 3:6]
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    if (na < 1e-9).any():
        raise ValueError("rot6d_to_matrix: a first column of (near) zero length is not a rotation")
    x = a / na
    b = b - (x * b).sum(-1, keepdims=True) * x
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    if (nb < 1e-9).any():
        raise ValueError("rot6d_to_matrix: the two columns are parallel; not a rotation")
    y = b / nb
    return np.stack([x, y, np.cross(x, y)], axis=-1)


def pose_to_state(poses: np.ndarray) -> np.ndarray:
    """[..., 4, 4] -> [..., 9] = position + 6D rotation (the state convention, format v2)."""
    poses = np.asarray(poses)
    return np.concatenate([poses[..., :3, 3], matrix_to_rot6d(poses[..., :3, :3])], axis=-1)


def state_to_pose(vec: np.ndarray) -> np.ndarray:
    """[..., 9] position + 6D -> [..., 4, 4] (inverse of pose_to_state)."""
    vec = np.asarray(vec, dtype=np.float64)
    poses = np.zeros(vec.shape[:-1] + (4, 4))
    poses[..., :3, :3] = rot6d_to_matrix(vec[..., 3:9])
    poses[..., :3, 3] = vec[..., :3]
    poses[..., 3, 3] = 1.0
    return poses


def axis_angle_state_to_6d(state: np.ndarray, arms: int) -> np.ndarray:
    """Format v1 state [T, 7 * arms] (position, axis-angle, gripper per arm) -> v2 [T, 10 * arms]."""
    state = np.asarray(state, dtype=np.float64)
    if state.ndim != 2 or state.shape[1] != ARM_DIM * arms:
        raise ValueError(f"v1 state: expected [T, {ARM_DIM * arms}] for {arms} arm(s), got {state.shape}")
    out = []
    for arm in range(arms):
        arm_state = state[:, arm * ARM_DIM:(arm + 1) * ARM_DIM]
        out += [pose_to_state(vec_to_pose(arm_state[:, :6])), arm_state[:, 6:7]]
    return np.concatenate(out, axis=-1).astype(np.float32)


def pose_to_vec(poses: np.ndarray) -> np.ndarray:
    """[..., 4, 4] -> [..., 6] = position + axis-angle (format v1 state; the v1 -> v2 converter)."""
    flat = poses.reshape(-1, 4, 4)
    rotvec = Rotation.from_matrix(flat[:, :3, :3]).as_rotvec()
    return np.concatenate([flat[:, :3, 3], rotvec], axis=-1).reshape(*poses.shape[:-2], 6)


def vec_to_pose(vec: np.ndarray) -> np.ndarray:
    """[..., 6] position + axis-angle -> [..., 4, 4]."""
    flat = np.asarray(vec, dtype=np.float64).reshape(-1, 6)
    poses = np.tile(np.eye(4), (flat.shape[0], 1, 1))
    poses[:, :3, :3] = Rotation.from_rotvec(flat[:, 3:]).as_matrix()
    poses[:, :3, 3] = flat[:, :3]
    return poses.reshape(*np.shape(vec)[:-1], 4, 4)


def ee_delta(pose_t: np.ndarray, pose_t1: np.ndarray) -> np.ndarray:
    """[..., 4, 4] x2 -> [..., 6] action (dx, dy, dz, rx, ry, rz) moving pose_t to pose_t1."""
    rel = pose_t1[..., :3, :3] @ np.swapaxes(pose_t[..., :3, :3], -1, -2)
    rotvec = Rotation.from_matrix(rel.reshape(-1, 3, 3)).as_rotvec().reshape(*rel.shape[:-2], 3)
    return np.concatenate([pose_t1[..., :3, 3] - pose_t[..., :3, 3], rotvec], axis=-1)


def apply_ee_delta(pose: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Inverse of ee_delta: the pose reached from ``pose`` [4, 4] by action ``delta`` [6]."""
    out = np.eye(4)
    out[:3, :3] = Rotation.from_rotvec(np.asarray(delta[3:6], dtype=np.float64)).as_matrix() @ pose[:3, :3]
    out[:3, 3] = pose[:3, 3] + np.asarray(delta[:3], dtype=np.float64)
    return out


def ee_track_state_actions(poses: np.ndarray, gripper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One arm's EE track in the ego frame -> (state [T, ARM_STATE_DIM], actions [T, ARM_DIM]).

    state[t] = pose_to_state(pose t) + gripper[t]; actions[t] = ee_delta(pose t, pose t+1) +
    gripper[t+1]; the last step holds (zero delta, gripper unchanged). Importers of EE-pose robot
    data use this, so the state/action representation is decided in this module only.
    """
    poses = np.asarray(poses, dtype=np.float64)
    gripper = np.asarray(gripper, dtype=np.float64).reshape(-1)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or gripper.shape != (poses.shape[0],):
        raise ValueError(f"poses [T, 4, 4] and gripper [T] expected, got {poses.shape} and {gripper.shape}")
    state = np.concatenate([pose_to_state(poses), gripper[:, None]], axis=-1)
    actions = np.zeros((poses.shape[0], ARM_DIM))
    actions[:-1, :ARM_DIM - 1] = ee_delta(poses[:-1], poses[1:])
    actions[:, ARM_DIM - 1] = np.concatenate([gripper[1:], gripper[-1:]])
    return state.astype(np.float32), actions.astype(np.float32)


# ---------------------------------------------------------------- palm frame ------------------

def palm_frames(keypoints: np.ndarray, hand: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """Palm (EE) poses from keypoints [..., 17, 3] (any frame) -> (poses [..., 4, 4], valid [...]).

    origin = mean of wrist and the four MCPs; x = wrist -> middle MCP; z = palm normal pointing out
    of the palm (its sign depends on ``hand``, so a palm-down grasp has z down for both hands);
    y = z cross x. Invalid poses (NaN, collapsed or collinear palm) are identity placeholders.
    """
    if keypoints.shape[-2:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"keypoints: expected [..., {NUM_KEYPOINTS}, 3], got {keypoints.shape}")
    if hand not in HANDS:
        raise ValueError(f"hand={hand!r}; choose from {HANDS}")
    kp = np.asarray(keypoints, dtype=np.float64)
    palm = kp[..., PALM_KEYPOINTS, :]
    finite = np.isfinite(palm).all(axis=(-1, -2))
    palm = np.where(finite[..., None, None], palm, 0.0)
    wrist, index, middle, pinky = (palm[..., 0, :], palm[..., 1, :], palm[..., 2, :], palm[..., 4, :])
    along = middle - wrist
    across = index - pinky
    along_n = np.linalg.norm(along, axis=-1)
    across_n = np.linalg.norm(across, axis=-1)
    big = (along_n > MIN_PALM_EDGE) & (across_n > MIN_PALM_EDGE)
    safe_along, safe_across = np.maximum(along_n, 1e-12), np.maximum(across_n, 1e-12)
    x = along / safe_along[..., None]
    normal = np.cross(x, across / safe_across[..., None])
    sin = np.linalg.norm(normal, axis=-1)
    valid = finite & big & (sin > MIN_PALM_SIN)
    sign = -1.0 if hand == "right" else 1.0  # right hand: index->pinky x fingers = back of hand
    z = sign * normal / np.maximum(sin, 1e-12)[..., None]
    y = np.cross(z, x)
    poses = np.zeros(kp.shape[:-2] + (4, 4))
    poses[..., :3, 0], poses[..., :3, 1], poses[..., :3, 2] = x, y, z
    poses[..., :3, 3] = palm.mean(axis=-2)
    poses[..., 3, 3] = 1.0
    poses[~valid] = np.eye(4)
    return poses, valid


# Thumb-tip to index-PIP distance over palm width (index MCP to pinky MCP) of an open hand and of a
# pinch grasp: the mini-world's hand model (adult proportions) measures 0.89 open and 0.11 at full curl.
# closure = 0 at OPEN, 1 at CLOSED, linear between, so 0.5 (where a gripper counts as closed) falls at
# half the pinch. The first estimate (1 - (ratio - 0.5)) read 0.61 for an open hand, past 0.5: as a
# gripper target (data.human_gripper=closure) it taught "closed" throughout (docs/LOG.md, 2026-12-06).
OPEN_PINCH_RATIO = 0.89
CLOSED_PINCH_RATIO = 0.11


def grip_closure(keypoints: np.ndarray) -> np.ndarray:
    """Closure in [0, 1] (0 open, 1 a pinch), the gripper convention, from the pinch ratio (thumb tip to
    index PIP over palm width) mapped linearly from OPEN_PINCH_RATIO to CLOSED_PINCH_RATIO. NaN -> 0."""
    kp = np.asarray(keypoints, dtype=np.float64)
    pinch = np.linalg.norm(kp[..., KP["thumb_tip"], :] - kp[..., KP["index_pip"], :], axis=-1)
    width = np.linalg.norm(kp[..., KP["index_mcp"], :] - kp[..., KP["pinky_mcp"], :], axis=-1)
    ratio = pinch / np.maximum(width, 1e-6)
    closure = (OPEN_PINCH_RATIO - ratio) / (OPEN_PINCH_RATIO - CLOSED_PINCH_RATIO)
    return np.nan_to_num(np.clip(closure, 0.0, 1.0), nan=0.0)


# ---------------------------------------------------------------- keypoints -> actions --------

@dataclass
class HandActions:
    actions: np.ndarray  # float32 [T, 14]
    state: np.ndarray  # float32 [T, 20]
    action_mask: np.ndarray  # bool [14], gripper dims False
    step_valid: np.ndarray  # bool [T]
    num_invalid_steps: int
    invalid_poses: dict[str, int] = field(default_factory=dict)  # hand -> frames with no palm pose


def hands_to_actions(hand_keypoints: np.ndarray, head_pose: np.ndarray,
                     gripper: np.ndarray | None = None) -> HandActions:
    """[T, 2, 17, 3] keypoints in the head-camera frame (hand 0 = right, 1 = left) + [T, 4, 4]
    camera-to-world head poses -> actions/state in the ego frame (module docstring).

    Step t is valid iff both palms are valid at t and at t+1 (the last step: at t) and the head
    pose is finite. Invalid steps get finite placeholders: zero deltas, the last valid state.
    ``gripper`` [T, 2] overrides the closure estimate (it is masked for human data either way).
    """
    kp = np.asarray(hand_keypoints, dtype=np.float64)
    T = kp.shape[0]
    if kp.shape != (T, 2, NUM_KEYPOINTS, 3):
        raise ValueError(f"hand_keypoints: expected [T, 2, {NUM_KEYPOINTS}, 3], got {kp.shape}")
    head = np.asarray(head_pose, dtype=np.float64)
    if head.shape != (T, 4, 4):
        raise ValueError(f"head_pose: expected [{T}, 4, 4], got {head.shape}")
    if T == 0:
        raise ValueError("hand_keypoints: the episode is empty (0 frames); drop it")
    head_ok = np.isfinite(head).all(axis=(-1, -2))
    if not head_ok.any():
        raise ValueError("head_pose: no finite head pose in the episode, so the ego frame is "
                         "undefined; drop the episode or fill the head track")
    # The ego frame is the first *known* head pose (normally step 0); steps without a head pose
    # are invalid and borrow that pose as a finite placeholder.
    first = int(np.argmax(head_ok))
    head = np.where(head_ok[:, None, None], head, head[first])
    ego_inv = np.linalg.inv(ego_frame(head[first]))
    if gripper is None:
        gripper = grip_closure(kp)  # [T, 2]
    actions = np.zeros((T, HUMAN_ACTION_DIM))
    state = np.zeros((T, HUMAN_STATE_DIM))
    pose_ok = np.ones(T, dtype=bool) & head_ok
    invalid_poses = {}
    for h, name in enumerate(HANDS):
        cam_poses, valid = palm_frames(kp[:, h], name)
        invalid_poses[name] = int((~valid).sum())
        pose_ok &= valid
        ego_poses = ego_inv @ head @ cam_poses  # [T, 4, 4]
        vec = pose_to_state(ego_poses)
        # Forward-fill the state over invalid frames (first valid frame back-fills the start).
        good = np.flatnonzero(valid & head_ok)
        if good.size:
            src = np.maximum.accumulate(np.where(valid & head_ok, np.arange(T), -1))
            src = np.where(src < 0, good[0], src)
            vec = vec[src]
            ego_poses = ego_poses[src]
        else:
            ego_poses = np.tile(np.eye(4), (T, 1, 1))  # placeholder: identity, a valid rotation
            vec = pose_to_state(ego_poses)
        sl = slice(h * ARM_DIM, (h + 1) * ARM_DIM)
        state_sl = slice(h * ARM_STATE_DIM, (h + 1) * ARM_STATE_DIM)
        state[:, state_sl] = np.concatenate([vec, gripper[:, h:h + 1]], axis=-1)
        actions[:-1, sl.start:sl.start + 6] = ee_delta(ego_poses[:-1], ego_poses[1:])
        actions[:, sl.start + 6] = np.concatenate([gripper[1:, h], gripper[-1:, h]])
    step_valid = pose_ok.copy()
    step_valid[:-1] &= pose_ok[1:]
    actions[~step_valid] = np.where(np.isin(np.arange(HUMAN_ACTION_DIM), GRIPPER_DIMS),
                                    actions[~step_valid], 0.0)
    action_mask = np.ones(HUMAN_ACTION_DIM, dtype=bool)
    action_mask[list(GRIPPER_DIMS)] = False
    num_invalid = int((~step_valid).sum())
    if num_invalid:
        log.debug("hands_to_actions: %d/%d steps invalid (frames without palm pose: %s)",
                  num_invalid, T, invalid_poses)
    return HandActions(actions=actions.astype(np.float32), state=state.astype(np.float32),
                       action_mask=action_mask, step_valid=step_valid,
                       num_invalid_steps=num_invalid, invalid_poses=invalid_poses)
