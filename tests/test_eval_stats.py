"""Evaluation statistics and report logic with no trained model: Wilson / Newcombe intervals and the
two-proportion tests against published values, Holm, the competence gate, the blind baselines."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from megavla.eval import report
from megavla.eval import stats as st


def test_wilson_matches_newcombe_1998_table():
    # Newcombe (1998), Stat Med 17:857, Table I: Wilson score intervals without continuity correction.
    assert st.wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert st.wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert st.wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    with pytest.raises(ValueError, match="successes"):
        st.wilson_interval(5, 4)


def test_newcombe_difference_interval_matches_published_example():
    # Newcombe (1998), Stat Med 17:873, example (a): 56/70 vs 48/80, method 10: 0.0524 to 0.3339.
    lo, hi = st.newcombe_interval(56, 70, 48, 80)
    assert lo == pytest.approx(0.0524, abs=1e-4) and hi == pytest.approx(0.3339, abs=1e-4)


def test_pooled_z_statistic_by_hand():
    # 56/70 vs 48/80: pooled p = 104/150; z = 0.2 / sqrt(p (1 - p) (1/70 + 1/80)).
    p = 104 / 150
    z_hand = 0.2 / math.sqrt(p * (1 - p) * (1 / 70 + 1 / 80))
    z, p_z = st.pooled_z(56, 70, 48, 80)
    assert z == pytest.approx(z_hand) and z == pytest.approx(2.650, abs=1e-3)
    assert p_z == pytest.approx(math.erfc(z_hand / math.sqrt(2)))
    assert st.pooled_z(0, 20, 0, 20) == (0.0, 1.0)  # both at zero: no evidence either way


def test_fisher_exact_known_values():
    # Fisher's tea-tasting table [[3, 1], [1, 3]]: two-sided p = 34/70.
    assert st.fisher_p(3, 4, 1, 4) == pytest.approx(34 / 70)
    # 0/20 vs 10/20: hypergeometric two-sided p = 2 * C(20,10) C(20,0)... computed exactly:
    exact = 2 * math.comb(20, 10) / math.comb(40, 10)
    assert st.fisher_p(0, 20, 10, 20) == pytest.approx(exact)
    res = st.compare_proportions(10, 20, 0, 20)
    assert res["difference"] == 0.5 and res["p_value"] == pytest.approx(exact) and res["test"].startswith("fisher")
    assert res["ci95"][0] > 0 and res["z"] > 0
    with pytest.raises(ValueError, match="at least one episode"):
        st.compare_proportions(0, 0, 1, 2)


def test_holm_adjustment():
    assert report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert report.holm([0.5]) == [0.5]


def _eval(k, n, mse=0.3, baselines=True):
    lo, hi = st.wilson_interval(k, n)
    off = {"action_mse": mse}
    if baselines:
        off["baselines"] = {"zero": 0.61, "repeat_previous": 0.48, "mean_action": 0.26, "mean_action_train": 0.30}
    return {"closed_loop": {"successes": k, "episodes": n, "success_rate": k / n, "ci95": [lo, hi]}, "offline": off}


def test_competence_gate_refuses_a_verdict_below_threshold():
    levels = {0.5: {"robot": _eval(0, 21), "robot+human": _eval(15, 21), "seen": _eval(8, 21)},  # 0.38 < 0.6
              1.0: {"robot": _eval(0, 21), "robot+human": _eval(16, 21), "seen": _eval(9, 21)}}
    rows = report.transfer_gap_rows(levels, threshold=0.6)
    assert [row["gate"] for row in rows] == ["fail", "fail"]
    verdict = report.transfer_verdict(rows)
    assert verdict["gated_levels"] == [] and verdict["refused_levels"] == [0.5, 1.0]
    assert "No transfer verdict" in verdict["summary"] and "emerges" not in verdict["summary"]
    assert all("no transfer verdict" in line and "< the competence threshold 0.60" in line for line in verdict["lines"])
    # The same numbers with a competent robot-only policy get a verdict.
    levels[1.0]["seen"] = _eval(18, 21)
    rows = report.transfer_gap_rows(levels, threshold=0.6)
    verdict = report.transfer_verdict(rows)
    assert [row["gate"] for row in rows] == ["fail", "pass"] and verdict["transfer_levels"] == [1.0]
    assert "emerges** at 100%" in verdict["summary"]
    assert rows[1]["p_holm"] == pytest.approx(rows[1]["comparison"]["p_value"])  # one gated level
    # Not evaluated on seen combos: no verdict either.
    rows = report.transfer_gap_rows({0.0: {"robot": _eval(0, 21), "robot+human": _eval(21, 21)}})
    assert rows[0]["gate"] == "not evaluated" and report.transfer_verdict(rows)["gated_levels"] == []


def test_verdict_no_significant_difference():
    rows = report.transfer_gap_rows({1.0: {"robot": _eval(3, 21), "robot+human": _eval(5, 21), "seen": _eval(19, 21)}})
    verdict = report.transfer_verdict(rows)
    assert verdict["transfer_levels"] == [] and "not shown" in verdict["summary"]
    assert "+0.10 [" in verdict["summary"] and "n = 21 vs 21" in verdict["summary"]


def test_report_tables_show_test_gate_and_baselines():
    levels = {0.0: {"robot": _eval(1, 21, 0.5), "robot+human": _eval(3, 21, 0.25), "seen": _eval(18, 21)}}
    md = report.transfer_gap_markdown(report.transfer_gap_rows(levels))
    assert "| 0% | 0.86 [" in md and "| pass |" in md and "p (Fisher)" in md and "+0.10 [" in md
    for col in ("baseline: zero", "baseline: repeat previous", "baseline: mean action (targets)",
                "baseline: mean action (train)"):
        assert col in md
    assert "| 0.610 | 0.480 | 0.260 | 0.300 |" in md


# ------------------------------------------------------------------- offline baselines ----
@pytest.fixture(scope="module")
def loaded_and_episodes():
    from megavla.config import Config, build
    from megavla.data.normalize import Normalizer
    from megavla.eval.offline import heldout_episodes
    from megavla.eval.policy import LoadedCheckpoint
    from megavla.model.vla import build_model
    from helpers.norm_stats import robot_arm_norm_stats
    cfg = build(Config, {"model": {"preset": "tiny"}, "data": {"image_size": 32}})
    torch.manual_seed(0)
    eps = heldout_episodes(["0:0", "0:1"], 1, image_size=32)
    return LoadedCheckpoint(build_model(cfg.model).eval(), cfg, Normalizer(robot_arm_norm_stats(eps), "quantile"),
                            None, None, None, None), eps


def test_offline_baselines_recompute_from_the_batch(loaded_and_episodes):
    from megavla.eval.offline import evaluate_offline, timesteps
    from megavla.eval.policy import episode_batch
    loaded, eps = loaded_and_episodes
    res = evaluate_offline(loaded, eps, 3, 2, subtask=False, progress=False)
    assert set(res["baselines"]) == {"zero", "repeat_previous", "mean_action", "mean_action_train"}
    zero, mean, targets = [], [], []
    for ep in eps:
        batch = episode_batch(loaded, [(ep, t) for t in timesteps(ep, 3)])
        mask = (batch.action_dim_mask[:, None, :] & batch.action_time_mask[:, :, None]).float()
        z = loaded.normalizer.normalize(torch.zeros_like(batch.actions), ep.embodiment)
        zero += (((z - batch.actions) ** 2 * mask).sum((1, 2)) / mask.sum((1, 2))).tolist()
        targets.append((batch.actions, mask))
    m = sum((a * k).sum((0, 1)) for a, k in targets) / sum(k.sum((0, 1)) for _, k in targets).clamp_min(1)
    for a, k in targets:
        mean += (((m - a) ** 2 * k).sum((1, 2)) / k.sum((1, 2))).tolist()
    assert res["baselines"]["zero"] == pytest.approx(np.mean(zero), rel=1e-5)
    assert res["baselines"]["mean_action"] == pytest.approx(np.mean(mean), rel=1e-5)
    assert res["mse_vs_best_baseline"] == pytest.approx(res["action_mse"] / min(res["baselines"].values()))


def test_a_blind_policy_scores_exactly_its_baseline(loaded_and_episodes):
    """A model that outputs the repeat-previous chunk gets that baseline's error: ratio >= 1."""
    from megavla.eval.offline import blind_predictions, evaluate_offline
    loaded, eps = loaded_and_episodes

    class RepeatPrevious(torch.nn.Module):
        def sample_actions(self, batch, num_steps, noise):
            ep = self.current
            ts = [int(t) for t in self.steps]
            return blind_predictions(loaded, ep, ts, tuple(batch.actions.shape))["repeat_previous"]

    import megavla.eval.offline as off
    blind = RepeatPrevious()
    real_timesteps = off.timesteps

    def spy(ep, count):  # let the fake model know which (episode, steps) it is asked about
        blind.current, blind.steps = ep, real_timesteps(ep, count)
        return blind.steps
    off.timesteps = spy
    try:
        res = evaluate_offline(dataclasses.replace(loaded, model=blind), eps, 3, 2, subtask=False, progress=False)
    finally:
        off.timesteps = real_timesteps
    assert res["action_mse"] == pytest.approx(res["baselines"]["repeat_previous"], rel=1e-6)
    assert res["mse_vs_best_baseline"] >= 1.0


