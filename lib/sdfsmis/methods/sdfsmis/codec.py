"""Images and masks to SD latents and back, through the frozen VAE (model.md steps 1, 2, 9)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


class LatentCodec(torch.nn.Module):
    """Grayscale slices in [-1, 1] and binary masks <-> scaled 4-channel latents.

    A mask is coded like an image (0 -> -1, 1 -> +1, three channels), so that the UNet predicts
    a mask latent and the VAE decoder turns it back into a probability-like map.

    ``batch`` > 0 runs the VAE on at most that many slices per call (bounds the memory of its
    full-resolution activations; on CPU a larger batch is no faster per slice);
    ``channels_last`` feeds it channels-last tensors (set by :func:`~sdfsmis.pipeline.acceleration.accelerate`).
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.scaling_factor = float(vae.config.scaling_factor)
        self.batch = 0
        self.channels_last = False

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _chunks(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.split(self.batch) if self.batch else (x,)

    @torch.no_grad()
    def encode(
        self, image: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[B, 1, H, W] in [-1, 1] -> [B, 4, H/8, W/8]; training samples, inference takes the mean."""
        x = image.to(self.vae.dtype).expand(-1, 3, -1, -1)
        latents = []
        for chunk in self._chunks(x):
            dist = self.vae.encode(chunk).latent_dist
            latents.append(dist.sample(generator) if sample else dist.mean)
        return torch.cat(latents) * self.scaling_factor

    def encode_mask(
        self, mask: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.encode(mask.float() * 2 - 1, sample=sample, generator=generator)

    @torch.no_grad()
    def decode_probability(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent -> [B, 1, H, W] in [0, 1]: decode, clip, rescale, average the 3 channels."""
        z = latent.to(self.vae.dtype) / self.scaling_factor
        probability = [
            ((self.vae.decode(chunk).sample.float().clamp(-1, 1) + 1) / 2).mean(dim=1, keepdim=True)
            for chunk in self._chunks(z)
        ]
        return torch.cat(probability).contiguous()
