"""Training image augmentation, openpi's recipe (``models/model.py: preprocess_observation``), run on
the device on whole batches.

* non-wrist cameras: random crop of 95 % of each side + resize back, then rotation by U(-5°, 5°)
  (one bilinear ``grid_sample``; corners rotated in from outside the image are black);
* every camera: colour jitter with openpi's strengths (brightness 0.3, contrast 0.4, saturation 0.5),
  applied to each image with probability 0.5 (augmax's default ``p``, which openpi keeps).
  Brightness and contrast act on the HSV value (GIMP's formulas, as augmax), saturation blends with
  the luma grey (augmax's saturation step discards its result, so we follow torchvision there).

Wrist cameras are the ones whose name contains "wrist" (openpi's rule). Every random draw comes
from torch's default generator of the images' device, in a fixed order and count per batch shape,
so the trainer's saved RNG state makes a resumed run draw exactly what the uninterrupted one drew.
Images stay uint8 [B, C, 3, R, R] (the Batch contract); rounding back to uint8 costs at most half a
grey level. Evaluation never calls this: the trainer applies it to training batches only.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from megavla.batch import Batch

CROP_SCALE = 0.95
MAX_ROTATION_DEG = 5.0
BRIGHTNESS, CONTRAST, SATURATION = 0.3, 0.4, 0.5
JITTER_PROBABILITY = 0.5
LUMA = (0.299, 0.587, 0.114)


def is_wrist(camera: str) -> bool:
    return "wrist" in camera


def _uniform(n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, device=device)


def crop_rotate(x: torch.Tensor) -> torch.Tensor:
    """x float [N, 3, R, R] in [0, 1] -> random 95 % crop, resized back, rotated by U(-5°, 5°)."""
    n, dev = x.shape[0], x.device
    slack = 1.0 - CROP_SCALE  # the crop centre may move this far (normalized coords) from the middle
    centre = _uniform(2 * n, -slack, slack, dev).view(n, 2)
    angle = _uniform(n, -MAX_ROTATION_DEG, MAX_ROTATION_DEG, dev) * (math.pi / 180.0)
    cos, sin = torch.cos(angle) * CROP_SCALE, torch.sin(angle) * CROP_SCALE
    # output pixel p (normalized) reads input at CROP_SCALE * R(angle) p + centre
    theta = torch.stack([torch.stack([cos, -sin, centre[:, 0]], 1), torch.stack([sin, cos, centre[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def color_jitter(x: torch.Tensor) -> torch.Tensor:
    """x float [N, 3, R, R] in [0, 1] -> brightness / contrast on the HSV value, saturation towards
    grey, each image with probability JITTER_PROBABILITY (the others are returned unchanged)."""
    n, dev = x.shape[0], x.device
    brightness = _uniform(n, -BRIGHTNESS, BRIGHTNESS, dev).view(n, 1, 1, 1)
    contrast = _uniform(n, -CONTRAST, CONTRAST, dev).view(n, 1, 1, 1)
    saturation = _uniform(n, -SATURATION, SATURATION, dev).view(n, 1, 1, 1)
    apply = (torch.rand(n, device=dev) < JITTER_PROBABILITY).view(n, 1, 1, 1)
    value = x.amax(dim=1, keepdim=True)
    new_value = torch.where(brightness < 0, value * (1.0 + brightness), value + (1.0 - value) * brightness)
    slant = torch.tan((contrast + 1.0) * (math.pi / 4.0))
    new_value = ((new_value - 0.5) * slant + 0.5).clamp(0.0, 1.0)
    # hue and saturation kept: scale r, g, b by the value's ratio (black stays black)
    y = x * (new_value / value.clamp_min(1e-6))
    luma = torch.tensor(LUMA, device=dev, dtype=x.dtype).view(1, 3, 1, 1)
    grey = (y * luma).sum(dim=1, keepdim=True)
    y = (grey + (y - grey) * (1.0 + saturation)).clamp(0.0, 1.0)
    return torch.where(apply, y, x)


def augment_images(images: torch.Tensor, cameras: list[str]) -> torch.Tensor:
    """uint8 [B, C, 3, R, R] (camera order = ``cameras``) -> augmented uint8 [B, C, 3, R, R]."""
    b, c = images.shape[:2]
    if c != len(cameras):
        raise ValueError(f"augment_images: batch has {c} cameras but data.cameras lists {len(cameras)} "
                         f"({cameras})")
    x = images.float() / 255.0
    geometric = [i for i, cam in enumerate(cameras) if not is_wrist(cam)]
    if geometric:
        sel = x[:, geometric]
        x[:, geometric] = crop_rotate(sel.reshape(-1, *sel.shape[2:])).view_as(sel)
    x = color_jitter(x.reshape(b * c, *x.shape[2:])).view_as(x)
    return (x * 255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)


class ImageAugmentation:
    """The trainer's hook: ``batch = augment(batch)`` on the device, training batches only."""

    def __init__(self, cameras: list[str]) -> None:
        self.cameras = list(cameras)

    def __call__(self, batch: Batch) -> Batch:
        return dataclasses.replace(batch, images=augment_images(batch.images, self.cameras))
