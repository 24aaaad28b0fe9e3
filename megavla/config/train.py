"""Trainer settings (owned by megavla/train)."""
from __future__ import annotations

from dataclasses import dataclass

from .core import ConfigError


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 1000
    lr: float = 1e-4
    seed: int = 0
    zero_stage: int = 2

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage={self.zero_stage} is not a ZeRO stage; choose 0, 1, 2 or 3")
        if self.steps <= 0:
            raise ConfigError(f"steps={self.steps} must be > 0")
