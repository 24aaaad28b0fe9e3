"""Rotary position embedding, rotate-half form as in Gemma / HF transformers.

For x [B, H, L, D] and integer positions [B, L]: with inv_freq_i = theta^(-2i/D) (i < D/2),
angle = position * inv_freq, cos/sin repeated over both halves, y = x * cos + rotate_half(x) * sin
where rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]). Computed in fp32, cast back to x's dtype.
"""
from __future__ import annotations

import torch

from .dispatch import kernels_defined, resolve_impl


def rope_inv_freq(head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


# ----------------------------------------------------------------------------- torch reference
def apply_rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    d = x.shape[-1]
    angle = positions.to(torch.float32)[:, :, None] * rope_inv_freq(d, theta, x.device)  # [B, L, D/2]
    cos = torch.cat([angle.cos(), angle.cos()], dim=-1)[:, None]  # [B, 1, L, D]
    sin = torch.cat([angle.sin(), angle.sin()], dim=-1)[:, None]
    xf = x.to(torch.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


# ----------------------------------------------------------------------------- public API
def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0, impl: str = "auto") -> torch.Tensor:
    """Rotate-half RoPE: x [B, H, L, D] (D even), positions [B, L] integer -> [B, H, L, D]."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rope: x {tuple(x.shape)} must be [B, H, L, D] with even D")
    if tuple(positions.shape) != (x.shape[0], x.shape[2]) or positions.is_floating_point():
        raise ValueError(f"apply_rope: positions {tuple(positions.shape)} {positions.dtype} must be integer "
                         f"[B, L]=({x.shape[0]}, {x.shape[2]})")
    if resolve_impl(impl, x, positions, op="apply_rope") == "triton":
        return _triton_apply_rope(x, positions, theta)
    return apply_rope_reference(x, positions, theta)


# ----------------------------------------------------------------------------- Triton
if kernels_defined():
    from .dispatch import tl, triton

    @triton.jit
    def _rope_kernel(X, Y, POS, INV_FREQ, L, NH, HALF, sxb, sxh, sxl, syb, syh, syl, spb, spl,
                     SIN_SIGN: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_HALF: tl.constexpr):
        """One program per (batch, run of positions): cos/sin computed once per position and applied to
        every head. SIN_SIGN=-1 applies the inverse rotation, which is the backward pass."""
        b = tl.program_id(0)
        heads = tl.arange(0, BLOCK_H)[:, None]
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        m = (heads < NH) & (cols < HALF)
        inv_freq = tl.load(INV_FREQ + cols, mask=cols < HALF, other=0.0)
        for i in range(0, ROWS):
            l = tl.program_id(1) * ROWS + i
            if l < L:
                angle = tl.load(POS + b.to(tl.int64) * spb + l * spl).to(tl.float32) * inv_freq
                cos = tl.cos(angle)
                sin = tl.sin(angle) * SIN_SIGN
                xo = b.to(tl.int64) * sxb + heads * sxh + l * sxl + cols
                yo = b.to(tl.int64) * syb + heads * syh + l * syl + cols
                x1 = tl.load(X + xo, mask=m, other=0.0).to(tl.float32)
                x2 = tl.load(X + xo + HALF, mask=m, other=0.0).to(tl.float32)
                tl.store(Y + yo, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=m)
                tl.store(Y + yo + HALF, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=m)


def _launch_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, sin_sign: int) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, nh, length, d = x.shape
    y = torch.empty((b, length, nh, d), dtype=x.dtype, device=x.device).transpose(1, 2) \
        if x.stride(1) == d and x.stride(2) == nh * d else torch.empty_like(x, memory_format=torch.contiguous_format)
    rows = max(1, min(length, triton.cdiv(b * length, 1024))) if x.is_cuda else length
    if x.numel():
        _rope_kernel[(b, triton.cdiv(length, rows))](
            x, y, positions, inv_freq, length, nh, d // 2, x.stride(0), x.stride(1), x.stride(2),
            y.stride(0), y.stride(1), y.stride(2), positions.stride(0), positions.stride(1),
            SIN_SIGN=sin_sign, ROWS=rows, BLOCK_H=triton.next_power_of_2(nh),
            BLOCK_HALF=triton.next_power_of_2(d // 2))
    return y


class RopeFunction(torch.autograd.Function):
    """Rotation by position; the backward is the inverse rotation of the incoming gradient."""

    @staticmethod
    def forward(ctx, x, positions, theta):
        inv_freq = rope_inv_freq(x.shape[-1], theta, x.device)
        ctx.save_for_backward(positions, inv_freq)
        return _launch_rope(x, positions, inv_freq, 1)

    @staticmethod
    def backward(ctx, g):
        positions, inv_freq = ctx.saved_tensors
        return _launch_rope(g, positions, inv_freq, -1), None, None


def _triton_apply_rope(x, positions, theta):
    return RopeFunction.apply(x, positions, theta)
