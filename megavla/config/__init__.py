"""Config tree of a MegaVLA run. See core.py for the rules (YAML + dotted overrides, strict keys)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .core import ConfigError, apply_overrides, build, read_yaml, to_dict, write_yaml
from .data import DataConfig
from .launch import LaunchConfig
from .model import ModelConfig
from .train import TrainConfig


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                cls: type = Config):
    """Read a YAML file (optional), apply dotted overrides, build and validate the tree."""
    mapping = read_yaml(path) if path else {}
    mapping = apply_overrides(mapping, list(overrides))
    return build(cls, mapping)


__all__ = [
    "Config", "ConfigError", "DataConfig", "LaunchConfig", "ModelConfig",
    "TrainConfig", "build", "load_config", "to_dict", "write_yaml",
]
