"""The backbone's token runs, shared by the training path (vla.py) and inference (inference.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Tokens:
    """A run of backbone tokens: embeddings [B, L, W], valid [B, L], kind [B, L], positions [B, L]."""
    x: torch.Tensor
    valid: torch.Tensor
    kind: torch.Tensor
    positions: torch.Tensor

    @staticmethod
    def cat(parts: list["Tokens"]) -> "Tokens":
        return Tokens(*(torch.cat([getattr(p, f) for p in parts], dim=1)
                        for f in ("x", "valid", "kind", "positions")))
