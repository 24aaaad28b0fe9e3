"""Flow-matching noising and the masked per-sample velocity loss.

pi0-style flow matching: x_t = t * noise + (1 - t) * actions, target velocity u = noise - actions.
The loss is the mean squared error between the predicted velocity v and u over the supervised
elements of each sample (dim_mask[b, a] & time_mask[b, h]), returned per sample in fp32; samples with
no supervised element get 0. The model averages the per-sample values over samples with >= 1
supervised element (`mean_over_supervised_samples`).
"""
from __future__ import annotations

import torch

from .dispatch import kernels_defined, resolve_impl


def _check_shapes(v, actions, noise, dim_mask, time_mask) -> None:
    if v.shape != actions.shape or noise.shape != actions.shape or actions.dim() != 3:
        raise ValueError(f"flow_matching_loss: v {tuple(v.shape)}, actions {tuple(actions.shape)}, "
                         f"noise {tuple(noise.shape)} must all be [B, H, A]")
    b, h, a = actions.shape
    if tuple(dim_mask.shape) != (b, a) or tuple(time_mask.shape) != (b, h):
        raise ValueError(f"flow_matching_loss: dim_mask {tuple(dim_mask.shape)} must be [B, A]=({b}, {a}) "
                         f"and time_mask {tuple(time_mask.shape)} must be [B, H]=({b}, {h})")
    if dim_mask.dtype != torch.bool or time_mask.dtype != torch.bool:
        raise TypeError("flow_matching_loss: dim_mask and time_mask must be bool tensors")


# ----------------------------------------------------------------------------- torch reference
def flow_noise_reference(actions: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = t.to(torch.float32).reshape(-1, 1, 1)
    x_t = tt * noise.to(torch.float32) + (1.0 - tt) * actions.to(torch.float32)
    return x_t.to(actions.dtype)


def flow_matching_loss_reference(v, actions, noise, dim_mask, time_mask) -> torch.Tensor:
    mask = time_mask[:, :, None] & dim_mask[:, None, :]
    diff = v.to(torch.float32) - (noise.to(torch.float32) - actions.to(torch.float32))
    # where() before squaring, not a multiply: a NaN/inf in a padded position must reach neither the
    # loss nor (through d(diff^2) = 2 diff) the gradient
    diff = torch.where(mask, diff, torch.zeros((), dtype=torch.float32, device=v.device))
    count = mask.sum(dim=(1, 2)).to(torch.float32)
    total = (diff * diff).sum(dim=(1, 2))
    return torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))


