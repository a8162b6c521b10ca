"""The SD-FSMIS network: frozen VAE codec and DINOv2, a fine-tuned UNet with split input convs
and SQI attention, QE and the VTCT token, and a one-step x0 prediction (docs/model.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import Dinov2Model

from sdfsmis.config import TrainingConfig
from sdfsmis.io.backbone import BackboneSource, load_backbone
from sdfsmis.methods.base import EpisodeBatch, OneShotModel, Prediction
from sdfsmis.methods.sdfsmis.attention import SQILayout, SupportKVBank, install_sqi
from sdfsmis.methods.sdfsmis.codec import LatentCodec
from sdfsmis.methods.sdfsmis.config import ModelConfig
from sdfsmis.methods.sdfsmis.query_enhancement import enhance_query, query_prototype
from sdfsmis.methods.sdfsmis.vtct import ConditionTranslator, dinov2_prototype


def widen_conv(conv: nn.Conv2d, init: str = "repeat_half") -> nn.Conv2d:
    """A copy of ``conv`` with twice the input channels. ``repeat_half`` repeats the pretrained
    weight along the input axis and halves it (the released code), so an input whose extra
    channels equal the first ones gives the pretrained output; ``zero`` zero-initialises the
    extra channels, which keeps the pretrained function for any extra input."""
    wide = nn.Conv2d(conv.in_channels * 2, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
    wide = wide.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        if init == "repeat_half":
            wide.weight.copy_(torch.cat([conv.weight, conv.weight], dim=1) / 2)
        elif init == "zero":
            wide.weight.copy_(torch.cat([conv.weight, torch.zeros_like(conv.weight)], dim=1))
        else:
            raise ValueError(f"unknown conv_init {init!r}: use 'repeat_half' or 'zero'")
        wide.bias.copy_(conv.bias)
    return wide


@dataclass
class SupportFeatures:
    """Everything about the support that does not depend on the query: computed once."""

    image_latent: torch.Tensor  # [S, 4, h, w]
    latent: torch.Tensor  # [S, 8, h, w] image latent ++ mask latent
    mask: torch.Tensor  # [S, 1, H, W] binary, for the QE prototypes
    token: torch.Tensor  # [S, 1, C] VTCT condition
    bank: SupportKVBank | None = None  # support K/V of every self-attention, once cached


class SDFSMIS(OneShotModel):
    method = "sdfsmis"
    title = "SD-FSMIS"
    description = (
        "One-shot segmentation (SD-FSMIS, Stable Diffusion v1.5): the structures of a submitted or uploaded "
        "label are segmented in the rest of the volume or in another patient's volume"
    )
    weights_name = "sdfsmis.safetensors"
    trained_parts = "widened convs, VTCT MLP"
    backbone_parts = ("vae", "unet", "dinov2")
    settings_key = "model"
    settings_class = ModelConfig
    encodes_queries = True
    paper_decision = {"relative_threshold": 0.25, "largest_per_slice": True}  # of the chunk's maximum; per slice

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, dinov2: Dinov2Model, config: ModelConfig):
        super().__init__()
        self.config = config
        self.codec = LatentCodec(vae)
        self.dinov2 = dinov2.requires_grad_(False).eval()
        # The UNet's own conv_in is replaced by two widened convs applied before the UNet, one
        # for the support rows (conv_in_ref) and one for the query rows, so that one batch can
        # hold both without any state on the modules.
        self.conv_in_ref = widen_conv(unet.conv_in, config.conv_init)
        self.conv_in = widen_conv(unet.conv_in, config.conv_init)
        unet.conv_in = nn.Identity()
        install_sqi(unet)
        self.unet = unet
        self.vtct = ConditionTranslator(
            dinov2.config.hidden_size,
            unet.config.cross_attention_dim,
            config.vtct_hidden_dim,
            config.vtct_hidden_layers,
        ).to(device=unet.device, dtype=unet.dtype)

    @classmethod
    def build(cls, source: BackboneSource, settings: Any, dtype: torch.dtype) -> SDFSMIS:
        return cls(*load_backbone(source, dtype=dtype), config=settings.model)

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @property
    def resolution(self) -> int:
        return self.config.resolution

    def parameter_groups(self, training: TrainingConfig) -> list[dict]:
        """UNet with both input convs at one rate, the VTCT MLP at another; VAE/DINOv2 frozen."""
        unet = [*self.unet.parameters(), *self.conv_in.parameters(), *self.conv_in_ref.parameters()]
        return [
            {"params": unet, "lr": training.lr_unet},
            {"params": list(self.vtct.parameters()), "lr": training.lr_mlp},
        ]

    def condition_token(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        prototype = dinov2_prototype(self.dinov2, image, mask, self.config.vtct_image_size)
        return self.vtct(prototype.to(self.vtct.net[0].weight.dtype))

    def _timesteps(self, batch: int) -> torch.Tensor:
        return torch.full((batch,), self.config.timestep, device=self.device, dtype=torch.long)

    def _query_input(self, support: SupportFeatures, query_latent: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        prototype = query_prototype(
            support.image_latent[index],
            support.mask[index],
            query_latent,
            self.config.qe_threshold,
            self.config.qe_topk,
        )
        return enhance_query(query_latent, prototype)

    def unet_output(
        self,
        support_latent: torch.Tensor,
        query_input: torch.Tensor,
        token: torch.Tensor,
        index: torch.Tensor,
    ) -> torch.Tensor:
        """Support and query rows in ONE UNet batch; returns the query rows' output."""
        rows = support_latent.shape[0]
        sample = torch.cat([self.conv_in_ref(support_latent), self.conv_in(query_input)])
        context = torch.cat([token, token[index]])
        out = self.unet(
            sample,
            self._timesteps(sample.shape[0]),
            encoder_hidden_states=context,
            cross_attention_kwargs={"sqi": SQILayout(rows, index)},
        ).sample
        return out[rows:]

    def encode_support(self, image: torch.Tensor, mask: torch.Tensor, cache_kv: bool = True) -> SupportFeatures:
        """Support slices [S, 1, H, W] in [-1, 1] and binary masks -> cached support features."""
        if (mask.flatten(1).sum(dim=1) == 0).any():
            raise ValueError("a support mask is empty: every support slice needs foreground")
        image_latent = self.codec.encode(image)
        latent = torch.cat([image_latent, self.codec.encode_mask(mask)], dim=1)
        features = SupportFeatures(image_latent, latent, mask, self.condition_token(image, mask))
        if cache_kv:
            features.bank = SupportKVBank()
            self.unet(
                self.conv_in_ref(latent),
                self._timesteps(latent.shape[0]),
                encoder_hidden_states=features.token,
                cross_attention_kwargs={"sqi": SQILayout(latent.shape[0], bank=features.bank)},
            )
        return features

    def predict_x0(self, support: SupportFeatures, query_image: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """One-step prediction: x0 = -UNet output (alpha_bar = 0 for every t, model.md step 8)."""
        return self._x0(support, self.encode_queries(query_image), index)

    def encode_queries(self, query_image: torch.Tensor) -> torch.Tensor:
        """The query slices' VAE latents: a quarter of a pass's cost, and none of it the support's."""
        return self.codec.encode(query_image)

    def predict_encoded(self, support: SupportFeatures, queries: torch.Tensor, index: torch.Tensor) -> list[Prediction]:
        """Query latents (:meth:`encode_queries`) against each of their support rows [Q, k]."""
        return [Prediction(self.codec.decode_probability(self._x0(support, queries, i))) for i in index.T]

    def _x0(self, support: SupportFeatures, query_latent: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        query_input = self._query_input(support, query_latent, index)
        if support.bank is None:
            return -self.unet_output(support.latent, query_input, support.token, index)
        out = self.unet(
            self.conv_in(query_input),
            self._timesteps(query_input.shape[0]),
            encoder_hidden_states=support.token[index],
            cross_attention_kwargs={"sqi": SQILayout(0, index, support.bank)},
        ).sample
        return -out

    def predict(self, support: SupportFeatures, query_image: torch.Tensor, index: torch.Tensor) -> Prediction:
        """Query slices [Q, 1, H, W] in [-1, 1] -> foreground probability [Q, 1, H, W] in [0, 1]."""
        return Prediction(self.codec.decode_probability(self.predict_x0(support, query_image, index)))

    def training_losses(
        self, episode: EpisodeBatch, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        return {"loss": self.training_loss(*episode, generator)}

    def training_loss(
        self,
        support_image: torch.Tensor,
        support_mask: torch.Tensor,
        query_image: torch.Tensor,
        query_mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """MSE between the UNet output and the NEGATED query-mask latent (sampled latents)."""
        image_latent = self.codec.encode(support_image, sample=True, generator=generator)
        support_latent = torch.cat([image_latent, self.codec.encode_mask(support_mask, True, generator)], dim=1)
        query_latent = self.codec.encode(query_image, sample=True, generator=generator)
        target = -self.codec.encode_mask(query_mask, True, generator)
        support = SupportFeatures(
            image_latent, support_latent, support_mask, self.condition_token(support_image, support_mask)
        )
        index = torch.arange(query_image.shape[0], device=query_image.device)
        query_input = self._query_input(support, query_latent, index)
        prediction = self.unet_output(support_latent, query_input, support.token, index)
        return F.mse_loss(prediction.float(), target.float())
