"""Loader state save/restore: the batches after a restore equal an uninterrupted reader's, bit for bit."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from helpers.shard_sets import TinyFastTokenizer, TinyTextTokenizer, grid_episodes, make_cfg, write_shard_set

from megavla.data.loader_state import LoaderStateError
from megavla.data.pipeline import build_loader


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    robot = write_shard_set(root / "robot", grid_episodes(3, 3, 2, steps=10), per_shard=3)
    human = write_shard_set(root / "human", grid_episodes(3, 3, 1, human=True, steps=10), per_shard=2)
    return str(robot), str(human)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name, tensor in x.tensors().items():
            assert torch.equal(tensor, getattr(y, name)), name
        assert x.meta == y.meta


def loader_for(shard_sets, rank, workers, **kw):
    return build_loader(make_cfg(shard_sets, workers, **kw), TinyTextTokenizer(), TinyFastTokenizer(),
                        rank=rank, world_size=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_restore_continues_bit_equal_on_two_ranks(shard_sets, workers):
    """The trainer's acceptance test: 40 batches on 2 ranks, snapshot, rebuild: next 8 bit-equal."""
    for rank in range(2):
        straight = loader_for(shard_sets, rank, workers)
        stream = iter(straight)
        list(itertools.islice(stream, 40))
        snapshot = json.loads(json.dumps(straight.state_dict()))  # survives a JSON file
        expected = list(itertools.islice(stream, 8))

        restored = loader_for(shard_sets, rank, workers)
        restored.load_state_dict(snapshot)
        got = take(restored, 8)
        assert_batches_equal(expected, got)
        assert restored.skip_counts() == straight.skip_counts()


def test_ranks_and_workers_read_different_samples(shard_sets):
    keys = {}
    for rank in range(2):
        batches = take(loader_for(shard_sets, rank, 2), 6)
        keys[rank] = [(k, t) for b in batches for k, t in zip(b.meta["key"], b.meta["timestep"])]
    assert keys[0] != keys[1]
    # Two fresh readers of the same rank agree (determinism).
    again = take(loader_for(shard_sets, 0, 2), 6)
    assert [(k, t) for b in again for k, t in zip(b.meta["key"], b.meta["timestep"])] == keys[0]


def test_restore_at_odd_batch_count_with_workers(shard_sets):
    """Restoring after an odd number of batches starts with worker 1's batch, as the straight run does."""
    straight = loader_for(shard_sets, 0, 2)
    stream = iter(straight)
    list(itertools.islice(stream, 7))
    snapshot = straight.state_dict()
    expected = list(itertools.islice(stream, 5))
    restored = loader_for(shard_sets, 0, 2)
    restored.load_state_dict(snapshot)
    assert_batches_equal(expected, take(restored, 5))


def test_iterating_again_continues_the_stream(shard_sets):
    loader = loader_for(shard_sets, 0, 0)
    first = take(loader, 3)
    second = take(loader, 3)
    reference = take(loader_for(shard_sets, 0, 0), 6)
    assert_batches_equal(first + second, reference)


def test_incompatible_state_is_refused(shard_sets):
    state = loader_for(shard_sets, 0, 0).state_dict()
    with pytest.raises(LoaderStateError, match="num_workers"):
        loader_for(shard_sets, 0, 2).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="batch_size"):
        loader_for(shard_sets, 0, 0, batch_size=8).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="rank"):
        loader_for(shard_sets, 1, 0).load_state_dict(state)
