"""The competence diagnosis on policies whose answer is known: the scripted expert looks (jitter slope
0, closes on the block); an expert planning on the block's nominal spot does not (slope -1)."""
import copy

import numpy as np
import pytest

from megavla.data_shards.miniworld import scene_spec
from megavla.eval import closed_loop as cl
from megavla.eval.competence import combo_competence, competence_lines, swap_instructions


def traces_of(policy, combo, n=8):
    traces: list = []
    cl.evaluate(policy, [combo], n, image_size=16, progress=False, traces=traces)
    return [t.loaded() for t in traces]


class NominalExpert:
    """The scripted expert planning in a copy of the world whose blocks sit at their scene's nominal
    spots: its arm goes where the block usually is, whatever the episode's jitter."""

    def reset(self, world):
        self.shadow = copy.deepcopy(world)
        self.shadow.state.blocks[:, :2] = scene_spec(world.scene).positions[:3]
        self.inner = cl.ScriptedPolicy()
        self.inner.reset(self.shadow)

    def act(self, world):
        action = self.inner.act(self.shadow)
        self.shadow.step(action)
        return action


@pytest.mark.parametrize("combo", ["0:0", "0:2"])  # pick-place, pick
def test_the_expert_looks_and_a_nominal_planner_does_not(combo):
    looks = combo_competence(traces_of(cl.ScriptedPolicy(), combo))
    assert looks["closes"] == 8 and looks["within_grasp_window"] == 1.0 and looks["median_close_distance"] < 1e-3
    assert abs(looks["median_height_above_block"]) < 1e-3
    assert abs(looks["jitter"]["slope"]) < 0.05
    blind = combo_competence(traces_of(NominalExpert(), combo))
    assert blind["closes"] == 8 and blind["jitter"]["slope"] == pytest.approx(-1.0, abs=0.05)
    assert blind["median_close_distance"] > 0.005  # off the block by its jitter (up to 2 cm per axis)


def test_push_reports_the_closest_low_pass_and_holding_still_never_closes():
    push = combo_competence(traces_of(cl.ScriptedPolicy(), "0:1"))
    assert push["kind"] == "push" and push["closes"] == 8 and push["median_close_distance"] < 0.05
    hold = combo_competence(traces_of(cl.HoldPolicy(), "0:0", n=3))
    assert hold["closes"] == 0 and hold["median_close_distance"] is None and hold["jitter"]["slope"] is None
    lines = competence_lines({"checkpoint": "x", "step": 1, "combos": {"0:0": {**hold, "swap_sensitivity": {}}}})
    assert lines[-1].startswith("0:0    pick_place  0/3")


def test_swap_instructions_change_one_word():
    swaps = swap_instructions(0, 0)  # "put the pink block in the orange bowl"
    assert len(swaps["colour"]) == 2 and all("pink" not in s and s.endswith("block in the orange bowl")
                                             for s in swaps["colour"])
    assert swaps["verb"] == ["push the pink block in the orange bowl"]
    assert np.all([s != "put the pink block in the orange bowl" for s in swaps["colour"]])


def test_competence_out_is_refused_before_any_episode_without_overwrite(tmp_path, capsys):
    from megavla.eval import cli as eval_cli
    out = tmp_path / "competence.json"
    out.write_text("{}")
    # the run dir does not exist: a refusal that came after loading would name it instead
    code = eval_cli.main(["competence", str(tmp_path / "no-run"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--overwrite" in err and str(out) in err, err
    assert out.read_text() == "{}"
