"""Parameter counts per part and training FLOPs per sample (the trainer's MFU numerator).

Formula (model FLOPs, the PaLM/MFU convention: activation-checkpoint recompute is *not* counted):

    train FLOPs/sample = 3 x forward FLOPs        (backward = 2 x forward)
    forward = sum over every Linear / Conv of 2 x in x out x (tokens it sees per sample)
            + attention: per layer 4 x Lq x Lk x num_heads x head_dim  (QK^T and PV, dense mask)
            + tied LM head: 2 x width x vocab x (subtask + FAST target tokens)

Tokens per sample come from the config's nominal lengths: vision runs num_cameras x (R/p)^2
patches; the backbone sees cameras' tokens + text_len + state tokens (state_dim when discrete) +
LM suffix (1 + subtask_len, 1 + fast_len for the objectives switched on); the expert sees
chunk_length (+1 state token when continuous) queries over backbone + expert keys; its adaRMS
``dense`` layers and the time MLP run once per sample. Embedding lookups cost nothing. With
knowledge insulation the backbone's backward still runs (for the CE losses), so the 3x holds;
when only the flow loss is on, the backbone backward is skipped and its 3x overcounts by 2x.
The model is built on the meta device, so even pi05-3b costs no memory.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import torch
from torch import nn

from megavla.config.core import to_dict
from megavla.config.model import ModelConfig

from .presets import resolve

PARTS = ("vision", "backbone", "expert")


def part_of(param_name: str) -> str:
    """Which part a parameter belongs to: vision (tower + projector), backbone (embeddings,
    decoder, state embedding) or expert."""
    top = param_name.split(".")[0]  # parameter or module name
    if top in ("vision", "projector"):
        return "vision"
    return "expert" if top == "expert" else "backbone"


def parameter_counts(model: nn.Module) -> dict[str, int]:
    counts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        counts[part_of(name)] += p.numel()
    counts["total"] = sum(counts[p] for p in PARTS)
    return counts


def model_config_of(cfg) -> ModelConfig:
    """ModelConfig from a ModelConfig or a full Config (whose data.cameras then sets num_cameras)."""
    if hasattr(cfg, "model") and hasattr(cfg, "data"):
        return dataclasses.replace(cfg.model, num_cameras=len(cfg.data.cameras))
    return cfg


@functools.lru_cache(maxsize=16)
def _meta_model(cfg_json: str):
    from .vla import VLA  # local: vla imports presets, which this module also needs

    with torch.device("meta"):
        return VLA(ModelConfig(**json.loads(cfg_json)))


def meta_model(cfg) -> nn.Module:
    """The VLA built on the meta device (shapes only, no memory)."""
    return _meta_model(json.dumps(to_dict(resolve(model_config_of(cfg))), sort_keys=True))


def token_counts(cfg: ModelConfig) -> dict[str, int]:
    cfg = resolve(cfg)
    patches = cfg.num_cameras * (cfg.image_size // cfg.patch_size) ** 2
    lm_targets = (cfg.subtask_len if cfg.subtask_weight > 0 else 0) + (cfg.fast_len if cfg.fast_weight > 0 else 0)
    lm_suffix = (1 + cfg.subtask_len if cfg.subtask_weight > 0 else 0) + (1 + cfg.fast_len if cfg.fast_weight > 0 else 0)
    backbone = patches + cfg.text_len + (cfg.state_dim if cfg.state_mode == "discrete" else 0) + lm_suffix
    expert = cfg.chunk_length + (1 if cfg.state_mode == "continuous" else 0) if cfg.flow_weight > 0 else 0
    return {"patches": patches, "backbone": backbone, "expert": expert, "lm_targets": lm_targets}


def flops_breakdown(cfg) -> dict[str, float]:
    """Forward FLOPs per sample per part (+ "train_total" = 3 x their sum)."""
    mcfg = resolve(model_config_of(cfg))
    model = meta_model(mcfg)
    tok = token_counts(mcfg)
    per_camera_patches = tok["patches"] // mcfg.num_cameras
    out = dict.fromkeys(("vision", "backbone", "expert", "attention", "lm_head"), 0.0)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            macs = module.weight.numel() * tok["patches"]
        elif isinstance(module, nn.Linear):
            if name.startswith(("vision.", "projector")):
                tokens = tok["patches"]
            elif name.startswith("expert."):
                once = name.endswith(".dense") or "time_mlp_" in name or "state_proj" in name
                tokens = 1 if once else tok["expert"]
                if tok["expert"] == 0:
                    tokens = 0
            else:
                tokens = tok["backbone"]
            macs = module.weight.numel() * tokens
        else:
            continue
        out[part_of(name)] += 2.0 * macs
    heads_dim = mcfg.num_heads * mcfg.head_dim
    attn = mcfg.vision_depth * 4.0 * per_camera_patches ** 2 * mcfg.vision_width * mcfg.num_cameras
    attn += mcfg.depth * 4.0 * tok["backbone"] ** 2 * heads_dim
    attn += mcfg.depth * 4.0 * tok["expert"] * (tok["backbone"] + tok["expert"]) * heads_dim
    out["attention"] = attn
    out["lm_head"] = 2.0 * mcfg.width * model.vocab_size * tok["lm_targets"]
    out["train_total"] = 3.0 * sum(out[k] for k in ("vision", "backbone", "expert", "attention", "lm_head"))
    return out


def flops_per_sample(cfg) -> float:
    """Training (forward + backward) FLOPs for one sample; cfg is a ModelConfig (nominal
    model.num_cameras) or a full Config (cameras = len(data.cameras))."""
    return flops_breakdown(cfg)["train_total"]
