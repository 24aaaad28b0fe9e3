"""The mini-world environment: scenes x tasks, dynamics in the action convention, rendering."""
import numpy as np
import pytest

from megavla.data_shards import hands
from megavla.data_shards import miniworld
from megavla.data_shards.miniworld import NUM_TASKS, PALETTE, MiniWorld, scene_spec, task_spec
from megavla.data_shards.synth import ScriptedExpert


def test_scenes_and_tasks_are_enumerable_and_distinct():
    instructions = [task_spec(0, t).instruction for t in range(NUM_TASKS)]
    assert len(set(instructions)) == NUM_TASKS
    assert {task_spec(0, t).kind for t in range(3)} == {"pick_place", "push", "pick"}
    a, b = scene_spec(0), scene_spec(1)
    assert a.colors != b.colors or not np.allclose(a.positions, b.positions)
    assert task_spec(5, 3) == task_spec(5, 3)  # pure function of (scene, task)
    with pytest.raises(ValueError, match="task=12"):
        task_spec(0, NUM_TASKS)
    with pytest.raises(ValueError, match="embodiment"):
        MiniWorld(0, 0, "robot/bimanual")


def test_layout_objects_do_not_overlap():
    for s in range(30):
        pos = scene_spec(s).positions
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + np.eye(6)
        assert d.min() > 0.12


@pytest.mark.parametrize("embodiment", ["robot/arm", "human/ego"])
def test_step_follows_the_action_convention(embodiment):
    w = MiniWorld(2, 1, embodiment, seed=3, image_size=32)
    rng = np.random.default_rng(0)
    for _ in range(5):
        s0 = w.ee_state()
        action = np.zeros(w.action_dim)
        action[:6] = np.concatenate([rng.normal(0, 0.01, 3), rng.normal(0, 0.05, 3)])
        action[6] = 0.0
        w.step(action)
        s1 = w.ee_state()
        expect = hands.apply_ee_delta(hands.state_to_pose(s0[:9]), action[:6])
        np.testing.assert_allclose(s1[:9], hands.pose_to_state(expect), atol=1e-5)
        np.testing.assert_allclose(s1[:3] - s0[:3], action[:3], atol=1e-6)
    with pytest.raises(ValueError, match="action"):
        w.step(np.zeros(w.action_dim + 1))
    with pytest.raises(ValueError, match="action"):
        w.step(np.full(w.action_dim, np.nan))


def test_ego_frame_is_the_head_camera():
    """+x of the action moves the gripper along the head camera's optical axis."""
    w = MiniWorld(0, 0, "robot/arm", seed=0, image_size=32)
    before = w.state.ee[0][:3, 3].copy()
    w.step(np.array([0.02, 0, 0, 0, 0, 0, 0]))
    moved = w.state.ee[0][:3, 3] - before
    optical_axis = w.head_pose()[:3, 2]
    np.testing.assert_allclose(moved / np.linalg.norm(moved), optical_axis, atol=1e-9)


def test_human_hand_keypoints_give_back_the_palm_pose():
    w = MiniWorld(1, 0, "human/ego", seed=0, image_size=32)
    for closure in (0.0, 1.0):
        w.state.gripper[:] = closure
        kp = w.hand_keypoints_world()
        for h, name in enumerate(hands.HANDS):
            pose, valid = hands.palm_frames(kp[h], name)
            assert valid
            np.testing.assert_allclose(pose, w.state.ee[h], atol=1e-9)


def test_render_shapes_and_target_is_visible():
    for emb in ("robot/arm", "human/ego"):
        w = MiniWorld(4, 0, emb, seed=0, image_size=64)
        for cam in w.cameras:
            img = w.render(cam)
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        head = w.render("head").astype(int)
        for idx in (w.task_spec.obj, w.task_spec.target):  # learnable: what to do is in view
            color = np.array(PALETTE[w.spec.colors[idx]])
            close = np.abs(head - color).max(axis=-1) < 60
            assert close.sum() >= 3, (emb, w.spec.colors[idx])
    with pytest.raises(ValueError, match="camera"):
        MiniWorld(0, 0, "human/ego", image_size=32).render("right_wrist")


def test_scenes_look_different():
    imgs = [MiniWorld(s, 0, "robot/arm", seed=0, image_size=32).render("head").astype(int)
            for s in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(imgs[i] - imgs[j]).mean() > 5


def test_grasp_lift_and_release():
    w = MiniWorld(0, 2, "robot/arm", seed=0, image_size=32)  # task 2 is a pick-up task
    assert w.task_spec.kind == "pick" and not w.success()
    expert = ScriptedExpert(w, np.random.default_rng(0))
    while (out := expert.act()) is not None:
        w.step(out[0])
    assert w.success() and w.state.held[0] == w.task_spec.obj
    w.step(np.zeros(7))  # open the gripper: the block drops back onto the table
    assert w.state.held[0] == -1 and w.state.blocks[w.task_spec.obj, 2] == pytest.approx(miniworld.BLOCK_HALF)
    assert not w.success()


@pytest.mark.parametrize("embodiment", ["robot/arm", "human/ego"])
def test_scripted_expert_success_rate(embodiment):
    wins, total = 0, 0
    for scene in range(3):
        for task in range(NUM_TASKS):
            w = MiniWorld(scene, task, embodiment, seed=scene * 100 + task, image_size=16)
            expert = ScriptedExpert(w, np.random.default_rng(task))
            steps = 0
            while (out := expert.act()) is not None:
                w.step(out[0])
                steps += 1
            assert 15 <= steps <= 80
            wins += w.success()
            total += 1
    assert wins / total >= 0.95, f"{wins}/{total}"


def test_doing_nothing_does_not_succeed():
    for task in range(NUM_TASKS):
        w = MiniWorld(3, task, "robot/arm", seed=0, image_size=16)
        for _ in range(5):
            w.step(np.zeros(7))
        assert not w.success()
