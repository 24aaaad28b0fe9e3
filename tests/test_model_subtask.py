"""pi0.5 hierarchical inference (actions read the subtask), the pi0 state block and FAST_END.

Masks are checked element by element against the rule written out per token here, and the
inference layout against the training layout at the same token layout.
"""

import numpy as np
import pytest
import torch

from helpers.tiny_models import tiny_vla_and_batch
from megavla.kernels import EXPERT, EXPERT_STATE, LM_SUFFIX, PREFIX, SUBTASK
from megavla.model import inference
from megavla.tokenizers import train_fast_tokenizer


def record_layouts(model, monkeypatch):
    """Every SharedAttention the model builds, in call order."""
    seen = []
    original = model.shared_attention

    def spy(bb_layout, ex_layout, cache=None):
        ctx = original(bb_layout, ex_layout, cache)
        seen.append(ctx)
        return ctx

    monkeypatch.setattr(model, "shared_attention", spy)
    return seen


def expected_expert_rows(batch, model, n_prefix_keys, prefix_valid, conditioning, with_fast):
    """The rule per token: an action row sees valid prefix keys, the valid subtask segment
    (SUBTASK_START + subtask tokens) iff conditioned on it, never FAST, and every expert token;
    the pi0 state row sees all that but the action tokens."""
    b, ls, lf = batch.batch_size, batch.subtask_tokens.shape[1], batch.fast_tokens.shape[1]
    n_state = model.expert.num_state_tokens
    n_expert = n_state + model.cfg.chunk_length
    keys = n_prefix_keys + 1 + ls + ((2 + lf) if with_fast else 0) + n_expert
    out = torch.zeros(b, n_expert, keys, dtype=torch.bool)
    for i in range(b):
        for r in range(n_expert):
            for j in range(keys):
                if j < n_prefix_keys:
                    ok = bool(prefix_valid[i, j])
                elif j < n_prefix_keys + 1 + ls:
                    s = j - n_prefix_keys  # 0 = SUBTASK_START
                    ok = conditioning == "subtask" and (s == 0 or bool(batch.subtask_mask[i, s - 1]))
                elif j < keys - n_expert:
                    ok = False  # FAST_START, FAST tokens, FAST_END
                else:
                    e = j - (keys - n_expert)
                    ok = not (r < n_state and e >= n_state)  # the state row is blind to actions
                out[i, r, j] = ok
    return out


@pytest.mark.parametrize("conditioning", ["subtask", "instruction"])
@pytest.mark.parametrize("state_mode", ["discrete", "continuous"])
def test_training_expert_mask_element_by_element(conditioning, state_mode, monkeypatch):
    model, batch = tiny_vla_and_batch(action_conditioning=conditioning, state_mode=state_mode)
    seen = record_layouts(model, monkeypatch)
    with torch.no_grad():
        model.run(batch)
    layout = seen[0].expert_layout
    prefix = model.prefix_tokens(batch)
    want = expected_expert_rows(batch, model, prefix.x.shape[1], prefix.valid, conditioning, with_fast=True)
    got = layout.dense_mask()
    assert got.shape == want.shape
    assert torch.equal(got, want), (got ^ want).nonzero()[:5]
    if state_mode == "continuous":
        assert int(layout.q_kind[0, 0]) == EXPERT_STATE and int(layout.q_kind[0, 1]) == EXPERT


@pytest.mark.parametrize("conditioning", ["subtask", "instruction"])
def test_inference_mask_and_positions_equal_training(conditioning, monkeypatch):
    """Given the same subtask tokens, the action rows at inference (KV cache of prefix + subtask)
    see exactly the keys they see in training with the FAST columns removed, at the same positions."""
    model, batch = tiny_vla_and_batch(action_conditioning=conditioning)
    seen = record_layouts(model, monkeypatch)
    positions = []
    original = model.expert_tokens
    monkeypatch.setattr(model, "expert_tokens", lambda *a: positions.append(original(*a)[0].positions) or original(*a))
    with torch.no_grad():
        model.run(batch)
    train_layout, train_pos = seen[0].expert_layout, positions[0]
    model.sample_actions(batch, num_steps=1, subtask=(batch.subtask_tokens, batch.subtask_mask))
    infer_layout, infer_pos = seen[-1].expert_layout, positions[-1]
    keep = train_layout.k_kind[0] != LM_SUFFIX  # the FAST segment (and an unread subtask)
    if conditioning == "subtask":
        assert bool((train_layout.k_kind[0] == SUBTASK).any())
    assert torch.equal(infer_layout.dense_mask(), train_layout.dense_mask()[:, :, keep])
    assert torch.equal(infer_pos, train_pos)
    # and the cache holds exactly those keys: prefix (+ subtask segment)
    n_cached = seen[-1].cache[0][0].shape[2]
    assert n_cached == int(keep.sum()) - train_layout.q_ar.shape[1]
    assert int(infer_layout.k_kind[0, 0]) == PREFIX


