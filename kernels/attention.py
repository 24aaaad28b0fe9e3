"""Attention under the pi0 / pi0.5 block mask, with flash-attn, FlexAttention, SDPA and eager backends.

Every token carries three attributes: an autoregressive level ``ar``, a ``kind`` and ``valid``.
Query i sees key j iff q_valid[i] & k_valid[j] & k_ar[j] <= q_ar[i]
& not (q_kind[i] in EXPERT_KINDS and k_kind[j] == LM_SUFFIX). Kinds, in sequence order:

* PREFIX (images, text, discrete state): one shared ar -> bidirectional.
* SUBTASK (the subtask segment when actions are conditioned on it): ar increments per token ->
  causal; the expert rows see it.
* LM_SUFFIX (FAST tokens; the subtask too when actions are not conditioned on it): causal; the
  expert rows never see it (the KI paper: actions must not read the discretized actions).
* EXPERT_STATE (pi0's continuous state token): its own block (openpi ``ar_mask=True`` on the state),
  so it does not see the noisy actions.
* EXPERT (action tokens): one block above everything else -> bidirectional among themselves.

This is openpi's ``make_attn_mask`` (cumulative ar, ``k_ar <= q_ar``) plus the one exception the
KI paper adds (actions blind to FAST tokens). All backends compute the same function; query rows
that see no key output zeros (never NaN), and their gradients are zero.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

PREFIX, SUBTASK, LM_SUFFIX, EXPERT_STATE, EXPERT = 0, 1, 2, 3, 4
CAUSAL_KINDS = (SUBTASK, LM_SUFFIX)       # ar steps at every token
EXPERT_KINDS = (EXPERT_STATE, EXPERT)     # expert-stream queries: blind to LM_SUFFIX keys
ATTENTION_IMPLS = ("auto", "flash", "flex", "sdpa", "eager")

try:  # optional: only with a CUDA build of flash-attn
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func
except Exception:  # pragma: no cover - not installable on CPU boxes
    _flash_attn_varlen_func = None


def _any_on_host(bad: torch.Tensor) -> bool:
    """bad.any() for a validity check without a device sync: read on the host for a CPU tensor; on
    a GPU the check is queued (torch._assert_async) and fails at a later kernel launch instead; inside
    a compiled graph (train.compile) it is an assert op of the graph, not a host read (a graph break)."""
    if bad.device.type == "cpu" and not torch.compiler.is_compiling():
        return bool(bad.numpy().any())
    torch._assert_async(~bad.any(), "AttentionLayout.from_kinds: kinds must be non-decreasing")
    return False


@dataclass
class AttentionLayout:
    """Per-token attributes: queries [B, L], keys [B, S]. Build with `from_kinds` when you can."""

    q_ar: torch.Tensor
    q_kind: torch.Tensor
    q_valid: torch.Tensor
    k_ar: torch.Tensor
    k_kind: torch.Tensor
    k_valid: torch.Tensor
    # True when built by `from_kinds` (kinds non-decreasing along the sequence,
    # ar derived from kinds, queries = the last L keys): the flash backend can then decompose the mask.
    canonical: bool = False
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        b, length = self.q_ar.shape
        s = self.k_ar.shape[1]
        for name, shape in (("q_kind", (b, length)), ("q_valid", (b, length)), ("k_ar", (b, s)),
                            ("k_kind", (b, s)), ("k_valid", (b, s))):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"AttentionLayout.{name} {tuple(getattr(self, name).shape)} must be {shape}")
        if self.q_valid.dtype != torch.bool or self.k_valid.dtype != torch.bool:
            raise TypeError("AttentionLayout: q_valid and k_valid must be bool tensors")

    @classmethod
    def from_kinds(cls, kind: torch.Tensor, valid: torch.Tensor, num_queries: int | None = None) -> "AttentionLayout":
        """Layout for a sequence [B, N] ordered PREFIX..., SUBTASK..., LM_SUFFIX..., EXPERT_STATE...,
        EXPERT... (any segment may be empty; padding tokens keep their segment's kind and have
        valid=False). Queries are all N tokens, or with a KV cache the last `num_queries` tokens
        while the keys are all N."""
        if kind.shape != valid.shape or kind.dim() != 2:
            raise ValueError(f"AttentionLayout.from_kinds: kind {tuple(kind.shape)} and valid "
                             f"{tuple(valid.shape)} must both be [B, N]")
        if _any_on_host(kind[:, 1:] < kind[:, :-1]):
            raise ValueError("AttentionLayout.from_kinds: kinds must be non-decreasing along each sequence "
                             "(PREFIX, SUBTASK, LM_SUFFIX, EXPERT_STATE, EXPERT); give padding its "
                             "segment's kind")
        prev = torch.cat([torch.full_like(kind[:, :1], PREFIX), kind[:, :-1]], dim=1)
        # causal kinds step at every token; an expert block steps once, at its first token
        step = _is_any(kind, CAUSAL_KINDS) | (_is_any(kind, EXPERT_KINDS) & (prev != kind))
        ar = torch.cumsum(step.to(torch.int32), dim=1).to(torch.int32)
        n = kind.shape[1] if num_queries is None else num_queries
        if not 0 < n <= kind.shape[1]:
            raise ValueError(f"AttentionLayout.from_kinds: num_queries={num_queries} must be in [1, {kind.shape[1]}]")
        q = slice(kind.shape[1] - n, None)
        return cls(ar[:, q], kind[:, q], valid[:, q], ar, kind, valid, canonical=True)

    def dense_mask(self) -> torch.Tensor:
        """Bool [B, L, S]: True where query i may attend to key j."""
        if "dense" not in self._cache:
            qk, kk = self.q_kind[:, :, None], self.k_kind[:, None, :]
            self._cache["dense"] = (self.q_valid[:, :, None] & self.k_valid[:, None, :]
                                    & (self.k_ar[:, None, :] <= self.q_ar[:, :, None])
                                    & ~(_is_any(qk, EXPERT_KINDS) & (kk == LM_SUFFIX)))
        return self._cache["dense"]

    def row_has_key(self) -> torch.Tensor:
        """Bool [B, L]: query rows that see at least one key (the others output zeros)."""
        if "has_key" not in self._cache:
            self._cache["has_key"] = self.dense_mask().any(dim=-1)
        return self._cache["has_key"]


def _is_any(kind: torch.Tensor, kinds: tuple[int, ...]) -> torch.Tensor:
    out = kind == kinds[0]
    for k in kinds[1:]:
        out = out | (kind == k)
    return out


# ----------------------------------------------------------------------------- backends
def _check_qkv(q, k, v, layout: AttentionLayout) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention: q {tuple(q.shape)} must be [B, Hq, L, D], k and v "
                         f"{tuple(k.shape)}/{tuple(v.shape)} equal [B, Hkv, S, D]")
    b, hq, length, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]:
        raise ValueError(f"attention: k {tuple(k.shape)} must share B and D with q {tuple(q.shape)} and "
                         f"Hq={hq} must be a multiple of Hkv={k.shape[1]}")
    if tuple(layout.q_ar.shape) != (b, length) or tuple(layout.k_ar.shape) != (b, k.shape[2]):
        raise ValueError(f"attention: layout is for queries {tuple(layout.q_ar.shape)} / keys "
                         f"{tuple(layout.k_ar.shape)} but q/k give ({b}, {length}) / ({b}, {k.shape[2]})")


def attention_eager(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """The reference: explicit fp32 softmax(q k^T * scale + mask) v."""
    groups = q.shape[1] // k.shape[1]
    kf = k.to(torch.float32).repeat_interleave(groups, dim=1)
    vf = v.to(torch.float32).repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.to(torch.float32), kf.transpose(-1, -2)) * scale
    # finite fill, not -inf: a row with no key then gets a uniform (finite) softmax that is zeroed
    # below, so neither the output nor the gradient sees a NaN
    scores = scores.masked_fill(~layout.dense_mask()[:, None], torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).masked_fill(~layout.row_has_key()[:, None, :, None], 0.0)
    return torch.matmul(probs, vf).to(q.dtype)


def attention_sdpa(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    has_key = layout.row_has_key()
    # SDPA returns NaN for a fully masked row: let such rows see every key, then zero them
    mask = layout.dense_mask() | ~has_key[:, :, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.masked_fill(~has_key[:, None, :, None], 0.0)


_compiled_flex = None


def _flex_block_mask(layout: AttentionLayout, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    key = ("flex_block_mask", str(device))
    if key not in layout._cache:
        qa, qk, qv = layout.q_ar, layout.q_kind, layout.q_valid
        ka, kk, kv = layout.k_ar, layout.k_kind, layout.k_valid

        def mask_mod(b, h, qi, ki):  # the same rule as dense_mask, per element
            q_expert = (qk[b, qi] == EXPERT) | (qk[b, qi] == EXPERT_STATE)
            return qv[b, qi] & kv[b, ki] & (ka[b, ki] <= qa[b, qi]) & ~(q_expert & (kk[b, ki] == LM_SUFFIX))

        b, length = qa.shape
        layout._cache[key] = create_block_mask(mask_mod, b, None, length, ka.shape[1], device=device)
    return layout._cache[key]


# torch.compile(flex_attention, dynamic=False) recompiles for every new sequence length and falls
# back to the unfused path after the recompile limit; prompts padded to the batch maximum vary in
# length, so flex inputs are padded (with invalid tokens) to a multiple of this.
FLEX_PAD_MULTIPLE = 128


def _padded_layout(layout: AttentionLayout, length: int, s: int) -> AttentionLayout:
    key = ("flex_padded", length, s)
    if key not in layout._cache:
        def pad(t, n):
            return F.pad(t, (0, n - t.shape[1]), value=0)

        layout._cache[key] = AttentionLayout(pad(layout.q_ar, length), pad(layout.q_kind, length),
                                             pad(layout.q_valid, length), pad(layout.k_ar, s),
                                             pad(layout.k_kind, s), pad(layout.k_valid, s))
    return layout._cache[key]


def attention_flex(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """FlexAttention with a block mask from the token attributes (backward needs CUDA)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    fn = flex_attention
    if q.is_cuda:  # uncompiled flex materializes the full score matrix; compiled it is a fused kernel
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    length, s = q.shape[2], k.shape[2]
    length_p, s_p = (-(-n // FLEX_PAD_MULTIPLE) * FLEX_PAD_MULTIPLE for n in (length, s))
    padded = _padded_layout(layout, length_p, s_p) if (length_p, s_p) != (length, s) else layout
    qp = F.pad(q, (0, 0, 0, length_p - length))
    kp, vp = (F.pad(t, (0, 0, 0, s_p - s)) for t in (k, v))
    out = fn(qp, kp, vp, block_mask=_flex_block_mask(padded, q.device), scale=scale,
             enable_gqa=q.shape[1] != k.shape[1])[:, :, :length]
    return out.masked_fill(~layout.row_has_key()[:, None, :, None], 0.0)


def _pack(x: torch.Tensor, select: torch.Tensor):
    """x [B, H, N, D], select bool [B, N] -> packed [n, H, D], flat index, cu_seqlens int32, max len."""
    counts = select.sum(dim=1)
    cu = torch.zeros(select.shape[0] + 1, dtype=torch.int32, device=x.device)
    cu[1:] = torch.cumsum(counts, dim=0)
    flat = select.reshape(-1).nonzero().squeeze(1)
    packed = x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3]).index_select(0, flat)
    return packed, flat, cu, int(counts.max().item()) if counts.numel() else 0


