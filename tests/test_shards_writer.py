"""ShardSetWriter: roll-over by size, manifest rows and totals, atomic finish, determinism."""
from __future__ import annotations

import json
import tarfile

import pytest

from megavla.data_shards.format import sample_to_episode
from megavla.data_shards.manifest import (find_shard_sets, load_manifest, ManifestError,
                                          shard_paths)
from megavla.data_shards.verify import iter_tar_samples
from megavla.data_shards.writer import ShardSetWriter, tar_sample_bytes
from megavla.data_shards.format import episode_to_sample
from helpers.toy_episodes import make_episode


def _episodes():
    eps = []
    for scene in range(2):
        for task in range(3):
            for e in range(2):
                eps.append(make_episode("robot/arm", scene, task, e))
    return eps


def test_rollover_and_manifest_counts(tmp_path):
    eps = _episodes()
    per_episode = tar_sample_bytes(episode_to_sample(eps[0]))
    target = int(per_episode * 3.5)  # 3 episodes fit, the 4th rolls over
    with ShardSetWriter(tmp_path, target_shard_bytes=target, generator={"seed": 7}) as w:
        for ep in eps:
            w.write(ep)
    m = load_manifest(tmp_path)
    assert [row["episodes"] for row in m["shards"]] == [3, 3, 3, 3]
    assert m["generator"] == {"seed": 7}
    for row, path in zip(m["shards"], shard_paths(tmp_path)):
        assert tmp_path.joinpath(row["path"]).stat().st_size == row["bytes"] <= target
        samples = list(iter_tar_samples(tmp_path / row["path"], []))
        parsed = [sample_to_episode(s) for s in samples]
        assert len(parsed) == row["samples"] == row["episodes"]
        assert sum(p.num_steps for p in parsed) == row["steps"]
        assert row["combos"] == sorted({p.combo for p in parsed}, key=lambda c: tuple(map(int, c.split(":"))))
        assert row["first_key"] == parsed[0].key and row["last_key"] == parsed[-1].key
    t = m["totals"]
    assert t["episodes"] == 12 and t["shards"] == 4 and t["steps"] == 12 * 8
    assert t["embodiments"] == {"robot/arm": 12}
    assert t["combos"]["robot/arm"] == [f"{s}:{k}" for s in range(2) for k in range(3)]
    assert t["bytes"] == sum(r["bytes"] for r in m["shards"])
    # an episode larger than the target gets a shard of its own instead of failing
    with ShardSetWriter(tmp_path / "big", target_shard_bytes=1000) as w:
        for ep in eps[:2]:
            w.write(ep)
    assert [r["episodes"] for r in load_manifest(tmp_path / "big")["shards"]] == [1, 1]


def test_mixed_embodiments_and_valid_steps(tmp_path):
    with ShardSetWriter(tmp_path) as w:
        w.write(make_episode("robot/arm", 0, 0, 0))
        w.write(make_episode("human/ego", 1, 2, 0))
    t = load_manifest(tmp_path)["totals"]
    assert t["embodiments"] == {"human/ego": 1, "robot/arm": 1}
    assert t["combos"] == {"human/ego": ["1:2"], "robot/arm": ["0:0"]}
    assert t["valid_steps"] == 15 and t["steps"] == 16


def test_same_episodes_give_identical_bytes(tmp_path):
    for name in ("a", "b"):
        with ShardSetWriter(tmp_path / name) as w:
            for ep in _episodes()[:4]:
                w.write(ep)
    sha = [[r["sha256"] for r in load_manifest(tmp_path / n)["shards"]] for n in ("a", "b")]
    assert sha[0] == sha[1]


def test_abort_midway_leaves_no_manifest_and_no_shards(tmp_path):
    eps = _episodes()
    with pytest.raises(RuntimeError, match="generator died"):
        with ShardSetWriter(tmp_path, target_shard_bytes=tar_sample_bytes(episode_to_sample(eps[0])) * 2) as w:
            for i, ep in enumerate(eps):
                if i == 5:
                    raise RuntimeError("generator died")
                w.write(ep)
    assert not (tmp_path / "manifest.json").exists()
    assert list(tmp_path.iterdir()) == []  # closed and open partial shards removed
    with pytest.raises(ManifestError, match="missing"):
        load_manifest(tmp_path)


def test_killed_writer_is_seen_as_incomplete(tmp_path):
    """A process that dies without cleanup leaves only *.partial files: never a manifest."""
    w = ShardSetWriter(tmp_path / "set", target_shard_bytes=1)
    for ep in _episodes()[:3]:
        w.write(ep)  # no finish(): simulate SIGKILL
    names = sorted(p.name for p in (tmp_path / "set").iterdir())
    assert names and all(n.endswith(".partial") for n in names)
    complete, incomplete = find_shard_sets(tmp_path)
    assert complete == [] and incomplete == [tmp_path / "set"]
    with pytest.raises(ManifestError, match="write died midway"):
        load_manifest(tmp_path / "set")
    # a new writer cleans the leftovers and produces a complete set
    with ShardSetWriter(tmp_path / "set") as w2:
        w2.write(make_episode())
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
        "episode_keys.json", "manifest.json", "norm_stats.json", "shard-000000.tar"]


def test_existing_set_needs_overwrite_and_stale_shards_go(tmp_path):
    with ShardSetWriter(tmp_path, target_shard_bytes=1) as w:
        for ep in _episodes()[:3]:
            w.write(ep)
    with pytest.raises(FileExistsError, match="overwrite"):
        ShardSetWriter(tmp_path)
    with ShardSetWriter(tmp_path, overwrite=True) as w:
        w.write(make_episode())
    assert sorted(p.name for p in tmp_path.glob("shard-*.tar")) == ["shard-000000.tar"]
    assert load_manifest(tmp_path)["totals"]["episodes"] == 1


def test_duplicate_key_rejected(tmp_path):
    with pytest.raises(ValueError, match="duplicate episode key"):
        with ShardSetWriter(tmp_path) as w:
            w.write(make_episode())
            w.write(make_episode())
    assert not (tmp_path / "manifest.json").exists()


def test_shards_are_plain_ustar_readable_by_tarfile(tmp_path):
    with ShardSetWriter(tmp_path) as w:
        w.write(make_episode("human/ego"))
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert "human-ego_s0000_t0000_e000000.meta.json" in names
    assert json.loads((tmp_path / "norm_stats.json").read_text())["human/ego"]["num_steps"] == 7
