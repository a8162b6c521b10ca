"""What a one-shot method offers the pipeline: encode a support once, then segment query
slices in batches against it. The volume segmenter, the trainer, the app, the evaluation
harness and the benchmark only use this interface, so SD-FSMIS and DPL run through one pipeline."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from sdfsmis.config import TrainingConfig
from sdfsmis.io.backbone import BackboneSource, resolve_backbone
from sdfsmis.io.weights import load_weights


class EpisodeBatch(NamedTuple):
    """A batch of training episodes: support and query slices [B, 1, H, W] in [-1, 1], binary masks."""

    support_image: torch.Tensor
    support_mask: torch.Tensor
    query_image: torch.Tensor
    query_mask: torch.Tensor


@dataclass
class Prediction:
    """Query slices' foreground probability [Q, 1, H, W], and, for a method that samples its
    support representation, the probabilities of each sample [Q, K, H, W] (its uncertainty)."""

    probability: torch.Tensor
    variants: torch.Tensor | None = None


class OneShotModel(nn.Module):
    """Base of the one-shot methods. Each subclass carries its own facts (the class attributes
    below), which the CLI, the app and the harness read instead of naming a method, and
    implements the abstract methods."""

    method: ClassVar[str]  # the name users type: --method, the app's infer and train task
    title: ClassVar[str]  # how people write it
    description: ClassVar[str]  # one sentence for the viewer's model list
    weights_name: ClassVar[str]  # its safetensors file
    trained_parts: ClassVar[str]  # what fine-tuning trains (warnings name them)
    backbone_parts: ClassVar[tuple[str, ...]]  # the backbone folders it loads (vae, unet, dinov2)
    settings_key: ClassVar[str]  # its section of the settings (presets: ``<key>:``)
    settings_class: ClassVar[type]
    ablations: ClassVar[dict[str, str]] = {}  # evaluation: variant key -> title (see :meth:`ablated`)
    encodes_queries: ClassVar[bool] = False  # query work that does not depend on the support (see encode_queries)
    #: A pass (query slices against one support) costs a network run (SD-FSMIS: the UNet and the
    #: decoder), so a pipeline that keeps results keeps each pass; DPL's are a few similarities.
    costly_passes: ClassVar[bool] = True
    paper_decision: ClassVar[dict[str, Any]] = {}  # the paper protocol's decision rule, if the method states one
    resolution: int

    @classmethod
    def from_backbone(
        cls,
        backbone: str | Path | None,
        settings: Any,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> OneShotModel:
        """Build from a backbone (directory or hub default) with :class:`~sdfsmis.settings.Settings`,
        and load our weights if given."""
        model = cls.build(resolve_backbone(backbone, parts=cls.backbone_parts), settings, dtype)
        if checkpoint is not None:
            load_weights(model, checkpoint)
        return model.to(device)

    @classmethod
    def build(cls, source: BackboneSource, settings: Any, dtype: torch.dtype) -> OneShotModel:
        """The model on the backbone parts it needs, its trained parts freshly initialised."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(p.device for p in self.parameters() if p.requires_grad)

    def encode_support(self, image: torch.Tensor, mask: torch.Tensor) -> Any:
        """Support slices [S, 1, H, W] in [-1, 1] and binary masks -> what segmenting needs of them."""
        raise NotImplementedError

    def join_supports(self, parts: list[Any]) -> Any:
        """Encoded supports (each from :meth:`encode_support`) -> one whose rows are theirs in order:
        the pipeline encodes each support row alone and keeps it, so that a row's encoding never
        depends on the rows encoded with it. Tensors are joined along their first axis, through
        dataclasses and dicts."""
        return _join_rows(parts)

    def predict(self, support: Any, query_image: torch.Tensor, index: torch.Tensor) -> Prediction:
        """Query slices [Q, 1, H, W] in [-1, 1], each against support row ``index[q]``."""
        raise NotImplementedError

    def predict_each(self, support: Any, query_image: torch.Tensor, index: torch.Tensor) -> list[Prediction]:
        """Query slices against each of their support rows ``index`` [Q, k]: k predictions. A
        method whose query work does not depend on the support overrides this to do it once."""
        return [self.predict(support, query_image, index[:, j]) for j in range(index.shape[1])]

    def encode_queries(self, query_image: torch.Tensor) -> Any:
        """Query slices -> what predicting needs of them whatever the support, kept by the pipeline
        so that a changed support does not redo it (DPL: their features). A method whose query
        work all depends on the support returns the slices (``encodes_queries`` False)."""
        return query_image

    def predict_encoded(self, support: Any, queries: Any, index: torch.Tensor) -> list[Prediction]:
        """Encoded query slices (:meth:`encode_queries`) against each of their support rows [Q, k]."""
        return self.predict_each(support, queries, index)

    @torch.no_grad()
    def segment(self, support: Any, query_image: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Foreground probability [Q, 1, H, W] in [0, 1]; every query uses support row 0 by default."""
        if index is None:
            index = torch.zeros(query_image.shape[0], dtype=torch.long, device=query_image.device)
        return self.predict(support, query_image, index).probability

    def training_losses(
        self, episode: EpisodeBatch, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The episode's losses: ``loss`` (what is minimised) and each of its terms, for the log."""
        raise NotImplementedError

    def parameter_groups(self, training: TrainingConfig) -> list[dict]:
        """The trainable parameters with their learning rates (frozen parts excluded)."""
        raise NotImplementedError

    def ablated(self, key: str) -> OneShotModel:
        """A copy of this model changed as the ablation ``key`` (of ``ablations``) says."""
        raise ValueError(f"{self.method} has no ablation {key!r}")

    def after_step(self) -> None:
        """Called after every optimiser step (e.g. to update an EMA)."""


def _join_rows(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if first is None:
        return None
    if dataclasses.is_dataclass(first):
        return type(first)(
            **{f.name: _join_rows([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(first)}
        )
    if isinstance(first, dict):
        return {key: _join_rows([p[key] for p in parts]) for key in first}
    raise TypeError(f"cannot join support encodings of type {type(first).__name__}")
