"""The released code's formulation of SQI, kept as a reference for tests and benchmarks:
a stateful K/V bank filled by a support forward pass and read by a second, query forward
pass. It breaks under gradient checkpointing and is not thread-safe; never serve with it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


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
