"""Launch cost: an eager training process never imports torch._dynamo (1.5-3 CPU-s and +141 MB RSS
per process on this box), at ZeRO-2 or ZeRO-3 (zero.Init build, engine, steps), nor triton on a
CPU-only torch (no kernel of ours or DeepSpeed's can run there); the optimizer stays torch's AdamW
numerically; a worker process freezes torch's objects out of the cyclic GC."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megavla.train.optim import EagerAdamW

SCRIPT = """
import os, sys
for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    os.environ.pop(v, None)
from megavla.config import load_config
from megavla.model.synthetic import random_batch
from megavla.train.engine import build_partitioned, create_engine, init_distributed
from megavla.train.entry import default_model_factory
stage = int(sys.argv[1])
cfg = load_config(None, ["model.preset=tiny", "model.kernels=torch", f"train.zero_stage={stage}",
                         "train.precision=fp32"])
dist = init_distributed()
model = build_partitioned(default_model_factory, cfg, 2, 1) if stage == 3 else default_model_factory(cfg)
engine, _, _ = create_engine(model, cfg.train, 2, dist)
batch = random_batch(model.cfg, batch_size=2)
for _ in range(2):
    engine.backward(engine(batch)["loss"])
    engine.step()
print("DYNAMO", "torch._dynamo" in sys.modules, "SYMPY", "sympy" in sys.modules)
print("TRITON", "triton" in sys.modules)
"""
CPU_ONLY_TORCH = torch.version.cuda is None and torch.version.hip is None


@pytest.mark.parametrize("stage", [2, 3])
def test_training_process_does_not_import_dynamo(stage):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(stage)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DYNAMO False SYMPY False" in out.stdout, out.stdout[-500:]
    if CPU_ONLY_TORCH and os.environ.get("TRITON_INTERPRET") != "1":
        assert "TRITON False" in out.stdout, out.stdout[-500:]


def test_worker_process_freezes_torch_objects_and_keeps_gc_on():
    """`python -m megavla.train.entry` (the local launcher's worker) imports torch with the cyclic GC
    off, then freezes what it imported (never rescanned: ~0.1-0.2 CPU-s per process start) and turns
    the GC back on before anything else runs."""
    probe = ("import gc, runpy, sys; sys.argv = ['megavla.train.entry', '--help']\n"
             "try:\n    runpy.run_module('megavla.train.entry', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print('GC', gc.isenabled(), gc.get_freeze_count() > 100_000, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GC True True True" in out.stdout, out.stdout[-500:]


def test_eager_adamw_steps_like_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.1, weight_decay=0.01)
    opt_b = EagerAdamW(b.parameters(), lr=0.1, weight_decay=0.01)
    for _ in range(3):
        x = torch.randn(5, 4)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_batch_accounting_reads_the_built_model():
    """The trainer's FLOP count takes its coefficients from the model it trains, never from a
    meta-device build (whose init imports torch._dynamo in the first step)."""
    from megavla.config.model import ModelConfig
    from megavla.model import flops
    from megavla.model.synthetic import random_batch
    from megavla.model.vla import build_model
    from megavla.train.entry import batch_accounting
    model = build_model(ModelConfig(preset="tiny", kernels="torch", expert_mlp_dim=72))  # a config of its own
    accounting = batch_accounting(model)
    builds = flops._meta_model.cache_info().misses
    tokens, train_flops = accounting(random_batch(model.cfg, batch_size=2))
    assert tokens > 0 and train_flops > 0
    assert flops._meta_model.cache_info().misses == builds
