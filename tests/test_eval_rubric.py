"""The goal-directed progress rubric on episodes whose answer is known: the scripted expert's own task
(1), holding still (0), and the seen sibling task performed instead of the target (0, flagged)."""
import numpy as np
import pytest

from megavla.data_shards.miniworld import MiniWorld, task_spec
from megavla.eval import closed_loop as cl
from megavla.eval.rubric import score_cell, score_episode, task_done
from megavla.eval.traces import load_traces, save_traces


def traced(policy, combos, episodes, tmp_path, name="t.npz"):
    traces: list = []
    cl.evaluate(policy, combos, episodes, image_size=16, progress=False, traces=traces)
    return load_traces(save_traces(traces, tmp_path / name))  # scored from the file, as the report does


def test_scripted_expert_scores_one_on_its_own_task(tmp_path):
    combos = [f"{s}:{t}" for s in range(3) for t in range(6)]  # every kind, three scenes
    for tr in traced(cl.ScriptedPolicy(), combos, 3, tmp_path):
        score = score_episode(tr, siblings=range(6))
        assert score.progress == 1.0, score
        assert score.approached and score.grasped and score.done and not score.did_another_task
        assert score.first_block == task_spec(tr.scene, tr.task).obj
        # task_done on the last row agrees with the world's own success test
        assert task_done(task_spec(tr.scene, tr.task), tr.blocks[-1], int(tr.held[-1]), tr.bowls, tr.pad) == tr.success


def test_holding_still_scores_zero(tmp_path):
    cell = score_cell(traced(cl.HoldPolicy(), ["0:0", "0:1", "0:2"], 3, tmp_path), ["0:3", "0:4", "0:5"])
    assert cell["episodes"] == 9 and cell["mean_progress"] == 0.0
    assert cell["rates"] == {"approached": 0.0, "grasped": 0.0, "done": 0.0, "did_another_task": 0.0}


class SiblingExpert:
    """The scripted expert of another task of the same scene, in the target's world."""

    def __init__(self, task):
        self.task = task

    def reset(self, world):
        sibling = MiniWorld(world.scene, self.task, seed=world.seed, image_size=16)
        sibling.state, sibling.bowls, sibling.pad = world.state, world.bowls, world.pad  # one shared world
        self.inner = cl.ScriptedPolicy()
        self.inner.reset(sibling)

    def act(self, world):
        return self.inner.act(world)


@pytest.mark.parametrize("target,sibling", [(0, 4), (1, 5), (2, 4)])
def test_doing_the_seen_sibling_task_scores_zero_and_is_flagged(tmp_path, target, sibling):
    # Scene 0: 0 pink -> orange bowl, 1 push cyan, 2 pick cyan; seen 4 pink -> purple bowl, 5 push pink.
    assert task_spec(0, 4).obj == task_spec(0, target).obj or target != 0
    trs = traced(SiblingExpert(sibling), [f"0:{target}"], 3, tmp_path)
    for tr in trs:
        assert not tr.success  # the world says the target failed
        score = score_episode(tr, siblings=[3, 4, 5])
        assert score.progress == 0.0 and score.did_another_task and score.other_task == sibling, score
        # without the sibling list the same episode earns partial credit only (never the "done" stage)
        partial = score_episode(tr, siblings=[])
        assert not partial.done and partial.progress < 1.0
    # The pick-place sibling grasps the target's own block: the rubric's early stages see it.
    if target == 0:
        assert all(score_episode(tr).approached and score_episode(tr).grasped for tr in trs)


def test_a_target_finished_is_never_another_task(tmp_path):
    # Expert on pick-place 0:0; "pick up the pink block" would be a prefix and never counts.
    for tr in traced(cl.ScriptedPolicy(), ["0:0"], 2, tmp_path):
        score = score_episode(tr, siblings=[0, 1, 2, 3, 4, 5])
        assert score.progress == 1.0 and not score.did_another_task
    assert np.isclose(score.goal_fraction, 1.0)
