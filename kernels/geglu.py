"""GeGLU activation of the Gemma MLP: gelu_tanh(gate) * up (fp32 math, result in gate's dtype)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import kernels_defined, resolve_impl


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.gelu(gate.to(torch.float32), approximate="tanh") * up.to(torch.float32)).to(gate.dtype)


def geglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """gelu(gate, approximate='tanh') * up, elementwise; gate and up have the same shape."""
    if gate.shape != up.shape:
        raise ValueError(f"geglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if resolve_impl(impl, gate, up, op="geglu") == "triton":
        return _triton_geglu(gate, up)
    return geglu_reference(gate, up)


# ----------------------------------------------------------------------------- Triton
if kernels_defined():
    from .dispatch import tl, triton

    @triton.jit
    def _gelu_tanh_parts(g):
        """gelu_tanh(g) and its derivative; tanh(z) written as 2*sigmoid(2z) - 1 (portable, fp32)."""
        c: tl.constexpr = 0.7978845608028654  # sqrt(2 / pi)
        # clamp: tanh is +-1 in fp32 beyond |z| ~ 9, and exp(-2z) must not overflow (interpreter warns)
        z = tl.minimum(tl.maximum(c * (g + 0.044715 * g * g * g), -15.0), 15.0)
        t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        gelu = 0.5 * g * (1.0 + t)
        dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * g * g)
        return gelu, dgelu

    @triton.jit
    def _geglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
        gelu, _ = _gelu_tanh_parts(g)
        tl.store(Y + offs, (gelu * u).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _geglu_bwd_kernel(G, U, DY, DG, DU, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        gelu, dgelu = _gelu_tanh_parts(g)
        tl.store(DG + offs, (dy * u * dgelu).to(DG.dtype.element_ty), mask=m)
        tl.store(DU + offs, (dy * gelu).to(DU.dtype.element_ty), mask=m)


def _elementwise_block(n: int, device: torch.device) -> int:
    return 1024 if device.type == "cuda" else min(1 << 16, triton.next_power_of_2(max(n, 16)))


class GegluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        block = _elementwise_block(n, gate.device)
        if n:
            _geglu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, y, n, BLOCK=block)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        block = _elementwise_block(n, gate.device)
        if n:
            _geglu_bwd_kernel[(triton.cdiv(n, block),)](gate, up, dy.contiguous(), d_gate, d_up, n, BLOCK=block)
        return d_gate, d_up


def _triton_geglu(gate, up):
    return GegluFunction.apply(gate, up)
