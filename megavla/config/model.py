"""Model settings (owned by megavla/model). Presets live in megavla/model/presets.py + configs/."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .core import ConfigError


@dataclass
class ModelConfig:
    preset: str = "tiny"
    kernels: Literal["auto", "triton", "torch"] = "auto"
    attention: Literal["auto", "flash", "flex", "sdpa", "eager"] = "auto"

    def validate(self) -> None:
        if not self.preset:
            raise ConfigError("preset must be a non-empty name")
