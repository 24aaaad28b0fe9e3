"""Tiny models the tests share: a random HF PaliGemma saved locally (nothing is downloaded) and a
tiny MegaVLA with a random batch."""
from __future__ import annotations

import torch

from megavla.config.model import ModelConfig
from megavla.model.synthetic import random_batch
from megavla.model.vla import build_model

HF_VOCAB, IMAGE_TOKEN = 260, 259
TEXT_VOCAB = 256  # MegaVLA keeps rows [0, 256): exercises the "rows beyond text vocab" path


def tiny_paligemma(tmp_path, seed=0):
    """A tiny random HF PaliGemma, every tensor randomized, saved as tmp_path/paligemma: (model, path)."""
    import transformers  # test-only dependency (extras "test"): callers importorskip it

    cfg = transformers.PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                           vision_use_head=False),
        text_config=dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=HF_VOCAB),
        image_token_index=IMAGE_TOKEN, projection_dim=64, hidden_size=64)
    torch.manual_seed(seed)
    model = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    # HF inits norms to identity (LayerNorm 1/0, Gemma RMSNorm 0): randomize everything so that a
    # swapped or dropped tensor in the loader shows up in the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1)
            if name.endswith("weight") and ("layer_norm" in name or "post_layernorm" in name):
                p.add_(1.0)  # SigLIP LayerNorm scales around 1 (Gemma's RMSNorm already is 1 + w)
    path = tmp_path / "paligemma"
    model.save_pretrained(path)
    return model, path


def tiny_vla_and_batch(seed=0, **overrides):
    """A tiny model with its adaRMS gates open (zero at init) and a random batch of 3."""
    torch.manual_seed(seed)
    cfg = ModelConfig(preset="tiny", kernels="torch", action_dim=8, state_dim=8, **overrides)
    model = build_model(cfg).eval()
    with torch.no_grad():  # open the adaRMS gates (zero at init) so the expert really computes
        for name, p in model.named_parameters():
            if name.endswith(".dense.weight"):
                p.normal_(std=0.05)
    return model, random_batch(cfg, batch_size=3, action_dims=6, state_dims=5, gripper_dim=5, seed=seed)