def attention_flash(q, k, v, layout: AttentionLayout, scale: float, varlen_fn=None) -> torch.Tensor:
    """flash-attn varlen, one call per query group (the mask decomposes for a canonical layout):
    PREFIX queries -> prefix keys (bidirectional); SUBTASK + LM_SUFFIX queries -> prefix + subtask
    + LM keys, causal aligned bottom-right (they are the last of those keys); EXPERT_STATE queries
    -> prefix + subtask + state keys; EXPERT queries -> prefix + subtask + state + expert keys
    (bidirectional).
    `varlen_fn` (flash_attn_varlen_func's signature) is injectable so the decomposition is testable on CPU."""
    fn = varlen_fn or _flash_attn_varlen_func
    if fn is None:
        raise RuntimeError("attention(impl='flash'): flash-attn is not installed (pip install 'megavla[gpu]')")
    if not layout.canonical:
        raise ValueError("attention(impl='flash') needs a layout built by AttentionLayout.from_kinds")
    b, hq, length, d = q.shape
    out = q.new_zeros(b * length, hq, d)
    for q_kinds, k_kinds, causal in (((PREFIX,), (PREFIX,), False),
                                     (CAUSAL_KINDS, (PREFIX, SUBTASK, LM_SUFFIX), True),
                                     ((EXPERT_STATE,), (PREFIX, SUBTASK, EXPERT_STATE), False),
                                     ((EXPERT,), (PREFIX, SUBTASK, EXPERT_STATE, EXPERT), False)):
        q_sel = layout.q_valid & _is_any(layout.q_kind, q_kinds)
        k_sel = layout.k_valid & _is_any(layout.k_kind, k_kinds)
        qp, q_flat, cu_q, max_q = _pack(q, q_sel)
        if qp.shape[0] == 0:
            continue
        kp, _, cu_k, max_k = _pack(k, k_sel)
        vp, _, _, _ = _pack(v, k_sel)
        res = fn(qp, kp, vp, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal)
        out = out.index_copy(0, q_flat, res.to(out.dtype))
    out = out.reshape(b, length, hq, d).transpose(1, 2)
    return out.masked_fill(~layout.row_has_key()[:, None, :, None], 0.0)


_BACKENDS = {"eager": attention_eager, "sdpa": attention_sdpa, "flex": attention_flex, "flash": attention_flash}


def choose_attention_impl(q: torch.Tensor, layout: AttentionLayout, impl: str = "auto") -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention: impl={impl!r} is not one of {ATTENTION_IMPLS} (config field model.attention)")
    if impl != "auto":
        return impl
    if q.is_cuda and _flash_attn_varlen_func is not None and layout.canonical and q.dtype in (torch.float16, torch.bfloat16):
        return "flash"
    if q.is_cuda:
        return "flex"
    return "sdpa"  # CPU: FlexAttention has no CPU backward; SDPA with a bool mask does


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
              impl: str = "auto", scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked by `layout`) v. q [B, Hq, L, D], k/v [B, Hkv, S, D] -> [B, Hq, L, D].
    scale defaults to D ** -0.5."""
    _check_qkv(q, k, v, layout)
    chosen = choose_attention_impl(q, layout, impl)
    return _BACKENDS[chosen](q, k, v, layout, q.shape[-1] ** -0.5 if scale is None else scale)
