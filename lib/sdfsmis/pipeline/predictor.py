"""The one way to run inference: a method's model, loaded from a backbone with its settings and
our weights on a device and made fast there, with the volume pipeline (supports, placement,
grounding, uncertainty) around it. The CLI, the app, the evaluation harness and the scripts all
build their segmentation from here, as nnU-Net's commands and Python users share one predictor."""

from __future__ import annotations

from pathlib import Path

import torch

from sdfsmis.io.volume import Volume
from sdfsmis.io.weights import load_weights
from sdfsmis.methods import OneShotModel, load_model
from sdfsmis.pipeline.acceleration import InferenceOptions, accelerate
from sdfsmis.pipeline.segmenter import SegmentationResult, SupportVolume, VolumeSegmenter
from sdfsmis.settings import Settings, load_config


class Predictor:
    """A loaded, accelerated one-shot model and the settings it is served with."""

    def __init__(self, model: OneShotModel, settings: Settings, options: InferenceOptions | None = None):
        self.options = options or InferenceOptions()
        self.model = accelerate(model.eval(), self.options)
        self.settings = settings

    @classmethod
    def from_pretrained(
        cls,
        method: str,
        backbone: str | Path | None,
        settings: Settings | str | Path | None = None,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        options: InferenceOptions | None = None,
    ) -> Predictor:
        """``settings``: a :class:`Settings`, or a preset name / YAML path; None: the backbone's own
        ``sdfsmis.yaml``, else the paper defaults. ``checkpoint``: our fine-tuned weights (file or
        folder); without it the method's trained parts are untrained."""
        if not isinstance(settings, Settings):
            settings = load_config(settings, backbone)
        return cls(load_model(method, backbone, settings, checkpoint, device=device), settings, options)

    @property
    def method(self) -> str:
        return self.model.method

    def load_weights(self, checkpoint: str | Path) -> None:
        """Swap in newer weights of the same method (the app picks up a published checkpoint)."""
        load_weights(self.model, checkpoint)

    def segmenter(self, progress: bool = True) -> VolumeSegmenter:
        return VolumeSegmenter(self.model, self.settings.inference, progress=progress, options=self.options)

    def segment(
        self, supports: list[SupportVolume], query: Volume, label_ids: list[int] | None = None, progress: bool = True
    ) -> SegmentationResult:
        """Segment ``query`` with each label of the supports (see :meth:`VolumeSegmenter.segment_with`)."""
        return self.segmenter(progress).segment_with(supports, query, label_ids)
