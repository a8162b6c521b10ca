"""The one-shot methods: SD-FSMIS and DPL, two models behind one interface
(:class:`~sdfsmis.models.base.OneShotModel`) that the volume segmenter, the trainer, the app,
the evaluation harness and the benchmark use alike."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import SDFSMISConfig
from .base import OneShotModel, Prediction
from .dpl import DPL
from .sdfsmis import SDFSMIS

METHODS: dict[str, type[OneShotModel]] = {"sdfsmis": SDFSMIS, "dpl": DPL}

__all__ = ["DPL", "METHODS", "SDFSMIS", "OneShotModel", "Prediction", "load_model"]


def method_class(method: str) -> type[OneShotModel]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    return METHODS[method]


def load_model(
    method: str,
    backbone: str | Path | None,
    config: SDFSMISConfig,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> OneShotModel:
    """The method's model from a backbone (directory or hub default), with our weights if given."""
    if method_class(method) is DPL:
        return DPL.from_backbone(backbone, config.dpl, config.model.resolution, checkpoint, device, dtype)
    return SDFSMIS.from_backbone(backbone, config.model, checkpoint, device, dtype)
