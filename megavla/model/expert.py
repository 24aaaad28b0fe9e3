"""The action expert: a narrower Gemma stack that denoises an action chunk by flow matching.

Same depth, heads, kv heads and head_dim as the backbone (the two share attention layer by layer),
its own width / MLP. Flow time t in [0, 1] (t = 1 is noise) enters

* ``adarms`` (pi0.5): sincos(t) -> time MLP (Linear, swish, Linear, swish) -> the condition of every
  adaptive RMSNorm (scale, shift, gate);
* ``mlp`` (pi0): sincos(t) concatenated to each action token's embedding, mixed by a 2-layer MLP.

With ``state_mode=continuous`` the normalized state is projected to one extra expert token (pi0).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .gemma import GemmaStack


def sincos_time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3,
                          max_period: float = 4.0) -> torch.Tensor:
    """openpi's posemb_sincos: t [B] -> [B, dim] (periods log-spaced in [min_period, max_period])."""
    if dim % 2:
        raise ValueError(f"time embedding width {dim} must be even")
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = t.to(torch.float64)[:, None] * (2 * math.pi / period)[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1).to(torch.float32)


class ActionExpert(nn.Module):
    def __init__(self, width: int, depth: int, mlp_dim: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, action_dim: int, state_dim: int, time_conditioning: str,
                 continuous_state: bool, impl: str = "auto") -> None:
        super().__init__()
        self.width = width
        self.time_conditioning = time_conditioning
        adarms = time_conditioning == "adarms"
        self.stack = GemmaStack(width, depth, mlp_dim, num_heads, num_kv_heads, head_dim,
                                cond_dim=width if adarms else None, impl=impl)
        self.action_in_proj = nn.Linear(action_dim, width)
        self.action_out_proj = nn.Linear(width, action_dim)
        if adarms:
            self.time_mlp_in = nn.Linear(width, width)
            self.time_mlp_out = nn.Linear(width, width)
        else:
            self.action_time_mlp_in = nn.Linear(2 * width, width)
            self.action_time_mlp_out = nn.Linear(width, width)
        self.state_proj = nn.Linear(state_dim, width) if continuous_state else None

    @property
    def num_state_tokens(self) -> int:
        return 1 if self.state_proj is not None else 0

    def embed(self, x_t: torch.Tensor, t: torch.Tensor, state: torch.Tensor | None):
        """x_t [B, H, A], t [B], state [B, S] (masked) -> (tokens [B, (1+)H, W], cond [B, W] or None)."""
        dtype = self.action_in_proj.weight.dtype
        tokens = self.action_in_proj(x_t.to(dtype))
        time_emb = sincos_time_embedding(t, self.width).to(dtype)
        cond = None
        if self.time_conditioning == "adarms":
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))
        else:
            mixed = torch.cat([tokens, time_emb[:, None, :].expand_as(tokens)], dim=-1)
            tokens = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(mixed)))
        if self.state_proj is not None:
            tokens = torch.cat([self.state_proj(state.to(dtype))[:, None, :], tokens], dim=1)
        return tokens, cond

    def velocity(self, hidden: torch.Tensor, cond: torch.Tensor | None, horizon: int) -> torch.Tensor:
        """Expert hidden states before the final norm -> velocity [B, H, A] (fp32)."""
        normed, _ = self.stack.norm(hidden, cond)
        return self.action_out_proj(normed[:, -horizon:]).to(torch.float32)
