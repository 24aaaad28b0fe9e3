"""Which weights evaluation and finetuning load: a run trained with train.ema_decay keeps
ema.safetensors beside its model states, and those EMA weights are the ones evaluated (auto)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from megavla.eval.policy import CheckpointError, choose_weights, load_state_dict


def checkpoint(tmp_path, ema: bool):
    raw = {"a.weight": torch.zeros(2, 2), "norm.weight": torch.ones(2), "steps": torch.tensor([3])}
    save_file(raw, str(tmp_path / "model.safetensors"))
    if ema:  # EMA of the trainable parameters only: norm.weight (frozen) is not in it
        save_file({"a.weight": torch.full((2, 2), 0.5, dtype=torch.bfloat16)}, str(tmp_path / "ema.safetensors"))
    return tmp_path


def test_auto_loads_the_ema_over_the_raw_weights(tmp_path):
    ckpt = checkpoint(tmp_path, ema=True)
    assert choose_weights(ckpt) == "ema"
    state = load_state_dict(ckpt)
    assert torch.equal(state["a.weight"], torch.full((2, 2), 0.5)) and state["a.weight"].dtype == torch.float32
    assert torch.equal(state["norm.weight"], torch.ones(2))   # not in the EMA: the raw value stays
    assert torch.equal(state["steps"], torch.tensor([3]))     # integer buffers untouched
    assert torch.equal(load_state_dict(ckpt, "raw")["a.weight"], torch.zeros(2, 2))


def test_without_an_ema_auto_is_raw_and_ema_is_refused(tmp_path):
    ckpt = checkpoint(tmp_path, ema=False)
    assert choose_weights(ckpt) == "raw"
    assert torch.equal(load_state_dict(ckpt)["a.weight"], torch.zeros(2, 2))
    with pytest.raises(CheckpointError, match="train.ema_decay"):
        load_state_dict(ckpt, "ema")
    with pytest.raises(ValueError, match="choose one of"):
        choose_weights(ckpt, "best")


def test_an_ema_of_another_model_is_refused(tmp_path):
    ckpt = checkpoint(tmp_path, ema=False)
    save_file({"b.weight": torch.zeros(1)}, str(tmp_path / "ema.safetensors"))
    with pytest.raises(CheckpointError, match="another model"):
        load_state_dict(ckpt)
