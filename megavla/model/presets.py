"""Model size presets: ``tiny`` (CPU tests) -> ``small`` (~100M) -> ``1b`` -> ``pi05-3b``.

A preset fills every size field of :class:`ModelConfig` that is left ``None``; any field set in the
YAML / overrides wins. ``pi05-3b`` is the paper's model: SigLIP So400m/14 at 224 px + Gemma-2B
backbone + a Gemma-300M-shaped action expert (width 1024, MLP 4096; the adaRMS modulation adds
~0.11B on top, as in openpi's pi0.5).
"""
from __future__ import annotations

import dataclasses

from megavla.config.core import ConfigError
from megavla.config.model import SIZE_FIELDS, ModelConfig

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(image_size=32, patch_size=8, vision_width=64, vision_depth=2, vision_heads=2,
                 vision_mlp_dim=128, width=64, depth=2, num_heads=2, num_kv_heads=1, head_dim=32,
                 mlp_dim=192, expert_width=48, expert_mlp_dim=96, text_vocab_size=1024,
                 fast_vocab_size=1024),
    "small": dict(image_size=224, patch_size=16, vision_width=384, vision_depth=8, vision_heads=6,
                  vision_mlp_dim=1536, width=640, depth=10, num_heads=8, num_kv_heads=1, head_dim=80,
                  mlp_dim=2560, expert_width=320, expert_mlp_dim=1280, text_vocab_size=16384,
                  fast_vocab_size=1024),
    # SigLIP B/16 + an 18-layer 1536-wide decoder.
    "1b": dict(image_size=224, patch_size=16, vision_width=768, vision_depth=12, vision_heads=12,
               vision_mlp_dim=3072, width=1536, depth=18, num_heads=8, num_kv_heads=1, head_dim=192,
               mlp_dim=8192, expert_width=768, expert_mlp_dim=3072, text_vocab_size=32000,
               fast_vocab_size=1024),
    # SigLIP So400m/14 (224 px -> 256 tokens) + Gemma-2B (PaliGemma vocab) + Gemma-300M expert.
    "pi05-3b": dict(image_size=224, patch_size=14, vision_width=1152, vision_depth=27, vision_heads=16,
                    vision_mlp_dim=4304, width=2048, depth=18, num_heads=8, num_kv_heads=1, head_dim=256,
                    mlp_dim=16384, expert_width=1024, expert_mlp_dim=4096, text_vocab_size=257152,
                    fast_vocab_size=1024),
}


# Training-recipe defaults per preset (used where the config leaves them null). The from-scratch
# presets read a continuous state token and train the backbone with the flow loss (measured in
# issue 11: discrete tokens + insulation left a tiny model unable to act); pi05-3b starts from
# PaliGemma, reads pi0.5's discrete state tokens and insulates the pretrained backbone.
TRAINING_DEFAULTS: dict[str, dict] = {
    "tiny": dict(state_mode="continuous", knowledge_insulation=False),
    "small": dict(state_mode="continuous", knowledge_insulation=False),
    "1b": dict(state_mode="continuous", knowledge_insulation=False),
    "pi05-3b": dict(state_mode="discrete", knowledge_insulation=True),
}


def resolve(cfg: ModelConfig) -> ModelConfig:
    """A copy of ``cfg`` with every size field (and the null training-recipe fields) filled from its
    preset; checks the combination."""
    if cfg.preset not in PRESETS:
        raise ConfigError(f"model.preset={cfg.preset!r} is unknown; choose one of {sorted(PRESETS)}")
    preset = {**PRESETS[cfg.preset], **TRAINING_DEFAULTS[cfg.preset]}
    filled = {name: (getattr(cfg, name) if getattr(cfg, name) is not None else preset[name])
              for name in (*SIZE_FIELDS, *TRAINING_DEFAULTS[cfg.preset])}
    out = dataclasses.replace(cfg, **filled)
    if out.knowledge_insulation_start_step and not out.knowledge_insulation:
        raise ConfigError(f"model.knowledge_insulation_start_step={out.knowledge_insulation_start_step} "
                          f"but insulation is off for preset {cfg.preset}; set model.knowledge_insulation=true")
    if out.image_size % out.patch_size:
        raise ConfigError(f"model.image_size={out.image_size} must be a multiple of model.patch_size="
                          f"{out.patch_size}")
    if out.vision_width % out.vision_heads:
        raise ConfigError(f"model.vision_width={out.vision_width} must be divisible by model.vision_heads="
                          f"{out.vision_heads}")
    if out.num_heads % out.num_kv_heads:
        raise ConfigError(f"model.num_heads={out.num_heads} must be a multiple of model.num_kv_heads="
                          f"{out.num_kv_heads} (GQA/MQA)")
    if out.head_dim % 2:
        raise ConfigError(f"model.head_dim={out.head_dim} must be even (RoPE rotates pairs)")
    return out

