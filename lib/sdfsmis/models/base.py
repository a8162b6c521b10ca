"""What a one-shot method offers the pipeline: encode a support once, then segment query
slices in batches against it. The volume segmenter, the trainer, the app, the evaluation
harness and the benchmark only use this interface, so SD-FSMIS and DPL run through one pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import TrainingConfig


@dataclass
class Prediction:
    """Query slices' foreground probability [Q, 1, H, W], and, for a method that samples its
    support representation, the probabilities of each sample [Q, K, H, W] (its uncertainty)."""

    probability: torch.Tensor
    variants: torch.Tensor | None = None


class OneShotModel(nn.Module):
    """Base of the one-shot methods. Subclasses set ``method`` (the CLI's and the app's name),
    ``weights_name`` (their safetensors file), ``backbone_parts`` and implement the abstract
    methods."""

    method: str
    weights_name: str
    backbone_parts: tuple[str, ...]  # the backbone folders it loads (vae, unet, dinov2)
    resolution: int

    @property
    def device(self) -> torch.device:
        return next(p.device for p in self.parameters() if p.requires_grad)

    def encode_support(self, image: torch.Tensor, mask: torch.Tensor) -> Any:
        """Support slices [S, 1, H, W] in [-1, 1] and binary masks -> what segmenting needs of them."""
        raise NotImplementedError

    def predict(self, support: Any, query_image: torch.Tensor, index: torch.Tensor) -> Prediction:
        """Query slices [Q, 1, H, W] in [-1, 1], each against support row ``index[q]``."""
        raise NotImplementedError

    def predict_each(self, support: Any, query_image: torch.Tensor, index: torch.Tensor) -> list[Prediction]:
        """Query slices against each of their support rows ``index`` [Q, k]: k predictions. A
        method whose query work does not depend on the support overrides this to do it once."""
        return [self.predict(support, query_image, index[:, j]) for j in range(index.shape[1])]

    @torch.no_grad()
    def segment(self, support: Any, query_image: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Foreground probability [Q, 1, H, W] in [0, 1]; every query uses support row 0 by default."""
        if index is None:
            index = torch.zeros(query_image.shape[0], dtype=torch.long, device=query_image.device)
        return self.predict(support, query_image, index).probability

    def training_losses(
        self,
        support_image: torch.Tensor,
        support_mask: torch.Tensor,
        query_image: torch.Tensor,
        query_mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The episode's losses: ``loss`` (what is minimised) and each of its terms, for the log."""
        raise NotImplementedError

    def parameter_groups(self, training: TrainingConfig) -> list[dict]:
        """The trainable parameters with their learning rates (frozen parts excluded)."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimiser step (e.g. to update an EMA)."""
