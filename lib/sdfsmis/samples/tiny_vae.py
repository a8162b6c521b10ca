"""Fit a tiny backbone's VAE as an autoencoder on generated slices and masks.

The real SD v1.5 VAE is pretrained, so decoded masks are meaningful; a randomly initialised
tiny VAE decodes any latent to noise, and then no amount of SD-FSMIS training can give a
measurable Dice. Learning tests and demos therefore fit the tiny VAE first (a few hundred
steps, seconds on a CPU). It stays frozen afterwards, as the real one does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from sdfsmis.io.volume import SliceGrid, axial_slices, normalise_intensity
from sdfsmis.samples.synthetic import make_volume


def _training_slices(resolution: int, volumes: int, seed: int) -> torch.Tensor:
    """Image slices and binary organ masks of generated volumes, all in [-1, 1]."""
    slices = []
    for i in range(volumes):
        image, label, _ = make_volume(seed + 1000 + i, modality="CT" if i % 2 == 0 else "MR")
        every = np.arange(image.shape[2])
        grid = SliceGrid(*image.shape[:2], resolution)
        slices.append(grid.to_model(axial_slices(normalise_intensity(image, (0.5, 99.5)), every)))
        for organ in np.unique(label)[1:]:
            mask = grid.to_model(axial_slices((label == organ).astype(np.float32), every), "nearest", 0.0)
            slices.append(mask[mask.flatten(1).any(dim=1)] * 2 - 1)
    return torch.cat(slices)


def fit_tiny_vae(backbone: Path, steps: int = 400, seed: int = 0, volumes: int = 4) -> float:
    """Train ``backbone/vae`` in place (reconstruction MSE + a small KL); returns the final
    reconstruction error."""
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(backbone / "vae")
    data = _training_slices(vae.config.sample_size, volumes, seed).expand(-1, 3, -1, -1)
    optimiser = torch.optim.Adam(vae.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    reconstruction = torch.tensor(0.0)
    vae.train()
    for _ in range(steps):
        batch = data[torch.randint(len(data), (16,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        decoded = vae.decode(posterior.sample(generator)).sample
        reconstruction = F.mse_loss(decoded, batch)
        loss = reconstruction + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    vae.save_pretrained(backbone / "vae", safe_serialization=True)
    return float(reconstruction.detach())
