"""Mixture weights (measured over 10k samples) and nested scene x task diversity subsets."""
from __future__ import annotations

import itertools
from collections import Counter

import pytest
from helpers.shard_sets import TinyTextTokenizer, grid_episodes, write_shard_set

from megavla.config.core import ConfigError
from megavla.config.data import DataConfig
from megavla.data.mixture import WeightedRoundRobin, combo_of_key, select_combos
from megavla.data.pipeline import WorkerStream, build_loader
from megavla.data_shards.tar_reader import READ, REF, SKIP


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    # 4 scenes x 3 tasks; shards mix combos so the diversity filter must work per episode.
    robot = write_shard_set(root / "robot", grid_episodes(4, 3, 2, steps=8, image_size=8,
                                                          cameras=("head",)), per_shard=5)
    human = write_shard_set(root / "human", grid_episodes(4, 3, 1, human=True, steps=8, image_size=8),
                            per_shard=5)
    return {"robot": str(robot), "human": str(human)}


def cfg_for(sets, **kw) -> DataConfig:
    base = dict(sources=sets, image_size=8, cameras=["head"], batch_size=50, num_workers=0, chunk_length=3,
                max_action_dim=6, max_state_dim=5, shuffle_buffer=32, samples_per_episode=4)
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.parametrize("robot_weight", [0.7])
def test_mixture_ratio_over_10k_samples(sets, robot_weight):
    cfg = cfg_for(sets, mixture={"robot": robot_weight, "human": 1 - robot_weight})
    loader = build_loader(cfg, TinyTextTokenizer(), None)
    counts = Counter(s for b in itertools.islice(loader, 200) for s in b.meta["source"])
    total = sum(counts.values())
    assert total == 10_000
    assert abs(counts["robot"] / total - robot_weight) <= 0.02, counts
    # Embodiment ids agree with the source (robot/arm = 0, human/ego = 1).


def test_zero_weight_source_is_never_read(sets):
    loader = build_loader(cfg_for(sets, mixture={"robot": 1.0, "human": 0.0}, batch_size=16))
    sources = {s for b in itertools.islice(loader, 10) for s in b.meta["source"]}
    assert sources == {"robot"}


def test_round_robin_share_is_close_at_every_prefix():
    rr = WeightedRoundRobin({"a": 3.0, "b": 1.0, "c": 0.0})
    picks = [rr.next() for _ in range(400)]
    assert "c" not in picks
    for n in (4, 10, 37, 400):
        assert abs(picks[:n].count("a") / n - 0.75) <= 1.0 / n + 1e-9
    resumed = WeightedRoundRobin({"a": 3.0, "b": 1.0}, credits=WeightedRoundRobin({"a": 3, "b": 1}).state_dict())
    assert resumed.next() == "a"


def test_diversity_subsets_are_nested_and_seeded():
    universe = [f"{s}:{t}" for s in range(8) for t in range(6)]
    quarter, half, full = (select_combos(universe, f, seed=3) for f in (0.25, 0.5, 1.0))
    assert len(quarter) == 12 and len(half) == 24 and full == set(universe)
    assert quarter < half < full
    assert select_combos(universe, 0.25, seed=4) != quarter  # the seed picks another subset
    assert select_combos(universe, 0.5, seed=3, exclude=["0:0"]) <= set(universe) - {"0:0"}
    assert select_combos(universe, 1.0, include=["1:2", "3:4", "9:9"]) == {"1:2", "3:4"}
    assert combo_of_key("robot-arm_s0003_t0011_e000007") == "3:11"
    assert combo_of_key("some_foreign_key") is None


def test_loader_keeps_only_subset_combos_and_counts_skips(sets):
    universe = {f"{s}:{t}" for s in range(4) for t in range(3)}
    cfg = cfg_for(sets, diversity_fraction=0.5, diversity_seed=1, batch_size=20)
    kept = select_combos(universe, 0.5, seed=1)
    loader = build_loader(cfg)
    batches = list(itertools.islice(loader, 15))
    seen = {f"{s}:{t}" for b in batches for s, t in zip(b.meta["scene"], b.meta["task"])}
    assert seen <= kept and len(seen) >= 4
    # Both embodiments see kept combos only (the subset is shared across sources).
    assert {s for b in batches for s in b.meta["source"]} == {"robot", "human"}
    assert loader.skip_counts()["excluded_episode"] > 0
    assert loader.skip_counts()["bad_sample"] == 0

    quarter = build_loader(cfg_for(sets, diversity_fraction=0.25, diversity_seed=1, batch_size=20))
    seen_q = {f"{s}:{t}" for b in itertools.islice(quarter, 10) for s, t in zip(b.meta["scene"], b.meta["task"])}
    assert seen_q <= select_combos(universe, 0.25, seed=1) <= kept


def test_excluded_episodes_skip_their_frames(sets):
    loader = build_loader(cfg_for(sets, include_combos=["0:0"]))
    cursor = WorkerStream(loader.plan, 0).cursors["robot"]
    # Kept episode: frames located (read later, only the sampled timestep), arrays read now.
    assert cursor.member_mode("robot-arm_s0000_t0000_e000000", "head.0003.jpg") == REF
    assert cursor.member_mode("robot-arm_s0000_t0000_e000000", "state.npy") == READ
    # Excluded combo: only meta.json is read.
    assert cursor.member_mode("robot-arm_s0001_t0000_e000000", "head.0003.jpg") == SKIP
    assert cursor.member_mode("robot-arm_s0001_t0000_e000000", "actions.npy") == SKIP
    assert cursor.member_mode("robot-arm_s0001_t0000_e000000", "meta.json") == READ


def test_fraction_that_keeps_nothing_fails_clearly(sets):
    with pytest.raises(ConfigError, match="no shard holds a kept combo"):
        build_loader(cfg_for(sets, include_combos=["99:99"]))


def test_val_split_reads_val_sources_with_all_combos(sets):
    cfg = cfg_for({"robot": sets["robot"]}, val_sources={"heldout": sets["human"]}, diversity_fraction=0.25,
                  batch_size=20)
    loader = build_loader(cfg, split="val")
    batches = list(itertools.islice(loader, 6))
    assert {s for b in batches for s in b.meta["source"]} == {"heldout"}
    combos = {f"{s}:{t}" for b in batches for s, t in zip(b.meta["scene"], b.meta["task"])}
    assert len(combos) > 3  # the 0.25 training subset (3 of 12 combos) does not apply to validation
    with pytest.raises(ConfigError, match="val_sources"):
        build_loader(cfg_for(sets), split="val")
