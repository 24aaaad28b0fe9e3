"""The Batch contract between the data pipeline and the model.

The pipeline (megavla/data) produces it; the model (megavla/model) consumes it; neither imports the
other. B batch, H chunk length, A max action dim, S max state dim, C cameras (order = config
``data.cameras``), R image size.

=====================  ================  ==========================================================
field                  dtype / shape     meaning
=====================  ================  ==========================================================
images                 uint8 [B,C,3,R,R]  camera frames; the model converts to float in [-1, 1]
                                          (the reader's tensor is a view of [B,C,R,R,3] memory,
                                          decoded in place; .contiguous() gives CHW memory)
image_mask             bool [B, C]        camera present (a missing wrist camera: False, zeros)
text_tokens            int64 [B, Lt]      instruction prompt tokens (sentencepiece), right-padded
text_mask              bool [B, Lt]       valid text tokens
state                  float32 [B, S]     normalized proprio state, zero-padded
state_mask             bool [B, S]        valid state dims
actions                float32 [B, H, A]  normalized action chunk a[t:t+H], zero-padded
action_dim_mask        bool [B, A]        supervised dims per sample (gripper False for human)
action_time_mask       bool [B, H]        valid chunk steps (False past the episode end / dropout)
fast_tokens            int64 [B, Lf]      FAST tokens of the chunk (valid dims only), right-padded
fast_mask              bool [B, Lf]       valid FAST tokens
subtask_tokens         int64 [B, Ls]      next-subtask text tokens (target of the high-level head)
subtask_mask           bool [B, Ls]       valid subtask tokens
embodiment             int64 [B]          id from data_shards/embodiments.py EMBODIMENT_IDS
meta                   dict of lists      source, key, scene, task, timestep (eval and logging)
=====================  ================  ==========================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

# Embodiment ids are in [0, MAX_EMBODIMENTS): the model logs per-embodiment losses as fixed-size
# device vectors of this length (no host sync to find which ids a batch holds).
MAX_EMBODIMENTS = 16


@dataclass
class Batch:
    images: torch.Tensor
    image_mask: torch.Tensor
    text_tokens: torch.Tensor
    text_mask: torch.Tensor
    state: torch.Tensor
    state_mask: torch.Tensor
    actions: torch.Tensor
    action_dim_mask: torch.Tensor
    action_time_mask: torch.Tensor
    fast_tokens: torch.Tensor
    fast_mask: torch.Tensor
    subtask_tokens: torch.Tensor
    subtask_mask: torch.Tensor
    embodiment: torch.Tensor
    meta: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.actions.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "meta"}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()}
        return Batch(**moved, meta=self.meta)

    def pin_memory(self) -> "Batch":
        """Called by torch DataLoader(pin_memory=True) on custom batch types."""
        return Batch(**{k: v.pin_memory() for k, v in self.tensors().items()}, meta=self.meta)

    def select(self, index: torch.Tensor | slice) -> "Batch":
        """Sub-batch (e.g. one embodiment) with the meta lists sliced the same way."""
        idx = index if isinstance(index, slice) else index.tolist()
        meta = {k: ([v[i] for i in idx] if isinstance(idx, list) else v[idx]) for k, v in self.meta.items()}
        return Batch(**{k: v[index] for k, v in self.tensors().items()}, meta=meta)
