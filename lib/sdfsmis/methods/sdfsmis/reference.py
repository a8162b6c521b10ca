"""The released code's formulation of SQI, kept as a reference for tests and benchmarks:
a stateful K/V bank filled by a support forward pass and read by a second, query forward
pass. It breaks under gradient checkpointing and is not thread-safe; never serve with it.

``released_segment_slice`` and ``released_training_step`` compute what the released pipeline
computes, the way it computes it (everything per query slice, batch 1, fp32), on our model's
weights: the baseline of ``sdfsmis bench``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from sdfsmis.methods.sdfsmis.attention import install_sqi
from sdfsmis.methods.sdfsmis.model import SDFSMIS
from sdfsmis.methods.sdfsmis.query_enhancement import enhance_query, query_prototype


class KVBankAttnProcessor:
    """``mode = "write"``: plain attention, remember this layer's K/V; ``"read"``: the query
    attends over [own K/V ; remembered support K/V]."""

    def __init__(self) -> None:
        self.mode = "write"
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, **_) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch = hidden_states.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], attn.heads, -1).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(context)), heads(attn.to_v(context))
        if encoder_hidden_states is None:
            if self.mode == "write":
                self.key, self.value = key, value
            else:
                key = torch.cat([key, self.key.expand(batch, -1, -1, -1)], dim=2)
                value = torch.cat([value, self.value.expand(batch, -1, -1, -1)], dim=2)
        out = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


def install_kv_bank(unet: torch.nn.Module) -> list[KVBankAttnProcessor]:
    processors = {name: KVBankAttnProcessor() for name in unet.attn_processors}
    installed = list(processors.values())
    unet.set_attn_processor(processors)  # consumes the dict
    return installed


def set_bank_mode(processors: list[KVBankAttnProcessor], mode: str) -> None:
    for processor in processors:
        processor.mode = mode


@contextlib.contextmanager
def kv_bank(unet: torch.nn.Module) -> Iterator[list[KVBankAttnProcessor]]:
    """The released two-pass processors for the duration of the block, SQI restored after."""
    try:
        yield install_kv_bank(unet)
    finally:
        install_sqi(unet)


def _released_unet_passes(model: SDFSMIS, banks, support_latent, query_input, token) -> torch.Tensor:
    """Support pass (writes the bank), then query pass (reads it); returns the query's UNet output."""
    timesteps = torch.full((1,), model.config.timestep, device=model.device, dtype=torch.long)
    set_bank_mode(banks, "write")
    model.unet(model.conv_in_ref(support_latent), timesteps, encoder_hidden_states=token)
    set_bank_mode(banks, "read")
    return model.unet(model.conv_in(query_input), timesteps, encoder_hidden_states=token).sample


@torch.no_grad()
def released_segment_slice(
    model: SDFSMIS, banks, support_image: torch.Tensor, support_mask: torch.Tensor, query_image: torch.Tensor
) -> torch.Tensor:
    """One query slice the released way, batch 1 in fp32: encode support image and mask, DINOv2
    token, support UNet pass, encode query, QE, query UNet pass, decode. [1, 1, H, W] -> [1, 1, H, W]."""
    image_latent = model.codec.encode(support_image)
    support_latent = torch.cat([image_latent, model.codec.encode_mask(support_mask)], dim=1)
    token = model.condition_token(support_image, support_mask)
    query_latent = model.codec.encode(query_image)
    prototype = query_prototype(
        image_latent, support_mask, query_latent, model.config.qe_threshold, model.config.qe_topk
    )
    out = _released_unet_passes(model, banks, support_latent, enhance_query(query_latent, prototype), token)
    return model.codec.decode_probability(-out)


class EpisodeTensors(Protocol):
    """What a training step reads of an episode (``sdfsmis.training.episodes.Episode`` has it)."""

    support_image: torch.Tensor
    support_mask: torch.Tensor
    query_image: torch.Tensor
    query_mask: torch.Tensor


def released_training_step(
    model: SDFSMIS,
    banks,
    optimizer: torch.optim.Optimizer,
    episode: EpisodeTensors,
    generator: torch.Generator,
    grad_clip: float,
) -> float:
    """One step of the released training loop: fp32, batch 1, four separate VAE encodes, two UNet
    passes through the K/V bank, backward, clipping, AdamW, and ``loss.item()`` every step."""
    device = model.device
    support_image, support_mask, query_image, query_mask = (
        t.to(device) for t in (episode.support_image, episode.support_mask, episode.query_image, episode.query_mask)
    )
    image_latent = model.codec.encode(support_image, sample=True, generator=generator)
    support_latent = torch.cat([image_latent, model.codec.encode_mask(support_mask, True, generator)], dim=1)
    query_latent = model.codec.encode(query_image, sample=True, generator=generator)
    target = -model.codec.encode_mask(query_mask, True, generator)
    token = model.condition_token(support_image, support_mask)
    prototype = query_prototype(
        image_latent, support_mask, query_latent, model.config.qe_threshold, model.config.qe_topk
    )
    out = _released_unet_passes(model, banks, support_latent, enhance_query(query_latent, prototype), token)
    loss = F.mse_loss(out, target)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()
