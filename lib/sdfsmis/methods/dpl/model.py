"""DPL: one-shot segmentation by an ADNet-style prototype head on frozen DINOv2 features, whose
support prototype is enhanced by a spatially conditioned diffusion over prototype vectors
(Gao & Morel, IVCNZ 2025; the facts and our choices: docs/dpl.md).

The same enhancement and fusion run in training and inference. The diffusion works on one
vector per SUPPORT slice, so a query slice costs one DINOv2 pass and K + 1 cosine maps: the
method a site without a GPU runs at interactive speed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Model

from sdfsmis.config import TrainingConfig
from sdfsmis.io.backbone import BackboneSource, load_dinov2
from sdfsmis.methods.base import EpisodeBatch, OneShotModel, Prediction
from sdfsmis.methods.dinov2 import masked_average, patch_features
from sdfsmis.methods.dpl.config import DPLConfig
from sdfsmis.methods.dpl.prototype_diffusion import PrototypeDenoiser, PrototypeDiffusion, conservative_fusion

#: Mask geometry (area, centroid, spread, correlation, box, fill) and prototype statistics
#: (feature dispersion, mean cosine, log norm) before the per-channel std of the features.
GEOMETRY_FEATURES = 14


class FeatureAdapter(nn.Module):
    """The trainable part of the features: 1x1 conv, GroupNorm, ReLU, 1x1 conv."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_dim, out_dim, 1),
            nn.GroupNorm(math.gcd(32, out_dim), out_dim),
            nn.ReLU(),
            nn.Conv2d(out_dim, out_dim, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def mask_geometry(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] binary -> [B, 11]: area fraction, centroid (y, x), spread (y, x), y-x
    correlation, bounding box (y0, x0, y1, x1) and fill ratio, in image-relative units."""
    batch, _, height, width = mask.shape
    m = mask[:, 0].float()
    total = m.sum(dim=(1, 2)).clamp_min(1.0)
    ys = torch.linspace(0, 1, height, device=m.device)[None, :, None]
    xs = torch.linspace(0, 1, width, device=m.device)[None, None, :]
    cy, cx = (m * ys).sum(dim=(1, 2)) / total, (m * xs).sum(dim=(1, 2)) / total
    dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
    vy, vx = (m * dy**2).sum(dim=(1, 2)) / total, (m * dx**2).sum(dim=(1, 2)) / total
    cov = (m * dy * dx).sum(dim=(1, 2)) / total
    rho = cov / (vy * vx).sqrt().clamp_min(1e-6)
    rows, cols = m.amax(dim=2) > 0, m.amax(dim=1) > 0
    y0 = rows.float().argmax(dim=1) / height
    y1 = (height - rows.flip(1).float().argmax(dim=1)) / height
    x0 = cols.float().argmax(dim=1) / width
    x1 = (width - cols.flip(1).float().argmax(dim=1)) / width
    area = total / (height * width)
    fill = area / ((y1 - y0) * (x1 - x0)).clamp_min(1e-6)
    return torch.stack([area, cy, cx, vy.sqrt(), vx.sqrt(), rho, y0, x0, y1, x1, fill], dim=1)


def spatial_condition(mask: torch.Tensor, features: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """The reverse diffusion's condition (dpl.md: geometric properties and prototype feature
    statistics): mask geometry, feature dispersion around the prototype, mean cos(F, p0) under
    the mask, log |p0| and the masked per-channel std of the features -> [B, 14 + C]."""
    weights = F.interpolate(mask.float(), size=features.shape[-2:], mode="area")
    total = weights.sum(dim=(2, 3)).clamp_min(1e-6)  # [B, 1]
    centred = features - prototype[..., None, None]
    variance = (weights * centred**2).sum(dim=(2, 3)) / total  # [B, C]
    cos = F.cosine_similarity(features, prototype[..., None, None], dim=1)[:, None]
    mean_cos = (weights * cos).sum(dim=(2, 3)) / total
    norm = prototype.norm(dim=1, keepdim=True)
    dispersion = variance.mean(dim=1, keepdim=True) / (norm**2 / prototype.shape[1] + 1e-6)
    statistics = [mask_geometry(mask), dispersion, mean_cos, torch.log(norm + 1e-6)]
    return torch.cat([*statistics, (variance + 1e-8).sqrt()], dim=1)


def prototype_probability(features: torch.Tensor, prototypes: torch.Tensor, scale: float, threshold: torch.Tensor):
    """ADNet head: S = -scale * cos(F, p), P = 1 - sigmoid(0.5 (S - T)).
    features [B, C, g, g], prototypes [B, C] or [B, K, C] -> [B, 1 or K, g, g]."""
    if prototypes.dim() == 2:
        prototypes = prototypes[:, None]
    cos = F.cosine_similarity(features[:, None], prototypes[..., None, None], dim=2)
    return 1 - torch.sigmoid(0.5 * (-scale * cos - threshold))


def weighted_nll(probability: torch.Tensor, mask: torch.Tensor, background_weight: float) -> torch.Tensor:
    """Cross-entropy of the foreground probability with the background down-weighted (ADNet)."""
    p = probability.clamp(1e-6, 1 - 1e-6)
    log_probs = torch.cat([torch.log1p(-p), torch.log(p)], dim=1)
    weight = torch.tensor([background_weight, 1.0], device=p.device, dtype=log_probs.dtype)
    return F.nll_loss(log_probs, mask[:, 0].long(), weight=weight)


@dataclass
class PrototypeSupport:
    """Everything about the support rows that the queries need: computed once."""

    prototype: torch.Tensor  # [S, C] x0, in unit-variance coordinates
    variants: torch.Tensor  # [S, K, C]
    enhanced: torch.Tensor  # [S, C] the fused prototype the prediction uses
    condition: torch.Tensor  # [S, F]


class DPL(OneShotModel):
    method = "dpl"
    title = "DPL"
    description = (
        "One-shot segmentation (DPL, diffusion-enhanced prototypes on DINOv2; fast on CPU): the structures of a "
        "submitted or uploaded label are segmented in the rest of the volume or in another patient's volume, with a "
        "per-slice confidence and the slices most worth reviewing"
    )
    weights_name = "dpl.safetensors"
    trained_parts = "adapter, denoiser, threshold"
    backbone_parts = ("dinov2",)
    settings_key = "dpl"
    settings_class = DPLConfig
    # changed after loading the same weights (docs/dpl.md "Ablations"): lambda 0 is the plain ADNet head
    # on the same features; the untrained denoiser is Gaussian prototype augmentation; without the
    # condition the denoiser, trained with it, runs without it
    encodes_queries = True
    costly_passes = False
    ablations = {
        "dpl-lambda0": "DPL, lambda 0 (plain prototype head)",
        "dpl-untrained-denoiser": "DPL, untrained denoiser",
        "dpl-no-condition": "DPL, no spatial condition",
    }

    def __init__(self, dinov2: Dinov2Model, config: DPLConfig, resolution: int):
        super().__init__()
        self.config = config
        self.resolution = resolution
        self.dinov2 = dinov2.requires_grad_(False).eval()
        dim = config.feature_dim
        self.adapter = FeatureAdapter(dinov2.config.hidden_size, dim)
        self.denoiser = PrototypeDenoiser(
            dim, config.denoiser_width, config.denoiser_blocks, GEOMETRY_FEATURES + dim, config.condition_dim
        )
        self.denoiser_ema = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.threshold = nn.Parameter(torch.tensor(float(config.threshold_init)))
        self.diffusion = PrototypeDiffusion(config.timesteps)

    @classmethod
    def build(cls, source: BackboneSource, settings: Any, dtype: torch.dtype) -> DPL:
        return cls(load_dinov2(source, dtype=dtype), settings.dpl, settings.resolution)

    @property
    def device(self) -> torch.device:
        return self.threshold.device

    def parameter_groups(self, training: TrainingConfig) -> list[dict]:
        params = [*self.adapter.parameters(), *self.denoiser.parameters(), self.threshold]
        return [{"params": params, "lr": self.config.lr}]

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA of the denoiser: the one used whenever the model is not training."""
        ema, live = list(self.denoiser_ema.parameters()), list(self.denoiser.parameters())
        torch._foreach_lerp_(ema, live, 1 - self.config.ema_decay)

    def ablated(self, key: str) -> DPL:
        model = copy.deepcopy(self)  # its own settings section too
        if key == "dpl-lambda0":
            model.config.fusion_lambda = 0.0
        elif key == "dpl-no-condition":
            model.config.use_condition = False
        elif key == "dpl-untrained-denoiser":
            model.reset_denoiser()
        else:
            return super().ablated(key)
        return model

    @torch.no_grad()
    def reset_denoiser(self) -> None:
        """Back to an untrained denoiser (ablation): zero output, i.e. Gaussian augmentation."""
        for denoiser in (self.denoiser, self.denoiser_ema):
            denoiser.output.weight.zero_()
            denoiser.output.bias.zero_()

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Slices [B, 1, R, R] in [-1, 1] -> adapted DINOv2 features [B, C, g, g]."""
        return self.adapter(patch_features(self.dinov2, image, self.config.image_size))

    def _diffusion_space(self, prototype: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(C) p / |p|: unit-variance coordinates, whatever the feature scale."""
        return math.sqrt(prototype.shape[1]) * F.normalize(prototype, dim=1)

    def _probability(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        grid = prototype_probability(features, prototypes, self.config.scale, self.threshold)
        return F.interpolate(grid, size=(self.resolution,) * 2, mode="bilinear", align_corners=False)

    def _enhance(self, features: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> PrototypeSupport:
        cfg = self.config
        prototype = masked_average(features, mask)
        condition = spatial_condition(mask, features, prototype)
        x0 = self._diffusion_space(prototype)
        denoiser = self.denoiser if self.training else self.denoiser_ema
        variants = self.diffusion.variants(
            denoiser, x0, condition if cfg.use_condition else None, cfg.variants, cfg.t_star, cfg.ddim_steps, noise
        )
        enhanced = conservative_fusion(x0, variants, cfg.tau, cfg.delta, cfg.fusion_lambda)
        return PrototypeSupport(x0, variants, enhanced, condition)

    def encode_support(self, image: torch.Tensor, mask: torch.Tensor) -> PrototypeSupport:
        """The K forward noises are drawn from ``config.seed``, the same for every support row:
        a support slice always gives the same variants, whatever other slices are supports with
        it, so that adding a correction changes only the query slices it serves."""
        if (mask.flatten(1).sum(dim=1) == 0).any():
            raise ValueError("a support mask is empty: every support slice needs foreground")
        generator = torch.Generator().manual_seed(self.config.seed)
        noise = torch.randn((self.config.variants, self.config.feature_dim), generator=generator)
        noise = noise.to(self.device).expand(image.shape[0], -1, -1)
        return self._enhance(self.features(image), mask, noise)

    def predict(self, support: PrototypeSupport, query_image: torch.Tensor, index: torch.Tensor) -> Prediction:
        return self._predict(support, self.features(query_image), index)

    def predict_each(
        self, support: PrototypeSupport, query_image: torch.Tensor, index: torch.Tensor
    ) -> list[Prediction]:
        """The query's DINOv2 features once for all of its k support rows."""
        return self.predict_encoded(support, self.features(query_image), index)

    def encode_queries(self, query_image: torch.Tensor) -> torch.Tensor:
        """DINOv2 and the adapter: nearly all of a query slice's cost, and none of it the support's."""
        return self.features(query_image)

    def predict_encoded(
        self, support: PrototypeSupport, features: torch.Tensor, index: torch.Tensor
    ) -> list[Prediction]:
        return [self._predict(support, features, index[:, j]) for j in range(index.shape[1])]

    def _predict(self, support: PrototypeSupport, features: torch.Tensor, index: torch.Tensor) -> Prediction:
        return Prediction(
            self._probability(features, support.enhanced[index]),
            self._probability(features, support.variants[index]),
        )

    def training_losses(
        self, episode: EpisodeBatch, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """L_seg (query, with the ENHANCED prototype, through the reverse steps) + L_align (the
        query prediction's prototype re-segments the support) + T/20 + lambda_d L_diff."""
        support_image, support_mask, query_image, query_mask = episode
        cfg = self.config
        device = self.device
        generator = generator or torch.Generator(device)
        batch = support_image.shape[0]
        features = self.features(torch.cat([support_image, query_image]))
        support_features, query_features = features[:batch], features[batch:]
        noise = torch.randn((batch, cfg.variants, cfg.feature_dim), generator=generator, device=device)
        support = self._enhance(support_features, support_mask, noise)

        query_grid = prototype_probability(query_features, support.enhanced, cfg.scale, self.threshold)
        query_probability = F.interpolate(query_grid, size=query_mask.shape[-2:], mode="bilinear", align_corners=False)
        seg = weighted_nll(query_probability, query_mask, cfg.background_weight)
        query_prototype = masked_average(query_features, query_grid)
        support_probability = self._probability(support_features, query_prototype)
        align = weighted_nll(support_probability, support_mask, cfg.background_weight)

        # noise prediction on the support's or the query's own prototype, conditioned on the support
        own = masked_average(query_features, query_mask)
        use_query = torch.rand((batch, 1), generator=generator, device=device) < 0.5
        x0 = torch.where(use_query, self._diffusion_space(own), support.prototype).detach()
        t = torch.randint(1, cfg.timesteps + 1, (batch,), generator=generator, device=device)
        eps = torch.randn(x0.shape, generator=generator, device=device)
        condition = support.condition.detach() if cfg.use_condition else None
        diff = F.mse_loss(self.denoiser(self.diffusion.add_noise(x0, eps, t), t, condition), eps)

        loss = seg + align + cfg.threshold_loss * self.threshold + cfg.lambda_diff * diff
        return {"loss": loss, "seg": seg, "align": align, "diff": diff, "threshold": self.threshold.detach()}
