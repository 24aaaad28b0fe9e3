"""train.lora in a training run: adapters applied after the pretrained load with the rest frozen
(megavla/model/lora.py), and the resume check that a checkpoint's adapters are the ones configured."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from megavla.config import to_dict

from .errors import ResumeError, TrainingError

log = logging.getLogger("megavla.train.entry")


def apply_lora_for_training(model: torch.nn.Module, cfg) -> None:
    """train.lora: adapters on the chosen layers, then everything but them and train.trainable_parts
    frozen (no gradient, no optimizer state). A TrainingError (every rank) when they match nothing."""
    from megavla.model.lora import apply_lora, freeze_for_lora
    try:
        apply_lora(model, cfg.train.lora)
        trainable, frozen = freeze_for_lora(model, cfg.train.trainable_parts)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    log.info("LoRA: %.3fM trainable parameters (adapters + trainable_parts %s), %.2fM frozen",
             trainable / 1e6, cfg.train.trainable_parts or "none", frozen / 1e6)


def check_same_adapters(saved: dict, path: Path, cfg) -> None:
    """A checkpoint holds the adapters (and trainable set) its run was built with; a resume with other
    LoRA settings would not load or would train other parameters. A ResumeError naming both."""
    def key(train: dict) -> dict:
        lora = {"rank": 0, **(train.get("lora") or {})}
        rank = lora["rank"] or 0
        return {"rank": rank, "alpha": (lora.get("alpha") or rank) if rank else None,
                "targets": lora.get("targets") if rank else None, "parts": lora.get("parts") if rank else None,
                "trainable_parts": list(train.get("trainable_parts") or [])}
    old, new = key(saved["config"]["train"]), key(to_dict(cfg.train))
    if old != new:
        raise ResumeError(f"{path} was trained with train.lora / trainable_parts {old}, this config has {new}: "
                          "resume with the checkpoint's settings, or start a new run (another train.run_dir)")
