"""Text + FAST tokenizers, and `megavla tokenizer train` on tiny shard sets written here."""
from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest

from megavla.data_shards.format import Episode, Subtask
from megavla.data_shards.manifest import shard_paths
from megavla.data_shards.writer import ShardSetWriter
from megavla.tokenizers import (FastTokenizer, TextTokenizer, load_tokenizers, train_fast_tokenizer,
                                train_text_tokenizer, train_tokenizers)
from megavla.tokenizers.fast import dct_coefficients, dct_matrix

TEXTS = ["pick up the red cube", "place the blue ball in the bowl", "push the green block left",
         "grasp the yellow cup", "move to the cube", "open the gripper"]


def smooth_chunks(rng, n, horizon, dim):
    """Smooth trajectories in [-1, 1], like normalized robot actions."""
    t = np.linspace(0, 1, horizon)[None, :, None]
    base = rng.uniform(-0.7, 0.7, (n, 1, dim))
    amp = rng.uniform(0, 0.3, (n, 1, dim))
    freq = rng.uniform(0.2, 1.5, (n, 1, dim))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, dim))
    return (base + amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


@pytest.fixture(scope="module")
def fast_tok():
    rng = np.random.default_rng(0)
    chunks = list(smooth_chunks(rng, 600, 10, 7)) + list(smooth_chunks(rng, 200, 10, 3))
    return train_fast_tokenizer(chunks, vocab_size=256, scale=10.0)


# --- text -------------------------------------------------------------------------------------
def test_text_roundtrip_specials_and_save_load(tmp_path):
    tok = train_text_tokenizer(TEXTS * 10, tmp_path / "text.model", vocab_size=400)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert 261 < tok.vocab_size <= 400
    ids = tok.encode("pick up the blue bowl", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "pick up the blue bowl"
    # BPE learns whole words of a template corpus (fewer pieces than characters).
    assert len(tok.encode("pick up the red cube", add_bos=False)) <= 5
    # Byte fallback: an unseen character round-trips instead of becoming <unk>.
    assert tok.unk_id not in tok.encode("zebra ☃") and tok.decode(tok.encode("zebra ☃")) == "zebra ☃"
    loaded = TextTokenizer.load(tmp_path / "text.model")
    assert loaded.encode("grasp the cup") == tok.encode("grasp the cup")
    # Spawned DataLoader workers pickle the dataset: the tokenizer must survive it.
    assert pickle.loads(pickle.dumps(tok)).encode("open it") == tok.encode("open it")
    # Model output with junk ids decodes without raising.
    assert tok.decode([tok.bos_id, 10**6, -5, *tok.encode("open", add_bos=False), tok.pad_id]) == "open"


def test_text_vocab_limits_and_bad_input(tmp_path):
    # Requested size is an upper bound on a tiny corpus (hard_vocab_limit=False).
    tok = train_text_tokenizer(TEXTS, None, vocab_size=5000)
    assert tok.vocab_size < 5000
    with pytest.raises(ValueError, match="too small"):
        train_text_tokenizer(TEXTS, None, vocab_size=100)
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_text_tokenizer(["", "  "], None)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        TextTokenizer.load(tmp_path / "junk.model")
    with pytest.raises(FileNotFoundError, match="tokenizer train"):
        TextTokenizer.load(tmp_path / "missing.model")


# --- FAST -------------------------------------------------------------------------------------
def test_fast_roundtrip_error_bound(fast_tok):
    """Proven bound (see fast.py): per-dim RMS <= 1/(2 scale), max-abs <= sqrt(H)/(2 scale)."""
    rng = np.random.default_rng(1)
    rms_bound, max_bound = fast_tok.error_bound(10)
    assert rms_bound == pytest.approx(0.05) and max_bound == pytest.approx(0.5 * math.sqrt(10) / 10)
    worst_rms = worst_max = 0.0
    for chunk in list(smooth_chunks(rng, 200, 10, 7)) + list(rng.uniform(-0.6, 0.6, (100, 10, 5))):
        ids = fast_tok.encode(chunk)
        assert all(0 <= i < fast_tok.vocab_size for i in ids)
        recon = fast_tok.decode(ids, *chunk.shape)
        assert recon.shape == chunk.shape and recon.dtype == np.float32
        err = recon - chunk
        worst_rms = max(worst_rms, float(np.sqrt((err ** 2).mean(axis=0)).max()))
        worst_max = max(worst_max, float(np.abs(err).max()))
    assert fast_tok.num_clipped == 0
    assert worst_rms <= rms_bound + 1e-6 and worst_max <= max_bound + 1e-6
    # The quantizer is really exercised (a lossless stub would give 0 error).
    assert worst_rms > 0.2 * rms_bound


def test_dct_matches_scipy():
    from scipy.fft import dct, idct
    x = np.random.default_rng(7).normal(size=(13, 4))
    np.testing.assert_array_equal(dct_coefficients(x, 10.0), np.rint(dct(x, axis=0, norm="ortho") * 10.0))
    np.testing.assert_allclose(dct_matrix(13).T @ dct(x, axis=0, norm="ortho"), x, atol=1e-12)
    np.testing.assert_allclose(idct(x, axis=0, norm="ortho"), dct_matrix(13).T @ x, atol=1e-12)


def test_fast_compresses_and_orders_low_frequency_first(fast_tok):
    rng = np.random.default_rng(2)
    chunk = smooth_chunks(rng, 1, 10, 7)[0]
    ids = fast_tok.encode(chunk)
    assert len(ids) < chunk.size  # BPE merged something
    # Coefficient-major flattening: a truncated sequence loses high frequencies only, so decoding
    # the first half of the coefficients is close to the low-pass of the chunk.
    coeffs, ok = fast_tok.decode_coefficients(ids, chunk.size)
    assert ok and np.array_equal(coeffs, dct_coefficients(chunk, 10.0).reshape(-1))
    assert np.array_equal(coeffs[:7], dct_coefficients(chunk, 10.0)[0])  # all dims' DC first


def test_fast_decode_never_crashes_on_malformed(fast_tok):
    rng = np.random.default_rng(3)
    chunk = smooth_chunks(rng, 1, 10, 7)[0]
    ids = fast_tok.encode(chunk)
    cases = [[], [0, 0, 0], [10**9, -1], ids[: len(ids) // 2], ids + ids, list(rng.integers(-5, 300, 40))]
    for bad in cases:
        out = fast_tok.decode(bad, 10, 7)
        assert out.shape == (10, 7) and np.isfinite(out).all()
    assert fast_tok.num_malformed >= len(cases) - 1
    # Truncated tokens are zero-padded high frequencies: still a rough approximation of the chunk.
    half = fast_tok.decode(ids[: max(1, len(ids) // 2)], 10, 7)
    assert np.abs(half - chunk).mean() < np.abs(chunk).mean()
    assert fast_tok.decode(ids, 0, 7).shape == (0, 7)


def test_fast_clips_out_of_range_and_rejects_bad(fast_tok):
    n0 = fast_tok.num_clipped
    ids = fast_tok.encode(np.full((10, 2), 50.0))
    assert fast_tok.num_clipped > n0 and all(0 <= i < fast_tok.vocab_size for i in ids)
    with pytest.raises(ValueError, match="non-finite"):
        fast_tok.encode(np.full((10, 2), np.nan))
    with pytest.raises(ValueError, match=r"\[H, d\]"):
        fast_tok.encode(np.zeros(10))
    with pytest.raises(ValueError, match="normalize actions"):
        train_fast_tokenizer([np.linspace(-100, 100, 20)[:, None]], vocab_size=64)


def test_fast_save_load_and_pickle(fast_tok, tmp_path):
    model_path, json_path = fast_tok.save(tmp_path / "fast")
    meta = json.loads(json_path.read_text())
    assert meta["scale"] == 10.0 and meta["min_coeff"] == fast_tok.min_coeff
    chunk = smooth_chunks(np.random.default_rng(4), 1, 10, 7)[0]
    for other in (FastTokenizer.load(tmp_path / "fast"), FastTokenizer.load(json_path),
                  pickle.loads(pickle.dumps(fast_tok))):
        assert other.encode(chunk) == fast_tok.encode(chunk)
        assert other.vocab_size == fast_tok.vocab_size
    json_path.write_text(json.dumps(dict(meta, format="other")))
    with pytest.raises(ValueError, match="format"):
        FastTokenizer.load(tmp_path / "fast")


# --- megavla tokenizer train ---------------------------------------------------------------------
def _episode(rng, embodiment, idx, steps, action_dim, gripper_masked, dropout):
    t = np.arange(steps)[:, None]
    # Raw (unnormalized) actions with per-dim offsets/scales: normalization must bring them to ~[-1, 1].
    actions = (5.0 * np.sin(0.2 * t + rng.uniform(0, 6, action_dim)) + 3.0).astype(np.float32)
    mask = np.ones(action_dim, bool)
    if gripper_masked:
        mask[-1] = False
        actions[:, -1] = 1e4  # garbage in an unsupervised dim must not reach FAST training
    valid = np.ones(steps, bool)
    if dropout:
        valid[steps // 2] = False
    return Episode(embodiment=embodiment, scene=idx % 3, task=idx % 2, episode=idx,
                   instruction=TEXTS[idx % len(TEXTS)],
                   subtasks=[Subtask("reach the object", 0, steps // 2), Subtask("lift it", steps // 2, steps)],
                   fps=10.0, state=np.zeros((steps, 4), np.float32), actions=actions,
                   action_mask=mask, step_valid=valid, frames={})


def _write_shard_set(path, episodes, **kwargs):
    with ShardSetWriter(path, **kwargs) as writer:
        for ep in episodes:
            writer.write(ep)


def test_tokenizer_train_cli_on_shard_sets(tmp_path, caplog):
    rng = np.random.default_rng(5)
    robot = [_episode(rng, "robot/arm", i, 24, 7, False, False) for i in range(6)]
    robot.append(_episode(rng, "robot/arm", 6, 5, 7, False, False))  # shorter than a chunk: padded
    human = [_episode(rng, "human/ego", i, 20, 7, True, i == 0) for i in range(4)]
    human.append(_episode(rng, "human/ego", 4, 20, 7, True, False))  # its shard gets corrupted
    _write_shard_set(tmp_path / "synth" / "robot", robot)
    _write_shard_set(tmp_path / "synth" / "human", human, target_shard_bytes=1)  # one episode a shard
    # A corrupt shard listed in the manifest: counted and skipped, never silently.
    last = shard_paths(tmp_path / "synth" / "human")[-1]
    with open(last, "wb") as f:
        f.write(rng.bytes(700))

    from megavla.tokenizers.cli import main
    out = tmp_path / "tok"
    with caplog.at_level("WARNING"):
        assert main(["train", "--shards", str(tmp_path / "synth"), "--out", str(out),
                     "--text-vocab", "400", "--fast-vocab", "300", "--chunk-length", "8"]) == 0
    summary = json.loads((out / "tokenizers.json").read_text())
    counts = summary["counts"]
    assert counts["episodes"] == 11 and counts["bad_samples"] >= 1
    # Every valid start, as the pipeline samples: robot 6 x 24 + 5 (short episode); human 4 x 20
    # minus the one dropout step. Tails past the end / over the dropout are forward-filled.
    assert counts["per_embodiment_chunks"] == {"robot/arm": 6 * 24 + 5, "human/ego": 4 * 20 - 1}
    assert counts["invalid_starts"] == 1
    assert counts["padded_chunks"] == 6 * 7 + 5 + 4 * 7 + 7  # tails (H-1 each) + 7 over the dropout
    assert counts["per_embodiment_dims"] == {"robot/arm": [7], "human/ego": [6]}  # gripper masked
    assert counts["texts"] == 11 * 3
    assert any("skipping" in r.message for r in caplog.records)

    text_tok, fast_tok = load_tokenizers(out)
    assert text_tok.decode(text_tok.encode("reach the object")) == "reach the object"
    assert fast_tok.vocab_size <= 300
    # Quantile-normalized actions of the valid dims span ~[-1, 1]: coefficient range stays small
    # (the masked gripper's 1e4 garbage would blow it up to ~1e5).
    assert -40 <= fast_tok.min_coeff and fast_tok.max_coeff <= 40
    # The FAST tokenizer round-trips a normalized robot chunk within the proven bound.
    from megavla.data.normalize import Normalizer, load_norm_stats
    norm = Normalizer(load_norm_stats(tmp_path / "synth" / "robot" / "norm_stats.json"))
    chunk = norm.normalize(robot[0].actions, "robot/arm")[:8]
    recon = fast_tok.decode(fast_tok.encode(chunk), 8, 7)
    assert np.abs(recon - chunk).max() <= fast_tok.error_bound(8)[1] + 1e-6

    with pytest.raises(FileNotFoundError, match="no shard set"):
        train_tokenizers([tmp_path / "tok"], tmp_path / "x")
    (tmp_path / "synth" / "robot" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="unfinished write"):
        train_tokenizers([tmp_path / "synth"], tmp_path / "z")


def test_corpus_walk_reads_what_the_loader_reads(tmp_path):
    """The corpus is walked with the loader's tar reader: a shard whose members are whole but that
    lacks the end-of-archive blocks is damaged for the loader (it loses the last episode), so the
    tokenizer counts it and reads the same episodes (webdataset's walk read all three and counted
    nothing); fail mode raises, naming the shard."""
    from megavla.data_shards.tar_reader import TarFormatError, group_members, iter_tar_members, map_shard
    from megavla.tokenizers.pair import CorpusCounts, iter_episodes

    rng = np.random.default_rng(1)
    _write_shard_set(tmp_path / "set", [_episode(rng, "robot/arm", i, 12, 7, False, False) for i in range(3)])
    (shard,) = map(str, shard_paths(tmp_path / "set"))
    with open(shard, "rb") as f:
        data = f.read().rstrip(b"\0")
    with open(shard, "wb") as f:
        f.write(data + bytes(-len(data) % 512))
    loader_keys = []
    with pytest.raises(TarFormatError, match="end-of-archive"):
        for group in group_members(iter_tar_members(map_shard(shard), shard), shard):
            loader_keys.append(group["__key__"])
    counts = CorpusCounts()
    episodes = list(iter_episodes([tmp_path / "set"], counts))
    assert [ep.key for ep in episodes] == loader_keys and len(loader_keys) == 2
    assert (counts.episodes, counts.bad_samples) == (2, 1)
    with pytest.raises(TarFormatError, match=f"{shard}: ends without end-of-archive blocks"):
        list(iter_episodes([tmp_path / "set"], CorpusCounts(), on_bad_sample="fail"))


def test_episode_chunks_forward_fill_like_the_pipeline():
    from megavla.tokenizers.pair import CorpusCounts, episode_chunks
    actions = np.arange(6, dtype=np.float32)[:, None] * np.array([[1.0, 10.0, 100.0]], np.float32)
    valid = np.array([True, True, False, True, True, True])
    counts = CorpusCounts()
    chunks = list(episode_chunks(actions, np.array([True, False, True]), valid, 4, 1, counts))
    assert len(chunks) == 5 and counts.invalid_starts == 1  # start 2 is a dropout step
    np.testing.assert_array_equal(chunks[0][:, 0], [0, 1, 1, 3])  # step 2 filled from step 1
    np.testing.assert_array_equal(chunks[-1][:, 0], [5, 5, 5, 5])  # past the end: last step
    assert chunks[0].shape == (4, 2) and np.array_equal(chunks[0][:, 1], chunks[0][:, 0] * 100)
