"""The pi0 block mask and the attention backends: every backend equals the eager reference.

CPU: SDPA forward + backward, FlexAttention forward (its backward is GPU-only), and the flash-attn
decomposition with an exact stand-in for flash_attn_varlen_func. GPU (@gpu): all of them, bf16 too.
"""
from __future__ import annotations

import pytest
import torch

from megavla.kernels import (EXPERT, EXPERT_STATE, LM_SUFFIX, PREFIX, SUBTASK, AttentionLayout, attention,
                             choose_attention_impl)
from megavla.kernels.attention import attention_flash

KINDS = [[PREFIX] * 4 + [LM_SUFFIX] * 3 + [EXPERT] * 3,             # pi0.5, actions conditioned on the instruction
         [PREFIX] * 3 + [SUBTASK] * 2 + [LM_SUFFIX] * 2 + [EXPERT] * 3,  # pi0.5, conditioned on the subtask
         [PREFIX] * 5 + [EXPERT_STATE] + [EXPERT] * 4,                 # pi0: continuous state token
         [PREFIX] * 6 + [EXPERT] * 4]


def make_layout(num_queries=None, device="cpu"):
    kind = torch.tensor(KINDS, device=device)
    valid = torch.ones_like(kind, dtype=torch.bool)
    valid[0, 3] = False  # a padded prefix token
    valid[0, 6] = False  # a padded LM token (right-padded FAST tokens)
    valid[1, 4] = False  # a padded subtask token
    valid[3, 9] = False  # a padded action token
    return AttentionLayout.from_kinds(kind, valid, num_queries=num_queries)


def rule_mask(layout: AttentionLayout) -> torch.Tensor:
    """The documented visibility rule, evaluated token by token in plain Python."""
    b, length = layout.q_ar.shape
    s = layout.k_ar.shape[1]
    out = torch.zeros(b, length, s, dtype=torch.bool)
    for bi in range(b):
        for i in range(length):
            for j in range(s):
                out[bi, i, j] = bool(layout.q_valid[bi, i]) and bool(layout.k_valid[bi, j]) \
                    and int(layout.k_ar[bi, j]) <= int(layout.q_ar[bi, i]) \
                    and not (int(layout.q_kind[bi, i]) in (EXPERT_STATE, EXPERT)
                             and int(layout.k_kind[bi, j]) == LM_SUFFIX)
    return out


def openpi_mask(input_mask: torch.Tensor, ar_mask: list[bool]) -> torch.Tensor:
    """openpi's make_attn_mask (pi0.py, from big_vision): key j visible to query i iff both are valid
    and cumsum(ar)[j] <= cumsum(ar)[i]."""
    cumsum = torch.cumsum(torch.tensor(ar_mask, dtype=torch.int64), dim=0).expand_as(input_mask)
    return (cumsum[:, None, :] <= cumsum[:, :, None]) & input_mask[:, None, :] & input_mask[:, :, None]


