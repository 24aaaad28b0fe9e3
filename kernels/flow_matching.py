"""Flow-matching noising and the masked per-sample velocity loss.

pi0-style flow matching: x_t = t * noise + (1 - t) * actions, target velocity u = noise - actions.
The loss is the mean squared error between the predicted velocity v and u over the supervised
elements of each sample (dim_mask[b, a] & time_mask[b, h]), returned per sample in fp32; samples with
no supervised element get 0. The model averages the per-sample values over samples with >= 1
supervised element (`mean_over_supervised_samples`).
"""
from __future__ import annotations

import torch

from .dispatch import resolve_impl


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
    # where(), not multiply: a NaN/inf in a padded position must not poison the sample's loss
    sq = torch.where(mask, diff * diff, torch.zeros((), dtype=torch.float32, device=v.device))
    count = mask.sum(dim=(1, 2)).to(torch.float32)
    total = sq.sum(dim=(1, 2))
    return torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))


# ----------------------------------------------------------------------------- public API
def flow_noise(actions: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """x_t = t * noise + (1 - t) * actions, with t [B] broadcast over [B, H, A]; dtype of actions."""
    if actions.shape != noise.shape or actions.dim() != 3 or t.shape != (actions.shape[0],):
        raise ValueError(f"flow_noise: actions {tuple(actions.shape)} and noise {tuple(noise.shape)} "
                         f"must be [B, H, A] and t {tuple(t.shape)} must be [B]")
    resolve_impl(impl, actions, noise, t, op="flow_noise")
    # A fused kernel for this single FMA gives nothing over torch (one read of each input, one
    # write): the fusion that matters is in the loss. Both impls use the reference.
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


def _triton_flow_matching_loss(v, actions, noise, dim_mask, time_mask):  # replaced below in step 2
    return flow_matching_loss_reference(v, actions, noise, dim_mask, time_mask)
