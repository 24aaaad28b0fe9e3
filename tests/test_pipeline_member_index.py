"""Episodes built from a remembered member walk (member_index.py: frames as lazy per-camera sequences)
equal those of the tar walk, and damaged ones fail with the same message."""
from __future__ import annotations

import numpy as np
import pytest
from helpers.shard_sets import make_episode, write_shard_set

from megavla.data.member_index import FrameRefs, episode_templates
from megavla.data.shard_reader import read_members
from megavla.data_shards.tar_reader import READ, REF, group_members, iter_tar_members, map_shard
from megavla.data_shards.format import EpisodeFormatError, episode_to_sample, sample_to_episode


def parse(group, where):
    try:
        return sample_to_episode(group, where=where)
    except EpisodeFormatError as e:
        return str(e)


def test_templates_give_the_walks_episodes_and_errors(tmp_path):
    eps = [make_episode(0, t, 0, steps=6) for t in range(5)]
    raw = [episode_to_sample(e) for e in eps]
    del raw[1]["left_wrist.0002.jpg"]              # a gap: that camera is read member by member
    for t in (4, 5):
        del raw[2]["head.%04d.jpg" % t]            # frames end early: "missing member head.0004.jpg"
    raw[3]["right_wrist.0006.jpg"] = raw[3]["right_wrist.0005.jpg"]   # one frame more than steps
    raw[4]["head.00001.jpg"] = raw[4]["head.0001.jpg"]                # not the writer's name: kept as is
    path = str(write_shard_set(tmp_path / "s", eps, per_shard=5, samples=raw) / "shard-000000.tar")
    mode = lambda key, suffix: REF if suffix.endswith(".jpg") else READ  # noqa: E731
    index: list = []
    walked = list(group_members(iter_tar_members(map_shard(path), path, mode, index), path))
    buf = map_shard(path)
    remembered = [t.sample(buf, path) for t in episode_templates(index)]
    assert [g["__key__"] for g in walked] == [g["__key__"] for g in remembered]
    assert all("__frames__" in g for g in remembered)
    assert "left_wrist" not in remembered[1]["__frames__"] and "left_wrist.0003.jpg" in remembered[1]
    for a, b in zip(walked, remembered):
        ea, eb = parse(a, path), parse(b, path)
        if isinstance(ea, str):
            assert ea == eb
            continue
        for name in ("state", "actions", "action_mask", "step_valid"):
            assert np.array_equal(getattr(ea, name), getattr(eb, name))
        assert sorted(ea.frames) == sorted(eb.frames)
        for cam in ea.frames:
            assert len(ea.frames[cam]) == len(eb.frames[cam]) == ea.num_steps
            assert [f.read() for f in ea.frames[cam]] == [eb.frames[cam][t].read() for t in range(eb.num_steps)]
    assert "missing member 'head.0004.jpg' (2 frames of camera head missing)" in parse(remembered[2], path)
    assert isinstance(parse(remembered[0], path).frames["head"], FrameRefs)
    # what a cursor yields on later epochs: the key only, members read when the episode is parsed
    for t, full in zip(episode_templates(index), remembered):
        header = t.header(buf, path)
        assert header["__key__"] == full["__key__"] and "__frames__" not in header
        group = read_members(header)
        assert "__unread__" not in group and sorted(group) == sorted(full)
        assert all(group[k] == full[k] for k in full if isinstance(full[k], (bytes, str, bool)))


def test_member_ref_view_is_the_read_bytes_in_place():
    refs = FrameRefs(b"abcdefgh", (0, 2, 5), (2, 3, 3))
    view = refs[1].view()
    assert isinstance(view, memoryview) and bytes(view) == refs[1].read() == b"cde"


def test_frame_refs_index_and_slice():
    refs = FrameRefs(b"abcdefgh", (0, 2, 5), (2, 3, 3))
    assert len(refs) == 3 and refs[1].read() == b"cde" and refs[-1].read() == b"fgh"
    assert [r.read() for r in refs[:2]] == [b"ab", b"cde"]
    with pytest.raises(IndexError):
        refs[3]


def test_remembered_episodes_read_the_same_batches_and_counts(tmp_path, monkeypatch):
    """Several epochs of a small set with one damaged episode: the remembered walks and parsed
    episodes give the batches and counters of reading every shard from scratch."""
    import itertools

    import torch

    from megavla.config.data import DataConfig
    from megavla.data import shard_reader
    from megavla.data.pipeline import build_loader

    eps = [make_episode(s, t, 0, steps=8) for s in range(2) for t in range(2)]
    raw = [episode_to_sample(e) for e in eps]
    raw[2]["actions.npy"] = b"not an array"     # skipped and counted in every epoch
    directory = write_shard_set(tmp_path / "s", eps, per_shard=2, samples=raw)
    cfg = DataConfig(sources={"robot": str(directory)}, image_size=16, batch_size=4, num_workers=0, chunk_length=3,
                     max_action_dim=6, max_state_dim=5, shuffle_buffer=4, samples_per_episode=2, seed=1,
                     normalization="none")

    parsed = []
    real_parse = shard_reader.sample_to_episode
    monkeypatch.setattr(shard_reader, "sample_to_episode", lambda *a, **k: parsed.append(1) or real_parse(*a, **k))

    def read():
        parsed.clear()
        loader = build_loader(cfg)
        batches = [(b.images.clone(), b.actions.clone(), b.meta["key"], b.meta["timestep"])
                   for b in itertools.islice(loader, 20)]
        return batches, loader.skip_counts(), loader.read_counts(), len(parsed)

    remembered = read()
    monkeypatch.setattr(shard_reader, "PARSED_EPISODE_LIMIT", 0)
    monkeypatch.setattr(shard_reader, "MEMBER_INDEX_LIMIT", 0)
    scratch = read()
    assert remembered[3] < scratch[3] / 2   # parsed again only until remembered
    assert remembered[1] == scratch[1] and remembered[2] == scratch[2]
    assert remembered[1]["bad_sample"] >= 3
    for (ia, aa, ka, ta), (ib, ab, kb, tb) in zip(remembered[0], scratch[0]):
        assert ka == kb and ta == tb and torch.equal(ia, ib) and torch.equal(aa, ab)
