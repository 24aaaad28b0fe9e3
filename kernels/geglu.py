"""GeGLU activation of the Gemma MLP: gelu_tanh(gate) * up (fp32 math, result in gate's dtype)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import resolve_impl


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.gelu(gate.to(torch.float32), approximate="tanh") * up.to(torch.float32)).to(gate.dtype)


def geglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """gelu(gate, approximate='tanh') * up, elementwise; gate and up have the same shape."""
    if gate.shape != up.shape:
        raise ValueError(f"geglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if resolve_impl(impl, gate, up, op="geglu") == "triton":
        return _triton_geglu(gate, up)
    return geglu_reference(gate, up)


def _triton_geglu(gate, up):  # replaced in step 2
    return geglu_reference(gate, up)
