"""Gemma RMSNorm and pi0.5 adaptive RMSNorm.

rms_norm:     y = x * rsqrt(mean(x^2) + eps) * (1 + weight)            (Gemma: weight is zero-init)
ada_rms_norm: y = x * rsqrt(mean(x^2) + eps) * (1 + scale) + shift     (scale/shift from the time MLP;
              the gate of the same MLP is applied by the caller on the residual branch)
Statistics are computed in fp32 and the result is cast back to x's dtype.
"""
from __future__ import annotations

import torch

from .dispatch import kernels_defined, resolve_impl


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


# ----------------------------------------------------------------------------- Triton
# One kernel pair serves both norms: x is viewed as [B, L, D] and the modulation (Gemma weight, or
# adaptive scale/shift) is addressed with strides (sb, sl) that are 0 where it is broadcast.
if kernels_defined():
    from .dispatch import tl, triton

    @triton.jit
    def _rms_norm_fwd_kernel(X, Y, SCALE, SHIFT, RSTD, L, D, sb, sl, eps,
                             ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SHIFT: tl.constexpr):
        b = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        cm = cols < D
        for i in range(0, ROWS):
            l = tl.program_id(1) * ROWS + i
            if l < L:
                row = b.to(tl.int64) * L + l
                x = tl.load(X + row * D + cols, mask=cm, other=0.0).to(tl.float32)
                rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
                mod = b.to(tl.int64) * sb + l * sl + cols
                y = x * rstd * (1.0 + tl.load(SCALE + mod, mask=cm, other=0.0).to(tl.float32))
                if HAS_SHIFT:
                    y += tl.load(SHIFT + mod, mask=cm, other=0.0).to(tl.float32)
                tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=cm)
                tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(X, DY, DX, SCALE, RSTD, DSCALE_PART, DSHIFT_PART, L, D, sb, sl,
                             ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SHIFT: tl.constexpr):
        """dx = rstd * (g' - xhat * mean(g' * xhat)) with g' = dy * (1 + scale); the modulation
        gradients of this program's rows are summed in fp32 into one partial row per program."""
        b = tl.program_id(0)
        c = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        cm = cols < D
        dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
        dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(0, ROWS):
            l = c * ROWS + i
            if l < L:
                row = b.to(tl.int64) * L + l
                x = tl.load(X + row * D + cols, mask=cm, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * D + cols, mask=cm, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                xhat = x * rstd
                mod = b.to(tl.int64) * sb + l * sl + cols
                gs = dy * (1.0 + tl.load(SCALE + mod, mask=cm, other=0.0).to(tl.float32))
                dx = rstd * (gs - xhat * (tl.sum(gs * xhat, axis=0) / D))
                tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=cm)
                dscale += dy * xhat
                if HAS_SHIFT:
                    dshift += dy
        part = (b.to(tl.int64) * tl.num_programs(1) + c) * D + cols
        tl.store(DSCALE_PART + part, dscale, mask=cm)
        if HAS_SHIFT:
            tl.store(DSHIFT_PART + part, dshift, mask=cm)


def _mod_strides(m: torch.Tensor, length: int, d: int) -> tuple[int, int]:
    if m.dim() == 1:
        return 0, 0
    return (d, 0) if m.dim() == 2 else (length * d, d)


def _warps(block_d: int) -> int:
    return 4 if block_d <= 1024 else 8 if block_d <= 4096 else 16  # keep ~8-16 fp32 values per thread


def _rows_per_program(b: int, length: int, per_token_mod: bool, device: torch.device) -> int:
    if per_token_mod:
        return 1  # each row has its own modulation gradient: one partial per row is the result itself
    if device.type != "cuda":
        return length  # interpreter: one program per batch element
    # enough programs to fill the GPU (~4 waves of 132 SMs) while amortizing the partial rows
    return max(1, min(length, triton.cdiv(b * length, 528)))


class RMSNormFunction(torch.autograd.Function):
    """y = x * rstd * (1 + scale) [+ shift]; x [B, L, D]; scale/shift [D], [B, D] or [B, L, D]."""

    @staticmethod
    def forward(ctx, x, scale, shift, eps):
        x = x.contiguous()
        scale = scale.contiguous()
        shift = shift.contiguous() if shift is not None else None
        b, length, d = x.shape
        sb, sl = _mod_strides(scale, length, d)
        rows = _rows_per_program(b, length, scale.dim() == 3, x.device)
        block_d = triton.next_power_of_2(d)
        y = torch.empty_like(x)
        rstd = torch.empty(b, length, dtype=torch.float32, device=x.device)
        grid = (b, triton.cdiv(length, rows))
        if x.numel():
            _rms_norm_fwd_kernel[grid](x, y, scale, shift if shift is not None else scale, rstd, length, d,
                                       sb, sl, eps, ROWS=rows, BLOCK_D=block_d, HAS_SHIFT=shift is not None,
                                       num_warps=_warps(block_d))
        ctx.save_for_backward(x, scale, rstd)
        ctx.meta = (rows, block_d, sb, sl, shift is not None, shift.dtype if shift is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, rstd = ctx.saved_tensors
        rows, block_d, sb, sl, has_shift, shift_dtype = ctx.meta
        b, length, d = x.shape
        grid = (b, triton.cdiv(length, rows))
        dx = torch.empty_like(x)
        dscale_part = torch.empty(b, grid[1], d, dtype=torch.float32, device=x.device)
        dshift_part = torch.empty_like(dscale_part) if has_shift else dscale_part
        if x.numel():
            _rms_norm_bwd_kernel[grid](x, dy.contiguous(), dx, scale, rstd, dscale_part, dshift_part, length, d,
                                       sb, sl, ROWS=rows, BLOCK_D=block_d, HAS_SHIFT=has_shift,
                                       num_warps=_warps(block_d))
        else:
            dscale_part.zero_()
            dshift_part.zero_()

        def reduce(part, dtype):
            if scale.dim() == 1:
                return part.sum(dim=(0, 1)).to(dtype)
            return (part.sum(dim=1) if scale.dim() == 2 else part).to(dtype)

        dscale = reduce(dscale_part, scale.dtype) if ctx.needs_input_grad[1] else None
        dshift = reduce(dshift_part, shift_dtype) if has_shift and ctx.needs_input_grad[2] else None
        return dx, dscale, dshift, None


def _triton_rms_norm(x, weight, eps):
    d = x.shape[-1]
    y = RMSNormFunction.apply(x.reshape(1, -1, d), weight, None, eps)
    return y.reshape(x.shape)


def _triton_ada_rms_norm(x, scale, shift, eps):
    return RMSNormFunction.apply(x, scale, shift, eps)
