"""The shard-set helper the reader tests share (tests/helpers/shard_sets.py) writes what the reader reads."""
from __future__ import annotations

import json

import numpy as np
import webdataset as wds

from helpers.shard_sets import grid_episodes, write_shard_set
from megavla.data_shards.format import sample_to_episode


def test_fixture_shard_set_round_trips(tmp_path):
    eps = grid_episodes(2, 2, 1, steps=5)
    d = write_shard_set(tmp_path / "set", eps, per_shard=3)
    manifest = json.loads((d / "manifest.json").read_text())
    assert [s["episodes"] for s in manifest["shards"]] == [3, 1]
    read = [sample_to_episode(s) for s in wds.WebDataset(str(d / "shard-000000.tar"), shardshuffle=False)]
    assert [e.key for e in read] == [e.key for e in eps[:3]]
    np.testing.assert_array_equal(read[1].actions, eps[1].actions)
