"""Human keypoints -> end-effector actions (megavla.data_shards.hands)."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from megavla.data_shards import hands

# A plausible right hand (metres, palm-frame-like coordinates; fingers along +x, palm down = -z).
_RIGHT = np.array([
    [0.00, 0.00, 0.0], [0.02, 0.025, -0.01], [0.04, 0.04, -0.015], [0.06, 0.05, -0.02],
    [0.075, 0.055, -0.025],                                   # thumb cmc, mcp, ip, tip
    [0.09, 0.03, 0.0], [0.12, 0.032, -0.01], [0.14, 0.033, -0.02],  # index
    [0.095, 0.01, 0.0], [0.13, 0.01, -0.01], [0.15, 0.01, -0.02],   # middle
    [0.09, -0.01, 0.0], [0.12, -0.011, -0.01], [0.14, -0.012, -0.02],  # ring
    [0.08, -0.03, 0.0], [0.10, -0.032, -0.01], [0.115, -0.033, -0.02],  # pinky
])


def _left():
    kp = _RIGHT.copy()
    kp[:, 1] *= -1  # mirror image of the right hand
    return kp


def _rigid(rotvec, trans):
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    T[:3, 3] = trans
    return T


def _apply(T, pts):
    return pts @ T[:3, :3].T + T[:3, 3]


def _track(num_steps, rng):
    """Random smooth-ish motion of both hands in front of a camera; keypoints in camera frame."""
    base_r = _rigid([np.pi / 2, 0, 0], [0.05, 0.1, 0.4])
    base_l = _rigid([np.pi / 2, 0, 0], [-0.1, 0.1, 0.4])
    kps = np.zeros((num_steps, 2, 17, 3))
    for t in range(num_steps):
        m = _rigid(rng.normal(0, 0.1, 3), rng.normal(0, 0.02, 3))
        kps[t, 0] = _apply(m @ base_r, _RIGHT)
        kps[t, 1] = _apply(m @ base_l, _left())
    return kps


def test_layout_is_mediapipe_minus_fingertips():
    assert hands.NUM_KEYPOINTS == 17 and len(set(hands.MEDIAPIPE_INDEX)) == 17
    assert set(range(21)) - set(hands.MEDIAPIPE_INDEX.tolist()) == {8, 12, 16, 20}
    kp21 = np.arange(21 * 3, dtype=float).reshape(21, 3)
    assert np.array_equal(hands.mediapipe21_to_17(kp21)[hands.KP["middle_mcp"]], kp21[9])


def test_palm_frame_is_orthonormal_and_hands_agree():
    poses, valid = hands.palm_frames(np.stack([_RIGHT]), "right")
    R = poses[0, :3, :3]
    assert valid.all() and np.allclose(R.T @ R, np.eye(3), atol=1e-12) and np.linalg.det(R) > 0
    assert R[2, 2] < -0.9  # palm-down hand: approach axis z points down (-z)
    left_pose, left_valid = hands.palm_frames(_left()[None], "left")
    assert left_valid.all() and left_pose[0, 2, 2] < -0.9  # mirrored left hand: also down


def test_known_rigid_motion_is_recovered():
    rng = np.random.default_rng(0)
    for _ in range(20):
        motion = _rigid(rng.normal(0, 0.3, 3), rng.normal(0, 0.05, 3))  # in the camera frame
        kp0 = _track(1, rng)[0]
        kps = np.stack([kp0, np.stack([_apply(motion, kp0[0]), _apply(motion, kp0[1])])])
        head = np.tile(np.eye(4), (2, 1, 1))
        out = hands.hands_to_actions(kps, head)
        assert out.step_valid.all() and out.num_invalid_steps == 0
        # Expected: the camera-frame motion written in ego axes, about the palm origin.
        C = hands.CAMERA_FROM_EGO[:3, :3]
        pose0, _ = hands.palm_frames(kp0[0], "right")
        origin0 = pose0[:3, 3]
        rot_ego = C.T @ motion[:3, :3] @ C
        expect_r = Rotation.from_matrix(rot_ego).as_rotvec()
        expect_d = C.T @ (_apply(motion, origin0[None])[0] - origin0)
        np.testing.assert_allclose(out.actions[0, 0:3], expect_d, atol=1e-5)
        np.testing.assert_allclose(out.actions[0, 3:6], expect_r, atol=1e-5)
        # The same motion applied to both hands gives the same rotation on the left arm dims.
        np.testing.assert_allclose(out.actions[0, 10:13], expect_r, atol=1e-5)
        # Applying the action to the state reproduces the next state (the convention round-trips).
        nxt = hands.apply_ee_delta(hands.state_to_pose(out.state[0, :9]), out.actions[0, :6])
        np.testing.assert_allclose(hands.pose_to_state(nxt), out.state[1, :9], atol=1e-5)


def test_moving_scene_with_camera_changes_nothing():
    rng = np.random.default_rng(1)
    T = 12
    kps = _track(T, rng)  # camera-frame keypoints are what a head-mounted tracker sees
    head = np.stack([_rigid(rng.normal(0, 0.05, 3), rng.normal(0, 0.02, 3)) for _ in range(T)])
    base = hands.hands_to_actions(kps, head)
    assert base.step_valid.all()
    for _ in range(3):
        g = _rigid(rng.normal(0, 1.0, 3), rng.normal(0, 2.0, 3))
        moved = hands.hands_to_actions(kps, g @ head)  # whole world (head included) moved by g
        np.testing.assert_allclose(moved.actions, base.actions, atol=1e-5)
        np.testing.assert_allclose(moved.state, base.state, atol=1e-5)
    # Sanity: moving the head alone (hands fixed in the world) does change the actions.
    other = hands.hands_to_actions(kps, head[::-1].copy())
    assert np.abs(other.actions - base.actions).max() > 1e-3


def test_head_motion_alone_gives_no_hand_motion():
    rng = np.random.default_rng(2)
    T = 8
    world_kp = _track(1, rng)[0]  # hands still in the world
    head = np.stack([_rigid(rng.normal(0, 0.1, 3), rng.normal(0, 0.05, 3)) for _ in range(T)])
    kps = np.stack([np.stack([_apply(np.linalg.inv(h), world_kp[i]) for i in range(2)]) for h in head])
    out = hands.hands_to_actions(kps, head)
    np.testing.assert_allclose(out.actions[:, [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]], 0, atol=1e-6)


@pytest.mark.parametrize("kind", ["nan", "collinear", "collapsed"])
def test_degenerate_frames_are_masked_and_counted(kind):
    rng = np.random.default_rng(3)
    T = 10
    kps = _track(T, rng)
    bad_t = 4
    if kind == "nan":  # tracker dropout of the whole right hand
        kps[bad_t, 0] = np.nan
    elif kind == "collinear":  # palm keypoints on one line
        line = np.linspace(0, 0.1, 17)[:, None] * np.array([1.0, 0.2, 0.1])
        kps[bad_t, 1] = line + np.array([0.0, 0.0, 0.4])
    else:  # every keypoint at one point
        kps[bad_t, 0] = np.array([0.0, 0.0, 0.4])
    out = hands.hands_to_actions(kps, np.tile(np.eye(4), (T, 1, 1)))
    assert np.isfinite(out.actions).all() and np.isfinite(out.state).all()
    # Step t uses frames t and t+1: the bad frame invalidates steps bad_t-1 and bad_t.
    assert out.num_invalid_steps == 2
    assert np.flatnonzero(~out.step_valid).tolist() == [bad_t - 1, bad_t]
    assert sum(out.invalid_poses.values()) == 1
    np.testing.assert_array_equal(out.action_mask, [i not in (6, 13) for i in range(14)])
    assert (out.actions[~out.step_valid][:, [0, 1, 2, 3, 4, 5]] == 0).all()


def test_missing_finger_keypoint_keeps_pose_and_nonfinite_gripper_is_finite():
    rng = np.random.default_rng(4)
    kps = _track(5, rng)
    kps[2, 0, hands.KP["thumb_tip"]] = np.nan  # not a palm keypoint: pose still defined
    out = hands.hands_to_actions(kps, np.tile(np.eye(4), (5, 1, 1)))
    assert out.step_valid.all() and np.isfinite(out.state).all()


def test_missing_head_pose_masks_steps():
    rng = np.random.default_rng(5)
    T = 6
    kps = _track(T, rng)
    head = np.tile(np.eye(4), (T, 1, 1))
    head[0] = np.nan  # head tracking starts late: ego frame = first known head pose
    head[3] = np.nan
    out = hands.hands_to_actions(kps, head)
    assert np.isfinite(out.actions).all() and np.isfinite(out.state).all()
    assert np.flatnonzero(~out.step_valid).tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="head_pose"):
        hands.hands_to_actions(kps, np.full((T, 4, 4), np.nan))


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="hand_keypoints"):
        hands.hands_to_actions(np.zeros((4, 2, 21, 3)), np.tile(np.eye(4), (4, 1, 1)))
    with pytest.raises(ValueError, match="head_pose"):
        hands.hands_to_actions(np.zeros((4, 2, 17, 3)), np.tile(np.eye(4), (3, 1, 1)))
