"""Triton kernels vs their torch references: outputs and every gradient (Liger-Kernel style).

Cases run on two devices:
* "cpu": the Triton interpreter, fp32, small shapes. Triton fixes interpretation at import time, so
  these run only when TRITON_INTERPRET=1 was set before megavla.kernels was imported: the default
  suite runs this file in such a subprocess (tests/test_kernels_interpreted.py); here they skip.
* "cuda" (@pytest.mark.gpu): full model shapes, fp32 and bf16.
Tolerances (atol, rtol): fp32 CPU (1e-5, 1e-5); fp32 GPU (1e-5, 1e-4); bf16 GPU (2e-2, 2e-2), i.e.
about two bf16 ulps, since kernel and reference both compute in fp32 and round once.
"""
from __future__ import annotations

import math

import pytest
import torch

from megavla.kernels import ada_rms_norm, apply_rope, flow_matching_loss, flow_noise, geglu, rms_norm
from megavla.kernels.dispatch import INTERPRETED_AT_IMPORT, triton_available
from megavla.kernels.flow_matching import flow_matching_loss_reference, flow_noise_reference
from megavla.kernels.geglu import geglu_reference
from megavla.kernels.rmsnorm import ada_rms_norm_reference, rms_norm_reference
from megavla.kernels.rope import apply_rope_reference

_CPU = pytest.mark.skipif(not (INTERPRETED_AT_IMPORT and triton_available()),
                          reason="interpreted Triton runs in the TRITON_INTERPRET=1 subprocess of "
                                 "tests/test_kernels_interpreted.py")
_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def cases(cpu_shapes, gpu_shapes):
    """(device, dtype, shape) params: fp32 small on the interpreter; fp32 + bf16 full on CUDA."""
    out = [pytest.param("cpu", torch.float32, s, marks=_CPU, id=f"cpu-fp32-{s}") for s in cpu_shapes]
    for dtype in (torch.float32, torch.bfloat16):
        out += [pytest.param("cuda", dtype, s, marks=_GPU, id=f"cuda-{str(dtype)[6:]}-{s}") for s in gpu_shapes]
    return out


def tolerances(device: str, dtype: torch.dtype) -> dict:
    if dtype == torch.bfloat16:
        return {"atol": 2e-2, "rtol": 2e-2}
    return {"atol": 1e-5, "rtol": 1e-5 if device == "cpu" else 1e-4}


def compare(triton_fn, reference_fn, inputs, device, dtype, grad_of=None):
    """Run both on clones of `inputs`, backprop the same random cotangent, compare out + grads."""
    grad_of = range(len(inputs)) if grad_of is None else grad_of
    runs = []
    for fn in (triton_fn, reference_fn):
        args = [t.detach().clone().requires_grad_(i in grad_of) if t.is_floating_point() else t
                for i, t in enumerate(inputs)]
        out = fn(*args)
        runs.append((out, args))
    (out_t, args_t), (out_r, args_r) = runs
    tol = tolerances(device, dtype)
    torch.testing.assert_close(out_t, out_r, **tol)
    cotangent = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(1)).to(out_r)
    out_t.backward(cotangent)
    out_r.backward(cotangent)
    for i in grad_of:
        assert args_t[i].grad is not None, f"input {i}: Triton path gave no gradient"
        assert torch.isfinite(args_t[i].grad.float()).all(), f"input {i}: non-finite gradient"
        torch.testing.assert_close(args_t[i].grad, args_r[i].grad, **tol, msg=lambda m: f"grad of input {i}: {m}")


