"""The methods the harness compares. Each wraps an object with the model's one-shot interface
(``encode_support`` / ``segment``, ``config.resolution``, ``device``): SD-FSMIS itself
(:class:`sdfsmis.models.sdfsmis.SDFSMIS`) or a training-free baseline, plus the paper protocol's
decision rule of that method."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .baselines import PrototypeMatcher, RegistrationPropagation

METHODS = ("sdfsmis", "prototype", "registration")


@dataclass
class Method:
    key: str
    title: str
    model: Any
    threshold: float = 0.5
    relative_threshold: float | None = None  # paper rule: fraction of the chunk's maximum
    largest_per_slice: bool = False  # paper rule: keep the largest 2-D component of each slice


def checkpoint_for_fold(pattern: str | None, fold: int) -> Path | None:
    """``--checkpoint`` may name one file for every fold (cross-domain) or a pattern with {fold}."""
    return None if pattern is None else Path(pattern.format(fold=fold))


class MethodFactory:
    """Builds a method for a fold; SD-FSMIS is reloaded only when the fold's checkpoint changes."""

    def __init__(
        self,
        backbone: str | Path | None,
        checkpoint: str | None,
        config: Any,
        device: str = "cpu",
        prototype_resolution: int = 256,
        registration_resolution: int = 128,
    ):
        self.backbone, self.checkpoint, self.config, self.device = backbone, checkpoint, config, device
        self.prototype_resolution = prototype_resolution
        self.registration_resolution = registration_resolution
        self._loaded: tuple[Path | None, Method] | None = None

    def __call__(self, key: str, fold: int) -> Method:
        if key == "prototype":
            return Method(key, PrototypeMatcher.title, PrototypeMatcher(self.prototype_resolution))
        if key == "registration":
            return Method(key, RegistrationPropagation.title, RegistrationPropagation(self.registration_resolution))
        if key != "sdfsmis":
            raise ValueError(f"unknown method {key!r} (known: {', '.join(METHODS)})")
        checkpoint = checkpoint_for_fold(self.checkpoint, fold)
        if self._loaded is None or self._loaded[0] != checkpoint:
            from ..models.sdfsmis import SDFSMIS

            if self.backbone is None:
                raise ValueError("method sdfsmis needs --backbone")
            if checkpoint is None:
                print("WARNING: no --checkpoint: SD-FSMIS is untrained, its scores are a floor", file=sys.stderr)
            elif not checkpoint.exists():
                raise FileNotFoundError(f"checkpoint for fold {fold} not found: {checkpoint}")
            model = SDFSMIS.from_backbone(self.backbone, self.config.model, checkpoint, device=self.device).eval()
            title = f"SD-FSMIS, backbone {Path(str(self.backbone)).name}" + ("" if checkpoint else " (untrained)")
            # The paper's decision: 0.25 x the chunk's maximum, largest component per slice.
            self._loaded = (checkpoint, Method(key, title, model, relative_threshold=0.25, largest_per_slice=True))
        return self._loaded[1]
