"""SigLIP-style vision tower: one ViT pass per present camera image.

Math follows Hugging Face ``SiglipVisionTransformer`` (PaliGemma's tower, no pooling head): conv
patch embedding + learned position embedding, pre-LN blocks (LayerNorm eps 1e-6, biased q/k/v/out
projections, MLP fc1 -> gelu(tanh) -> fc2), final ``post_layernorm``. Pixels are uint8 mapped to
[-1, 1] (PaliGemma's mean 0.5 / std 0.5 normalization).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6


class SiglipAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, w // self.heads).transpose(1, 2)

        # every patch sees every patch of its own image: no mask, so SDPA picks its fastest kernel
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class SiglipMLP(nn.Module):
    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.self_attn = SiglipAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = SiglipMLP(width, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """images uint8 [N, 3, R, R] -> patch features [N, (R/p)^2, vision_width]."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_dim: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(self.num_patches, width) * 0.02)
        self.layers = nn.ModuleList(SiglipLayer(width, heads, mlp_dim) for _ in range(depth))
        self.post_layernorm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.checkpoint_layers = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.to(self.patch_embed.weight.dtype) * (2.0 / 255.0) - 1.0
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.pos_embed
        for layer in self.layers:
            if self.checkpoint_layers and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.post_layernorm(x)


def encode_cameras(tower: VisionTower, projector: nn.Linear, images: torch.Tensor,
                   image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images uint8 [B, C, 3, R, R], image_mask bool [B, C] -> tokens [B, C*N, width], valid [B, C*N].

    Only present cameras run through the tower (a missing wrist camera costs no compute); absent
    cameras get zero tokens marked invalid, so their pixels can change nothing downstream.
    """
    b, c = images.shape[:2]
    if images.shape[-1] != tower.image_size or images.shape[-2] != tower.image_size:
        raise ValueError(f"batch images are {tuple(images.shape[-2:])} px but model.image_size="
                         f"{tower.image_size}; set data.image_size={tower.image_size} (the pipeline "
                         f"resizes) or model.image_size={images.shape[-1]}")
    n = tower.num_patches
    flat_mask = image_mask.reshape(b * c)
    valid = image_mask[:, :, None].expand(b, c, n).reshape(b, c * n)
    if torch.compiler.is_compiling():
        # A compiled graph is static: every camera runs through the tower and absent ones are zeroed
        # (where(): no gradient reaches their pixels), instead of a data-dependent selection.
        tokens = projector(tower(images.reshape(b * c, *images.shape[2:])))
        out = torch.where(flat_mask[:, None, None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
        return out.reshape(b, c * n, -1), valid
    features = tower(images.reshape(b * c, *images.shape[2:])[flat_mask])
    tokens = projector(features)
    out = tokens.new_zeros(b * c, n, tokens.shape[-1])
    out = out.index_copy(0, flat_mask.nonzero().squeeze(1), tokens)
    return out.reshape(b, c * n, -1), valid
