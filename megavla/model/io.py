"""Save / load MegaVLA weights: ``model.safetensors`` + ``model_config.yaml`` (resolved ModelConfig)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megavla.config.core import build, read_yaml, write_yaml
from megavla.config.model import ModelConfig

from .vla import VLA, build_model

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.yaml"


def save_model(model: VLA, directory: str | Path) -> Path:
    """Write the weights and the resolved model config into ``directory``; returns the weights path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    path = directory / WEIGHTS_FILE
    save_file(tensors, str(path), metadata={"format": "megavla", "preset": model.cfg.preset})
    write_yaml(model.cfg, directory / CONFIG_FILE)
    logger.info("saved %d tensors to %s", len(tensors), path)
    return path


def load_model_config(directory: str | Path) -> ModelConfig:
    return build(ModelConfig, read_yaml(Path(directory) / CONFIG_FILE), "model")


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> VLA:
    """Build the model from ``model_config.yaml`` and load ``model.safetensors`` (strict: every
    parameter must be present and no extra tensor may be left over)."""
    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a directory written by save_model")
    model = build_model(load_model_config(directory))
    state = load_file(str(path), device=str(device))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path}: weights do not match {directory / CONFIG_FILE}: {e}") from None
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match {directory / CONFIG_FILE}: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    return model.to(device)