def rand(shape, device, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- flow matching
@pytest.mark.parametrize("device,dtype,shape", cases([(3, 5, 7), (4, 1, 3), (2, 10, 32)], [(32, 50, 32), (7, 33, 19)]))
def test_flow_matching_loss_matches_reference(device, dtype, shape):
    b, h, a = shape
    g = torch.Generator().manual_seed(0)
    dim_mask = (torch.rand(b, a, generator=g) > 0.3).to(device)
    time_mask = (torch.rand(b, h, generator=g) > 0.2).to(device)
    dim_mask[0] = False  # a sample with nothing supervised: loss 0, gradient 0
    if b > 2:
        time_mask[1] = False
    v, actions, noise = (rand(shape, device, dtype, s) for s in (1, 2, 3))
    if dim_mask.any():  # padding may hold garbage: it must not reach the loss or the gradient
        v[~(time_mask[:, :, None] & dim_mask[:, None, :])] = float("nan")

    def run(fn):
        return lambda v_, a_, n_: fn(v_, a_, n_, dim_mask, time_mask)

    compare(run(lambda *x: flow_matching_loss(*x, impl="triton")), run(flow_matching_loss_reference),
            [v, actions, noise], device, dtype)
    loss = flow_matching_loss(v, actions, noise, dim_mask, time_mask, impl="triton")
    assert loss.dtype == torch.float32 and loss.shape == (b,) and loss[0].item() == 0.0


@pytest.mark.parametrize("device,dtype,shape", cases([(3, 5, 7), (1, 4, 130)], [(32, 50, 32)]))
def test_flow_noise_matches_reference(device, dtype, shape):
    actions, noise = rand(shape, device, dtype, 1), rand(shape, device, dtype, 2)
    t = torch.rand(shape[0], generator=torch.Generator().manual_seed(3)).to(device)
    compare(lambda a, n, t_: flow_noise(a, n, t_, impl="triton"), flow_noise_reference, [actions, noise, t],
            device, dtype)


# ----------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("device,dtype,shape", cases([(2, 3, 37), (1, 4, 64), (3, 1, 130)],
                                                     [(4, 800, 2048), (32, 50, 1024), (5, 17, 1000)]))
def test_rms_norm_matches_reference(device, dtype, shape):
    x, weight = rand(shape, device, dtype, 1), rand(shape[-1:], device, dtype, 2, 0.1)
    compare(lambda x_, w: rms_norm(x_, w, impl="triton"), rms_norm_reference, [x, weight], device, dtype)


@pytest.mark.parametrize("per_token", [False, True], ids=["mod_BD", "mod_BLD"])
@pytest.mark.parametrize("device,dtype,shape", cases([(2, 3, 37), (3, 1, 130)], [(32, 50, 1024), (5, 17, 1000)]))
def test_ada_rms_norm_matches_reference(device, dtype, shape, per_token):
    b, length, d = shape
    mod_shape = (b, length, d) if per_token else (b, d)
    x = rand(shape, device, dtype, 1, 3.0)
    scale, shift = rand(mod_shape, device, dtype, 2, 0.5), rand(mod_shape, device, dtype, 3)
    compare(lambda *a: ada_rms_norm(*a, impl="triton"), ada_rms_norm_reference, [x, scale, shift], device, dtype)


# ----------------------------------------------------------------------------- RoPE, GeGLU
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "BLHD_view"])
@pytest.mark.parametrize("device,dtype,shape", cases([(2, 3, 5, 8), (1, 2, 7, 6)], [(32, 8, 850, 256), (3, 5, 17, 64)]))
def test_rope_matches_reference(device, dtype, shape, transposed):
    b, nh, length, d = shape
    # the model's q/k come from a [B, L, H, D] projection viewed as [B, H, L, D]: strided input
    x = rand((b, length, nh, d), device, dtype, 1).transpose(1, 2) if transposed else rand(shape, device, dtype, 1)
    positions = torch.randint(0, 1000, (b, length), generator=torch.Generator().manual_seed(2)).to(device)
    compare(lambda x_: apply_rope(x_, positions, impl="triton"), lambda x_: apply_rope_reference(x_, positions),
            [x], device, dtype)


def test_rope_reference_is_a_norm_preserving_rotation():
    """Independent of the kernel: rotation keeps per-pair norms, and position 0 is the identity."""
    x = torch.randn(2, 3, 5, 8)
    positions = torch.randint(0, 100, (2, 5))
    positions[:, 0] = 0
    y = apply_rope_reference(x, positions)
    pair_norm = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])
    # relative-position property: <rope(q, m), rope(k, n)> depends on m - n only
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    dot = lambda m, n: (apply_rope_reference(q, torch.tensor([[m]])) * apply_rope_reference(k, torch.tensor([[n]]))).sum()  # noqa: E731
    assert math.isclose(dot(7, 3).item(), dot(14, 10).item(), rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize("device,dtype,shape", cases([(3, 37), (2, 5, 130)], [(32, 50, 4096), (7, 1001)]))
def test_geglu_matches_reference(device, dtype, shape):
    gate, up = rand(shape, device, dtype, 1, 3.0), rand(shape, device, dtype, 2)
    compare(lambda g, u: geglu(g, u, impl="triton"), geglu_reference, [gate, up], device, dtype)
