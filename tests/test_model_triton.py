"""model.kernels=triton (Triton interpreter on CPU) gives the same loss and gradients as torch.

Runs in a subprocess: TRITON_INTERPRET=1 must be set before megavla.kernels is imported and must not
leak into the other tests of this process.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from megavla.kernels import triton_available

SCRIPT = textwrap.dedent("""
    import json, torch
    from megavla.config.model import ModelConfig
    from megavla.model.synthetic import random_batch
    from megavla.model.vla import build_model

    def step(impl):
        torch.manual_seed(0)
        cfg = ModelConfig(preset="tiny", kernels=impl, action_dim=8, state_dim=8, depth=1, vision_depth=1)
        model = build_model(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".dense.weight"):
                    p.normal_(std=0.05)  # open the adaRMS gates so ada_rms_norm is exercised
        batch = random_batch(cfg, batch_size=2, action_dims=6, state_dims=5, gripper_dim=5, seed=0)
        g = torch.Generator().manual_seed(1)
        out = model(batch, torch.randn(batch.actions.shape, generator=g), torch.rand(2, generator=g))
        out["loss"].backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        # every output, scalars and per-embodiment [2, E] sums alike, as flat lists
        return {k: v.detach().flatten().tolist() for k, v in out.items()}, grads

    ref_losses, ref_grads = step("torch")
    tri_losses, tri_grads = step("triton")
    # relative to each gradient's scale, with a floor: some are exactly zero in exact math
    # (a key bias cannot change a softmax) and hold only rounding noise in both runs
    worst = max(((tri_grads[n] - g).abs().max() / (g.abs().max() + 1e-6)).item()
                for n, g in ref_grads.items())
    print(json.dumps({"ref": ref_losses, "triton": tri_losses, "grad_rel_err": worst,
                      "same_grad_keys": sorted(ref_grads) == sorted(tri_grads)}))
""")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernels_match_torch_for_one_training_step():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same_grad_keys"]
    assert sorted(result["ref"]) == sorted(result["triton"])
    for key, values in result["ref"].items():
        assert len(result["triton"][key]) == len(values), key
        for tri, ref in zip(result["triton"][key], values):
            assert abs(tri - ref) <= 1e-4 * max(1.0, abs(ref)), key
    assert result["grad_rel_err"] < 1e-3