def test_mcnemar_exact_and_pairing():
    # 8 start states won only with human data, 1 only without: two-sided binomial p = 2 * P(X <= 1 | 9, 1/2).
    first = [True] * 8 + [False] * 1 + [True] * 5 + [False] * 6
    second = [False] * 8 + [True] * 1 + [True] * 5 + [False] * 6
    res = st.mcnemar_exact(first, second)
    assert (res["only_first"], res["only_second"]) == (8, 1)
    assert res["p_value"] == pytest.approx(2 * (1 + 9) / 2 ** 9)
    assert st.mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    with pytest.raises(ValueError, match="equal"):
        st.mcnemar_exact([True], [])
    # report.paired_test pairs by (scene, task, seed) and refuses different start states.
    def cl(successes, seeds):
        return {"episodes_detail": [{"scene": 0, "task": 0, "seed": s, "success": ok} for s, ok in zip(seeds, successes)]}
    assert report.paired_test(cl(first, range(20)), cl(second, range(20)))["only_first"] == 8
    assert report.paired_test(cl(first, range(20)), cl(second, range(1, 21))) is None


def test_noise_scale_zero_is_deterministic_and_one_samples(loaded_and_episodes):
    """noise_scale=0 integrates the flow from x = 0: the same chunk whatever the noise seed; 1 samples."""
    from megavla.data_shards.miniworld import MiniWorld
    from megavla.eval.policy import VLAPolicy
    loaded, _ = loaded_and_episodes
    world = MiniWorld(0, 0, seed=5, image_size=32)
    plans = {(scale, seed): VLAPolicy(loaded, noise_scale=scale, seed=seed).plan(world)
             for scale in (0.0, 1.0) for seed in (0, 1)}
    assert np.array_equal(plans[0.0, 0], plans[0.0, 1])
    assert not np.allclose(plans[1.0, 0], plans[1.0, 1])
    with pytest.raises(ValueError, match="noise_scale"):
        VLAPolicy(loaded, noise_scale=-1.0)


