"""FLOPs of the batch actually run (megavla.model.flops.batch_flops), checked against independent counts:
torch's FlopCounterMode for every matmul / convolution, the attention layouts' visible pairs for
attention, and the nominal per-sample figure for a batch shaped like the nominal sample."""
import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megavla.config.model import ModelConfig
from megavla.model.flops import (batch_flops, batch_token_counts, batch_tokens, coefficients, flops_per_sample,
                                 forward_flops)
from megavla.model.synthetic import random_batch
from megavla.model.vla import build_model

MASKS = ("image_mask", "text_mask", "subtask_mask", "fast_mask", "state_mask")

VARIANTS = [{}, {"state_mode": "continuous"}, {"fast_weight": 0.0},
            {"subtask_weight": 0.0, "fast_weight": 0.0}, {"action_conditioning": "instruction", "subtask_weight": 0.0},
            {"time_conditioning": "mlp", "state_mode": "continuous"}]


def full_batch(cfg: ModelConfig, batch_size: int = 2):
    """Every mask True: the model then runs no padding, so executed matmul FLOPs = model FLOPs."""
    batch = random_batch(cfg, batch_size=batch_size, num_cameras=3)
    for name in MASKS:
        getattr(batch, name)[:] = True
    return batch


@pytest.mark.parametrize("overrides", VARIANTS)
def test_matmul_flops_equal_torch_flop_counter(overrides):
    cfg = ModelConfig(preset="tiny", attention="sdpa", kernels="torch", **overrides)
    model = build_model(cfg)
    batch = full_batch(cfg)
    with FlopCounterMode(display=False) as counter:
        model(batch)
    measured = sum(counter.get_flop_counts()["Global"].values())  # mm/addmm/convolution (SDPA uncounted)
    ours = forward_flops(cfg, **batch_token_counts(cfg, batch))
    assert ours["vision"] + ours["backbone"] + ours["expert"] + ours["lm_head"] == measured


@pytest.mark.parametrize("overrides", [{}, {"state_mode": "continuous"}, {"action_conditioning": "instruction"},
                                       {"subtask_weight": 0.0}, {"fast_weight": 0.0, "state_mode": "discrete"}])
def test_attention_pairs_equal_the_models_layouts(overrides, monkeypatch):
    """Visible query-key pairs per layer = what the model's own AttentionLayouts allow (padded batch;
    the layouts are the ones VLA.run builds: subtask context, FAST_END and the pi0 state block)."""
    cfg = ModelConfig(preset="tiny", kernels="torch", **overrides)
    model = build_model(cfg)
    batch = random_batch(cfg, batch_size=4, seed=3)  # padded text/subtask/FAST, absent cameras
    seen = []
    original = model.shared_attention
    monkeypatch.setattr(model, "shared_attention", lambda *a: seen.append(original(*a)) or seen[-1])
    with torch.no_grad():
        model.run(batch)
    backbone_pairs = int(seen[0].backbone_layout.dense_mask().sum())
    expert_pairs = int(seen[0].expert_layout.dense_mask().sum())
    c = coefficients(cfg)
    tok = batch_token_counts(cfg, batch)
    ours = forward_flops(cfg, **tok)
    vision_attention = float(tok["images"].sum()) * c.vision_attention_per_image
    assert ours["attention_vlm"] - vision_attention == pytest.approx(backbone_pairs * c.attention_per_pair)
    assert ours["attention_expert"] == pytest.approx(expert_pairs * c.attention_per_pair)


def test_batch_flops_count_valid_tokens_only():
    cfg = ModelConfig(preset="small")
    batch = random_batch(cfg, batch_size=4, seed=1)
    total = batch_flops(cfg, batch)
    # a sum over samples, and padding changes nothing
    assert total == pytest.approx(sum(batch_flops(cfg, batch.select(slice(i, i + 1))) for i in range(4)))
    padded = dataclasses.replace(batch, text_tokens=torch.nn.functional.pad(batch.text_tokens, (0, 5)),
                                 text_mask=torch.nn.functional.pad(batch.text_mask, (0, 5)))
    assert batch_flops(cfg, padded) == pytest.approx(total)
    # one more valid text token in one sample costs more; dropping a camera costs less
    more = dataclasses.replace(padded, text_mask=padded.text_mask.clone())
    more.text_mask[0, batch.text_tokens.shape[1]] = True
    assert batch_flops(cfg, more) > total
    fewer = dataclasses.replace(batch, image_mask=batch.image_mask.clone())
    fewer.image_mask[0, 1] = False
    assert total - batch_flops(cfg, fewer) > 3 * coefficients(cfg).vision_per_image * 0.99
    # the random batch (2 cameras, short text) is far below the nominal sample (3 cameras, text 48, ...)
    assert total / 4 < 0.6 * flops_per_sample(cfg)
    assert batch_tokens(cfg, batch) == int(sum((v for k, v in batch_token_counts(cfg, batch).items()
                                                if k in ("prefix", "suffix", "expert")), 0).sum())


def test_nominal_sample_equals_a_batch_of_nominal_shape():
    cfg = ModelConfig(preset="tiny", kernels="torch", text_len=6, subtask_len=5, fast_len=8, num_cameras=3)
    batch = random_batch(cfg, batch_size=3, num_cameras=3, text_len=6, subtask_len=5, fast_len=8)
    for name in MASKS:
        getattr(batch, name)[:] = True
    assert batch_flops(cfg, batch) == pytest.approx(3 * flops_per_sample(cfg))


def test_flow_only_with_insulation_counts_the_backbone_forward_once():
    flow_only = ModelConfig(preset="tiny", subtask_weight=0.0, fast_weight=0.0, knowledge_insulation=True)
    batch = full_batch(flow_only)
    parts = forward_flops(flow_only, **batch_token_counts(flow_only, batch))
    vlm = parts["vision"] + parts["backbone"] + parts["attention_vlm"] + parts["lm_head"]
    assert parts["train_total"] == pytest.approx(vlm + 3 * (parts["expert"] + parts["attention_expert"]))
    coupled = dataclasses.replace(flow_only, knowledge_insulation=False)
    assert batch_flops(coupled, batch) == pytest.approx(3 * sum(parts[k] for k in (
        "vision", "backbone", "expert", "attention", "lm_head")))


def test_batch_token_counts_refuse_a_device_batch():
    cfg = ModelConfig(preset="tiny")
    batch = random_batch(cfg, batch_size=2)
    batch = dataclasses.replace(batch, image_mask=batch.image_mask.to("meta"))
    with pytest.raises(ValueError, match="CPU batch"):
        batch_token_counts(cfg, batch)
