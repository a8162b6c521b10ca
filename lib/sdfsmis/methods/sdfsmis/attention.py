"""Support-Query Interaction (SQI) as a diffusers attention processor.

SQI adds no weights: in every UNet self-attention the query tokens attend over their own keys
and values concatenated with the support's keys and values of the same layer (one softmax);
support tokens get plain self-attention. The batch carries the support rows first, then the
query rows, and a :class:`SQILayout` passed through ``cross_attention_kwargs`` says how many
rows are support and which support each query row uses. Nothing is stored on the processor,
so it is safe under gradient checkpointing and for concurrent requests.

For inference the support K/V can be computed once and reused for every query batch: a
support-only pass records them into a :class:`SupportKVBank`, and query-only passes read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


@dataclass
class SupportKVBank:
    """Per-layer support keys/values [S, heads, tokens, head_dim], filled by a support pass."""

    keys: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SQILayout:
    """How a UNet batch is laid out.

    ``support_rows`` leading rows are support slices; the others are query slices. Query row i
    attends to support ``support_index[i]`` (default: support i when there are as many supports
    as queries, else support 0). With a ``bank``, a support-only batch records its K/V and a
    query-only batch (``support_rows == 0``) reads them from the bank.
    """

    support_rows: int
    support_index: torch.Tensor | None = None
    bank: SupportKVBank | None = None


def _heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    batch, tokens, _ = x.shape
    return x.view(batch, tokens, attn.heads, -1).transpose(1, 2)


def _resolve_index(layout: SQILayout, supports: int, queries: int, device: torch.device) -> torch.Tensor:
    if layout.support_index is not None:
        return layout.support_index.to(device)
    if supports == queries:
        return torch.arange(queries, device=device)
    if supports == 1:
        return torch.zeros(queries, dtype=torch.long, device=device)
    raise ValueError(f"SQI: {queries} query rows and {supports} supports need an explicit support_index")


class SQIAttnProcessor:
    """Scaled-dot-product attention with SQI on self-attention; plain attention elsewhere."""

    def __init__(self, name: str):
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        sqi: SQILayout | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("SQIAttnProcessor supports the SD v1.5 transformer attentions only")
        residual = hidden_states
        is_self = encoder_hidden_states is None
        context = hidden_states if is_self else encoder_hidden_states
        if not is_self and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = _heads(attn, attn.to_q(hidden_states))
        key = _heads(attn, attn.to_k(context))
        value = _heads(attn, attn.to_v(context))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if is_self and sqi is not None:
            out = self._support_query_attention(query, key, value, sqi)
        else:
            out = F.scaled_dot_product_attention(query, key, value)

        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _support_query_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sqi: SQILayout
    ) -> torch.Tensor:
        rows = sqi.support_rows
        if sqi.bank is not None and rows == query.shape[0]:
            sqi.bank.keys[self.name], sqi.bank.values[self.name] = key, value
            return F.scaled_dot_product_attention(query, key, value)
        if sqi.bank is not None and rows == 0:
            support_keys, support_values = sqi.bank.keys[self.name], sqi.bank.values[self.name]
        elif sqi.bank is None and 0 < rows < query.shape[0]:
            support_keys, support_values = key[:rows], value[:rows]
        else:
            raise ValueError(f"SQI layout with {rows} support rows does not fit a batch of {query.shape[0]}")
        index = _resolve_index(sqi, support_keys.shape[0], query.shape[0] - rows, query.device)
        query_keys = torch.cat([key[rows:], support_keys[index]], dim=2)
        query_values = torch.cat([value[rows:], support_values[index]], dim=2)
        query_out = F.scaled_dot_product_attention(query[rows:], query_keys, query_values)
        if rows == 0:
            return query_out
        support_out = F.scaled_dot_product_attention(query[:rows], key[:rows], value[:rows])
        return torch.cat([support_out, query_out], dim=0)


def install_sqi(unet: torch.nn.Module) -> None:
    """Install SQI processors on every attention of the UNet (install last: xformers, LoRA
    loaders and ``set_default_attn_processor`` replace processors)."""
    unet.set_attn_processor({name: SQIAttnProcessor(name) for name in unet.attn_processors})
    assert_sqi_installed(unet)


def assert_sqi_installed(unet: torch.nn.Module) -> None:
    wrong = [name for name, proc in unet.attn_processors.items() if not isinstance(proc, SQIAttnProcessor)]
    if wrong:
        raise RuntimeError(f"SQI attention processor was replaced on {len(wrong)} layers, e.g. {wrong[0]}")
