"""Per-step closed-loop traces: what evaluate() records, what save_traces writes, what load_traces reads."""
import numpy as np
import pytest

from megavla.data_shards.miniworld import MiniWorld, task_spec
from megavla.eval import closed_loop as cl
from megavla.eval.traces import load_traces, save_traces, traces_path


def test_trace_round_trip_keeps_every_step_and_event(tmp_path):
    traces: list = []
    combos = ["0:0", "0:1", "0:2"]  # pick-place, push, pick
    res = cl.evaluate(cl.ScriptedPolicy(), combos, 2, image_size=16, progress=False, traces=traces)
    assert len(traces) == res["episodes"] == 6
    path = save_traces(traces, tmp_path / "traces_targets.npz")
    assert path == traces_path(tmp_path / "eval_targets.json")
    loaded = load_traces(path)
    assert len(loaded) == 6
    for ep, tr, detail in zip(loaded, traces, res["episodes_detail"]):
        assert (ep.scene, ep.task, ep.seed, ep.success) == (detail["scene"], detail["task"], detail["seed"],
                                                            detail["success"])
        assert len(ep.held) == detail["steps"] + 1  # the start state + one row per executed step
        arrays = tr.arrays()
        for name in ("ee", "gripper_cmd", "gripper", "blocks", "held"):
            assert getattr(ep, name).dtype == arrays[name].dtype
            np.testing.assert_array_equal(getattr(ep, name), arrays[name])
        assert ep.events == [(row, ("grasp", "release", "contact")[k], b) for row, k, b in tr.events]
        spec = task_spec(ep.scene, ep.task)
        if spec.kind == "push":  # the instructed block is pushed, never grasped
            assert ep.first("contact", spec.obj) is not None and ep.first("grasp") is None
        else:
            assert ep.held[ep.first("grasp", spec.obj)] == spec.obj
        if spec.kind == "pick_place":
            assert ep.first("release", spec.obj) > ep.first("grasp", spec.obj)
    # The last row is the world's final state: replay the first episode and compare.
    world = MiniWorld(0, 0, seed=loaded[0].seed, image_size=16)
    policy = cl.ScriptedPolicy()
    policy.reset(world)
    for _ in range(len(loaded[0].held) - 1):
        world.step(policy.act(world))
    np.testing.assert_allclose(loaded[0].blocks[-1, :, :3], world.state.blocks, atol=1e-6)
    np.testing.assert_allclose(loaded[0].bowls, world.bowls, atol=1e-6)


def test_a_file_that_is_not_a_trace_is_refused(tmp_path):
    assert traces_path(tmp_path / "res.json").name == "res.traces.npz"  # closed-loop --out res.json
    with pytest.raises(ValueError, match="no episode traces"):
        save_traces([], tmp_path / "empty.npz")
    bad = tmp_path / "x.npz"
    np.savez(bad, steps=np.zeros(1))
    with pytest.raises(ValueError, match="lacks"):
        load_traces(bad)
    (tmp_path / "y.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable trace file"):
        load_traces(tmp_path / "y.npz")
