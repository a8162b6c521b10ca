"""Episode augmentation of protocol.md, applied to one side of an episode: gamma in
[0.5, 1.5], affine (rotation 5 deg, shift 5 px, shear 5 deg, scale 0.9-1.2) and elastic
(alpha 10, sigma 5) deformation, each with probability 0.5 and a FRESH random draw every call
(the released code seeded the warp with a constant, so every episode got the same warp)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def _affine_matrix(rng: np.random.Generator, size: int) -> torch.Tensor:
    angle = math.radians(rng.uniform(-5, 5))
    shear = math.radians(rng.uniform(-5, 5))
    scale = rng.uniform(0.9, 1.2)
    shift = rng.uniform(-5, 5, size=2) * 2 / size  # pixels -> normalised coordinates
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shearing = np.array([[1.0, math.tan(shear)], [0.0, 1.0]])
    linear = rotation @ shearing / scale  # grid_sample maps output -> input coordinates
    return torch.tensor(np.hstack([linear, shift[:, None]]), dtype=torch.float32)


def _elastic_displacement(rng: np.random.Generator, size: int, alpha: float, sigma: float) -> torch.Tensor:
    field = [ndimage.gaussian_filter(rng.uniform(-1, 1, (size, size)), sigma) * alpha for _ in range(2)]
    return torch.tensor(np.stack(field[::-1], axis=-1) * 2 / size, dtype=torch.float32)  # (x, y) order


def augment(
    image: torch.Tensor,
    mask: torch.Tensor,
    rng: np.random.Generator,
    p: float = 0.5,
    alpha: float = 10.0,
    sigma: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment one slice [1, 1, R, R] in [-1, 1] and its mask the same way."""
    size = image.shape[-1]
    if rng.random() < p:
        gamma = rng.uniform(0.5, 1.5)
        image = ((image + 1) / 2).clamp(0, 1).pow(gamma) * 2 - 1
    theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    warped = False
    if rng.random() < p:
        theta, warped = _affine_matrix(rng, size), True
    grid = F.affine_grid(theta[None], list(image.shape), align_corners=False)
    if rng.random() < p:
        grid, warped = grid + _elastic_displacement(rng, size, alpha, sigma)[None], True
    if warped:
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        mask = (F.grid_sample(mask.float(), grid, mode="bilinear", align_corners=False) > 0.5).float()
    return image, mask
