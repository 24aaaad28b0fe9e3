"""verify catches truncated tars, flipped bytes, missing members, NaN arrays, bad JPEGs."""
from __future__ import annotations

import hashlib
import io
import json
import shutil

import numpy as np
import pytest
import webdataset as wds

from megavla.data_shards.format import episode_to_sample
from megavla.data_shards.verify import verify_shard_set
from megavla.data_shards.writer import ShardSetWriter
from helpers.toy_episodes import make_episode


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    with ShardSetWriter(root, target_shard_bytes=1) as w:  # one episode per shard
        for e in range(3):
            w.write(make_episode("robot/arm", 0, 1, e))
        w.write(make_episode("human/ego", 0, 1, 0))
    return root


@pytest.fixture
def copy(clean_set, tmp_path):
    dst = tmp_path / "set"
    shutil.copytree(clean_set, dst)
    return dst


def _rewrite_shard(set_dir, index, mutate):
    """Hand-craft a bad shard with TarWriter and make the manifest agree with its bytes/sha, so only
    the content check can catch it."""
    manifest = json.loads((set_dir / "manifest.json").read_text())
    row = manifest["shards"][index]
    ep = make_episode("robot/arm", 0, 1, index)
    sample = episode_to_sample(ep)
    mutate(sample)
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as tar:
        tar.write(sample)
    data = buf.getvalue()
    (set_dir / row["path"]).write_bytes(data)
    row["bytes"], row["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (set_dir / "manifest.json").write_text(json.dumps(manifest))
    return set_dir / row["path"], ep.key


def test_clean_set_passes(clean_set):
    report = verify_shard_set(clean_set)
    assert report.ok, [str(p) for p in report.problems]
    assert report.shards == 4 and report.samples == 4
    assert report.frames_decoded == 3 * 8 * 2 + 8


def test_truncated_tar(copy):
    shard = copy / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    report = verify_shard_set(copy)
    assert report.bad_shards == [str(shard)]
    messages = " | ".join(map(str, report.errors))
    assert "size" in messages and "sha256" in messages
    assert "unreadable tar after member robot-arm_s0000_t0001_e000001." in messages
    assert "truncated or corrupt" in messages


def test_flipped_byte_is_sha_mismatch(copy):
    shard = copy / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify_shard_set(copy)
    assert report.bad_shards == [str(shard)]
    assert any("sha256" in p.message for p in report.errors)
    parallel = verify_shard_set(copy, workers=2)
    assert [str(p) for p in parallel.problems] == [str(p) for p in report.problems]
    assert (parallel.shards, parallel.samples, parallel.frames_decoded) == (
        report.shards, report.samples, report.frames_decoded)


def test_missing_member(copy):
    path, key = _rewrite_shard(copy, 0, lambda s: s.pop("state.npy"))
    report = verify_shard_set(copy)
    (problem,) = report.errors
    assert (problem.shard, problem.key, problem.member) == (str(path), key, "state.npy")
    assert "missing member" in problem.message


def test_missing_jpeg_frame(copy):
    path, key = _rewrite_shard(copy, 0, lambda s: s.pop("left_wrist.0003.jpg"))
    (problem,) = verify_shard_set(copy).errors
    assert (problem.key, problem.member) == (key, "left_wrist.0003.jpg")


def test_nan_array(copy):
    def poison(sample):
        buf = io.BytesIO()
        actions = np.zeros((8, 7), np.float32)
        actions[3, 2] = np.nan
        np.save(buf, actions, allow_pickle=False)
        sample["actions.npy"] = buf.getvalue()

    path, key = _rewrite_shard(copy, 0, poison)
    (problem,) = verify_shard_set(copy).errors
    assert (problem.shard, problem.key, problem.member) == (str(path), key, "actions.npy")
    assert "non-finite" in problem.message


def test_undecodable_jpeg_and_unknown_member(copy):
    def damage(sample):
        sample["head.0002.jpg"] = b"\xff\xd8 not a jpeg"
        sample["notes.txt"] = b"hello"

    path, key = _rewrite_shard(copy, 0, damage)
    problems = {p.member: p for p in verify_shard_set(copy).errors}
    assert set(problems) == {"head.0002.jpg", "notes.txt"}
    assert "does not decode" in problems["head.0002.jpg"].message
    assert verify_shard_set(copy, check_images=False).bad_shards == [str(path)]  # notes.txt still


def test_missing_shard_manifest_and_stale_file(copy):
    (copy / "shard-000003.tar").rename(copy / "shard-000009.tar")
    report = verify_shard_set(copy)
    assert [p.message for p in report.errors] == ["shard file missing"]
    assert [p.severity for p in report.problems if "not listed" in p.message] == ["warning"]
    (copy / "manifest.json").unlink()
    report = verify_shard_set(copy)
    assert not report.ok and "manifest.json: missing" in report.errors[0].message


def test_truncated_at_member_boundary(copy):
    """A cut between members (tarfile ended there quietly, so verify used to see only an incomplete
    sample): the reader's parser finds no end-of-archive blocks, and verify names the damage after
    the last good member, as the loader does."""
    import tarfile

    shard = copy / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        cut = next(m.offset for m in tar.getmembers() if m.name.endswith("left_wrist.0002.jpg"))
    shard.write_bytes(shard.read_bytes()[:cut])
    report = verify_shard_set(copy)
    assert report.bad_shards == [str(shard)]
    messages = [p.message for p in report.errors]
    assert any("size" in m for m in messages)
    assert any(m.startswith("unreadable tar after member robot-arm_s0000_t0001_e000000.left_wrist.0001.jpg: "
                            "TarFormatError: ends without end-of-archive blocks") for m in messages), messages


def _reshard(set_dir, transform):
    """Rewrite shard 0's bytes with ``transform`` and make the manifest agree with them."""
    shard = set_dir / "shard-000000.tar"
    data = transform(shard.read_bytes())
    shard.write_bytes(data)
    manifest = json.loads((set_dir / "manifest.json").read_text())
    manifest["shards"][0]["bytes"], manifest["shards"][0]["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (set_dir / "manifest.json").write_text(json.dumps(manifest))
    return shard


def _loader_walk(shard):
    from megavla.data_shards.tar_reader import group_members, iter_tar_members, map_shard

    return list(group_members(iter_tar_members(map_shard(str(shard)), str(shard)), str(shard)))


def test_no_end_of_archive_blocks_is_what_the_loader_refuses(copy):
    """Every member whole but no end-of-archive blocks: the loader's parser raises at the end (and
    drops the last episode); verify runs that parser, so it reports the shard (it passed it while
    it walked the tar with tarfile)."""
    from megavla.data_shards.tar_reader import TarFormatError

    shard = _reshard(copy, lambda data: data.rstrip(b"\0") + bytes(-len(data.rstrip(b"\0")) % 512))
    with pytest.raises(TarFormatError, match="without end-of-archive blocks"):
        _loader_walk(shard)
    report = verify_shard_set(copy)
    assert report.bad_shards == [str(shard)]
    (problem,) = report.errors
    assert "TarFormatError: ends without end-of-archive blocks" in problem.message


def test_member_names_are_grouped_as_the_loader_groups_them(copy):
    """Suffixes are case-sensitive in the loader ('KEY.META.JSON' is not its meta.json), so verify
    must not fold case (it lowercased them, and passed a shard whose episode the loader skips)."""
    path, key = _rewrite_shard(copy, 0, lambda s: s.update({"META.JSON": s.pop("meta.json")}))
    (group,) = _loader_walk(path)
    assert "META.JSON" in group and "meta.json" not in group
    report = verify_shard_set(copy)
    assert {(p.key, p.member) for p in report.errors} >= {(key, "META.JSON"), (key, "meta.json")}
    assert any("missing member 'meta.json'" in p.message for p in report.errors)