# ------------------------------------------------ per-episode scores: seed-aware intervals and tests ----
def test_one_seed_reduces_to_the_ordinary_bootstrap_and_permutation_test():
    from scipy import stats as sps

    from megavla.eval import stats as st
    rng = np.random.default_rng(3)
    a, b = rng.random(30) * 0.6 + 0.2, rng.random(30) * 0.6
    ours = st.bootstrap_mean([a])
    ref = sps.bootstrap((a,), np.mean, method="percentile", n_resamples=4000, random_state=1).confidence_interval
    assert ours["mean"] == pytest.approx(a.mean())
    assert ours["ci95"] == pytest.approx([ref.low, ref.high], abs=0.01)
    p_ref = sps.permutation_test((a, b), lambda x, y: x.mean() - y.mean(), n_resamples=4000,
                                 alternative="two-sided", random_state=1).pvalue
    assert st.compare_means([a], [b])["p_value"] == pytest.approx(p_ref, abs=0.01)


def test_seed_variance_widens_the_interval_and_stratifies_the_test():
    from megavla.eval import stats as st
    rng = np.random.default_rng(4)
    # Two training seeds that differ a lot; the episode-level spread is small.
    seeds = [0.2 + 0.05 * rng.random(30), 0.7 + 0.05 * rng.random(30)]
    pooled = st.bootstrap_mean([np.concatenate(seeds)])
    hier = st.bootstrap_mean(seeds)
    assert hier["mean"] == pytest.approx(pooled["mean"])
    assert hier["ci95"][1] - hier["ci95"][0] > 3 * (pooled["ci95"][1] - pooled["ci95"][0])
    # Arm b is arm a shifted by +0.02 in every seed: within a seed that is a large, consistent gap...
    shifted = [s + 0.02 for s in seeds]
    assert st.compare_means(shifted, seeds)["p_value"] < 0.01
    # ...and pairing seed 0 of one arm with seed 1 of the other is refused, not silently mixed.
    with pytest.raises(ValueError, match="pairs runs by seed"):
        st.compare_means(shifted, seeds[:1])
    with pytest.raises(ValueError, match="at least one episode"):
        st.bootstrap_mean([np.zeros(0)])


def test_transfer_efficiency_and_a_failed_control():
    from megavla.eval import stats as st
    rng = np.random.default_rng(5)
    robot = [rng.random(30) * 0.2, rng.random(30) * 0.2]
    human = [r + 0.3 for r in robot]
    control = [r + 0.6 for r in robot]
    out = st.transfer_efficiency(robot, human, control)
    assert out["detectable"] and out["efficiency"] == pytest.approx(0.5)
    assert out["ci95"][0] < 0.5 < out["ci95"][1]
    failed = st.transfer_efficiency(robot, human, robot)  # the control learned nothing either
    assert not failed["detectable"] and failed["efficiency"] is None and failed["ci95"] is None
