"""What one sample holds: chunk padding masks, step_valid, cameras, normalization, tokens."""
from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
import torch
from helpers.shard_sets import (CAMERA_LEVEL, TinyFastTokenizer, TinyTextTokenizer, make_episode,
                                    norm_stats_of, write_shard_set)

from megavla.config.data import DataConfig
from megavla.data.normalize import Normalizer, merge_norm_stats
from megavla.data.pipeline import build_loader

STEPS, H = 6, 4


@pytest.fixture(scope="module")
def episodes():
    robot = [make_episode(0, t, 0, steps=STEPS) for t in range(3)]
    robot[1].step_valid[3] = False  # a dropout step inside the episode
    human = [make_episode(1, t, 0, human=True, steps=STEPS) for t in range(3)]
    return robot, human


@pytest.fixture(scope="module")
def sets(tmp_path_factory, episodes):
    root = tmp_path_factory.mktemp("samples")
    robot, human = episodes
    return {"robot": str(write_shard_set(root / "robot", robot, per_shard=2)),
            "human": str(write_shard_set(root / "human", human, per_shard=2))}


def read(sets, n_batches=12, **kw):
    base = dict(sources=sets, image_size=16, batch_size=6, num_workers=0, chunk_length=H, max_action_dim=7,
                max_state_dim=6, shuffle_buffer=6, samples_per_episode=3)
    base.update(kw)
    loader = build_loader(DataConfig(**base), TinyTextTokenizer(), TinyFastTokenizer())
    return loader, list(itertools.islice(loader, n_batches))


def samples_of(batches):
    for b in batches:
        for i in range(b.batch_size):
            yield b, i


def test_chunk_padding_and_step_valid_masks(sets, episodes):
    by_key = {e.key: e for e in episodes[0] + episodes[1]}
    _, batches = read(sets, normalization="none")
    seen_end = seen_dropout = False
    for b, i in samples_of(batches):
        ep, t = by_key[b.meta["key"][i]], b.meta["timestep"][i]
        assert ep.step_valid[t], "timesteps are drawn among valid steps"
        idx = np.arange(t, t + H)
        expect = (idx < STEPS) & ep.step_valid[np.minimum(idx, STEPS - 1)]
        assert b.action_time_mask[i].tolist() == expect.tolist()
        A = ep.actions.shape[1]
        for h in range(H):
            want = ep.actions[t + h] if expect[h] else np.zeros(A, np.float32)
            np.testing.assert_array_equal(b.actions[i, h, :A].numpy(), want)
        assert not b.actions[i, :, A:].any() and b.action_dim_mask[i].tolist() == ep.action_mask.tolist() + [False] * (7 - A)
        np.testing.assert_array_equal(b.state[i, :4].numpy(), ep.state[t])
        assert b.state_mask[i].tolist() == [True] * 4 + [False] * 2
        seen_end |= not expect[-1] and t + H > STEPS
        seen_dropout |= t < 3 < t + H and not ep.step_valid[3]
    assert seen_end and seen_dropout


def test_camera_masks_frames_and_resize(sets):
    _, batches = read(sets, n_batches=4)
    for b, i in samples_of(batches):
        t = b.meta["timestep"][i]
        human = b.embodiment[i].item() == 1
        assert b.image_mask[i].tolist() == ([True, False, False] if human else [True, True, True])
        for c, cam in enumerate(["head", "left_wrist", "right_wrist"]):
            img = b.images[i, c].float()
            if b.image_mask[i, c]:
                assert abs(img.mean().item() - (CAMERA_LEVEL[cam] + t)) < 2.0  # frame t was decoded
            else:
                assert not img.any()
    _, small = read(sets, n_batches=1, cameras=["right_wrist", "head"], image_size=8)
    assert small[0].images.shape == (6, 2, 3, 8, 8)
    for b, i in samples_of(small):  # config order: right_wrist first
        assert b.image_mask[i].tolist() == ([False, True] if b.embodiment[i] == 1 else [True, True])


def test_tokens_follow_instruction_subtask_and_valid_dims(sets, episodes):
    tok = TinyTextTokenizer()
    by_key = {e.key: e for e in episodes[0] + episodes[1]}
    _, batches = read(sets, n_batches=4)
    for b, i in samples_of(batches):
        ep, t = by_key[b.meta["key"][i]], b.meta["timestep"][i]
        text = b.text_tokens[i][b.text_mask[i]].tolist()
        assert text == tok.encode(ep.instruction, add_bos=True)
        subtask = "reach the cube" if t < STEPS // 2 else "lift the cube"
        assert b.subtask_tokens[i][b.subtask_mask[i]].tolist() == tok.encode(subtask, add_bos=False, add_eos=True)
        dims = int(ep.action_mask.sum())  # human: gripper dim excluded from FAST
        assert int(b.fast_mask[i].sum()) == math.ceil(H / 2) * dims
        assert b.text_tokens[i][~b.text_mask[i]].eq(tok.pad_id).all()


