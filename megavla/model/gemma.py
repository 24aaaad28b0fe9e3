"""Gemma-style decoder layers and the layer-by-layer shared attention of backbone and action expert.

Math matches Hugging Face ``GemmaDecoderLayer`` (Gemma 1 / PaliGemma): RMSNorm ``x * (1 + w)``
(eps 1e-6), q/k/v/o projections without bias, rotate-half RoPE, GQA/MQA, softmax scale
head_dim^-0.5, GeGLU MLP ``down(gelu_tanh(gate(x)) * up(x))``. The action expert uses the same layer
with its own (narrower) width and, for pi0.5, adaptive RMSNorm (scale, shift, gate from the flow-time
condition; gate on the residual branch, zero-initialized as in openpi).

Backbone and expert share attention: per layer, each token computes Q/K/V with its own stream's
weights, and the queries of both streams attend over the concatenated keys. The query rows are
computed in two blocks (backbone rows, expert rows); softmax is per row, so this equals one joint
attention, and it lets knowledge insulation hand the expert rows a *detached* copy of the backbone
K/V (no flow-loss gradient into the backbone) and lets inference cache the backbone K/V.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megavla.kernels import AttentionLayout, ada_rms_norm, apply_rope, attention, geglu, rms_norm

RMS_EPS = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, impl: str = "auto") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))  # Gemma: (1 + w), zero-init = identity scale
        self.impl = impl

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        return rms_norm(x, self.weight, RMS_EPS, impl=self.impl), None


class AdaRMSNorm(nn.Module):
    """pi0.5 adaptive RMSNorm: (scale, shift, gate) = dense(cond); returns (normed, gate)."""

    def __init__(self, dim: int, cond_dim: int, with_gate: bool = True, impl: str = "auto") -> None:
        super().__init__()
        self.with_gate = with_gate
        self.dense = nn.Linear(cond_dim, dim * (3 if with_gate else 2))
        nn.init.zeros_(self.dense.weight)  # starts as plain RMSNorm with a closed gate (adaLN-zero)
        nn.init.zeros_(self.dense.bias)
        self.dense._zero_init = True  # VLA's weight init keeps (re-applies) the zeros
        self.impl = impl

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        if cond is None:
            raise ValueError("AdaRMSNorm needs the flow-time condition (cond [B, cond_dim])")
        parts = self.dense(cond).chunk(3 if self.with_gate else 2, dim=-1)
        normed = ada_rms_norm(x, parts[0], parts[1], RMS_EPS, impl=self.impl)
        return normed, (parts[2][:, None, :] if self.with_gate else None)


class TiedEmbedding(nn.Embedding):
    """Token embedding that is also the tied output head: ``emb(ids)`` -> embeddings,
    ``emb(hidden, as_head=True)`` -> logits. The head goes through ``forward`` (not ``emb.weight``
    read from outside) so DeepSpeed ZeRO-3's gather hooks see the weight being used."""

    def forward(self, x: torch.Tensor, as_head: bool = False) -> torch.Tensor:
        return x @ self.weight.t() if as_head else super().forward(x)


class GemmaAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(width, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(width, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(width, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, width, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, theta: float, impl: str):
        """x [B, L, W] -> q [B, H, L, D], k/v [B, Hkv, L, D] with RoPE applied to q and k."""
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, positions, theta, impl=impl), apply_rope(k, positions, theta, impl=impl), v


class GemmaMLP(nn.Module):
    def __init__(self, width: int, mlp_dim: int, impl: str = "auto") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, mlp_dim, bias=False)
        self.up_proj = nn.Linear(width, mlp_dim, bias=False)
        self.down_proj = nn.Linear(mlp_dim, width, bias=False)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x), impl=self.impl))


class GemmaLayer(nn.Module):
    def __init__(self, width: int, mlp_dim: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 cond_dim: int | None = None, impl: str = "auto") -> None:
        super().__init__()
        def norm() -> nn.Module:
            return RMSNorm(width, impl) if cond_dim is None else AdaRMSNorm(width, cond_dim, True, impl)
        self.input_layernorm = norm()
        self.self_attn = GemmaAttention(width, num_heads, num_kv_heads, head_dim)
        self.post_attention_layernorm = norm()
        self.mlp = GemmaMLP(width, mlp_dim, impl)


class GemmaStack(nn.Module):
    """Decoder layers + final norm of one stream (backbone or expert)."""

    def __init__(self, width: int, depth: int, mlp_dim: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, cond_dim: int | None = None, impl: str = "auto") -> None:
        super().__init__()
        self.width = width
        self.layers = nn.ModuleList(GemmaLayer(width, mlp_dim, num_heads, num_kv_heads, head_dim, cond_dim, impl)
                                    for _ in range(depth))
        self.norm = RMSNorm(width, impl) if cond_dim is None else AdaRMSNorm(width, cond_dim, False, impl)


@dataclass
class Stream:
    """One stream's tokens entering the layers: hidden x [B, L, W], RoPE positions [B, L],
    flow-time condition [B, cond_dim] (expert with adaRMS) or None."""
    x: torch.Tensor
    positions: torch.Tensor
    cond: torch.Tensor | None = None


