"""ZeRO-3 builds the model under deepspeed.zero.Init (each rank holds only its partition from the
start); the weights equal a plain build's, so the choice changes memory, not training."""
from __future__ import annotations

import deepspeed
import torch

from megavla.config import load_config
from megavla.train.engine import build_partitioned, init_distributed, seed_everything
from megavla.train.entry import default_model_factory


def test_partitioned_build_equals_a_plain_build(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    init_distributed()
    cfg = load_config(None, ["model.preset=tiny", "model.kernels=torch", "train.zero_stage=3",
                             "train.precision=fp32"])
    seed_everything(0)
    plain = default_model_factory(cfg)
    seed_everything(0)
    partitioned = build_partitioned(default_model_factory, cfg, micro_batch=2, world_size=1)
    params = dict(partitioned.named_parameters())
    assert set(params) == {n for n, _ in plain.named_parameters()}
    assert all(hasattr(p, "ds_id") for p in params.values())          # DeepSpeed-partitioned
    for name, p in plain.named_parameters():
        with deepspeed.zero.GatheredParameters([params[name]]):
            assert torch.equal(params[name].data, p.data), name
    # the adaLN-zero layers kept their zeros (they are zeroed in AdaRMSNorm.__init__, which a
    # partitioned build cannot do: VLA.init_module_weights re-applies it)
    dense = [n for n in params if n.endswith(".dense.weight")]
    assert dense and all(not plain.get_parameter(n).any() for n in dense)
