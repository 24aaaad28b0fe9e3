"""Inference paths of the VLA: flow sampling with a prefix KV cache, greedy decoding, prefix embedding.

The prefix (cameras, text, state) is encoded once; its per-layer K/V are the cache. With
action_conditioning=subtask, the subtask is then decoded greedily on that cache (one backbone token
per step, stopping at EOS) and its K/V join the cache. Flow sampling runs only the expert for each
Euler step (t = 1 -> 0) over the cache. ``use_cache=False`` recomputes everything each step (the
reference the tests compare the cached path against).
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from megavla.batch import Batch
from megavla.kernels import AttentionLayout

from .gemma import Stream, run_shared_layers
from .tokens import Tokens

logger = logging.getLogger(__name__)


def encode_prefix(model, batch: Batch):
    """-> (prefix Tokens, backbone hidden of the prefix before the final norm, per-layer (k, v))."""
    prefix = model.prefix_tokens(batch)
    layout = AttentionLayout.from_kinds(prefix.kind, prefix.valid)
    hidden, _, kv = run_shared_layers(model.backbone, None, Stream(prefix.x, prefix.positions), None,
                                      model.shared_attention(layout, None))
    return prefix, hidden, kv


def sample_actions(model, batch: Batch, num_steps: int, noise: torch.Tensor | None, use_cache: bool,
                   subtask: tuple[torch.Tensor, torch.Tensor] | None = None, return_subtask: bool = False):
    """With action_conditioning=subtask the subtask is decoded first (or ``subtask`` = (ids, mask)
    given, e.g. the ground truth) and the action rows read prefix + [SUBTASK_START, subtask...].
    ``return_subtask``: -> (actions, (ids, mask) the actions were conditioned on, or None)."""
    cfg = model.cfg
    if num_steps <= 0:
        raise ValueError(f"sample_actions: num_steps={num_steps} must be >= 1")
    shape = (batch.batch_size, cfg.chunk_length, cfg.action_dim)
    dev = batch.actions.device
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"sample_actions: noise {tuple(noise.shape)} must be [B, model.chunk_length, "
                         f"model.action_dim] = {shape}")
    noise = torch.randn(shape, device=dev) if noise is None else noise.to(dev, torch.float32)
    # Training never supervises a sample's unused dims and feeds t * eps there (actions are zeroed):
    # keep them on that path here too, so they look like they did in training.
    used = batch.action_dim_mask[:, None, :]
    x = noise.clone()
    dt = -1.0 / num_steps
    context, cache, subtask = action_context(model, batch, use_cache, subtask)
    start = context.valid.long().sum(dim=1)  # expert positions follow what the action rows read
    for step in range(num_steps):
        t = torch.full((shape[0],), 1.0 + step * dt, device=dev)
        x = euler_step(model, batch, x, noise, used, t, dt, context, cache, start)
    actions = torch.where(used, x, torch.zeros_like(x))
    return (actions, subtask) if return_subtask else actions


def euler_step(model, batch: Batch, x, noise, used, t, dt: float, context, cache, start):
    """One Euler step of the flow from time ``t`` [B] to t + dt over the action context (its K/V
    ``cache``, or recomputed when None) -> the next x [B, H, A] (megavla/model/compile.py compiles
    this function as it is)."""
    x = torch.where(used, x, t[:, None, None] * noise)
    ex, ex_kind, ex_valid = model.expert_tokens(x, t, batch, start)
    ex_layout = AttentionLayout.from_kinds(torch.cat([context.kind, ex_kind.to(context.kind.dtype)], 1),
                                           torch.cat([context.valid, ex_valid], 1), ex.x.shape[1])
    if cache is not None:
        ctx = model.shared_attention(None, ex_layout, cache)
        _, ex_h, _ = run_shared_layers(None, model.expert.stack, None, ex, ctx)
    else:
        ctx = model.shared_attention(AttentionLayout.from_kinds(context.kind, context.valid), ex_layout)
        _, ex_h, _ = run_shared_layers(model.backbone, model.expert.stack,
                                       Stream(context.x, context.positions), ex, ctx)
    return x + dt * model.expert.velocity(ex_h, ex.cond, model.cfg.chunk_length)


def action_context(model, batch: Batch, use_cache: bool, subtask=None):
    """The backbone tokens the action rows read -> (Tokens, per-layer K/V cache or None, the subtask
    (ids, mask) or None). Prefix only, or prefix + [SUBTASK_START, subtask...] when actions are
    conditioned on the subtask: decoded greedily (KV-cached when use_cache) unless ``subtask`` =
    (ids, mask) is given."""

    cfg = model.cfg
    if not model.actions_read_subtask:
        if use_cache:
            prefix, _, cache = encode_prefix(model, batch)
            return prefix, cache, None
        return model.prefix_tokens(batch), None, None
    if use_cache and subtask is None:
        decoded, context, cache = decode_subtask_cached(model, batch, cfg.subtask_len, cfg.subtask_eos_id)
        return context, cache, decoded
    if subtask is None:
        subtask = greedy_decode(model, batch, "subtask", cfg.subtask_len, cfg.subtask_eos_id, use_cache=False)
    ids, mask = subtask
    with_subtask = dataclasses.replace(batch, subtask_tokens=ids.to(batch.text_tokens.device),
                                       subtask_mask=mask.to(batch.text_tokens.device))
    if not use_cache:
        prefix = model.prefix_tokens(batch)
        return Tokens.cat([prefix, model.lm_suffix_tokens(with_subtask, prefix, True, False)[0]]), None, subtask
    prefix, _, cache = encode_prefix(model, batch)
    segment = model.lm_suffix_tokens(with_subtask, prefix, True, False)[0]
    cache, _ = _extend_cache(model, cache, prefix, segment)
    return Tokens.cat([prefix, segment]), cache, subtask


def _extend_cache(model, cache, context, seq):
    """Run the backbone on ``seq`` over a cache of ``context`` -> (cache of context + seq, hidden)."""
    layout = AttentionLayout.from_kinds(torch.cat([context.kind, seq.kind], 1),
                                        torch.cat([context.valid, seq.valid], 1), seq.x.shape[1])
    hidden, _, kv = run_shared_layers(model.backbone, None, Stream(seq.x, seq.positions), None,
                                      model.shared_attention(layout, None, cache))
    return [(torch.cat([ck, k], 2), torch.cat([cv, v], 2)) for (ck, cv), (k, v) in zip(cache, kv)], hidden


def decode_subtask_cached(model, batch: Batch, max_len: int, eos_id: int):
    """Greedy subtask decoding on a KV cache that keeps every fed token, stopping once every row has
    emitted ``eos_id`` (or after max_len tokens); the last token is fed too, so the cache then holds
    prefix + [SUBTASK_START, subtask...] for the action rows. Tokens after a row's EOS are fed as
    invalid (nobody reads them). -> ((ids [B, n], mask [B, n]), context Tokens, cache), n <= max_len."""

    prefix, _, cache = encode_prefix(model, batch)
    context = prefix
    seq = _seed_tokens(model, batch, prefix, "subtask")
    alive = torch.ones(batch.batch_size, dtype=torch.bool, device=prefix.x.device)
    ids, mask = [], []
    for step in range(max_len + 1):
        cache, hidden = _extend_cache(model, cache, context, seq)
        context = Tokens.cat([context, seq])
        if step == max_len or not bool(alive.any()):
            break
        next_id = model.logits(hidden[:, -1:])[:, 0, :model.cfg.text_vocab_size].argmax(dim=-1)
        ids.append(next_id)
        mask.append(alive)
        alive = alive & (next_id != eos_id)
        seq = Tokens(model._embed_ids(next_id[:, None]), mask[-1][:, None], seq.kind[:, -1:],
                     seq.positions[:, -1:] + 1)
    b, dev = batch.batch_size, prefix.x.device
    out = ((torch.stack(ids, 1), torch.stack(mask, 1)) if ids else
           (torch.zeros(b, 0, dtype=torch.long, device=dev), torch.zeros(b, 0, dtype=torch.bool, device=dev)))
    return out, context, cache


def _seed_tokens(model, batch: Batch, prefix, target: str):
    """LM-suffix tokens that precede generation: [SUBTASK_START] for the subtask, or
    [SUBTASK_START, batch subtask..., FAST_START] (subtask part only if trained with it) for FAST."""
    b, dev = batch.batch_size, batch.text_tokens.device
    empty = torch.zeros(b, 0, dtype=torch.long, device=dev)
    empty_mask = torch.zeros(b, 0, dtype=torch.bool, device=dev)
    if target == "subtask":
        seed_batch = dataclasses.replace(batch, subtask_tokens=empty, subtask_mask=empty_mask)
        return model.lm_suffix_tokens(seed_batch, prefix, True, False)[0]
    seed_batch = dataclasses.replace(batch, fast_tokens=empty, fast_mask=empty_mask)
    return model.lm_suffix_tokens(seed_batch, prefix, model.subtask_in_sequence, True, fast_end=False)[0]


def greedy_decode(model, batch: Batch, target: str, max_len: int, eos_id: int | None, use_cache: bool):
    """Greedy generation restricted to the target's id range (FAST: FAST ids + FAST_END). Returns
    (ids [B, max_len] in the target's own id space: text ids for "subtask", FAST-local ids for
    "fast", FAST_END = model.fast_end_local; mask [B, max_len], False after the first eos_id).
    With eos_id, generation stops once every row has emitted it (the rest is eos_id, masked)."""

    cfg = model.cfg
    lo, hi = ((0, cfg.text_vocab_size) if target == "subtask"
              else (model.fast_offset, model.fast_end_id + 1))
    local = 0 if target == "subtask" else model.fast_offset
    if use_cache:
        prefix, _, cache = encode_prefix(model, batch)
        context = prefix
    else:
        prefix = model.prefix_tokens(batch)
    seq = _seed_tokens(model, batch, prefix, target)  # tokens not yet run (cached) / all suffix tokens
    generated = []
    finished = torch.zeros(batch.batch_size, dtype=torch.bool, device=prefix.x.device)
    for _ in range(max_len):
        if use_cache:
            cache, hidden = _extend_cache(model, cache, context, seq)
            context = Tokens.cat([context, seq])
        else:
            full = Tokens.cat([prefix, seq])
            layout = AttentionLayout.from_kinds(full.kind, full.valid)
            hidden, _, _ = run_shared_layers(model.backbone, None, Stream(full.x, full.positions), None,
                                             model.shared_attention(layout, None))
        logits = model.logits(hidden[:, -1:])[:, 0, lo:hi]
        next_id = logits.argmax(dim=-1) + lo
        generated.append(next_id - local)
        if eos_id is not None:
            finished = finished | (generated[-1] == eos_id)
            if bool(finished.all()):
                break
        last = seq if use_cache else full
        new = Tokens(model._embed_ids(next_id[:, None]), torch.ones_like(next_id[:, None], dtype=torch.bool),
                     last.kind[:, -1:], last.positions[:, -1:] + 1)
        seq = new if use_cache else Tokens.cat([seq, new])
    ids = torch.stack(generated, dim=1)
    if ids.shape[1] < max_len:  # stopped early: every row has emitted eos
        ids = torch.cat([ids, ids.new_full((ids.shape[0], max_len - ids.shape[1]), eos_id)], dim=1)
    mask = torch.ones_like(ids, dtype=torch.bool)
    if eos_id is not None:
        # valid up to and including the first eos
        seen_eos = torch.cumsum((ids == eos_id).long(), dim=1)
        mask = (seen_eos - (ids == eos_id).long()) == 0
    return ids, mask


def decode_fast(model, tokens, fast_tokenizer, horizon: int | None, dim: int | None):
    """FAST-local ids up to the first FAST_END (it and what follows are dropped) -> actions."""
    ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    if model.fast_end_local in ids:
        ids = ids[:ids.index(model.fast_end_local)]
    kept = [int(i) for i in ids if 0 <= int(i) < model.cfg.fast_vocab_size]
    if len(kept) != len(ids):
        logger.warning("decode_fast: dropped %d of %d ids outside the FAST vocabulary [0, %d)",
                       len(ids) - len(kept), len(ids), model.cfg.fast_vocab_size)
    return fast_tokenizer.decode(kept, horizon or model.cfg.chunk_length, dim or model.cfg.action_dim)


def embed_prefix(model, batch: Batch) -> torch.Tensor:
    prefix, hidden, _ = encode_prefix(model, batch)
    normed, _ = model.backbone.norm(hidden)
    weights = prefix.valid.to(torch.float32)[:, :, None]
    return (normed.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
