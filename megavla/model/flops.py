"""Parameter counts per part and training FLOPs: of a nominal sample (``megavla model summary``) and
of the batch actually run (the trainer's MFU numerator, the train_step benchmark).

Formula (model FLOPs, the PaLM/MFU convention: activation-checkpoint recompute is *not* counted,
padding is not counted: only valid tokens do useful work):

    train FLOPs = 3 x forward FLOPs               (backward = 2 x forward)
    forward = sum over every Linear / Conv of 2 x in x out x (valid tokens it sees)
            + attention: per layer 4 x (visible query-key pairs) x num_heads x head_dim
              (QK^T and PV; the same pair count as benchmarks/kernels.py)
            + tied LM head: 2 x width x vocab x (valid subtask + FAST target tokens)

Tokens of one sample: the vision tower runs only on present cameras ((R/p)^2 patches each); the
backbone sees the prefix (camera tokens + valid text + valid state dims when the state is discrete)
and the LM suffix (1 + subtask when it is a target or the actions' context, 2 + FAST with FAST_END);
prefix tokens see the whole prefix, suffix token i sees the prefix and suffix tokens <= i; the
expert's chunk_length (+1 state token when continuous) queries see the prefix (+ the subtask segment
with action_conditioning=subtask) and each other, except that the state token does not see the
actions; its adaRMS ``dense`` layers and the time
MLP run once per sample. Embedding lookups cost nothing. With knowledge insulation and no CE
objective the backbone (and vision) backward never runs, so they count 1x, not 3x. Frozen parts
(train.freeze) still count 3x (their weight gradients are skipped: a small overcount).

The model is built on the meta device once per config (cached), so even pi05-3b costs no memory, and
the per-batch count is a few vector operations on the batch's CPU masks.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import torch
from torch import nn

from megavla.config.core import to_dict
from megavla.config.model import ModelConfig

from .presets import resolve

PARTS = ("vision", "backbone", "expert")
FORWARD_PARTS = ("vision", "backbone", "expert", "attention", "lm_head")


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


def _key(cfg: ModelConfig) -> str:
    return json.dumps(to_dict(resolve(cfg)), sort_keys=True)


@functools.lru_cache(maxsize=16)
def _meta_model(cfg_json: str):
    from .vla import VLA  # local: only the meta model needs the model code, not the cost formulas

    with torch.device("meta"):
        return VLA(ModelConfig(**json.loads(cfg_json)))


def meta_model(cfg) -> nn.Module:
    """The VLA built on the meta device (shapes only, no memory)."""
    return _meta_model(_key(model_config_of(cfg)))


@dataclasses.dataclass(frozen=True)
class Coefficients:
    """Forward FLOPs per unit of work for one model config (from the meta model's layer shapes)."""
    vision_per_image: float       # tower Linears/Conv + projector, per present camera image
    vision_attention_per_image: float
    backbone_per_token: float     # decoder Linears, per backbone token
    expert_per_token: float       # expert stack Linears, per expert token (chunk steps + state token)
    expert_per_step: float        # action in/out projections (+ action-time MLP), per chunk step
    expert_per_sample: float      # adaRMS dense / time MLP / state_proj: once per sample
    expert_state_tokens: int      # 1 with a continuous state token, else 0
    attention_per_pair: float     # 4 x heads x head_dim x depth, per visible query-key pair
    lm_head_per_target: float     # 2 x width x vocab
    patches_per_image: int
    lm_objective: bool            # a CE objective (subtask / FAST) trains the backbone
    subtask_in_sequence: bool     # the subtask segment runs: a CE target and/or the actions' context
    actions_read_subtask: bool    # action_conditioning=subtask (with the flow objective on)


_COEFFICIENTS: dict[str, Coefficients] = {}


def _numel(param) -> int:
    """Full element count, also of a ZeRO-3 partitioned parameter (whose local tensor is empty)."""
    return int(getattr(param, "ds_numel", param.numel()))


def _coefficients(cfg_json: str, model: nn.Module | None = None) -> Coefficients:
    if cfg_json in _COEFFICIENTS:
        return _COEFFICIENTS[cfg_json]
    mcfg = ModelConfig(**json.loads(cfg_json))
    model = model if model is not None else _meta_model(cfg_json)
    patches = (mcfg.image_size // mcfg.patch_size) ** 2
    macs = dict(vision=0.0, backbone=0.0, expert=0.0, expert_step=0.0, expert_once=0.0)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            macs["vision"] += _numel(module.weight) * patches
        elif isinstance(module, nn.Linear):
            n = _numel(module.weight)
            if name.startswith(("vision.", "projector")):
                macs["vision"] += n * patches
            elif name.startswith("expert.stack."):
                macs["expert_once" if name.endswith(".dense") else "expert"] += n
            elif name.startswith(("expert.time_mlp_", "expert.state_proj")):
                macs["expert_once"] += n
            elif name.startswith("expert."):  # action_in/out_proj, action_time_mlp_*: chunk steps only
                macs["expert_step"] += n
            else:
                macs["backbone"] += n
    lm_objective = mcfg.subtask_weight > 0 or mcfg.fast_weight > 0
    read_subtask = mcfg.action_conditioning == "subtask" and mcfg.flow_weight > 0
    _COEFFICIENTS[cfg_json] = Coefficients(
        vision_per_image=2.0 * macs["vision"],
        vision_attention_per_image=mcfg.vision_depth * 4.0 * patches ** 2 * mcfg.vision_width,
        backbone_per_token=2.0 * macs["backbone"], expert_per_token=2.0 * macs["expert"],
        expert_per_step=2.0 * macs["expert_step"], expert_per_sample=2.0 * macs["expert_once"],
        expert_state_tokens=1 if mcfg.state_mode == "continuous" else 0,
        attention_per_pair=mcfg.depth * 4.0 * mcfg.num_heads * mcfg.head_dim,
        lm_head_per_target=2.0 * mcfg.width * model.vocab_size, patches_per_image=patches,
        lm_objective=lm_objective, subtask_in_sequence=mcfg.subtask_weight > 0 or read_subtask,
        actions_read_subtask=read_subtask)
    return _COEFFICIENTS[cfg_json]


def coefficients(cfg, model: nn.Module | None = None) -> Coefficients:
    """Per-config FLOP coefficients, read from `model`'s layer shapes when given (a built VLA of this
    config whose parameters are not partitioned yet), else from a meta-device build. The meta build
    costs ~1-2 CPU-s the first time in a process (its init ops import torch._dynamo and sympy), so
    the trainer passes the model it already has."""
    return _coefficients(_key(model_config_of(cfg)), model)


def forward_flops(cfg, images, prefix, suffix, expert, lm_targets, insulated: bool | None = None,
                  expert_context=None) -> dict[str, float]:
    """Forward FLOPs per part, summed over samples; each count is a number or a 1-D array (one
    entry per sample): present camera images, prefix / LM-suffix / expert tokens, LM targets, and
    the backbone tokens the action rows read (default: the prefix; + the subtask segment when
    actions are conditioned on it).
    "train_total" applies the backward factors; `insulated`: knowledge insulation in effect at this
    step (VLA.insulated; default: the config's setting)."""
    c = coefficients(cfg)
    if insulated is None:
        insulated = bool(resolve(model_config_of(cfg)).knowledge_insulation)
    # only the flow loss, insulated from the backbone: the backbone / vision backward never runs
    backbone_factor = 1.0 if (insulated and not c.lm_objective) else 3.0
    t = {k: np.asarray(v, dtype=np.float64) for k, v in
         dict(images=images, prefix=prefix, suffix=suffix, expert=expert, lm_targets=lm_targets).items()}
    backbone_tokens = t["prefix"] + t["suffix"]
    has_expert = (t["expert"] > 0).astype(np.float64)
    chunk_steps = np.maximum(t["expert"] - c.expert_state_tokens, 0.0)
    pairs_backbone = t["prefix"] ** 2 + t["suffix"] * t["prefix"] + t["suffix"] * (t["suffix"] + 1) / 2
    context = t["prefix"] if expert_context is None else np.asarray(expert_context, dtype=np.float64)
    # every expert row reads the context and the expert block, but a pi0 state token (its own
    # block) does not see the action tokens
    pairs_expert = t["expert"] * (context + t["expert"]) - has_expert * c.expert_state_tokens * chunk_steps
    out = {
        "vision": float((t["images"] * c.vision_per_image).sum()),
        "backbone": float((backbone_tokens * c.backbone_per_token).sum()),
        "expert": float((t["expert"] * c.expert_per_token + chunk_steps * c.expert_per_step
                         + has_expert * c.expert_per_sample).sum()),
        "attention_vlm": float((t["images"] * c.vision_attention_per_image
                                + pairs_backbone * c.attention_per_pair).sum()),
        "attention_expert": float((pairs_expert * c.attention_per_pair).sum()),
        "lm_head": float((t["lm_targets"] * c.lm_head_per_target).sum()),
    }
    out["attention"] = out["attention_vlm"] + out["attention_expert"]
    vlm = out["vision"] + out["backbone"] + out["attention_vlm"] + out["lm_head"]
    out["train_total"] = backbone_factor * vlm + 3.0 * (out["expert"] + out["attention_expert"])
    return out


def token_counts(cfg: ModelConfig) -> dict[str, int]:
    """Nominal tokens of one sample (model.num_cameras, text_len, subtask_len, fast_len)."""
    cfg = resolve(cfg)
    patches = cfg.num_cameras * (cfg.image_size // cfg.patch_size) ** 2
    c = coefficients(cfg)
    subtask = 1 + cfg.subtask_len if c.subtask_in_sequence else 0   # SUBTASK_START + tokens
    fast = 2 + cfg.fast_len if cfg.fast_weight > 0 else 0           # FAST_START + tokens + FAST_END
    lm_targets = (cfg.subtask_len if cfg.subtask_weight > 0 else 0) + (fast - 1 if fast else 0)
    prefix = patches + cfg.text_len + (cfg.state_dim if cfg.state_mode == "discrete" else 0)
    expert = cfg.chunk_length + (1 if cfg.state_mode == "continuous" else 0) if cfg.flow_weight > 0 else 0
    return {"images": cfg.num_cameras, "patches": patches, "prefix": prefix, "suffix": subtask + fast,
            "backbone": prefix + subtask + fast, "expert": expert, "lm_targets": lm_targets,
            "expert_context": prefix + (subtask if c.actions_read_subtask else 0)}


def flops_breakdown(cfg) -> dict[str, float]:
    """Forward FLOPs of one nominal sample per part (+ "train_total")."""
    mcfg = resolve(model_config_of(cfg))
    tok = token_counts(mcfg)
    return forward_flops(mcfg, tok["images"], tok["prefix"], tok["suffix"], tok["expert"], tok["lm_targets"],
                         expert_context=tok["expert_context"])


def flops_per_sample(cfg) -> float:
    """Training (forward + backward) FLOPs for one nominal sample; cfg is a ModelConfig (nominal
    model.num_cameras) or a full Config (cameras = len(data.cameras))."""
    return flops_breakdown(cfg)["train_total"]


def _valid_per_sample(mask: torch.Tensor) -> np.ndarray:
    if mask.device.type != "cpu":
        raise ValueError("batch_token_counts reads the batch's masks on the host: call it on the CPU batch "
                         "(before batch.to(device)), so that it forces no device sync")
    return mask.numpy().sum(axis=1)


def batch_token_counts(cfg: ModelConfig, batch) -> dict[str, np.ndarray]:
    """Per-sample valid token counts [B] of a megavla.batch.Batch, as VLA.forward consumes them.
    Reads the CPU batch's masks with numpy (no tensor -> host conversion, no device sync)."""
    cfg = resolve(cfg)
    images = _valid_per_sample(batch.image_mask)
    prefix = images * coefficients(cfg).patches_per_image + _valid_per_sample(batch.text_mask)
    if cfg.state_mode == "discrete":
        prefix = prefix + _valid_per_sample(batch.state_mask)
    c = coefficients(cfg)
    zero = np.zeros_like(images)
    suffix, lm_targets, context = zero, zero, prefix
    if c.subtask_in_sequence:  # SUBTASK_START + subtask tokens: a CE target and/or the actions' context
        segment = 1 + _valid_per_sample(batch.subtask_mask)
        suffix = suffix + segment
        if cfg.subtask_weight > 0:
            lm_targets = lm_targets + segment - 1
        if c.actions_read_subtask:
            context = prefix + segment
    if cfg.fast_weight > 0:    # FAST_START + FAST tokens + FAST_END (a target too)
        valid = _valid_per_sample(batch.fast_mask)
        suffix = suffix + 2 + valid
        lm_targets = lm_targets + valid + 1
    per_expert = cfg.chunk_length + (1 if cfg.state_mode == "continuous" else 0) if cfg.flow_weight > 0 else 0
    return {"images": images, "prefix": prefix, "suffix": suffix, "expert": zero + per_expert,
            "lm_targets": lm_targets, "expert_context": context}


def batch_flops(cfg: ModelConfig, batch, insulated: bool | None = None) -> float:
    """Training FLOPs of one micro-batch as the model runs it (valid tokens only)."""
    tok = batch_token_counts(cfg, batch)
    return forward_flops(cfg, **tok, insulated=insulated)["train_total"]


def batch_tokens(cfg: ModelConfig, batch) -> int:
    """Valid tokens the model processes for this batch (backbone + expert), for tokens/s."""
    tok = batch_token_counts(cfg, batch)
    return int((tok["prefix"] + tok["suffix"] + tok["expert"]).sum())  # expert_context: a subset
