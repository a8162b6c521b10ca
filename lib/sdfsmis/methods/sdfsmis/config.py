"""SD-FSMIS's section of the settings (``model:`` in the presets)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """What the network is and how one episode is computed (see docs/model.md)."""

    resolution: int = 256
    timestep: int = 999
    conv_init: str = "repeat_half"  # or "zero": extra input channels start at zero
    qe_threshold: float = 0.7
    qe_topk: int = 10
    vtct_image_size: int = 224
    vtct_hidden_dim: int = 1536
    vtct_hidden_layers: int = 2
