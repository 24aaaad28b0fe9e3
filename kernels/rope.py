"""Rotary position embedding, rotate-half form as in Gemma / HF transformers.

For x [B, H, L, D] and integer positions [B, L]: with inv_freq_i = theta^(-2i/D) (i < D/2),
angle = position * inv_freq, cos/sin repeated over both halves, y = x * cos + rotate_half(x) * sin
where rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]). Computed in fp32, cast back to x's dtype.
"""
from __future__ import annotations

import torch

from .dispatch import resolve_impl


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


def _triton_apply_rope(x, positions, theta):  # replaced in step 2
    return apply_rope_reference(x, positions, theta)