def test_cached_subtask_decoding_equals_predict_subtask_and_reencoding():
    model, batch = tiny_vla_and_batch()
    eos = 7
    (ids, mask), context, cache = inference.decode_subtask_cached(model, batch, 6, eos)
    ref_ids, ref_mask = model.predict_subtask(batch, max_len=6, eos_id=eos, use_cache=False)
    n = ids.shape[1]
    assert torch.equal(mask, ref_mask[:, :n]) and not ref_mask[:, n:].any()
    assert torch.equal(ids[mask], ref_ids[:, :n][mask])
    # the cache of the decode loop equals one pass over prefix + [SUBTASK_START, subtask...]
    ctx2, cache2, _ = inference.action_context(model, batch, True, (ref_ids, ref_mask))
    # sample_actions hands back the subtask it conditioned on: the same decode
    _, (got_ids, got_mask) = model.sample_actions(batch, num_steps=1, return_subtask=True)
    (want_ids, want_mask), _, _ = inference.decode_subtask_cached(model, batch, model.cfg.subtask_len,
                                                                  model.cfg.subtask_eos_id)
    assert torch.equal(got_ids, want_ids) and torch.equal(got_mask, want_mask)
    _, none = tiny_vla_and_batch(action_conditioning="instruction")[0].sample_actions(batch, num_steps=1, return_subtask=True)
    assert none is None
    valid = context.valid
    assert torch.equal(valid.sum(1), ctx2.valid.sum(1))
    k1 = cache[-1][0].transpose(1, 2)[valid]
    k2 = cache2[-1][0].transpose(1, 2)[ctx2.valid]
    torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-5)


def test_subtask_decoding_stops_when_every_row_has_ended():
    model, batch = tiny_vla_and_batch()
    eos = 7
    bias = torch.zeros(model.vocab_size)
    bias[eos] = 1e4  # every row's first token is the EOS
    logits = model.logits
    model.logits = lambda hidden: logits(hidden) + bias
    (ids, mask), context, cache = inference.decode_subtask_cached(model, batch, 8, eos)
    assert ids.tolist() == [[eos]] * batch.batch_size and mask.all()  # one step, not eight
    n_prefix = model.prefix_tokens(batch).x.shape[1]
    assert context.x.shape[1] == n_prefix + 2 and cache[0][0].shape[2] == n_prefix + 2  # START + EOS fed
    # rows that end at different steps: the ended row's later tokens are fed but invalid
    bias[eos] = 0.0
    free = inference.decode_subtask_cached(model, batch, 3, eos_id=-1)[0][0]  # never stops
    eos = int(free[0, 1])
    (ids, mask), _, _ = inference.decode_subtask_cached(model, batch, 3, eos)
    n = ids.shape[1]
    for r in range(batch.batch_size):
        row = free[r].tolist()
        end = row.index(eos) if eos in row else len(row)
        assert mask[r].tolist() == [j <= end for j in range(n)]
        assert ids[r, :min(end + 1, n)].tolist() == row[:min(end + 1, n)]


@pytest.mark.parametrize("insulated", [True, False])
def test_knowledge_insulation_also_detaches_the_subtask_keys(insulated):
    model, batch = tiny_vla_and_batch(knowledge_insulation=insulated, fast_weight=0.0, subtask_weight=0.0)
    model.train()
    model(batch)["loss"].backward()
    rows = batch.subtask_tokens[batch.subtask_mask].unique()
    grad = model.embed_tokens.weight.grad
    start = model.subtask_start_id
    subtask_grad = 0.0 if grad is None else float(grad[rows].abs().sum() + grad[start].abs().sum())
    assert (subtask_grad == 0.0) == insulated