def test_loader_normalizes_per_embodiment_and_unnormalizes_back(sets, episodes):
    by_key = {e.key: e for e in episodes[0] + episodes[1]}
    loader, batches = read(sets, n_batches=3)
    for b, i in samples_of(batches):
        ep, t = by_key[b.meta["key"][i]], b.meta["timestep"][i]
        n = int(b.action_time_mask[i].sum())
        if not b.action_time_mask[i, :n].all():
            continue
        raw = loader.normalizer.unnormalize(b.actions[i, :n], ep.embodiment, "actions")
        np.testing.assert_allclose(raw[:, :5].numpy(), ep.actions[t : t + n], atol=1e-5)
        state = loader.normalizer.unnormalize(b.state[i], ep.embodiment, "state")
        np.testing.assert_allclose(state[:4].numpy(), ep.state[t], atol=1e-5)


@pytest.mark.parametrize("mode", ["quantile", "zscore"])
def test_normalization_round_trip(mode):
    rng = np.random.default_rng(0)
    eps = [make_episode(0, 0, e, steps=40, image_size=8, cameras=()) for e in range(3)]
    norm = Normalizer(norm_stats_of(eps), mode)
    x = rng.normal(size=(7, 5)).astype(np.float32) * 3
    y = norm.normalize(x, "robot/arm", "actions")
    np.testing.assert_allclose(norm.unnormalize(y, "robot/arm", "actions"), x, rtol=1e-5, atol=1e-5)
    xt = torch.from_numpy(np.concatenate([x, np.full((7, 2), 9.0, np.float32)], 1))  # padded to 7 dims
    yt = norm.normalize(xt, "robot/arm", "actions")
    assert torch.equal(yt[:, 5:], xt[:, 5:]) and torch.allclose(yt[:, :5], torch.from_numpy(y))
    torch.testing.assert_close(norm.unnormalize(yt, "robot/arm", "actions"), xt)
    stats = norm.stats["robot/arm"]["actions"]
    if mode == "quantile":
        ends = np.array([stats["q01"], stats["q99"]], np.float32)
        np.testing.assert_allclose(norm.normalize(ends, "robot/arm", "actions"), [[-1] * 5, [1] * 5], atol=1e-5)


def test_degenerate_range_uses_floor_with_warning(caplog):
    ep = make_episode(0, 0, 0, steps=20, image_size=8, cameras=())
    ep.actions[:, 2] = 0.5  # a constant dim (e.g. a gripper that never moves)
    with caplog.at_level(logging.WARNING):
        norm = Normalizer(norm_stats_of([ep]), "quantile", floor=1e-3)
    assert "dims [2]" in caplog.text
    y = norm.normalize(ep.actions, "robot/arm", "actions")
    assert np.isfinite(y).all() and np.abs(y[:, 2]).max() < 1e-4
    np.testing.assert_allclose(norm.unnormalize(y, "robot/arm", "actions"), ep.actions, atol=1e-5)


def test_merge_stats_pools_mean_and_std():
    a = [make_episode(0, 0, e, steps=30, image_size=8, cameras=()) for e in range(2)]
    b = [make_episode(1, 1, e, steps=10, image_size=8, cameras=()) for e in range(3)]
    merged = merge_norm_stats([norm_stats_of(a), norm_stats_of(b)])["robot/arm"]["actions"]
    pooled = norm_stats_of(a + b)["robot/arm"]["actions"]
    np.testing.assert_allclose(merged["mean"], pooled["mean"], atol=1e-9)
    np.testing.assert_allclose(merged["std"], pooled["std"], atol=1e-9)


def test_samples_a_tokenizer_refuses_are_skipped_and_frames_stay_with_their_sample(sets):
    """The loader decodes a batch's frames first, then tokenizes: a sample the FAST tokenizer refuses
    leaves the batch and the frames of the samples after it move up with them."""
    class Refusing(TinyFastTokenizer):
        def encode(self, chunk):
            if chunk[0, 0] == 2.0:   # actions[t, 0] == t (normalization none): refuse timestep 2
                raise ValueError("refused")
            return super().encode(chunk)

    base = dict(sources=sets, image_size=16, batch_size=6, num_workers=0, chunk_length=H, max_action_dim=7,
                max_state_dim=6, shuffle_buffer=6, samples_per_episode=3, normalization="none")
    loader = build_loader(DataConfig(**base), TinyTextTokenizer(), Refusing())
    batches = list(itertools.islice(loader, 10))
    assert loader.skip_counts()["bad_sample"] > 0
    for b, i in samples_of(batches):
        t = b.meta["timestep"][i]
        assert t != 2
        assert abs(b.images[i, 0].float().mean().item() - (CAMERA_LEVEL["head"] + t)) < 2.0
