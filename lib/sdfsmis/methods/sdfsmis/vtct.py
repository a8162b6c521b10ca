"""Visual-to-Textual Condition Translator (VTCT): the support foreground seen by a frozen
DINOv2, pooled to one prototype and mapped by an MLP to ONE text-like token that conditions
the UNet's cross-attention in place of a CLIP prompt (model.md step 7)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Dinov2Model

from sdfsmis.methods.dinov2 import masked_average, patch_features


def dinov2_prototype(dinov2: Dinov2Model, image: torch.Tensor, mask: torch.Tensor, image_size: int) -> torch.Tensor:
    """Masked average of DINOv2 patch tokens: [B, 1, H, W] in [-1, 1], mask [B, 1, H, W] -> [B, D]."""
    return masked_average(patch_features(dinov2, image, image_size), mask)


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
