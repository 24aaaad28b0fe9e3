"""Model settings (owned by megavla/model). Presets live in megavla/model/presets.py + configs/.

Every size field defaults to ``None`` = "take it from the preset"; set one to override the preset
(``model.width=768``). ``megavla.model.presets.resolve(cfg)`` returns a copy with all sizes filled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .core import ConfigError

# Fields that a preset fills (None here = use the preset's value).
SIZE_FIELDS = (
    "image_size", "patch_size", "vision_width", "vision_depth", "vision_heads", "vision_mlp_dim",
    "width", "depth", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
    "expert_width", "expert_mlp_dim", "text_vocab_size", "fast_vocab_size",
)


@dataclass
class ModelConfig:
    preset: str = "tiny"
    kernels: Literal["auto", "triton", "torch"] = "auto"
    attention: Literal["auto", "flash", "flex", "sdpa", "eager"] = "auto"

    # --- vision tower (SigLIP-style ViT), one image per camera
    image_size: int | None = None
    patch_size: int | None = None
    vision_width: int | None = None
    vision_depth: int | None = None
    vision_heads: int | None = None
    vision_mlp_dim: int | None = None
    # --- backbone (Gemma-style decoder); the expert shares depth, num_heads, num_kv_heads, head_dim
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int | None = None
    # --- action expert (own, narrower weights)
    expert_width: int | None = None
    expert_mlp_dim: int | None = None
    # --- vocabularies: model vocab = text + FAST (offset by text_vocab_size) + FAST end + 2 start markers
    text_vocab_size: int | None = None
    fast_vocab_size: int | None = None
    rope_theta: float = 10000.0

    # --- action / state interface (must match data.chunk_length / max_action_dim / max_state_dim)
    chunk_length: int = 10
    action_dim: int = 32
    state_dim: int = 32
    # continuous: one projected state token in the expert suffix (pi0): the flow loss trains it and
    # a small from-scratch model reads it precisely.
    # discrete: pi0.5 state tokens in the prefix (state_bins bins over [-1, 1]); what a pretrained
    # VLM backbone reads. A from-scratch tiny model cannot read the unordered bins well (issue 11:
    # 1/20 vs 9/20 closed-loop success on one combo).
    # text: no state parameters; the state reaches the model only as prompt text, the way a loaded
    # LeRobot / openpi pi0.5 was trained ("Task: ..., State: 12 200 ...;\nAction: ", 256 bins
    # written in decimal; megavla.data.prompt.pi05_prompt) -- what pi0_size_overrides sets.
    # null = the preset's choice (presets.TRAINING_DEFAULTS): continuous for the from-scratch
    # presets tiny / small / 1b, discrete for pi05-3b (PaliGemma-initialised).
    state_mode: Literal["discrete", "continuous", "text"] | None = None
    state_bins: int = 256
    # adarms: pi0.5 adaptive RMSNorm in the expert; mlp: pi0 time embedding mixed into action tokens.
    time_conditioning: Literal["adarms", "mlp"] = "adarms"
    # No gradient from the flow loss into the backbone (the expert sees detached backbone K/V).
    # null = the preset's choice: off for from-scratch presets (with a random backbone, insulation
    # leaves vision and state to the FAST / subtask losses alone), on for pi05-3b (a pretrained
    # VLM whose knowledge the flow gradient would erode; the paper's recipe).
    # knowledge_insulation_start_step=N with insulation on: the first N steps train without it
    # (the backbone learns to see for the actions), then it switches on ("on after N").
    knowledge_insulation: bool | None = None
    knowledge_insulation_start_step: int = 0
    # What the action rows read besides the prefix. subtask (pi0.5: pi(a | o, l^) pi(l^ | o, l)):
    # training feeds the ground-truth subtask tokens, inference first decodes the subtask greedily
    # (up to subtask_len tokens or subtask_eos_id) and samples actions on prefix + subtask.
    # instruction: the action rows read the prefix only (no subtask step at inference).
    action_conditioning: Literal["instruction", "subtask"] = "subtask"
    # The text tokenizer's EOS (Gemma / PaliGemma and `megavla tokenizer train`: 1); subtask targets
    # end in it, and inference stops decoding the subtask there.
    subtask_eos_id: int = 1

    # --- loss weights (0 = objective off, its compute skipped)
    flow_weight: float = 1.0
    fast_weight: float = 1.0
    subtask_weight: float = 1.0

    activation_checkpointing: bool = False

    # --- nominal sequence lengths for FLOPs accounting (flops_per_sample); subtask_len is also the
    # most subtask tokens inference decodes before sampling actions (action_conditioning=subtask)
    num_cameras: int = 3
    text_len: int = 48
    subtask_len: int = 16
    fast_len: int = 64

    def validate(self) -> None:
        if not self.preset:
            raise ConfigError("preset must be a non-empty name")
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}={value} must be positive (or null for the preset's value)")
        if self.subtask_eos_id < 0:
            raise ConfigError(f"subtask_eos_id={self.subtask_eos_id} must be >= 0 (the text tokenizer's eos_id)")
        if self.knowledge_insulation_start_step < 0:
            raise ConfigError(f"knowledge_insulation_start_step={self.knowledge_insulation_start_step} "
                              "must be >= 0")
        if self.knowledge_insulation_start_step and self.knowledge_insulation is False:
            raise ConfigError("knowledge_insulation_start_step is set but knowledge_insulation is false; "
                              "set model.knowledge_insulation=true for 'on after N steps'")
        for name in ("chunk_length", "action_dim", "state_dim", "state_bins", "num_cameras", "subtask_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        for name in ("flow_weight", "fast_weight", "subtask_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0 (0 turns the objective off)")
        if self.flow_weight == 0 and self.fast_weight == 0 and self.subtask_weight == 0:
            raise ConfigError("flow_weight, fast_weight and subtask_weight are all 0: nothing to train; "
                              "set at least one > 0")
