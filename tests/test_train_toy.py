"""The pure helpers of the trainer (schedule, parameter groups, RNG/JSON state, DeepSpeed config),
on the toy model of tests/helpers/toy_training.py."""
from __future__ import annotations

import math

import torch

from helpers.toy_training import S, ToyVLA

# ---- tests of the pure helpers -----------------------------------------------------------------
def test_lr_schedule_warmup_then_cosine_to_floor():
    from megavla.config.train import TrainConfig
    from megavla.train.optim import lr_factor
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == 0.1 and lr_factor(9, cfg) == 1.0
    assert math.isclose(lr_factor(10, cfg), 1.0)
    assert math.isclose(lr_factor(60, cfg), 0.55)          # half way down the cosine
    assert math.isclose(lr_factor(110, cfg), 0.1) and math.isclose(lr_factor(500, cfg), 0.1)


def test_weight_decay_only_on_matrices_and_freeze():
    from megavla.train.optim import apply_freeze, param_groups
    model = ToyVLA()
    frozen = apply_freeze(model, ["norm"])
    assert frozen == 2 * S
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()) - frozen
    try:
        apply_freeze(model, ["vision"])
    except ValueError as e:
        assert "vision" in str(e) and "net" in str(e)
    else:
        raise AssertionError("unknown freeze prefix must fail")


def test_rng_state_json_roundtrip():
    import json
    import random

    import numpy as np

    from megavla.train.checkpoint import rng_state, set_rng_state
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = json.loads(json.dumps(rng_state()))
    expected = (torch.rand(3), np.random.rand(2), random.random())
    torch.rand(7), np.random.rand(7), random.random()
    set_rng_state(state)
    got = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_ds_config_derives_accumulation_from_global_batch():
    import pytest

    from megavla.config.train import TrainConfig
    from megavla.train.engine import ds_config
    c = ds_config(TrainConfig(global_batch_size=16, zero_stage=3, precision="fp32"), micro_batch=4, world_size=2)
    assert c["gradient_accumulation_steps"] == 2 and c["train_batch_size"] == 16
    assert c["zero_optimization"]["stage"] == 3 and not c["bf16"]["enabled"]
    with pytest.raises(ValueError, match="global_batch_size"):
        ds_config(TrainConfig(global_batch_size=10), micro_batch=4, world_size=2)



def test_zero_buckets_scale_with_the_model():
    from megavla.config.train import TrainConfig
    from megavla.train.engine import ds_config
    small = ds_config(TrainConfig(zero_stage=3), micro_batch=2, world_size=2, num_params=108_000_000)
    assert small["zero_optimization"]["reduce_bucket_size"] == 6_750_000      # ZeRO-3: of the partition
    assert small["zero_optimization"]["stage3_prefetch_bucket_size"] == 6_750_000
    assert ds_config(TrainConfig(zero_stage=2), micro_batch=2, world_size=2,
                     num_params=108_000_000)["zero_optimization"]["reduce_bucket_size"] == 13_500_000
    assert small["zero_optimization"]["sub_group_size"] == 13_500_000            # 1/8 of the model
    big3 = ds_config(TrainConfig(zero_stage=3), micro_batch=2, world_size=8, num_params=3_000_000_000)
    assert big3["zero_optimization"]["stage3_prefetch_bucket_size"] == 46_875_000
    assert big3["zero_optimization"]["sub_group_size"] == 375_000_000
    big = ds_config(TrainConfig(zero_stage=2), micro_batch=2, world_size=2, num_params=3_000_000_000)
    assert big["zero_optimization"]["allgather_bucket_size"] == int(5e7)
    tiny = ds_config(TrainConfig(zero_stage=2), micro_batch=2, world_size=2, num_params=400_000)
    assert tiny["zero_optimization"]["reduce_bucket_size"] == 2**20
    fixed = ds_config(TrainConfig(zero_stage=2, zero_bucket_elements=12345), 2, 2, num_params=10**9)
    assert fixed["zero_optimization"]["reduce_bucket_size"] == 12345