@dataclass
class SharedAttention:
    """What the layers need besides the streams: the two query-row layouts, per-layer cached backbone
    K/V (keys that precede this call's backbone tokens), and switches."""
    backbone_layout: AttentionLayout | None  # backbone queries x (cache + backbone keys)
    expert_layout: AttentionLayout | None    # expert queries x (cache + backbone + expert keys)
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    detach_backbone_kv_for_expert: bool = True
    rope_theta: float = 10000.0
    impl: str = "auto"
    attention_impl: str = "auto"
    scale: float | None = None


def _gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + (y if gate is None else y * gate)


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    b, h, length, d = o.shape
    return o.transpose(1, 2).reshape(b, length, h * d)


def shared_layer(bb_layer: GemmaLayer | None, ex_layer: GemmaLayer | None, bb: Stream | None,
                 ex: Stream | None, ctx: SharedAttention, layer_index: int):
    """One decoder layer over both streams. Returns (bb_x, ex_x, (k, v) of the backbone tokens)."""
    bb_kv = None
    if bb is not None:
        h, bb_gate = bb_layer.input_layernorm(bb.x, bb.cond)
        q_b, k_b, v_b = bb_layer.self_attn.qkv(h, bb.positions, ctx.rope_theta, ctx.impl)
        bb_kv = (k_b, v_b)
    if ex is not None:
        h, ex_gate = ex_layer.input_layernorm(ex.x, ex.cond)
        q_e, k_e, v_e = ex_layer.self_attn.qkv(h, ex.positions, ctx.rope_theta, ctx.impl)

    # keys visible to this call: cached backbone keys, then this call's backbone keys
    k_parts, v_parts = [], []
    if ctx.cache is not None:
        k_parts.append(ctx.cache[layer_index][0])
        v_parts.append(ctx.cache[layer_index][1])
    if bb_kv is not None:
        k_parts.append(bb_kv[0])
        v_parts.append(bb_kv[1])

    bb_out = ex_out = None
    if bb is not None:
        k_all, v_all = torch.cat(k_parts, dim=2), torch.cat(v_parts, dim=2)
        o = attention(q_b, k_all, v_all, ctx.backbone_layout, impl=ctx.attention_impl, scale=ctx.scale)
        x = _gated(bb.x, bb_layer.self_attn.o_proj(_merge_heads(o)), bb_gate)
        h, bb_gate = bb_layer.post_attention_layernorm(x, bb.cond)
        bb_out = _gated(x, bb_layer.mlp(h), bb_gate)
    if ex is not None:
        if ctx.detach_backbone_kv_for_expert:
            k_parts, v_parts = [k.detach() for k in k_parts], [v.detach() for v in v_parts]
        k_all = torch.cat(k_parts + [k_e], dim=2)
        v_all = torch.cat(v_parts + [v_e], dim=2)
        o = attention(q_e, k_all, v_all, ctx.expert_layout, impl=ctx.attention_impl, scale=ctx.scale)
        x = _gated(ex.x, ex_layer.self_attn.o_proj(_merge_heads(o)), ex_gate)
        h, ex_gate = ex_layer.post_attention_layernorm(x, ex.cond)
        ex_out = _gated(x, ex_layer.mlp(h), ex_gate)
    return bb_out, ex_out, bb_kv


def run_shared_layers(backbone: GemmaStack | None, expert: GemmaStack | None, bb: Stream | None,
                      ex: Stream | None, ctx: SharedAttention, checkpoint: bool = False):
    """All layers. Returns (backbone hidden before the final norm or None, expert hidden before the
    final norm or None, per-layer backbone (k, v) of this call's backbone tokens)."""
    depth = len((backbone or expert).layers)
    # train.compile=blocks (megavla/model/compile.py) sets `layer_call` on the stacks: one compiled
    # (checkpoint-inside, as torchtitan) layer function shared by every layer; None = eager.
    compiled = getattr(backbone if backbone is not None else expert, "layer_call", None)
    kv_per_layer = []
    bb_x = bb.x if bb is not None else None
    ex_x = ex.x if ex is not None else None
    for i in range(depth):
        bb_i = Stream(bb_x, bb.positions, bb.cond) if bb is not None else None
        ex_i = Stream(ex_x, ex.positions, ex.cond) if ex is not None else None
        bb_layer = backbone.layers[i] if backbone is not None else None
        ex_layer = expert.layers[i] if expert is not None else None
        if compiled is not None:
            bb_x, ex_x, kv = compiled(bb_layer, ex_layer, bb_i, ex_i, ctx, i, checkpoint and torch.is_grad_enabled())
        elif checkpoint and torch.is_grad_enabled():
            bb_x, ex_x, kv = torch.utils.checkpoint.checkpoint(
                shared_layer, bb_layer, ex_layer, bb_i, ex_i, ctx, i, use_reentrant=False)
        else:
            bb_x, ex_x, kv = shared_layer(bb_layer, ex_layer, bb_i, ex_i, ctx, i)
        kv_per_layer.append(kv)
    return bb_x, ex_x, kv_per_layer
