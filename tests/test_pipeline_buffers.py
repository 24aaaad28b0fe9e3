"""Reused image buffers (megavla/data/buffers.py): a batch the consumer still holds is never
overwritten, every batch reads as an uninterrupted reader's, and dropped batches' buffers are reused."""
from __future__ import annotations

import gc
import itertools

import pytest
import torch
from helpers.shard_sets import grid_episodes, write_shard_set

from megavla.config.data import DataConfig
from megavla.data import pipeline
from megavla.data.pipeline import build_loader


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return str(write_shard_set(tmp_path_factory.mktemp("buffers") / "robot", grid_episodes(2, 2, 2, steps=10),
                               per_shard=2))


def make_cfg(shard_set, num_workers: int) -> DataConfig:
    return DataConfig(sources={"robot": shard_set}, image_size=16, batch_size=4, num_workers=num_workers,
                      chunk_length=4, max_action_dim=8, max_state_dim=6, shuffle_buffer=8, samples_per_episode=2,
                      seed=3, normalization="none")


def _fields(batch) -> dict:
    return {**{k: v.clone() for k, v in batch.tensors().items()}, "meta": batch.meta}


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        if k == "meta":
            assert got[k] == v, f"{what}: meta"
        else:
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{what}: {k}"


@pytest.mark.parametrize("num_workers", [0, 1])
def test_held_batches_are_never_overwritten(shard_set, num_workers):
    """Every field (images in the reused buffer; a worker's other fields in the buffer's arena) of a
    batch the consumer holds stays as read while later batches reuse the buffers."""
    reference = [_fields(b) for b in itertools.islice(iter(build_loader(make_cfg(shard_set, 0))), 10)]
    held, seen = {}, []
    for i, batch in enumerate(itertools.islice(iter(build_loader(make_cfg(shard_set, num_workers))), 10)):
        seen.append(_fields(batch))
        if i in (1, 4):
            held[i] = batch          # kept while later batches are produced
        del batch
        gc.collect()
    for i, fields in enumerate(seen):
        _assert_same(fields, reference[i], f"batch {i} differs from the uninterrupted reader's")
    for i, batch in held.items():
        _assert_same(_fields(batch), reference[i], f"held batch {i} was overwritten")


def test_worker_fields_travel_in_the_buffer_arena(shard_set, monkeypatch):
    """A worker's batch fields are written into the arena after its images and named by offset in the
    message (no pickled arrays); with no room in the arena every field goes by value: same batches."""
    from megavla.data import collate
    messages = []

    class Recording(pipeline.BufferMaps):
        def batch(self, item, worker, buffer_index):
            messages.append({k: isinstance(v, tuple) for k, v in item["fields"].items()})
            return super().batch(item, worker, buffer_index)

    reference = [_fields(b) for b in itertools.islice(iter(build_loader(make_cfg(shard_set, 0))), 6)]
    monkeypatch.setattr(pipeline, "BufferMaps", Recording)
    for room in ("all", "none"):
        if room == "none":   # an arena with no room: every field goes by value
            monkeypatch.setattr(collate.BatchFields, "arena_bytes", classmethod(lambda cls, *a: 0))
        messages.clear()
        for i, batch in enumerate(itertools.islice(iter(build_loader(make_cfg(shard_set, 1))), 6)):
            _assert_same(_fields(batch), reference[i], f"batch {i} (arena room: {room})")
            del batch
        assert len(messages) == 6
        assert all(all(m.values()) == (room == "all") and any(m.values()) == (room == "all") for m in messages)


def test_dropped_batches_buffers_are_reused(shard_set):
    loader = build_loader(make_cfg(shard_set, 0))
    stream = iter(loader)   # kept alive: its dataset holds the ring
    for _ in itertools.islice(stream, 12):
        pass
    rings = [o.stream.ring for o in gc.get_objects()
             if isinstance(o, pipeline.MixtureStream) and o.stream is not None and o.plan is loader.plan]
    assert rings and len(rings[0].buffers) <= 2   # 12 batches, at most 2 image buffers ever allocated


def test_remembered_member_index_reads_the_same_batches(shard_set, monkeypatch):
    """Later epochs read shards through the member index of the first walk: same batches as walking
    the tar headers every time (several epochs of this 8-episode set)."""
    from megavla.data import shard_reader

    def batches():
        return [(b.images.clone(), b.actions.clone(), b.meta["key"])
                for b in itertools.islice(iter(build_loader(make_cfg(shard_set, 0))), 24)]

    cached = batches()
    monkeypatch.setattr(shard_reader, "MEMBER_INDEX_LIMIT", 0)
    walked = batches()
    for (ia, aa, ka), (ib, ab, kb) in zip(cached, walked):
        assert ka == kb and torch.equal(ia, ib) and torch.equal(aa, ab)


def test_worker_sends_each_image_buffer_once(shard_set, monkeypatch):
    """A worker hands each shared image buffer to the main process once (a file-descriptor hand-over
    per batch cost ~180 us of worker CPU); later batches name the buffer's index and read the same."""
    received = []

    class Recording(pipeline.BufferMaps):
        def batch(self, item, worker, buffer_index):
            received.append(item["buffer"] is not None)
            return super().batch(item, worker, buffer_index)

    reference = [b.images.clone() for b in itertools.islice(iter(build_loader(make_cfg(shard_set, 0))), 12)]
    monkeypatch.setattr(pipeline, "BufferMaps", Recording)
    for i, batch in enumerate(itertools.islice(iter(build_loader(make_cfg(shard_set, 1))), 12)):
        assert torch.equal(batch.images, reference[i]), f"batch {i} differs from the main process's"
        del batch
        gc.collect()
    assert len(received) == 12 and 1 <= sum(received) <= 5, received   # 12 batches in a few buffers


@pytest.mark.parametrize("num_workers", [0, 1])
def test_frames_are_decoded_off_the_32_byte_alignment(shard_set, num_workers):
    """libjpeg-turbo's AVX2 colour conversion takes a non-temporal-store path for 32-byte-aligned rows
    (measured 10 % slower a frame; buffers.DECODE_OFFSET): every frame slot, in the main process and
    as a worker's buffer arrives in the main process, starts off that alignment."""
    from megavla.data.buffers import DECODE_OFFSET, off_alignment_buffer
    assert DECODE_OFFSET % 32
    for shared in (False, True):
        buf = off_alignment_buffer((2, 3, 16, 16, 3), shared=shared)
        assert buf.is_contiguous() and buf.shape == (2, 3, 16, 16, 3) and buf.is_shared() == shared
        assert buf.data_ptr() % 32 == DECODE_OFFSET % 32
    for batch in itertools.islice(iter(build_loader(make_cfg(shard_set, num_workers))), 3):
        frames = batch.images.permute(0, 1, 3, 4, 2)   # back to the [B, C, R, R, 3] buffer layout
        assert frames.is_contiguous()
        for b in range(frames.shape[0]):
            for c in range(frames.shape[1]):
                assert frames[b, c].data_ptr() % 32 == DECODE_OFFSET % 32