# ----------------------------------------------------------------------------- public API
def flow_noise(actions: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """x_t = t * noise + (1 - t) * actions, with t [B] broadcast over [B, H, A]; dtype of actions."""
    if actions.shape != noise.shape or actions.dim() != 3 or t.shape != (actions.shape[0],):
        raise ValueError(f"flow_noise: actions {tuple(actions.shape)} and noise {tuple(noise.shape)} "
                         f"must be [B, H, A] and t {tuple(t.shape)} must be [B]")
    if resolve_impl(impl, actions, noise, t, op="flow_noise") == "triton":
        return FlowNoiseFunction.apply(actions, noise, t)
    return flow_noise_reference(actions, noise, t)


def flow_matching_loss(v: torch.Tensor, actions: torch.Tensor, noise: torch.Tensor,
                       dim_mask: torch.Tensor, time_mask: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Per-sample masked MSE between v and u = noise - actions -> [B] fp32 (0 where nothing supervised)."""
    _check_shapes(v, actions, noise, dim_mask, time_mask)
    if resolve_impl(impl, v, actions, noise, dim_mask, time_mask, op="flow_matching_loss") == "triton":
        return _triton_flow_matching_loss(v, actions, noise, dim_mask, time_mask)
    return flow_matching_loss_reference(v, actions, noise, dim_mask, time_mask)


def mean_over_supervised_samples(per_sample: torch.Tensor, dim_mask: torch.Tensor,
                                 time_mask: torch.Tensor) -> torch.Tensor:
    """The model's flow loss: mean of per_sample over samples with >= 1 supervised element (0 if none)."""
    has = (time_mask.any(dim=1) & dim_mask.any(dim=1)).to(per_sample.dtype)
    return (per_sample * has).sum() / has.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------- Triton
if kernels_defined():
    from .dispatch import tl, triton

    @triton.jit
    def _flow_noise_kernel(A_ptr, N_ptr, T_ptr, X_ptr, per_sample, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        t = tl.load(T_ptr + b).to(tl.float32)
        base = b.to(tl.int64) * per_sample
        for start in range(0, per_sample, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < per_sample
            a = tl.load(A_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            n = tl.load(N_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(X_ptr + base + offs, (t * n + (1.0 - t) * a).to(X_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _fm_loss_fwd_kernel(V_ptr, A_ptr, N_ptr, DM_ptr, TM_ptr, LOSS_ptr, INVCNT_ptr, H, A,
                            BLOCK: tl.constexpr):
        """One program per sample: fp32 sum of masked squared error and the supervised count."""
        b = tl.program_id(0)
        n_el = H * A
        base = b.to(tl.int64) * n_el
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        cnt = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_el, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < n_el
            sup = (tl.load(TM_ptr + b * H + offs // A, mask=inb, other=0) != 0) & \
                  (tl.load(DM_ptr + b * A + offs % A, mask=inb, other=0) != 0)
            v = tl.load(V_ptr + base + offs, mask=sup, other=0.0).to(tl.float32)
            a = tl.load(A_ptr + base + offs, mask=sup, other=0.0).to(tl.float32)
            n = tl.load(N_ptr + base + offs, mask=sup, other=0.0).to(tl.float32)
            d = v - (n - a)
            acc += tl.where(sup, d * d, 0.0)
            cnt += sup.to(tl.float32)
        total = tl.sum(acc, axis=0)
        count = tl.sum(cnt, axis=0)
        inv = tl.where(count > 0, 1.0 / tl.maximum(count, 1.0), 0.0)
        tl.store(LOSS_ptr + b, total * inv)
        tl.store(INVCNT_ptr + b, inv)

    @triton.jit
    def _fm_loss_bwd_kernel(V_ptr, A_ptr, N_ptr, DM_ptr, TM_ptr, INVCNT_ptr, GOUT_ptr, DV_ptr, H, A,
                            BLOCK: tl.constexpr):
        """dL/dv = grad[b] * 2 (v - noise + actions) / count[b] on supervised elements, else 0."""
        b = tl.program_id(0)
        n_el = H * A
        base = b.to(tl.int64) * n_el
        coef = 2.0 * tl.load(INVCNT_ptr + b) * tl.load(GOUT_ptr + b).to(tl.float32)
        for start in range(tl.program_id(1) * BLOCK, n_el, tl.num_programs(1) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < n_el
            sup = (tl.load(TM_ptr + b * H + offs // A, mask=inb, other=0) != 0) & \
                  (tl.load(DM_ptr + b * A + offs % A, mask=inb, other=0) != 0)
            v = tl.load(V_ptr + base + offs, mask=sup, other=0.0).to(tl.float32)
            a = tl.load(A_ptr + base + offs, mask=sup, other=0.0).to(tl.float32)
            n = tl.load(N_ptr + base + offs, mask=sup, other=0.0).to(tl.float32)
            dv = tl.where(sup, coef * (v - (n - a)), 0.0)
            tl.store(DV_ptr + base + offs, dv.to(DV_ptr.dtype.element_ty), mask=inb)


def _block(n: int, device: torch.device, gpu_cap: int = 1024) -> int:
    """GPU: moderate blocks; interpreter: one block per row (each interpreted program costs ~ms)."""
    cap = gpu_cap if device.type == "cuda" else 1 << 16
    return min(cap, triton.next_power_of_2(max(n, 16)))


class FlowMatchingLossFunction(torch.autograd.Function):
    """Fused masked per-sample MSE; backward recomputes v - u from the inputs (nothing materialized)."""

    @staticmethod
    def forward(ctx, v, actions, noise, dim_mask, time_mask):
        v, actions, noise = v.contiguous(), actions.contiguous(), noise.contiguous()
        dm, tm = dim_mask.contiguous().view(torch.uint8), time_mask.contiguous().view(torch.uint8)
        b, h, a = v.shape
        loss = torch.empty(b, dtype=torch.float32, device=v.device)
        inv_count = torch.empty(b, dtype=torch.float32, device=v.device)
        if b:
            _fm_loss_fwd_kernel[(b,)](v, actions, noise, dm, tm, loss, inv_count, h, a,
                                      BLOCK=_block(h * a, v.device))
        ctx.save_for_backward(v, actions, noise, dm, tm, inv_count)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        v, actions, noise, dm, tm, inv_count = ctx.saved_tensors
        b, h, a = v.shape
        dv = torch.empty_like(v)
        block = _block(h * a, v.device)
        splits = max(1, min(triton.cdiv(h * a, block), 8)) if v.is_cuda else 1
        if b:
            _fm_loss_bwd_kernel[(b, splits)](v, actions, noise, dm, tm, inv_count, grad_loss.contiguous(),
                                             dv, h, a, BLOCK=block)
        # d/d actions = +dv, d/d noise = -dv (only when asked: both are data in training)
        d_actions = dv.to(actions.dtype) if ctx.needs_input_grad[1] else None
        d_noise = (-dv).to(noise.dtype) if ctx.needs_input_grad[2] else None
        return dv, d_actions, d_noise, None, None


def _triton_flow_matching_loss(v, actions, noise, dim_mask, time_mask):
    return FlowMatchingLossFunction.apply(v, actions, noise, dim_mask, time_mask)


class FlowNoiseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, actions, noise, t):
        actions_c, noise_c = actions.contiguous(), noise.contiguous()
        x_t = torch.empty_like(actions_c)
        b = actions.shape[0]
        per_sample = actions[0].numel() if b else 0
        if b and per_sample:
            _flow_noise_kernel[(b,)](actions_c, noise_c, t.contiguous(), x_t, per_sample,
                                     BLOCK=_block(per_sample, actions.device))
        ctx.save_for_backward(actions, noise, t)
        return x_t

    @staticmethod
    def backward(ctx, g):  # rarely needed (actions, noise and t are data): plain torch is enough
        actions, noise, t = ctx.saved_tensors
        tt = t.to(torch.float32).reshape(-1, 1, 1)
        gf = g.to(torch.float32)
        d_actions = ((1.0 - tt) * gf).to(actions.dtype) if ctx.needs_input_grad[0] else None
        d_noise = (tt * gf).to(noise.dtype) if ctx.needs_input_grad[1] else None
        d_t = ((gf * (noise.float() - actions.float())).sum(dim=(1, 2)).to(t.dtype)
               if ctx.needs_input_grad[2] else None)
        return d_actions, d_noise, d_t
