"""Inference paths of the VLA: flow sampling with a prefix KV cache, greedy decoding, prefix embedding.

The prefix (cameras, text, state) is encoded once; its per-layer K/V are the cache. Flow sampling
then runs only the expert for each Euler step (t = 1 -> 0); greedy decoding appends one LM-suffix
token per step. ``use_cache=False`` recomputes everything each step (the reference the tests compare
the cached path against).
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from megavla.batch import Batch
from megavla.kernels import AttentionLayout

from .gemma import Stream, run_shared_layers

logger = logging.getLogger(__name__)


def encode_prefix(model, batch: Batch):
    """-> (prefix Tokens, backbone hidden of the prefix before the final norm, per-layer (k, v))."""
    prefix = model.prefix_tokens(batch)
    layout = AttentionLayout.from_kinds(prefix.kind, prefix.valid)
    hidden, _, kv = run_shared_layers(model.backbone, None, Stream(prefix.x, prefix.positions), None,
                                      model.shared_attention(layout, None))
    return prefix, hidden, kv


def sample_actions(model, batch: Batch, num_steps: int, noise: torch.Tensor | None, use_cache: bool):
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
    if use_cache:
        prefix, _, cache = encode_prefix(model, batch)
    else:
        prefix = model.prefix_tokens(batch)
    for step in range(num_steps):
        t_value = 1.0 + step * dt
        t = torch.full((shape[0],), t_value, device=dev)
        x = torch.where(used, x, t_value * noise)
        ex, ex_kind, ex_valid = model.expert_tokens(x, t, batch, prefix)
        ex_layout = AttentionLayout.from_kinds(torch.cat([prefix.kind, ex_kind], 1),
                                               torch.cat([prefix.valid, ex_valid], 1), ex.x.shape[1])
        if use_cache:
            ctx = model.shared_attention(None, ex_layout, cache)
            _, ex_h, _ = run_shared_layers(None, model.expert.stack, None, ex, ctx)
        else:
            bb_layout = AttentionLayout.from_kinds(prefix.kind, prefix.valid)
            ctx = model.shared_attention(bb_layout, ex_layout)
            _, ex_h, _ = run_shared_layers(model.backbone, model.expert.stack,
                                           Stream(prefix.x, prefix.positions), ex, ctx)
        x = x + dt * model.expert.velocity(ex_h, ex.cond, cfg.chunk_length)
    return torch.where(used, x, torch.zeros_like(x))


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
    return model.lm_suffix_tokens(seed_batch, prefix, model.cfg.subtask_weight > 0, True)[0]


def greedy_decode(model, batch: Batch, target: str, max_len: int, eos_id: int | None, use_cache: bool):
    """Greedy generation restricted to the target's id range. Returns (ids [B, max_len] in the
    target's own id space: text ids for "subtask", FAST-local ids for "fast"; mask [B, max_len],
    False after the first eos_id)."""
    from .vla import Tokens  # local import: vla imports this module

    cfg = model.cfg
    lo, hi = (0, cfg.text_vocab_size) if target == "subtask" else (model.fast_offset, model.fast_offset + cfg.fast_vocab_size)
    if use_cache:
        prefix, _, cache = encode_prefix(model, batch)
        cache_kind, cache_valid = prefix.kind, prefix.valid
    else:
        prefix = model.prefix_tokens(batch)
    seq = _seed_tokens(model, batch, prefix, target)  # tokens not yet run (cached) / all suffix tokens
    generated = []
    for _ in range(max_len):
        if use_cache:
            kind, valid = torch.cat([cache_kind, seq.kind], 1), torch.cat([cache_valid, seq.valid], 1)
            layout = AttentionLayout.from_kinds(kind, valid, seq.x.shape[1])
            hidden, _, kv = run_shared_layers(model.backbone, None, Stream(seq.x, seq.positions), None,
                                              model.shared_attention(layout, None, cache))
            cache = [(torch.cat([ck, k], 2), torch.cat([cv, v], 2)) for (ck, cv), (k, v) in zip(cache, kv)]
            cache_kind, cache_valid = kind, valid
        else:
            full = Tokens.cat([prefix, seq])
            layout = AttentionLayout.from_kinds(full.kind, full.valid)
            hidden, _, _ = run_shared_layers(model.backbone, None, Stream(full.x, full.positions), None,
                                             model.shared_attention(layout, None))
        logits = model.logits(hidden[:, -1:])[:, 0, lo:hi]
        next_id = logits.argmax(dim=-1) + lo
        generated.append(next_id - (0 if target == "subtask" else model.fast_offset))
        last = seq if use_cache else full
        new = Tokens(model._embed_ids(next_id[:, None]), torch.ones_like(next_id[:, None], dtype=torch.bool),
                     last.kind[:, -1:], last.positions[:, -1:] + 1)
        seq = new if use_cache else Tokens.cat([seq, new])
    ids = torch.stack(generated, dim=1)
    mask = torch.ones_like(ids, dtype=torch.bool)
    if eos_id is not None:
        # valid up to and including the first eos
        seen_eos = torch.cumsum((ids == eos_id).long(), dim=1)
        mask = (seen_eos - (ids == eos_id).long()) == 0
    return ids, mask


def decode_fast(model, tokens, fast_tokenizer, horizon: int | None, dim: int | None):
    ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
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
