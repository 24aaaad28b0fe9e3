"""The v2 state convention: 6D rotation columns, round trips, no sign flips through pi, v1 -> v2."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from megavla.data_shards import hands
from megavla.data_shards.miniworld import MiniWorld


def test_rot6d_round_trip_random_rotations():
    rots = Rotation.random(200, random_state=0).as_matrix()
    back = hands.rot6d_to_matrix(hands.matrix_to_rot6d(rots))
    np.testing.assert_allclose(back, rots, atol=1e-12)
    poses = np.tile(np.eye(4), (200, 1, 1))
    poses[:, :3, :3], poses[:, :3, 3] = rots, np.random.default_rng(0).normal(size=(200, 3))
    np.testing.assert_allclose(hands.state_to_pose(hands.pose_to_state(poses)), poses, atol=1e-12)


def test_rot6d_to_matrix_orthonormalizes_noisy_input_and_rejects_degenerate():
    rots = Rotation.random(50, random_state=1).as_matrix()
    noisy = hands.matrix_to_rot6d(rots) + np.random.default_rng(1).normal(0, 0.01, (50, 6))
    out = hands.rot6d_to_matrix(noisy)
    np.testing.assert_allclose(out @ np.swapaxes(out, -1, -2), np.broadcast_to(np.eye(3), out.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(out), 1.0, atol=1e-12)
    assert np.abs(out - rots).max() < 0.05
    with pytest.raises(ValueError, match="parallel"):
        hands.rot6d_to_matrix(np.array([1.0, 0, 0, 2.0, 0, 0]))


def test_no_sign_flip_on_a_rotation_through_pi():
    """A slow rotation through a half turn: axis-angle jumps (|r| ~ pi flips sign), 6D moves smoothly."""
    angles = np.linspace(np.pi - 0.2, np.pi + 0.2, 81)  # 0.005 rad per step
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    poses = np.tile(np.eye(4), (len(angles), 1, 1))
    poses[:, :3, :3] = Rotation.from_rotvec(angles[:, None] * axis).as_matrix()
    state = hands.pose_to_state(poses)
    six_d_jump = np.abs(np.diff(state[:, 3:9], axis=0)).max()
    assert six_d_jump < 0.02  # bounded by the step angle (0.005 rad) times a small constant
    old = hands.pose_to_vec(poses)  # the v1 representation does flip, which is why it was replaced
    assert np.abs(np.diff(old[:, 3:6], axis=0)).max() > 1.0


def test_miniworld_state_is_continuous_through_a_half_turn():
    """The robot yaws its gripper by 2 pi in small steps: every state step stays small."""
    w = MiniWorld(0, 3, "robot/arm", seed=0, image_size=16)
    states = [w.ee_state()]
    for _ in range(70):
        w.step(np.array([0, 0, 0, 0, 0, 0.09, 0.0]))
        states.append(w.ee_state())
    states = np.stack(states)
    assert states.shape[1] == hands.ARM_STATE_DIM
    assert np.abs(np.diff(states[:, 3:9], axis=0)).max() < 0.1


def test_v1_axis_angle_state_converts_to_v2():
    rng = np.random.default_rng(2)
    poses = np.tile(np.eye(4), (6, 2, 1, 1))
    poses[..., :3, :3] = Rotation.random(12, random_state=2).as_matrix().reshape(6, 2, 3, 3)
    poses[..., :3, 3] = rng.normal(size=(6, 2, 3))
    grip = rng.uniform(size=(6, 2, 1))
    v1 = np.concatenate([hands.pose_to_vec(poses), grip], axis=-1).reshape(6, 14)
    v2 = hands.axis_angle_state_to_6d(v1, arms=2)
    expect = np.concatenate([hands.pose_to_state(poses), grip], axis=-1).reshape(6, 20)
    np.testing.assert_allclose(v2, expect, atol=1e-6)
    with pytest.raises(ValueError, match="v1 state"):
        hands.axis_angle_state_to_6d(v1, arms=1)
