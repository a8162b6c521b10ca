"""Visual-to-Textual Condition Translator (VTCT): the support foreground seen by a frozen
DINOv2, pooled to one prototype and mapped by an MLP to ONE text-like token that conditions
the UNet's cross-attention in place of a CLIP prompt (model.md step 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dinov2_prototype(dinov2: Dinov2Model, image: torch.Tensor, mask: torch.Tensor, image_size: int) -> torch.Tensor:
    """Masked average of DINOv2 patch tokens: [B, 1, H, W] in [-1, 1], mask [B, 1, H, W] -> [B, D].

    The image is resized to ``image_size`` WITHOUT the stock processor's centre crop, so the
    mask, resized to the patch grid, stays aligned with the patches.
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
    weights = F.interpolate(mask.float(), size=(grid, grid), mode="area").flatten(1)[..., None]
    return (patches * weights).sum(dim=1) / (weights.sum(dim=1) + 1e-6)


class ConditionTranslator(nn.Module):
    """MLP from the DINOv2 prototype (D) to one cross-attention token (the UNet's context dim)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 1536, hidden_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
        for _ in range(hidden_layers):
            layers += [nn.LayerNorm(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
        layers += [nn.LayerNorm(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, prototype: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, 1, out_dim]."""
        return self.net(prototype)[:, None, :]
