"""impl dispatch and input validation of megavla.kernels (plain torch; runs in every process)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megavla.kernels import (ada_rms_norm, apply_rope, flow_matching_loss, geglu, mean_over_supervised_samples,
                             resolve_impl, rms_norm)
from megavla.kernels.dispatch import INTERPRETED_AT_IMPORT, triton_available

needs_plain_cpu = pytest.mark.skipif(INTERPRETED_AT_IMPORT, reason="this process imported kernels interpreted")


@needs_plain_cpu
def test_auto_uses_torch_on_cpu_and_triton_is_a_clear_error():
    x = torch.randn(2, 3)
    assert resolve_impl("auto", x) == "torch"
    assert resolve_impl("torch", x) == "torch"
    if triton_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            rms_norm(x, torch.zeros(3), impl="triton")


def test_unknown_impl_names_the_config_field():
    with pytest.raises(ValueError, match="model.kernels"):
        geglu(torch.randn(3), torch.randn(3), impl="cuda")


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="time_mask"):
        flow_matching_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4),
                           torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale"):
        ada_rms_norm(torch.randn(2, 3, 4), torch.randn(2, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="positions"):
        apply_rope(torch.randn(1, 2, 3, 4), torch.zeros(1, 3))  # float positions


def test_flow_loss_reference_by_hand_and_supervised_mean():
    """Per-sample mean over supervised elements, 0 for a sample without any; batch mean skips it."""
    actions = torch.zeros(2, 2, 2)
    noise = torch.ones(2, 2, 2)  # u = noise - actions = 1
    v = torch.tensor([[[1.0, 3.0], [0.0, 9.0]], [[5.0, 5.0], [5.0, 5.0]]])
    dim_mask = torch.tensor([[True, True], [False, False]])
    time_mask = torch.tensor([[True, False], [True, True]])
    per_sample = flow_matching_loss(v, actions, noise, dim_mask, time_mask, impl="torch")
    torch.testing.assert_close(per_sample, torch.tensor([(0.0 + 4.0) / 2, 0.0]))
    assert mean_over_supervised_samples(per_sample, dim_mask, time_mask).item() == pytest.approx(2.0)
    none = torch.zeros(2, 2, dtype=torch.bool)
    assert mean_over_supervised_samples(per_sample, none, time_mask).item() == 0.0


def test_rms_norm_reference_by_hand():
    x = torch.tensor([[3.0, 4.0]])  # mean square 12.5
    y = rms_norm(x, torch.tensor([0.0, 1.0]), eps=0.0, impl="torch")
    torch.testing.assert_close(y, torch.tensor([[3.0, 8.0]]) / 12.5 ** 0.5)
    ya = ada_rms_norm(x[None], torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, -0.5]]), eps=0.0, impl="torch")
    torch.testing.assert_close(ya, (torch.tensor([[[6.0, 4.0]]]) / 12.5 ** 0.5) + torch.tensor([0.5, -0.5]))


def test_float64_stays_on_the_torch_reference():
    x = torch.randn(2, 3, dtype=torch.float64)
    assert resolve_impl("auto", x) == "torch"
    if triton_available():
        with pytest.raises(RuntimeError, match="float64"):
            resolve_impl("triton", x)


@pytest.mark.skipif(torch.version.cuda is not None or torch.version.hip is not None,
                    reason="a CUDA/ROCm build of torch imports triton: its kernels can run")
def test_cpu_only_torch_does_not_import_triton_unless_interpreted():
    """No kernel can run on a CPU-only torch without the interpreter: importing triton there only
    cost process start time (issue 16, launch). With TRITON_INTERPRET=1 it is imported as before."""
    probe = ("import sys, megavla.model.vla, megavla.kernels.dispatch as d; "
             "print('triton' in sys.modules, d.kernels_defined(), d.triton_available())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    plain = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr[-2000:]
    installed = plain.stdout.split()[2] == "True"
    assert plain.stdout.split()[:2] == ["False", "False"]
    if installed:
        interpreted = subprocess.run([sys.executable, "-c", probe], env=dict(env, TRITON_INTERPRET="1"),
                                     capture_output=True, text=True, timeout=120)
        assert interpreted.returncode == 0, interpreted.stderr[-2000:]
        assert interpreted.stdout.split() == ["True", "True", "True"]
