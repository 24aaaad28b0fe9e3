"""build_sample's per-episode precompute and shared token cache (issue 16, loader workers) give exactly
what the per-sample code before it gave: `reference_sample` below is that code, kept as the spec."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.shard_sets import TinyTextTokenizer, make_episode, norm_stats_of

from megavla.data.collate import (BatchFields, SampleError, active_subtask, build_sample, collate_samples,
                                  episode_arrays, fast_chunk, sample_fields)
from megavla.data.normalize import Normalizer
from megavla.data_shards.embodiments import EMBODIMENT_IDS
from megavla.tokenizers.fast import train_fast_tokenizer

H, MAX_S, MAX_A = 5, 6, 7


def reference_sample(ep, t, normalizer, text_tok, fast_tok) -> dict:
    """The per-sample build before the per-episode precompute (images left out)."""
    T = ep.num_steps
    norm = normalizer is not None
    state = normalizer.normalize(ep.state, ep.embodiment, "state") if norm else ep.state
    actions = normalizer.normalize(ep.actions, ep.embodiment, "actions") if norm else ep.actions
    S, A = ep.state.shape[1], ep.actions.shape[1]
    idx = np.arange(t, t + H)
    clipped = np.minimum(idx, T - 1)
    time_mask = (idx < T) & ep.step_valid[clipped]
    chunk = actions[clipped]
    state_out = np.zeros(MAX_S, np.float32)
    state_out[:S] = state[t]
    state_mask = np.zeros(MAX_S, bool)
    state_mask[:S] = True
    actions_out = np.zeros((H, MAX_A), np.float32)
    actions_out[:, :A] = chunk
    actions_out[~time_mask] = 0.0
    dim_mask = np.zeros(MAX_A, bool)
    dim_mask[:A] = ep.action_mask
    last = np.maximum.accumulate(np.where(time_mask, np.arange(H), 0))
    fast = list(fast_tok.encode(chunk[last][:, ep.action_mask]))
    subtask = active_subtask(ep, t)
    return {"image_mask": np.ones(3, bool), "state": state_out, "state_mask": state_mask,
            "actions": actions_out, "action_dim_mask": dim_mask, "action_time_mask": time_mask,
            "text_tokens": text_tok.encode(ep.instruction, add_bos=True, add_eos=False),
            "subtask_tokens": text_tok.encode(subtask, add_bos=False, add_eos=True) if subtask else [],
            "fast_tokens": fast, "embodiment": EMBODIMENT_IDS[ep.embodiment],
            "meta": {"source": "s", "key": ep.key, "scene": ep.scene, "task": ep.task, "timestep": t}}


def reference_pad(seqs, pad_id):
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    mask = np.arange(max(1, int(lengths.max()))) < lengths[:, None]
    tokens = np.full(mask.shape, pad_id, dtype=np.int64)
    tokens[mask] = np.fromiter((i for s in seqs for i in s), dtype=np.int64, count=int(lengths.sum()))
    return tokens, mask


@pytest.fixture(scope="module")
def episodes():
    eps = [make_episode(0, 0, 0, steps=9), make_episode(1, 2, 0, steps=7),
           make_episode(0, 1, 0, human=True, steps=8), make_episode(2, 0, 1, human=True, steps=3)]
    eps[0].step_valid[[2, 3, 7]] = False   # dropouts inside the chunk and near the end
    eps[1].step_valid[0] = False           # an invalid first step (eval may ask for any t)
    return eps


@pytest.fixture(scope="module")
def fast_tok(episodes):
    rng = np.random.default_rng(0)
    chunks = [np.clip(np.cumsum(rng.normal(0, 0.3, (H, d)), 0), -1, 1) for d in (4, 5) for _ in range(60)]
    return train_fast_tokenizer(chunks, vocab_size=160, scale=10.0)


@pytest.mark.parametrize("normalized", [False, True])
def test_samples_equal_the_per_sample_reference(episodes, fast_tok, normalized):
    normalizer = Normalizer(norm_stats_of(episodes), "quantile") if normalized else None
    text_tok = TinyTextTokenizer()
    token_cache: dict = {}     # shared by all episodes, as a loader worker shares it
    new, ref = [], []
    for ep in episodes:
        episode_cache: dict = {}
        for t in range(ep.num_steps):
            got = build_sample(ep, t, source="s", where="w", cameras=["head", "left_wrist", "right_wrist"],
                               image_size=16, chunk_length=H, max_state_dim=MAX_S, max_action_dim=MAX_A,
                               normalizer=normalizer, text_tokenizer=text_tok, fast_tokenizer=fast_tok,
                               text_cache=episode_cache, token_cache=token_cache)
            want = reference_sample(ep, t, normalizer, text_tok, fast_tok)
            want["image_mask"] = np.array([cam in ep.frames for cam in ("head", "left_wrist", "right_wrist")])
            assert set(got) - {"images"} == set(want)
            for key, value in want.items():
                if isinstance(value, np.ndarray):
                    assert got[key].dtype == value.dtype and np.array_equal(got[key], value), (ep.key, t, key)
                else:
                    assert got[key] == value, (ep.key, t, key)
            new.append(got)
            ref.append(want)
    # A sample owns its arrays: writing into one leaves the episode's other samples alone.
    new[0]["state"][:] = 99
    new[0]["actions"][:] = 99
    assert not np.array_equal(new[1]["state"], new[0]["state"])
    new[0]["state"], new[0]["actions"] = ref[0]["state"], ref[0]["actions"]
    batch = collate_samples(new, text_pad_id=0)
    for field in ("text_tokens", "subtask_tokens", "fast_tokens"):
        tokens, mask = reference_pad([s[field] for s in ref], 0)
        short = field.split("_")[0]
        assert torch.equal(getattr(batch, field), torch.from_numpy(tokens))
        assert torch.equal(getattr(batch, f"{short}_mask"), torch.from_numpy(mask))


@pytest.mark.parametrize("normalized", [False, True])
def test_batch_fields_equal_collated_samples(episodes, fast_tok, normalized):
    """BatchFields (the loader's row-by-row batch) against collate_samples over sample_fields: every
    tensor equal in dtype, shape and value, and the same meta; a refused text writes no row."""
    normalizer = Normalizer(norm_stats_of(episodes), "quantile") if normalized else None
    text_tok = TinyTextTokenizer()
    items = [(ep, t) for ep in episodes for t in range(ep.num_steps)]
    for start in range(0, len(items), 6):
        chunk = items[start:start + 6]
        caches = {ep.key: {} for ep, _ in chunk}
        samples, rows = [], BatchFields(6, H, MAX_S, MAX_A, 3, text_tokenizer=text_tok, token_cache={})
        images = torch.zeros(6, 3, 4, 4, 3, dtype=torch.uint8)
        for ep, t in chunk:
            cache = episode_arrays(ep, caches[ep.key], normalizer, H, MAX_S, MAX_A)
            fast = fast_tok.encode(fast_chunk(ep, t, cache, H))
            mask = np.array([cam in ep.frames for cam in ("head", "left_wrist", "right_wrist")])
            fields = sample_fields(ep, t, source="s", where="w", chunk_length=H, max_state_dim=MAX_S,
                                   max_action_dim=MAX_A, normalizer=normalizer, text_tokenizer=text_tok,
                                   fast_tokenizer=fast_tok, text_cache=cache, token_cache={})
            samples.append({"image_mask": mask, **fields})
            rows.add(ep, t, cache, source="s", where="w", image_mask=mask, fast_tokens=fast)
        want = collate_samples(samples, text_pad_id=0, images=images)
        got = rows.batch(images, text_pad_id=0)
        for name, value in want.tensors().items():
            other = getattr(got, name)
            assert other.dtype == value.dtype and torch.equal(other, value), name
        assert got.meta == want.meta

    class Refusing(TinyTextTokenizer):
        def encode(self, text, **kw):
            raise ValueError("no")
    rows = BatchFields(2, H, MAX_S, MAX_A, 3, text_tokenizer=Refusing(), token_cache={})
    ep = episodes[0]
    with pytest.raises(SampleError):
        rows.add(ep, 0, episode_arrays(ep, {}, None, H, MAX_S, MAX_A), source="s", where="w",
                 image_mask=np.ones(3, bool), fast_tokens=[])
    assert rows.n == 0 and not rows.meta["key"]


def reference_decode(data: bytes, size: int) -> np.ndarray:
    """decode_frame before it skipped the header parse: header first, then decode or resize."""
    import simplejpeg
    from megavla.data_shards.format import resize_with_pad
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    if height == size and width == size:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=np.empty((size, size, 3), np.uint8))
    rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size, min_width=size)
    return rgb if rgb.shape[:2] == (size, size) else resize_with_pad(rgb, size)


@pytest.mark.parametrize("shape", [(32, 32, 3), (16, 16, 3), (24, 40, 3), (64, 64, 3), (64, 48, 3), (300, 10, 3),
                                   (40, 24, 3), (33, 31, 3), (96, 20, 3), (32, 32, 1)])
def test_decode_into_the_batch_slot_equals_the_checked_decode(shape):
    import simplejpeg
    from megavla.data.collate import decode_frame
    image = (np.random.default_rng(shape[0] * 100 + shape[1]).random(shape) * 255).astype(np.uint8)
    data = simplejpeg.encode_jpeg(image, quality=90, colorspace="GRAY" if shape[2] == 1 else "RGB")
    slot = np.full((32, 32, 3), 7, np.uint8)   # stale contents of a reused buffer
    assert decode_frame(data, 32, "w", out=slot) is slot
    assert np.array_equal(slot, reference_decode(data, 32))
    assert np.array_equal(decode_frame(data, 32, "w"), reference_decode(data, 32))


def test_fast_encode_many_equals_encode_each(fast_tok):
    from megavla.data.collate import SampleError, encode_fast_chunks
    rng = np.random.default_rng(3)
    chunks = [np.clip(np.cumsum(rng.normal(0, 0.3, (H, d)), 0), -1, 1).astype(np.float32)
              for d in (4, 5, 4, 0, 5, 4) for _ in range(7)]
    chunks[3] = chunks[3] * 40          # beyond the trained range: clipped (and counted) alike
    chunks.append(np.zeros((3, 4), np.float32))   # another horizon in the same call
    before = fast_tok.num_clipped
    want = [fast_tok.encode(c) for c in chunks]
    clipped = fast_tok.num_clipped - before
    assert clipped > 0
    assert fast_tok.encode_many(chunks) == want
    assert fast_tok.num_clipped - before == 2 * clipped
    bad = list(chunks)
    bad[5] = np.full((H, 4), np.nan, np.float32)
    with pytest.raises(ValueError, match="non-finite"):
        fast_tok.encode_many(bad)
    got = encode_fast_chunks(fast_tok, bad, [f"w{i}" for i in range(len(bad))])
    assert isinstance(got[5], SampleError) and "w5.actions.npy" in str(got[5])
    assert got[:5] == want[:5] and got[6:] == want[6:]


def test_loader_batches_equal_samples_built_one_by_one(tmp_path, fast_tok):
    """The loader (frames first, then fields, FAST a batch at a time) against build_sample per sample."""
    import itertools

    from megavla.config.data import DataConfig
    from megavla.data.pipeline import build_loader
    from helpers.shard_sets import write_shard_set
    robot = [make_episode(s, t, 0, steps=9) for s in range(2) for t in range(2)]
    robot[1].step_valid[[4, 8]] = False
    directory = write_shard_set(tmp_path / "robot", robot, per_shard=2)
    cfg = DataConfig(sources={"robot": str(directory)}, image_size=16, batch_size=5, num_workers=0,
                     chunk_length=H, max_action_dim=MAX_A, max_state_dim=MAX_S, shuffle_buffer=5,
                     samples_per_episode=3, normalization="quantile")
    loader = build_loader(cfg, TinyTextTokenizer(), fast_tok)
    by_key = {e.key: e for e in robot}
    for batch in itertools.islice(loader, 6):
        for i, (key, t) in enumerate(zip(batch.meta["key"], batch.meta["timestep"])):
            want = build_sample(by_key[key], t, source="robot", where="w", cameras=list(cfg.cameras), image_size=16,
                                chunk_length=H, max_state_dim=MAX_S, max_action_dim=MAX_A,
                                normalizer=loader.normalizer, text_tokenizer=TinyTextTokenizer(), fast_tokenizer=fast_tok)
            assert batch.fast_tokens[i][batch.fast_mask[i]].tolist() == want["fast_tokens"]
            assert batch.subtask_tokens[i][batch.subtask_mask[i]].tolist() == want["subtask_tokens"]
            assert torch.equal(batch.actions[i], torch.from_numpy(want["actions"]))
            assert torch.equal(batch.state[i], torch.from_numpy(want["state"]))
            assert torch.equal(batch.images[i], torch.from_numpy(want["images"]).permute(0, 3, 1, 2))