def naive_attention(q, k, v, mask, scale):
    """Row-by-row softmax over the visible keys only (zeros where none): independent of the backends."""
    groups = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q, dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                keys = mask[b, i].nonzero().squeeze(1)
                if keys.numel():
                    s = (k[b, h // groups, keys].double() @ q[b, h, i].double()) * scale
                    out[b, h, i] = torch.softmax(s, 0) @ v[b, h // groups, keys].double()
    return out


def test_from_kinds_gives_the_pi0_structure():
    layout = make_layout()
    assert layout.q_ar[0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 4, 4]
    assert layout.q_ar[1].tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 5, 5]
    assert layout.q_ar[2].tolist() == [0, 0, 0, 0, 0, 1, 2, 2, 2, 2]
    torch.testing.assert_close(layout.dense_mask(), rule_mask(layout))
    m0 = layout.dense_mask()[0]
    assert m0[:3, :3].all() and not m0[:4, 4:].any()            # prefix: bidirectional, sees only prefix
    assert m0[4, 4] and not m0[4, 5] and m0[5, 4] and m0[5, 5] and not m0[6].any()  # LM suffix: causal
    assert m0[7:, 7:].all() and not m0[7:, 4:7].any()            # expert: bidirectional, blind to LM tokens
    assert not m0[3].any() and not m0[:, 3].any()                # padding
    m1 = layout.dense_mask()[1]
    assert m1[7:, 3].all() and not m1[7:, 4].any()               # expert sees the valid subtask tokens
    assert not m1[7:, 5:7].any()                                 # ... but never the FAST tokens
    assert m1[5, 3] and m1[6, 3] and not m1[3, 5]                # FAST reads the subtask, causal
    m2 = layout.dense_mask()[2]
    assert m2[5, :6].all() and not m2[5, 6:].any()               # pi0 state token: blind to actions
    assert m2[6:, :].all()                                       # actions see prefix, state, each other


def test_masks_equal_openpis_make_attn_mask():
    """pi0 (openpi pi0.py embed_prefix/embed_suffix): prefix ar False, the state token ar True (own
    block), the first action token ar True, the others False. pi0.5: the same without the state token.
    Subtask conditioning: subtask tokens ar True each (causal), then the action block."""
    kind = torch.tensor(KINDS[1:])
    valid = torch.ones_like(kind, dtype=torch.bool)
    valid[0, 4] = False
    valid[1, 2] = False
    valid[2, 5] = False
    ours = AttentionLayout.from_kinds(kind, valid).dense_mask()
    pi0_ar = [False] * 5 + [True] + [True] + [False] * 3
    torch.testing.assert_close(ours[1:2], openpi_mask(valid[1:2], pi0_ar))
    pi05_ar = [False] * 6 + [True] + [False] * 3
    torch.testing.assert_close(ours[2:3], openpi_mask(valid[2:3], pi05_ar))
    # subtask conditioning: the FAST tokens are the one exception to the block rule (actions never
    # see them); with them removed the mask is openpi's rule with causal subtask tokens
    keep = torch.tensor([True] * 5 + [False] * 2 + [True] * 3)
    sub_ar = [False] * 3 + [True] * 2 + [True] + [False] * 2
    torch.testing.assert_close(ours[0:1][:, keep][:, :, keep], openpi_mask(valid[0:1, keep], sub_ar))


def test_kv_cache_layout_equals_the_matching_rows_of_the_full_mask():
    full, cached = make_layout(), make_layout(num_queries=3)
    torch.testing.assert_close(cached.dense_mask(), full.dense_mask()[:, -3:])


def test_from_kinds_rejects_unsorted_kinds():
    kind = torch.tensor([[PREFIX, EXPERT, LM_SUFFIX]])
    with pytest.raises(ValueError, match="non-decreasing"):
        AttentionLayout.from_kinds(kind, torch.ones_like(kind, dtype=torch.bool))
    kind = torch.tensor([[PREFIX, LM_SUFFIX, SUBTASK, EXPERT]])
    with pytest.raises(ValueError, match="non-decreasing"):
        AttentionLayout.from_kinds(kind, torch.ones_like(kind, dtype=torch.bool))


def test_layout_shape_mismatch_is_a_clear_error():
    t = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="q_valid"):
        AttentionLayout(t, t, torch.ones(2, 5, dtype=torch.bool), t, t, torch.ones(2, 4, dtype=torch.bool))


def qkv(hq, hkv, layout, d=16, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, length = layout.q_ar.shape
    s = layout.k_ar.shape[1]
    mk = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(b, hq, length, d), mk(b, hkv, s, d), mk(b, hkv, s, d)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
def test_eager_reference_equals_naive_softmax(hq, hkv):
    layout = make_layout()
    q, k, v = qkv(hq, hkv, layout)
    ref = naive_attention(q, k, v, rule_mask(layout), 0.25).float()
    torch.testing.assert_close(attention(q, k, v, layout, impl="eager", scale=0.25), ref, atol=1e-5, rtol=1e-5)
    assert attention(q, k, v, layout, impl="eager")[0, :, 3].abs().max() == 0  # padded query -> zeros


def fake_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
    """Exact stand-in for flash_attn_varlen_func (causal aligned bottom-right, GQA by head groups)."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for i in range(len(cu_q) - 1):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        qi = q[qs].transpose(0, 1)
        ki, vi = (t[ks].transpose(0, 1).repeat_interleave(groups, 0) for t in (k, v))
        s = qi @ ki.transpose(-1, -2) * softmax_scale
        if causal:
            nq, nk = qi.shape[1], ki.shape[1]
            allowed = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
            s = s.masked_fill(~allowed, float("-inf"))
        out[qs] = (torch.softmax(s, -1) @ vi).transpose(0, 1)
    return out


BACKENDS_CPU = ["sdpa", "flex", "flash"]


@pytest.mark.parametrize("num_queries", [None, 3, 5], ids=["full", "kv_cache_expert", "kv_cache_lm_expert"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_backend_forward_equals_eager_on_cpu(backend, hq, hkv, num_queries):
    layout = make_layout(num_queries)
    q, k, v = qkv(hq, hkv, layout)
    ref = attention(q, k, v, layout, impl="eager")
    if backend == "flash":
        out = attention_flash(q, k, v, layout, q.shape[-1] ** -0.5, varlen_fn=fake_flash_varlen)
    else:
        out = attention(q, k, v, layout, impl=backend)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1)], ids=["MHA", "MQA"])
def test_sdpa_backward_equals_eager_and_masked_rows_get_zero_gradient(hq, hkv):
    layout = make_layout()
    grads = {}
    for impl in ("eager", "sdpa"):
        q, k, v = (t.requires_grad_(True) for t in qkv(hq, hkv, layout))
        out = attention(q, k, v, layout, impl=impl)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
        grads[impl] = (out, q.grad, k.grad, v.grad)
    for got, want in zip(grads["sdpa"], grads["eager"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert grads["sdpa"][1][0, :, 3].abs().max() == 0  # the padded query row: no gradient
    assert grads["sdpa"][2][0, :, 3].abs().max() == 0  # the padded key: no gradient


def test_auto_picks_sdpa_on_cpu_and_rejects_unknown_impl():
    layout = make_layout()
    q, _, _ = qkv(2, 2, layout)
    assert choose_attention_impl(q, layout) == "sdpa"
    with pytest.raises(ValueError, match="model.attention"):
        attention(q, q, q, layout, impl="xformers")


def test_flash_needs_a_canonical_layout():
    layout = make_layout()
    generic = AttentionLayout(layout.q_ar, layout.q_kind, layout.q_valid, layout.k_ar, layout.k_kind, layout.k_valid)
    q, k, v = qkv(2, 2, layout)
    with pytest.raises(ValueError, match="from_kinds"):
        attention_flash(q, k, v, generic, 0.25, varlen_fn=fake_flash_varlen)


# ----------------------------------------------------------------------------- GPU, full shapes
def big_layout(device, batch=4, prefix=800, lm=0, expert=50, num_queries=None):
    kind = torch.tensor([PREFIX] * prefix + [LM_SUFFIX] * lm + [EXPERT] * expert, device=device).repeat(batch, 1)
    valid = torch.ones_like(kind, dtype=torch.bool)
    for b in range(batch):  # different amounts of prefix padding per sample
        valid[b, prefix - 37 * b: prefix] = False
    return AttentionLayout.from_kinds(kind, valid, num_queries=num_queries)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash"])
@pytest.mark.parametrize("lm", [0, 20], ids=["expert_only", "with_fast"])
def test_backend_fwd_bwd_equals_eager_on_gpu(backend, dtype, lm):
    from megavla.kernels.attention import _flash_attn_varlen_func
    if backend == "flash" and _flash_attn_varlen_func is None:
        pytest.skip("flash-attn not installed")
    if backend == "flash" and dtype == torch.float32:
        pytest.skip("flash-attn is fp16/bf16 only")
    layout = big_layout("cuda", lm=lm)
    results = {}
    for impl in ("eager", backend):
        q, k, v = (t.requires_grad_(True) for t in qkv(8, 1, layout, d=256, device="cuda", dtype=dtype))
        out = attention(q, k, v, layout, impl=impl)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out))
        results[impl] = (out, q.grad, k.grad, v.grad)
    # bf16: outputs 2e-2; gradients 5e-2 (dk/dv of the single KV head sum over 8 heads x 850 queries
    # of bf16 products); fp32: 2e-4 (TF32-free kernels, but different summation orders)
    for i, (got, want) in enumerate(zip(results[backend], results["eager"])):
        tol = 2e-4 if dtype == torch.float32 else 2e-2 if i == 0 else 5e-2
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
