"""DPL's diffusion over prototype VECTORS: a conditioned MLP denoiser, a partial forward step and
a DDIM reverse that turn one support prototype into K variants, and the conservative fusion that
keeps the enhanced prototype close to the original (docs/dpl.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn


class FiLMBlock(nn.Module):
    """Residual MLP block whose normalised input is scaled and shifted by the embedding."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(width, 2 * width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(F.silu(embedding)).chunk(2, dim=-1)
        return hidden + self.mlp(self.norm(hidden) * (1 + scale) + shift)


class PrototypeDenoiser(nn.Module):
    """Predicts the noise of a prototype vector at step t, given the support's spatial condition.

    The last layer starts at zero, so an untrained denoiser predicts no noise and the reverse
    process is plain Gaussian augmentation of the prototype."""

    def __init__(self, dim: int, width: int, blocks: int, condition_features: int, condition_dim: int):
        super().__init__()
        self.width = width
        self.input = nn.Linear(dim, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.condition = nn.Sequential(
            nn.Linear(condition_features, condition_dim), nn.SiLU(), nn.Linear(condition_dim, width)
        )
        self.blocks = nn.ModuleList(FiLMBlock(width) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """x [B, C], t [B] integer steps, condition [B, F] or None (unconditioned) -> noise [B, C]."""
        embedding = self.time(get_timestep_embedding(t, self.width).to(x.dtype))
        if condition is not None:
            embedding = embedding + self.condition(condition)
        hidden = self.input(x)
        for block in self.blocks:
            hidden = block(hidden, embedding)
        return self.output(self.norm(hidden))


class PrototypeDiffusion(nn.Module):
    """Cosine-schedule diffusion of T steps over vectors; step 0 is the clean vector."""

    def __init__(self, timesteps: int):
        super().__init__()
        schedule = DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2", clip_sample=False)
        alpha_bar = torch.cat([torch.ones(1), schedule.alphas_cumprod.float()])
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)
        self.timesteps = timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) for t [B] (broadcast over the trailing dimensions)."""
        a = self.alpha_bar[t].view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def reverse_schedule(self, t_star: int, steps: int) -> list[int]:
        """The DDIM steps t_star > ... > 0 (``steps`` jumps, fewer if t_star is small)."""
        if not 0 <= t_star <= self.timesteps:
            raise ValueError(f"t_star must be in 0..{self.timesteps}, got {t_star}")
        return sorted({round(t_star * i / steps) for i in range(steps + 1)}, reverse=True)

    def variants(
        self,
        denoiser: PrototypeDenoiser,
        x0: torch.Tensor,
        condition: torch.Tensor | None,
        count: int,
        t_star: int,
        steps: int,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """Forward x0 [B, C] to t_star with ``noise`` [B, K, C], then DDIM (eta 0) back to 0 ->
        variants [B, K, C]. t_star = 0 returns K copies of x0."""
        batch, dim = x0.shape
        if t_star == 0:
            return x0[:, None].expand(batch, count, dim)
        ts = self.reverse_schedule(t_star, steps)
        x = self.add_noise(x0[:, None], noise, torch.tensor([t_star], device=x0.device)).reshape(batch * count, dim)
        cond = None if condition is None else condition.repeat_interleave(count, dim=0)
        for t, t_prev in zip(ts[:-1], ts[1:]):
            a, a_prev = self.alpha_bar[t], self.alpha_bar[t_prev]
            eps = denoiser(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), cond)
            clean = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * clean + (1 - a_prev).sqrt() * eps
        return x.view(batch, count, dim)


def conservative_fusion(x0: torch.Tensor, variants: torch.Tensor, tau: float, delta: float, lam: float) -> torch.Tensor:
    """x_enh = (1 - lam) x0 + lam * sum_k w_k v_k with w = softmax(tau * cos(v_k, x0)) over the
    variants whose cos >= delta (none left: x0). Every term has cos >= delta with x0, so the
    result does too: cos(x_enh, x0) >= delta by construction."""
    cos = F.cosine_similarity(variants, x0[:, None], dim=-1)  # [B, K]
    keep = cos >= delta
    logits = (tau * cos).masked_fill(~keep, float("-inf"))
    any_kept = keep.any(dim=1, keepdim=True)
    weights = torch.softmax(torch.where(any_kept, logits, torch.zeros_like(logits)), dim=1)
    mean = (weights[..., None] * variants).sum(dim=1)
    mean = torch.where(any_kept, mean, x0)
    return (1 - lam) * x0 + lam * mean
