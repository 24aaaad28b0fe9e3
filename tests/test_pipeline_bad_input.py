"""Bad input: each case is counted and logged with shard and key, and skipped (or raises in fail mode)."""
from __future__ import annotations

import io
import itertools
import logging
import tarfile

import numpy as np
import pytest
from helpers.shard_sets import TinyTextTokenizer, grid_episodes, make_episode, write_shard_set

from megavla.config.data import DataConfig
from megavla.data.pipeline import DataError, build_loader
from megavla.data_shards.tar_reader import READ, REF, SKIP, TarFormatError, iter_tar_members, map_shard
from megavla.data_shards.format import episode_to_sample


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def bad_samples() -> tuple[list, list[dict], dict[str, str]]:
    """Episodes 0..7 of scene 0 plus raw samples; returns (episodes, samples, {key: defect})."""
    eps = grid_episodes(1, 8, 1, steps=6)
    samples = [episode_to_sample(e) for e in eps]
    defects = {}
    del samples[1]["state.npy"]
    defects[eps[1].key] = "missing member"
    samples[2]["actions.npy"] = npy(np.where(np.arange(30).reshape(6, 5) == 7, np.nan, 1.0).astype(np.float32))
    defects[eps[2].key] = "NaN"
    samples[3]["state.npy"] = npy(np.ones((6, 3), np.float32))  # norm stats say 4 dims
    defects[eps[3].key] = "wrong shape"
    samples[4]["actions.npy"] = npy(np.full((6, 5), np.inf, np.float32))
    defects[eps[4].key] = "inf"
    for t in range(6):
        samples[5][f"head.{t:04d}.jpg"] = b"\xff\xd8 not a jpeg"
    defects[eps[5].key] = "corrupt JPEG"
    return eps, samples, defects


@pytest.fixture()
def bad_set(tmp_path):
    eps, samples, defects = bad_samples()
    directory = write_shard_set(tmp_path / "bad", eps, per_shard=4, samples=samples)
    return directory, defects


def cfg(directory, **kw) -> DataConfig:
    base = dict(sources={"robot": str(directory)}, image_size=16, batch_size=4, num_workers=0, chunk_length=3,
                max_action_dim=6, max_state_dim=5, shuffle_buffer=4, samples_per_episode=2)
    base.update(kw)
    return DataConfig(**base)


def read_keys(loader, n):
    return {k for b in itertools.islice(loader, n) for k in b.meta["key"]}


def test_bad_samples_are_counted_logged_and_skipped(bad_set, caplog):
    directory, defects = bad_set
    loader = build_loader(cfg(directory), TinyTextTokenizer())
    with caplog.at_level(logging.WARNING):
        keys = read_keys(loader, 12)  # 48 samples = 24 episodes: every episode seen at least twice
    assert keys and not keys & set(defects)
    counts = loader.skip_counts()
    assert counts["bad_sample"] >= 4 and counts["bad_image"] >= 1 and counts["bad_shard"] == 0
    for key in defects:
        line = next(r.getMessage() for r in caplog.records if key in r.getMessage())
        assert "shard-00000" in line  # shard path and key in the log line
    messages = caplog.text
    assert "missing member 'state.npy'" in messages and "non-finite" in messages
    assert "wrong shape" in messages and "cannot be decoded" in messages


def test_fail_mode_raises_naming_the_sample(bad_set):
    directory, defects = bad_set
    loader = build_loader(cfg(directory, on_bad_sample="fail"), TinyTextTokenizer())
    with pytest.raises(DataError, match=r"shard-00000\d\.tar.*robot-arm_s0000_t000[1-5]"):
        read_keys(loader, 12)


@pytest.mark.parametrize("damage", ["truncate", "corrupt_header", "missing_file"])
def test_broken_shard_is_counted_and_the_rest_is_read(tmp_path, damage, caplog):
    directory = write_shard_set(tmp_path / "set", grid_episodes(2, 3, 1, steps=6), per_shard=3)
    broken = directory / "shard-000001.tar"
    data = broken.read_bytes()
    if damage == "truncate":
        broken.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt_header":
        with tarfile.open(broken) as tf:
            at = tf.getmembers()[5].offset  # a header block in the middle of the first sample
        broken.write_bytes(data[:at] + b"\x17" * 512 + data[at + 512 :])
    else:
        broken.unlink()
    loader = build_loader(cfg(directory, num_workers=0), TinyTextTokenizer())
    with caplog.at_level(logging.WARNING):
        keys = read_keys(loader, 10)
    assert loader.skip_counts()["bad_shard"] >= 1
    assert "shard-000001.tar" in caplog.text
    good = {e.key for e in grid_episodes(2, 3, 1, steps=6)[:3]}
    assert good <= keys  # the intact shard is read in full


def test_broken_shard_fails_in_fail_mode(tmp_path):
    directory = write_shard_set(tmp_path / "set", grid_episodes(1, 2, 1, steps=6), per_shard=1)
    (directory / "shard-000000.tar").write_bytes((directory / "shard-000000.tar").read_bytes()[:3000])
    with pytest.raises(DataError, match="shard-000000.tar"):
        read_keys(build_loader(cfg(directory, on_bad_sample="fail")), 4)


def test_tar_reader_matches_tarfile_and_detects_damage(tmp_path):
    directory = write_shard_set(tmp_path / "set", [make_episode(0, 0, 0, steps=4)], per_shard=1)
    path = directory / "shard-000000.tar"
    with tarfile.open(path) as tf:
        expected = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isreg()]
    data = path.read_bytes()
    got = [(f"{key}.{suffix}", member) for key, suffix, member in iter_tar_members(data, str(path))]
    assert got == expected
    modes = {"npy": READ, "jpg": REF}
    located = list(iter_tar_members(map_shard(str(path)), str(path),
                                    mode=lambda key, suffix: modes.get(suffix.rsplit(".", 1)[1], SKIP)))
    wanted = [e for e in expected if e[0].endswith((".npy", ".jpg"))]
    assert [f"{k}.{s}" for k, s, _ in located] == [n for n, _ in wanted]
    for (_, suffix, member), (_, want) in zip(located, wanted):
        assert (member.read() if suffix.endswith(".jpg") else member) == want
    # Cut inside a header, cut inside member data, one flipped bit in a header field.
    for damaged in (data[:1000], data[: len(data) // 2], data[:100] + bytes([data[100] ^ 1]) + data[101:]):
        with pytest.raises(TarFormatError):
            list(iter_tar_members(damaged, "d.tar"))


def test_fail_mode_raises_through_dataloader_workers(bad_set):
    directory, _ = bad_set
    loader = build_loader(cfg(directory, on_bad_sample="fail", num_workers=2), TinyTextTokenizer())
    with pytest.raises(DataError, match=r"robot-arm_s0000_t000[1-5]"):
        read_keys(loader, 12)
