"""Synthetic episodes: determinism, format validity, masks, consistency with the world."""
import numpy as np
import pytest
import simplejpeg

from megavla.data_shards import hands
from megavla.data_shards.format import CAMERAS, episode_to_sample, sample_to_episode, validate_episode
from megavla.data_shards.miniworld import MiniWorld
from megavla.data_shards.synth import (FPS, episode_rng, generate_episode, iter_episodes, rollout)


def _sample_bytes(ep):
    return {k: v for k, v in episode_to_sample(ep).items()}


@pytest.mark.parametrize("embodiment", ["robot/arm", "human/ego"])
def test_same_arguments_same_bytes(embodiment):
    a = _sample_bytes(generate_episode(embodiment, 3, 4, 7, image_size=32))
    b = _sample_bytes(generate_episode(embodiment, 3, 4, 7, image_size=32))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    c = _sample_bytes(generate_episode(embodiment, 3, 4, 8, image_size=32))
    d = _sample_bytes(generate_episode(embodiment, 3, 4, 7, image_size=32, seed=1))
    assert a["actions.npy"] != c["actions.npy"] and a["actions.npy"] != d["actions.npy"]


def test_robot_episode_format():
    ep = generate_episode("robot/arm", 0, 0, 0, image_size=32)
    validate_episode(ep)
    assert set(ep.frames) == set(CAMERAS) and 25 <= ep.num_steps <= 70 and ep.fps == FPS
    assert ep.actions.shape == (ep.num_steps, 7) and ep.state.shape == (ep.num_steps, 10)
    assert ep.action_mask.all() and ep.step_valid.all()
    assert ep.hand_keypoints is None and ep.head_pose is None
    img = simplejpeg.decode_jpeg(ep.frames["head"][0])
    assert img.shape == (32, 32, 3)
    assert [s.text for s in ep.subtasks][0].startswith("reach the")
    assert ep.subtasks[0].start == 0 and ep.subtasks[-1].end == ep.num_steps
    assert all(a.end == b.start for a, b in zip(ep.subtasks, ep.subtasks[1:]))
    assert set(np.unique(ep.actions[:, 6])) <= {0.0, 1.0}
    back = sample_to_episode(episode_to_sample(ep))  # the shared format round-trips it
    np.testing.assert_array_equal(back.actions, ep.actions)


def test_human_episode_format_and_masks():
    ep = generate_episode("human/ego", 1, 2, 0, image_size=32)
    validate_episode(ep)
    assert set(ep.frames) == {"head"}  # head camera only, as in real egocentric video
    T = ep.num_steps
    assert ep.actions.shape == (T, 14) and ep.state.shape == (T, 20)
    np.testing.assert_array_equal(ep.action_mask, [d not in (6, 13) for d in range(14)])
    assert ep.hand_keypoints.shape == (T, 2, 17, 3) and ep.head_pose.shape == (T, 4, 4)
    assert np.isfinite(ep.actions).all() and np.isfinite(ep.state).all()
    assert ep.extra["invalid_steps"] == int((~ep.step_valid).sum())


def test_dropouts_are_masked_and_counted():
    invalid, dropped = 0, 0
    for episode in range(6):
        ep = generate_episode("human/ego", 0, 1, episode, image_size=16, cameras=())
        invalid += int((~ep.step_valid).sum())
        dropped += ep.extra["dropped_hand_frames"]
        nan_frames = np.isnan(ep.hand_keypoints).any(axis=(2, 3)).any(axis=1)
        # A dropped frame t invalidates steps t-1 and t (actions move t -> t+1).
        expect = nan_frames.copy()
        expect[:-1] |= nan_frames[1:]
        np.testing.assert_array_equal(~ep.step_valid, expect)
        assert (ep.actions[~ep.step_valid][:, [0, 1, 2, 3, 4, 5]] == 0).all()
    assert dropped > 0 and invalid >= dropped


def test_replaying_robot_actions_reaches_success():
    for scene, task in [(0, 0), (1, 1), (2, 2), (5, 7)]:
        ep = generate_episode("robot/arm", scene, task, 0, image_size=16, cameras=())
        world = MiniWorld(scene, task, "robot/arm", seed=ep.extra["world_seed"], image_size=16)
        assert not world.success()
        for t in range(ep.num_steps):
            np.testing.assert_allclose(world.ee_state(), ep.state[t], atol=1e-5)
            world.step(ep.actions[t])
        assert world.success(), (scene, task)


def test_human_actions_track_the_true_hand_motion():
    """Actions from noisy tracked keypoints ~ the true hand motion in the same ego frame."""
    emb, scene, task, episode = "human/ego", 2, 0, 0
    ep = generate_episode(emb, scene, task, episode, image_size=16, cameras=())
    truth = rollout(emb, scene, task, episode_rng(emb, scene, task, episode, 0), 16, cameras=())
    clean = hands.hands_to_actions(truth.keypoints, truth.head_poses)
    assert clean.step_valid.all()
    # Clean keypoints reproduce the executed actions and true states (the world and hands.py
    # agree on the palm frame and on the ego frame).
    np.testing.assert_allclose(clean.actions[:, :6], truth.actions[:, :6], atol=1e-5)
    np.testing.assert_allclose(clean.state[:, :9], truth.states[:, :9], atol=1e-5)
    valid = ep.step_valid
    pos_err = np.abs(ep.actions[valid, :3] - truth.actions[valid, :3])
    assert pos_err.mean() < 0.004  # a few mm: 2 mm keypoint noise averaged over the palm
    rot_err = np.abs(ep.actions[valid, 3:6] - truth.actions[valid, 3:6])
    assert rot_err.mean() < 0.1


def test_iter_episodes_order_and_bad_task():
    eps = list(iter_episodes(2, [0, 3], 1, embodiments=("robot/arm", "human/ego"), image_size=16,
                             cameras=("head",)))
    assert [(e.embodiment, e.scene, e.task) for e in eps] == [
        (emb, s, t) for emb in ("robot/arm", "human/ego") for s in range(2) for t in (0, 3)]
    assert all(set(e.frames) == {"head"} for e in eps)
    with pytest.raises(ValueError, match="tasks"):
        next(iter_episodes(1, [99], 1))
    with pytest.raises(ValueError, match="cameras"):
        generate_episode("robot/arm", 0, 0, 0, cameras=("top",))


def test_robot_expert_decelerates_into_the_grasp():
    """Issue 11: where the arm stops must be a smooth function of the distance, not a step count --
    the steps into every grip get shorter, and the gripper closes within a few mm of the block."""
    r = rollout("robot/arm", 0, 3, episode_rng("robot/arm", 0, 3, 0, 0), image_size=16, cameras=())
    assert r.world.task_spec.kind == "pick_place" and r.world.success()
    moves = np.linalg.norm(r.actions[:, :3], axis=-1)
    cruise = moves.max()
    closes = [t for t in range(1, len(r.actions)) if r.actions[t, 6] >= 0.5 > r.actions[t - 1, 6]]
    assert closes, "the expert never closed its gripper"
    t = closes[0]
    approach = moves[t - 4:t]  # a constant-speed expert: cruise, cruise, cruise, remainder
    assert np.all(np.diff(approach) <= 1e-6) and approach[1] < 0.6 * cruise, \
        f"steps into the grasp do not shrink: {approach} (cruise {cruise:.3f})"
    w = MiniWorld(0, 3, "robot/arm", seed=r.world_seed, image_size=16)
    for a in r.actions[:t]:
        w.step(a)
    block = w.state.blocks[w.task_spec.obj]
    assert np.linalg.norm(w.contact_point(0) - block) < 0.01

