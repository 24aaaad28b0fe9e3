"""Closed-loop evaluator pieces that need no trained model: Wilson interval, scripted / hold
policies in the mini-world, episode termination, offline timestep choice, report formatting."""
import math

import numpy as np
import pytest

from megavla.eval import closed_loop as cl
from megavla.eval import report
from megavla.eval.offline import timesteps
from megavla.data_shards.synth import generate_episode


def test_wilson_matches_textbook_values():
    # Wilson 95% for 8/10 (Brown, Cai & DasGupta 2001, Table / direct formula): [0.490, 0.943]
    lo, hi = cl.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=2e-4) and hi == pytest.approx(0.9433, abs=2e-4)
    lo, hi = cl.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=2e-4)
    lo, hi = cl.wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=2e-4)
    assert cl.wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_coverage_is_near_nominal():
    rng = np.random.default_rng(0)
    p, n, trials = 0.3, 40, 2000
    k = rng.binomial(n, p, trials)
    covered = np.mean([lo <= p <= hi for lo, hi in (cl.wilson_interval(int(x), n) for x in k)])
    assert 0.92 < covered < 0.98


def test_scripted_policy_succeeds_and_hold_fails():
    combos = ["0:0", "0:1", "1:2"]  # pick-place, push, pick
    good = cl.evaluate(cl.ScriptedPolicy(), combos, 2, image_size=32, progress=False)
    bad = cl.evaluate(cl.HoldPolicy(), combos, 2, image_size=32, progress=False)
    assert good["success_rate"] == 1.0 and good["episodes"] == 6
    assert bad["success_rate"] == 0.0 and bad["successes"] == 0
    assert set(good["per_combo"]) == set(combos)
    # An episode ends at its first success: the scripted expert needs fewer than max steps.
    assert all(e["steps"] < 90 for e in good["episodes_detail"])
    assert all(e["steps"] == 90 for e in bad["episodes_detail"])
    lo, hi = bad["ci95"]
    assert lo == 0.0 and math.isclose(hi, cl.wilson_interval(0, 6)[1])


def test_evaluation_seeds_differ_from_each_other_and_by_seed():
    a = cl.evaluate(cl.HoldPolicy(), ["0:0"], 3, image_size=32, max_steps=1, progress=False)
    b = cl.evaluate(cl.HoldPolicy(), ["0:0"], 3, image_size=32, max_steps=1, seed=1, progress=False)
    seeds_a = [e["seed"] for e in a["episodes_detail"]]
    seeds_b = [e["seed"] for e in b["episodes_detail"]]
    assert len(set(seeds_a)) == 3 and not set(seeds_a) & set(seeds_b)


def test_non_finite_action_is_a_failure_not_a_crash():
    class NaNPolicy(cl.HoldPolicy):
        def act(self, world):
            return np.full(world.action_dim, np.nan)
    res = cl.run_episode(NaNPolicy(), 0, 0, 5, image_size=32)
    assert not res.success and res.steps == 0


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="scene:task"):
        cl.parse_combo("0-1")
    with pytest.raises(ValueError, match="combos is empty"):
        cl.evaluate(cl.HoldPolicy(), [], 1, image_size=32)
    with pytest.raises(ValueError, match="episodes_per_combo"):
        cl.evaluate(cl.HoldPolicy(), ["0:0"], 0, image_size=32)


def test_offline_timesteps_are_valid_and_spread():
    ep = generate_episode("human/ego", 0, 0, 0, image_size=32)
    ts = timesteps(ep, 5)
    assert all(ep.step_valid[t] for t in ts) and ts == sorted(ts)
    assert ts[0] == int(np.flatnonzero(ep.step_valid)[0]) and ts[-1] == int(np.flatnonzero(ep.step_valid)[-1])


def test_transfer_gap_rows_and_markdown():
    def ev(k, n, mse):
        lo, hi = cl.wilson_interval(k, n)
        return {"closed_loop": {"successes": k, "episodes": n, "success_rate": k / n, "ci95": [lo, hi]},
                "offline": {"action_mse": mse}}
    rows = report.transfer_gap_rows({0.5: {"robot": ev(1, 4, 0.5), "robot+human": ev(3, 4, 0.25), "seen": ev(4, 4, 0.1)},
                                     0.0: {"robot": ev(0, 4, 1.0), "robot+human": ev(0, 4, 1.0), "seen": None}})
    assert [r["diversity"] for r in rows] == [0.0, 0.5]
    assert rows[1]["delta_success"] == pytest.approx(0.5) and rows[1]["delta_mse"] == pytest.approx(0.25)
    assert [r["gate"] for r in rows] == ["not evaluated", "pass"]
    md = report.transfer_gap_markdown(rows)
    assert md.count("\n") == 3 + 1 + 4 and "| 50% | 1.00 [" in md and "| 0.25 [" in md and "+0.50 [" in md
