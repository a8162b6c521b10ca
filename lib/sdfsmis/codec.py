"""Images and masks to SD latents and back, through the frozen VAE (model.md steps 1, 2, 9)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


class LatentCodec(torch.nn.Module):
    """Grayscale slices in [-1, 1] and binary masks <-> scaled 4-channel latents.

    A mask is coded like an image (0 -> -1, 1 -> +1, three channels), so that the UNet predicts
    a mask latent and the VAE decoder turns it back into a probability-like map.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.scaling_factor = float(vae.config.scaling_factor)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(
        self, image: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[B, 1, H, W] in [-1, 1] -> [B, 4, H/8, W/8]; training samples, inference takes the mean."""
        x = image.to(self.vae.dtype).expand(-1, 3, -1, -1)
        dist = self.vae.encode(x).latent_dist
        latent = dist.sample(generator) if sample else dist.mean
        return latent * self.scaling_factor

    def encode_mask(
        self, mask: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.encode(mask.float() * 2 - 1, sample=sample, generator=generator)

    @torch.no_grad()
    def decode_probability(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent -> [B, 1, H, W] in [0, 1]: decode, clip, rescale, average the 3 channels."""
        image = self.vae.decode(latent.to(self.vae.dtype) / self.scaling_factor).sample
        return ((image.float().clamp(-1, 1) + 1) / 2).mean(dim=1, keepdim=True)