def test_pi0_state_token_does_not_see_the_noisy_actions():
    """openpi pi0.py embed_suffix: the state token is its own block (ar_mask=True)."""
    model, batch = tiny_vla_and_batch(state_mode="continuous", time_conditioning="mlp")
    hidden = []
    hook = model.expert.stack.norm.register_forward_hook(lambda m, args, out: hidden.append(args[0]))
    noise = torch.randn(batch.actions.shape)
    time = torch.full((batch.batch_size,), 0.7)
    with torch.no_grad():
        model.run(batch, noise, time)
        model.run(batch, noise + 1.0, time)
    hook.remove()
    state_rows = [h[:, 0] for h in hidden]
    torch.testing.assert_close(state_rows[0], state_rows[1], atol=1e-6, rtol=0)
    assert (hidden[0][:, 1:] - hidden[1][:, 1:]).abs().max() > 1e-3  # the action rows do move


# ---------------------------------------------------------------------------------------- FAST_END
def test_fast_targets_end_with_fast_end():
    model, batch = tiny_vla_and_batch()
    ids, mask = model.fast_targets(batch)
    lengths = batch.fast_mask.sum(1)
    for i in range(batch.batch_size):
        n = int(lengths[i])
        assert ids[i, :n].tolist() == (batch.fast_tokens[i, :n] + model.fast_offset).tolist()
        assert int(ids[i, n]) == model.fast_end_id and mask[i].tolist() == [j <= n for j in range(ids.shape[1])]


def test_greedy_fast_decoding_stops_at_fast_end_and_decodes_through_the_tokenizer():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 10)[None, :, None]
    chunks = (rng.uniform(-0.5, 0.5, (300, 1, 6)) + 0.3 * np.sin(6 * t + rng.uniform(0, 6, (300, 1, 6))))
    tok = train_fast_tokenizer(list(chunks.astype(np.float32)), vocab_size=200, scale=10.0)
    model, batch = tiny_vla_and_batch()
    chunk = chunks[0].astype(np.float32)
    ids = tok.encode(chunk)
    end = model.fast_end_local
    # round trip: FAST_END and anything after it are dropped, the chunk comes back within FAST's bound
    decoded = model.decode_fast(ids + [end, 3, 4, 5], tok, horizon=10, dim=6)
    np.testing.assert_array_equal(decoded, tok.decode(ids, 10, 6))
    assert np.abs(decoded - chunk).max() <= tok.error_bound(10)[1]
    assert tok.num_malformed == 0
    # greedy decoding stops by itself once every row has emitted FAST_END: force it as the argmax
    bias = torch.zeros(model.vocab_size)
    bias[model.fast_end_id] = 1e4
    logits = model.logits
    model.logits = lambda hidden: logits(hidden) + bias
    fast, mask = model.predict_fast(batch, max_len=12)
    assert fast.shape == (batch.batch_size, 12)
    assert bool((fast[:, 0] == end).all()) and mask[:, 0].all() and not mask[:, 1:].any()
    ref, ref_mask = model.predict_fast(batch, max_len=12, use_cache=False)
    assert torch.equal(fast, ref) and torch.equal(mask, ref_mask)
    assert model.decode_fast(fast[0], tok, 10, 6).shape == (10, 6)


def test_training_refuses_a_tokenizer_whose_eos_is_not_the_models(tmp_path):
    from megavla.config import Config, ConfigError
    from megavla.tokenizers import train_text_tokenizer
    from megavla.train.entry import check_subtask_eos
    tok = train_text_tokenizer(["pick up the red cube", "open the gripper"] * 10, tmp_path / "t.model", vocab_size=300)
    cfg = Config()
    cfg.model.subtask_eos_id = tok.eos_id
    check_subtask_eos(cfg, tok)  # matching: fine
    cfg.model.subtask_eos_id = tok.eos_id + 1
    with pytest.raises(ConfigError, match=f"set model.subtask_eos_id={tok.eos_id}"):
        check_subtask_eos(cfg, tok)
