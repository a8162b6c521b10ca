"""The one way to run inference: a method's model, loaded from a backbone with its settings and
our weights on a device and made fast there, with the volume pipeline (supports, placement,
grounding, uncertainty) around it. The CLI, the app, the evaluation harness and the scripts all
build their segmentation from here, as nnU-Net's commands and Python users share one predictor."""

from __future__ import annotations

from pathlib import Path

import torch

from sdfsmis.io.volume import Volume, load_volume
from sdfsmis.io.weights import load_weights
from sdfsmis.methods import OneShotModel, load_model
from sdfsmis.pipeline.acceleration import InferenceOptions, accelerate
from sdfsmis.pipeline.cache import ComputeCache, cached, digest
from sdfsmis.pipeline.segmenter import SegmentationResult, SupportVolume, VolumeSegmenter
from sdfsmis.settings import Settings, load_config


class Predictor:
    """A loaded, accelerated one-shot model and the settings it is served with."""

    def __init__(
        self,
        model: OneShotModel,
        settings: Settings,
        options: InferenceOptions | None = None,
        cache_bytes: int = 0,
    ):
        self.options = options or InferenceOptions()
        self.model = accelerate(model.eval(), self.options)
        self.settings = settings
        # a server keeps what it computed for the next request on the same image (pipeline.cache)
        self.cache = ComputeCache(cache_bytes) if cache_bytes > 0 else None

    @classmethod
    def from_pretrained(
        cls,
        method: str,
        backbone: str | Path | None,
        settings: Settings | str | Path | None = None,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        options: InferenceOptions | None = None,
        cache_bytes: int = 0,
    ) -> Predictor:
        """``settings``: a :class:`Settings`, or a preset name / YAML path; None: the backbone's own
        ``sdfsmis.yaml``, else the paper defaults. ``checkpoint``: our fine-tuned weights (file or
        folder); without it the method's trained parts are untrained. ``cache_bytes``: how much of
        what it computed to keep for later requests (0: nothing)."""
        if not isinstance(settings, Settings):
            settings = load_config(settings, backbone)
        return cls(load_model(method, backbone, settings, checkpoint, device=device), settings, options, cache_bytes)

    @property
    def method(self) -> str:
        return self.model.method

    def load_weights(self, checkpoint: str | Path) -> None:
        """Swap in newer weights of the same method (the app picks up a published checkpoint)."""
        load_weights(self.model, checkpoint)
        if self.cache is not None:  # computed by the old weights
            self.cache.clear()

    def read_image(self, path: str | Path, max_voxels: int | None = None) -> Volume:
        """The image at ``path``, loaded once while its file is unchanged (path, size and time of
        change) and the cache keeps it: a re-run on the same image skips the read. The volume is
        shared, never to be changed in place."""
        path = Path(path)
        stat = path.stat()
        key = digest("image", str(path.resolve()), stat.st_size, stat.st_mtime_ns, max_voxels)
        return cached(self.cache, key, lambda: load_volume(path, max_voxels=max_voxels))

    def segmenter(self, progress: bool = True) -> VolumeSegmenter:
        return VolumeSegmenter(
            self.model, self.settings.inference, progress=progress, options=self.options, cache=self.cache
        )

    def segment(
        self,
        supports: list[SupportVolume],
        query: Volume,
        label_ids: list[int] | None = None,
        progress: bool = True,
        doubt_map: bool = True,
    ) -> SegmentationResult:
        """Segment ``query`` with each label of the supports (see :meth:`VolumeSegmenter.segment_with`)."""
        return self.segmenter(progress).segment_with(supports, query, label_ids, doubt_map)
