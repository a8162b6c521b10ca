"""Frozen DINOv2 patch features of grayscale slices, shared by SD-FSMIS's VTCT token and DPL's
prototype features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Dinov2Model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def patch_features(dinov2: Dinov2Model, image: torch.Tensor, image_size: int) -> torch.Tensor:
    """[B, 1, H, W] in [-1, 1] -> patch tokens as a map [B, D, g, g], g = image_size / patch.

    The image is resized to ``image_size`` WITHOUT the stock processor's centre crop, so that a
    mask resized to the patch grid stays aligned with the patches; ImageNet normalisation.
    """
    dtype = next(dinov2.parameters()).dtype
    x = F.interpolate((image.float() + 1) / 2, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (x.expand(-1, 3, -1, -1) - mean) / std
    with torch.no_grad():
        tokens = dinov2(pixel_values=x.to(dtype)).last_hidden_state
    grid = image_size // dinov2.config.patch_size
    patches = tokens[:, -grid * grid :].float()  # drop the CLS (and any register) tokens
    return patches.transpose(1, 2).reshape(patches.shape[0], -1, grid, grid)


def masked_average(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked average pooling: features [B, C, g, g], mask [B, 1, H, W] (area-resized to the
    grid, so partial coverage weighs partially) -> [B, C]."""
    weights = F.interpolate(mask.float(), size=features.shape[-2:], mode="area")
    return (features * weights).sum(dim=(2, 3)) / (weights.sum(dim=(2, 3)) + 1e-6)
