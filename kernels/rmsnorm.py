"""Gemma RMSNorm and pi0.5 adaptive RMSNorm.

rms_norm:     y = x * rsqrt(mean(x^2) + eps) * (1 + weight)            (Gemma: weight is zero-init)
ada_rms_norm: y = x * rsqrt(mean(x^2) + eps) * (1 + scale) + shift     (scale/shift from the time MLP;
              the gate of the same MLP is applied by the caller on the residual branch)
Statistics are computed in fp32 and the result is cast back to x's dtype.
"""
from __future__ import annotations

import torch

from .dispatch import resolve_impl


# ----------------------------------------------------------------------------- torch reference
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.to(torch.float32)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * (1.0 + weight.to(torch.float32))).to(x.dtype)


def _broadcast_modulation(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """scale/shift [B, D] -> [B, 1, D]; [B, L, D] (per-token time) is used as is."""
    return m[:, None, :] if m.dim() == 2 else m


def ada_rms_norm_reference(x, scale, shift, eps: float = 1e-6) -> torch.Tensor:
    xf = x.to(torch.float32)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = y * (1.0 + _broadcast_modulation(scale, x).to(torch.float32)) + _broadcast_modulation(shift, x).to(torch.float32)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- public API
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """Gemma RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) * (1 + weight)."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be [D] with D = x.shape[-1] = {x.shape[-1]}")
    if resolve_impl(impl, x, weight, op="rms_norm") == "triton":
        return _triton_rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def ada_rms_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6,
                 impl: str = "auto") -> torch.Tensor:
    """Adaptive RMSNorm: x [B, L, D], scale/shift [B, D] (or [B, L, D]) -> [B, L, D] in x's dtype."""
    if x.dim() != 3:
        raise ValueError(f"ada_rms_norm: x {tuple(x.shape)} must be [B, L, D]")
    b, length, d = x.shape
    for name, m in (("scale", scale), ("shift", shift)):
        if tuple(m.shape) not in ((b, d), (b, length, d)):
            raise ValueError(f"ada_rms_norm: {name} {tuple(m.shape)} must be [B, D]=({b}, {d}) or [B, L, D]")
    if resolve_impl(impl, x, scale, shift, op="ada_rms_norm") == "triton":
        return _triton_ada_rms_norm(x, scale, shift, eps)
    return ada_rms_norm_reference(x, scale, shift, eps)


def _triton_rms_norm(x, weight, eps):  # replaced in step 2
    return rms_norm_reference(x, weight, eps)


def _triton_ada_rms_norm(x, scale, shift, eps):  # replaced in step 2
    return ada_rms_norm_reference(x, scale, shift, eps)
