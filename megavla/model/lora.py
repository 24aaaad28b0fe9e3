"""LoRA adapters (low-rank updates of chosen Linear layers) for a parameter-light finetune.

``apply_lora(model, cfg)`` swaps each targeted ``nn.Linear`` for a ``LoRALinear`` that *shares* the
Linear's own weight and bias (the same Parameter objects, so pretrained values, DeepSpeed ZeRO-3
partitioning and parameter names ``...q_proj.weight`` are kept) and adds ``lora_A`` [r, in] and
``lora_B`` [out, r]: ``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T``. B starts at zero, so
the adapted model's output at step 0 equals the base model's. It is applied after the model is built
and pretrained weights are loaded (a PaliGemma / pi0.5 warm start, then LoRA).

``merge_lora(model)`` folds ``(alpha / r) B A`` into each weight and puts plain ``nn.Linear`` modules
back: the state dict then loads into a model built without LoRA (what ``megavla export`` writes).

Which layers: ``cfg.targets`` (attention: q/k/v/o projections, SigLIP's out_proj; mlp: Gemma's
gate/up/down, SigLIP's fc1/fc2) within ``cfg.parts`` (backbone: ``backbone.``, expert:
``expert.stack.``, vision: ``vision.``). openpi's Gemma LoRA targets the same attention and MLP
weights (rank 16 / alpha 16 on the backbone, 32 / 32 on the expert).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# module-name prefixes of the parts, and the Linear names of each target kind
PART_PREFIXES = {"backbone": "backbone.", "expert": "expert.stack.", "vision": "vision."}
TARGET_NAMES = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj"),
                "mlp": ("gate_proj", "up_proj", "down_proj", "fc1", "fc2")}
ADAPTER_PARAMS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` (its weight/bias are the wrapped Linear's own Parameters) plus a rank-r update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)   # not nn.Linear.__init__: that would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        device = base.weight.device
        dtype = base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # PEFT's / the LoRA paper's A init
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._keep_init = True   # VLA's weight init (re-applied under zero.Init) must not touch it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return y + update * self.scale

    def delta(self) -> torch.Tensor:
        """The weight update this adapter stands for: (alpha / r) B A, [out, in]."""
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def target_linears(model: nn.Module, parts, targets) -> list[tuple[str, nn.Linear]]:
    """(name, Linear) of every layer LoRA would adapt, in module order."""
    prefixes = tuple(PART_PREFIXES[p] for p in parts)
    names = {n for t in targets for n in TARGET_NAMES[t]}
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
            and name.startswith(prefixes) and name.rsplit(".", 1)[-1] in names]


def adapter_parameter_count(model: nn.Module, cfg) -> int:
    """Parameters that `apply_lora(model, cfg)` would add (model not changed; works on meta models)."""
    if not cfg.enabled:
        return 0
    return sum(cfg.rank * (m.in_features + m.out_features) for _, m in target_linears(model, cfg.parts, cfg.targets))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, cfg) -> int:
    """Adapt the layers `cfg` (a LoraConfig: rank, alpha, dropout, targets, parts) names; returns the
    number of adapter parameters added (0 when cfg.rank is 0 / None). Raises ValueError when the
    parts/targets match no layer of this model."""
    if not cfg.enabled:
        return 0
    found = target_linears(model, cfg.parts, cfg.targets)
    if not found:
        raise ValueError(f"train.lora: parts={list(cfg.parts)} x targets={list(cfg.targets)} match no Linear "
                         "layer of this model; choose parts from backbone/expert/vision and targets from "
                         "attention/mlp")
    added = 0
    for name, linear in found:
        lora = LoRALinear(linear, cfg.rank, cfg.alpha_value, cfg.dropout)
        _set_submodule(model, name, lora)
        added += lora.lora_A.numel() + lora.lora_B.numel()
    log.info("LoRA rank %d (alpha %g, dropout %g) on %d layers (%s x %s): %.3fM adapter parameters",
             cfg.rank, cfg.alpha_value, cfg.dropout, len(found), "/".join(cfg.parts), "/".join(cfg.targets),
             added / 1e6)
    return added


def is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def freeze_for_lora(model: nn.Module, trainable_parts: list[str]) -> tuple[int, int]:
    """requires_grad=False on everything but the adapters and parameters whose name starts with one
    of `trainable_parts` (checked: each must match something). Returns (trainable, frozen) counts."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in trainable_parts:
        if not any(n.startswith(prefix) for n in names):
            raise ValueError(f"train.trainable_parts: no parameter name starts with {prefix!r}; top-level "
                             f"modules are {sorted({n.split('.')[0] for n in names})}")
    trainable = frozen = 0
    for name, p in model.named_parameters():
        keep = is_adapter(name) or any(name.startswith(prefix) for prefix in trainable_parts)
        p.requires_grad_(keep)
        n = int(getattr(p, "ds_numel", p.numel()))
        trainable, frozen = (trainable + n, frozen) if keep else (trainable, frozen + n)
    _warn_closed_gates(model)
    return trainable, frozen


def _warn_closed_gates(model: nn.Module) -> None:
    """An expert whose adaRMS gates are all zero (a fresh expert: adaLN-zero init, e.g. after a
    PaliGemma start) and frozen passes nothing through its attention / MLP branches, so adapters there
    never get a gradient. Checked where the weights are local (not under ZeRO-3 partitioning)."""
    closed = [name for name, m in model.named_modules()
              if getattr(m, "_zero_init", False) and not m.weight.requires_grad
              and not hasattr(m.weight, "ds_id") and not m.weight.any() and not m.bias.any()]
    adapted = any(isinstance(m, LoRALinear) and n.startswith(PART_PREFIXES["expert"]) for n, m in model.named_modules())
    if closed and adapted:
        log.warning("LoRA: %d adaRMS gates of the action expert are zero and frozen (%s, ...): a fresh, "
                    "not pretrained expert, whose attention/MLP adapters would get no gradient; train it "
                    "in full with train.trainable_parts=[expert] (and train.lora.parts without expert)",
                    len(closed), closed[0])


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its weight and put a plain nn.Linear (same weight/bias Parameters)
    back, so the state dict has no adapter keys. Returns the number of layers merged."""
    merged = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            plain = nn.Linear.__new__(nn.Linear)
            nn.Module.__init__(plain)
            plain.in_features, plain.out_features = m.in_features, m.out_features
            plain.weight, plain.bias = m.weight, m.bias
            _set_submodule(model, name, plain)
            merged += 1
    return merged


def optimizer_state_bytes(trainable: int, precision: str) -> int:
    """AdamW state per trainable parameter: exp_avg + exp_avg_sq in fp32 (8 B), plus DeepSpeed's fp32
    master copy under bf16 mixed precision (4 B). ZeRO-1/2/3 split this across ranks."""
    return trainable * (12 if precision == "bf16" else 8)


def trainable_parameter_counts(model: nn.Module, train_cfg) -> dict[str, int]:
    """{"full": trainable parameters of a full finetune, "lora": with train_cfg.lora} for `model`
    (not changed; a meta model works). train.freeze applies to both; LoRA keeps its adapters and
    train.trainable_parts."""
    def frozen(name: str) -> bool:
        return any(name.startswith(prefix) for prefix in train_cfg.freeze)
    params = [(n, p.numel()) for n, p in model.named_parameters()]
    full = sum(k for n, k in params if not frozen(n))
    lora = sum(k for n, k in params if not frozen(n) and any(n.startswith(t) for t in train_cfg.trainable_parts))
    return {"full": full, "lora": lora + adapter_parameter_count(model, train_cfg.lora)}
