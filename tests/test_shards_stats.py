"""Streaming norm stats: quantiles within the stated bound of numpy's, masks, degenerate floors."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from megavla.data_shards.stats import (NormStatsAccumulator, StreamingHistogram, compare_norm_stats,
                                       load_norm_stats, write_json_atomic)
from helpers.toy_episodes import make_episode

DATASETS = {
    "normal": lambda rng: rng.normal(0.0, 1.0, (6000, 4)),
    "heavy_tail": lambda rng: rng.standard_t(2, (6000, 4)) * 10,
    "drifting": lambda rng: np.linspace(0, 50, 6000)[:, None] + rng.normal(0, 0.1, (6000, 4)),
    "bimodal_small_then_wide": lambda rng: np.concatenate(
        [np.full((300, 4), 0.5), rng.uniform(-3, 9, (5700, 4))]),
    "discrete": lambda rng: rng.integers(0, 2, (6000, 4)).astype(float),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("num_bins", [64, 4096])
def test_quantiles_within_bound_of_numpy(name, num_bins):
    rng = np.random.default_rng(0)
    data = DATASETS[name](rng).astype(np.float32)
    hist = StreamingHistogram(4, num_bins)
    for chunk in np.array_split(data, 97):  # episode-sized pieces, as the writer feeds them
        hist.add(chunk)
    x = data.astype(np.float64)
    w = hist.bin_width()
    span = x.max(0) - x.min(0)
    assert (w <= np.maximum(4 * span / num_bins, 1e-9)).all(), (w, span)  # the stated size of w
    for q in (0.01, 0.5, 0.99):
        est = hist.quantile(q)
        lower = np.quantile(x, q, axis=0, method="lower")
        higher = np.quantile(x, q, axis=0, method="higher")
        assert (np.abs(est - lower) <= w + 1e-12).all(), (q, est, lower, w)
        assert (np.abs(est - np.quantile(x, q, axis=0)) <= w + (higher - lower) + 1e-12).all()


def test_bound_is_not_vacuous_coarse_bins_are_worse():
    data = np.random.default_rng(1).normal(0, 1, (5000, 1))
    errors = []
    for bins in (16, 4096):
        h = StreamingHistogram(1, bins)
        h.add(data)
        errors.append(abs(h.quantile(0.99)[0] - np.quantile(data, 0.99, method="lower")))
    assert errors[1] < 0.01 and errors[1] < errors[0]


def test_mean_std_over_valid_steps_and_supervised_dims_only():
    eps = [make_episode("human/ego", s, t, 0, steps=10) for s in range(3) for t in range(2)]
    acc = NormStatsAccumulator()
    for ep in eps:
        acc.add(ep)
    stats = acc.finalize()["human/ego"]
    valid_actions = np.concatenate([ep.actions[ep.step_valid] for ep in eps]).astype(np.float64)
    valid_state = np.concatenate([ep.state[ep.step_valid] for ep in eps]).astype(np.float64)
    assert stats["num_steps"] == len(valid_state) == 6 * 9 and stats["num_episodes"] == 6
    np.testing.assert_allclose(stats["state"]["mean"], valid_state.mean(0), atol=1e-9)
    np.testing.assert_allclose(stats["state"]["std"], valid_state.std(0), atol=1e-9)
    # the 1e3 dropout placeholder would dominate these if invalid steps leaked in
    np.testing.assert_allclose(stats["actions"]["mean"][:6], valid_actions[:, :6].mean(0), atol=1e-9)
    assert max(stats["actions"]["q99"][:6]) < 1.0
    # gripper dim 6 is never supervised for human/ego: identity placeholder, count 0
    assert stats["actions"]["count"][6] == 0
    assert [stats["actions"][k][6] for k in ("mean", "std", "q01", "q99")] == [0.0, 1.0, -1.0, 1.0]


def test_degenerate_dims_get_floor_and_warning(caplog):
    acc = NormStatsAccumulator(min_range=1e-3, min_std=1e-4)
    for e in range(3):
        ep = make_episode("robot/arm", 0, 0, e)
        ep.state[:, 2] = 0.25  # constant state dim
        acc.add(ep)
    with caplog.at_level(logging.WARNING, logger="megavla.data_shards.stats"):
        stats = acc.finalize()["robot/arm"]["state"]
    assert stats["q99"][2] - stats["q01"][2] == pytest.approx(1e-3)
    assert 0.5 * (stats["q99"][2] + stats["q01"][2]) == pytest.approx(0.25)
    assert stats["std"][2] == 1e-4
    messages = [r.getMessage() for r in caplog.records]
    assert any("robot/arm state dim 2: degenerate quantile range" in m for m in messages)
    assert any("robot/arm state dim 2: degenerate std" in m for m in messages)
    assert not any("dim 1:" in m for m in messages)  # healthy dims untouched
    # downstream quantile normalization stays finite for the constant dim
    q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
    normalized = 2 * (np.full(8, 0.25) - q01) / (q99 - q01) - 1
    assert np.isfinite(normalized).all()


def test_inconsistent_dims_within_embodiment_rejected():
    acc = NormStatsAccumulator()
    acc.add(make_episode())
    ep = make_episode(episode=1)
    ep.state = ep.state[:, :5]
    with pytest.raises(ValueError, match="state.npy: 5 dims"):
        acc.add(ep)


def test_roundtrip_and_compare(tmp_path):
    acc = NormStatsAccumulator()
    for e in range(4):
        acc.add(make_episode("robot/arm", 0, 0, e))
    stats = acc.finalize()
    write_json_atomic(tmp_path / "norm_stats.json", stats)
    loaded = load_norm_stats(tmp_path)
    assert max(compare_norm_stats(stats, loaded).values()) == 0.0
    shifted = {"robot/arm": {**loaded["robot/arm"], "state": {**loaded["robot/arm"]["state"],
                                                              "mean": [m + 0.5 for m in loaded["robot/arm"]["state"]["mean"]]}}}
    assert compare_norm_stats(loaded, shifted)["robot/arm.state.mean"] == pytest.approx(0.5)
    (tmp_path / "norm_stats.json").write_text('{"robot/arm": {"state": {"mean": [NaN]}}}')
    with pytest.raises(ValueError, match="not finite"):
        load_norm_stats(tmp_path)
