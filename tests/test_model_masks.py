"""Attention layout, knowledge insulation and loss masks of the VLA, checked by perturbation."""
import dataclasses

import pytest
import torch

from megavla.batch import MAX_EMBODIMENTS

from megavla.config.model import ModelConfig
from megavla.model.synthetic import HUMAN, random_batch
from megavla.model.vla import build_model

ATOL = 1e-6


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(preset="tiny", kernels="torch", action_dim=8, state_dim=8, **overrides)


def make(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny(**overrides)
    model = build_model(cfg).eval()
    # adaRMS gates start at zero (the expert's branches are closed): open them so the expert's
    # output depends on what it attends to, else these tests could pass for the wrong reason
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".dense.weight"):
                p.normal_(std=0.05)
    batch = random_batch(cfg, batch_size=4, action_dims=6, state_dims=5, gripper_dim=5, seed=seed)
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(batch.actions.shape, generator=g)
    time = torch.rand(batch.batch_size, generator=g)
    return model, batch, noise, time


def moved(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The controls: a real change shows well above float noise (the untouched cases agree to ~1e-7)."""
    return (a - b).abs().max().item() > 1e-5


def run(model, batch, noise, time):
    with torch.no_grad():
        return model.run(batch, noise, time)


def with_(batch, **fields):
    return dataclasses.replace(batch, **{k: v.clone() for k, v in fields.items()})


@pytest.mark.parametrize("conditioning", ["instruction", "subtask"])
def test_fast_tokens_never_reach_the_expert_and_subtask_tokens_only_when_conditioned(conditioning):
    model, batch, noise, time = make(action_conditioning=conditioning)
    base = run(model, batch, noise, time)
    fast = batch.fast_tokens.clone()
    fast[batch.fast_mask] = (fast[batch.fast_mask] + 17) % model.cfg.fast_vocab_size
    changed = run(model, with_(batch, fast_tokens=fast), noise, time)
    assert torch.allclose(changed.velocity, base.velocity, atol=ATOL)
    assert moved(changed.fast_logits, base.fast_logits)  # the perturbation is real
    sub = batch.subtask_tokens.clone()
    sub[batch.subtask_mask] = (sub[batch.subtask_mask] + 29) % model.cfg.text_vocab_size
    changed = run(model, with_(batch, subtask_tokens=sub), noise, time)
    if conditioning == "subtask":
        assert moved(changed.velocity, base.velocity)
    else:
        assert torch.allclose(changed.velocity, base.velocity, atol=ATOL)
    # the prefix (bidirectional, before the suffix) is unchanged either way
    n_prefix = base.backbone_hidden.shape[1] - 3 - batch.subtask_tokens.shape[1] - batch.fast_tokens.shape[1]
    assert torch.allclose(changed.backbone_hidden[:, :n_prefix], base.backbone_hidden[:, :n_prefix], atol=ATOL)


def test_a_later_causal_token_leaves_earlier_outputs_unchanged():
    model, batch, noise, time = make()
    base = run(model, batch, noise, time)
    j = 3  # all samples have >= 4 valid FAST tokens (lengths >= fast_len // 2)
    assert bool(batch.fast_mask[:, j].all())
    fast = batch.fast_tokens.clone()
    fast[:, j] = (fast[:, j] + 5) % model.cfg.fast_vocab_size
    changed = run(model, with_(batch, fast_tokens=fast), noise, time)
    # logits at positions <= j were computed before token j is read (position j+1 reads it)
    assert torch.allclose(changed.fast_logits[:, : j + 1], base.fast_logits[:, : j + 1], atol=ATOL)
    assert moved(changed.fast_logits[:, j + 1], base.fast_logits[:, j + 1])
    assert torch.allclose(changed.subtask_logits, base.subtask_logits, atol=ATOL)
    # and subtask tokens: changing token 2 leaves subtask logits 0..2 alone
    sub = batch.subtask_tokens.clone()
    sub[:, 2] = (sub[:, 2] + 3) % model.cfg.text_vocab_size
    changed = run(model, with_(batch, subtask_tokens=sub), noise, time)
    assert torch.allclose(changed.subtask_logits[:, :3], base.subtask_logits[:, :3], atol=ATOL)
    assert moved(changed.subtask_logits[:, 3], base.subtask_logits[:, 3])


def test_a_missing_cameras_pixels_change_nothing():
    model, batch, noise, time = make()
    assert not bool(batch.image_mask[1, 1])  # sample 1 is human: wrist camera missing
    base = run(model, batch, noise, time)
    images = batch.images.clone()
    images[1, 1] = 255 - images[1, 1]
    changed = run(model, with_(batch, images=images), noise, time)
    for name in ("velocity", "fast_logits", "subtask_logits"):
        assert torch.allclose(getattr(changed, name), getattr(base, name), atol=ATOL), name
    # control: the same change to a present camera moves the outputs
    images = batch.images.clone()
    images[0, 1] = 255 - images[0, 1]
    changed = run(model, with_(batch, images=images), noise, time)
    assert moved(changed.velocity[0], base.velocity[0])


@pytest.mark.parametrize("ki,start,step,insulated", [(True, 0, 0, True), (False, 0, 0, False),
                                                     (True, 5, 4, False), (True, 5, 5, True)])
def test_knowledge_insulation_blocks_flow_gradient_into_the_backbone(ki, start, step, insulated):
    """off / on / on after N steps (the trainer sets model.training_step before each step)."""
    model, batch, noise, time = make(knowledge_insulation=ki, knowledge_insulation_start_step=start,
                                     fast_weight=0.0, subtask_weight=0.0)
    model.train()
    model.training_step = step
    assert model.insulated == insulated
    model(batch, noise, time)["loss"].backward()
    grads = {name: (p.grad.abs().sum().item() if p.grad is not None else 0.0)
             for name, p in model.named_parameters()}
    vlm = sum(v for k, v in grads.items() if not k.startswith("expert."))
    expert = sum(v for k, v in grads.items() if k.startswith("expert."))
    assert expert > 0
    if insulated:
        assert vlm == 0.0
    else:
        assert vlm > 0
        assert grads["vision.patch_embed.weight"] > 0 and grads["backbone.layers.0.self_attn.k_proj.weight"] > 0


def test_human_gripper_dim_gets_no_gradient():
    model, batch, noise, time = make(fast_weight=0.0, subtask_weight=0.0)
    model.train()
    human = torch.nonzero(batch.embodiment == HUMAN).squeeze(1)
    sub = batch.select(human)
    actions = sub.actions.clone().requires_grad_(True)
    loss = model(dataclasses.replace(sub, actions=actions), noise[human], time[human])["loss"]
    loss.backward()
    gripper = 5
    out_proj = model.expert.action_out_proj
    assert out_proj.weight.grad[gripper].abs().max() == 0 and out_proj.bias.grad[gripper] == 0
    assert actions.grad[:, :, gripper].abs().max() == 0
    assert out_proj.weight.grad[0].abs().max() > 0  # a supervised dim does learn


@pytest.mark.parametrize("state_mode", ["discrete", "continuous"])
def test_garbage_in_unsupervised_positions_changes_no_loss(state_mode):
    model, batch, noise, time = make(state_mode=state_mode)
    base = model(batch, noise, time)
    unsup = ~(batch.action_dim_mask[:, None, :] & batch.action_time_mask[:, :, None])
    assert unsup.any()
    actions = torch.where(unsup, torch.full_like(batch.actions, float("nan")), batch.actions)
    state = torch.where(batch.state_mask, batch.state, torch.full_like(batch.state, float("nan")))
    text = torch.where(batch.text_mask, batch.text_tokens, torch.full_like(batch.text_tokens, 10**6))
    fast = torch.where(batch.fast_mask, batch.fast_tokens, torch.full_like(batch.fast_tokens, -5))
    changed = model(with_(batch, actions=actions, state=state, text_tokens=text, fast_tokens=fast), noise, time)
    assert base.keys() == changed.keys()
    for key in base:
        assert torch.allclose(base[key], changed[key], atol=1e-6), key
    # control: a change in a supervised action entry does move the flow loss
    actions = batch.actions.clone()
    actions[0, 0, 0] += 1.0
    assert not torch.allclose(model(with_(batch, actions=actions), noise, time)["flow"], base["flow"])


def test_per_embodiment_losses_and_switches():
    model, batch, noise, time = make()
    out = model(batch, noise, time)
    for name in ("flow", "fast", "subtask"):
        # per-embodiment [numerator sums; denominators] on the device; both embodiments present, and
        # together they make up the batch's loss (flow: mean over supervised samples; CE: over tokens)
        sums = out[f"{name}/by_embodiment"]
        assert sums.shape == (2, MAX_EMBODIMENTS) and bool((sums[1, :2] > 0).all()) and not sums[:, 2:].any()
        assert torch.allclose(sums[0].sum() / sums[1].sum(), out[name])
    w = model.cfg
    expected = w.flow_weight * out["flow"] + w.fast_weight * out["fast"] + w.subtask_weight * out["subtask"]
    assert torch.allclose(out["loss"], expected)
    flow_only, _, _, _ = make(fast_weight=0.0, subtask_weight=0.0)
    keys = flow_only(batch, noise, time).keys()
    assert "fast" not in keys and "subtask" not in keys and "flow" in keys
    with pytest.raises(ValueError, match="model.text_vocab_size"):
        bad = batch.text_tokens.clone()
        bad[0, 0] = 10**6
        model(with_(batch, text_tokens=bad))
