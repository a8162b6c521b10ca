"""The methods the harness compares. Each wraps an object with the one-shot interface of
:class:`sdfsmis.methods.base.OneShotModel` (``encode_support`` / ``predict`` -> ``Prediction``,
``resolution``, ``device``): every method of the registry and its ablations (loaded by
:class:`sdfsmis.pipeline.predictor.Predictor`) or a training-free baseline, plus the paper protocol's decision
rule of that method. The nearest-slice copy (``nearest-slice``) has no model: it is the floor of
same-volume propagation and runs only under that protocol."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdfsmis.evaluation.baselines import PrototypeMatcher, RegistrationPropagation
from sdfsmis.evaluation.interpolation import SliceInterpolation
from sdfsmis.evaluation.nearest_slice import NearestSliceCopy
from sdfsmis.methods import DEFAULT_METHOD, OneShotModel, weights_option
from sdfsmis.methods import METHODS as MODELS
from sdfsmis.pipeline.predictor import Predictor

#: The model rows: every method of the registry and each of its ablations (variants changed
#: after loading the same fold weights) -> (method, ablation or None).
MODEL_KEYS: dict[str, tuple[str, str | None]] = {
    key: (name, ablation)
    for name, method in MODELS.items()
    for key, ablation in [(name, None), *((a, a) for a in method.ablations)]
}
METHODS = (*MODEL_KEYS, "prototype", "registration", "nearest-slice", "interpolation")
#: Methods that only the same-volume ``propagation`` protocol can run (they copy the volume's own
#: annotation; from another patient's volume there is nothing to copy).
PROPAGATION_ONLY = ("nearest-slice", "interpolation")


@dataclass
class Method:
    key: str
    title: str
    model: Any  # a one-shot model, or a training-free floor (its own ``propagate``, no model)
    threshold: float = 0.5
    relative_threshold: float | None = None  # paper rule: fraction of the chunk's maximum
    largest_per_slice: bool = False  # paper rule: keep the largest 2-D component of each slice


def checkpoint_for_fold(pattern: str | None, fold: int, weights_name: str | None = None) -> Path | None:
    """``--checkpoint`` / ``--dpl-checkpoint`` name one path for every fold (cross-domain) or a
    pattern with {fold}. A path that is a folder holds each method's own weights file
    (``weights_name``: sdfsmis.safetensors, dpl.safetensors)."""
    if pattern is None:
        return None
    path = Path(pattern.format(fold=fold))
    return path / weights_name if weights_name and path.is_dir() else path


class MethodFactory:
    """Builds a method for a fold; a model is reloaded only when the fold's checkpoint changes
    (ablations are changed copies of the loaded model). ``checkpoints``: method -> weights pattern
    (see :func:`checkpoint_for_fold`); a method without one takes its weights file from the default
    method's pattern when that names a folder."""

    def __init__(
        self,
        backbone: str | Path | None,
        checkpoints: dict[str, str | None],
        config: Any,
        device: str = "cpu",
        prototype_resolution: int = 256,
        registration_resolution: int = 128,
    ):
        self.backbone, self.checkpoints, self.config, self.device = backbone, checkpoints, config, device
        self.prototype_resolution = prototype_resolution
        self.registration_resolution = registration_resolution
        self._loaded: tuple[str, Path | None, Method] | None = None
        self._base: tuple[str, Path | None, OneShotModel] | None = None  # the fold's model as loaded, never changed

    def _checkpoint(self, method: str, fold: int) -> Path | None:
        weights_name = MODELS[method].weights_name
        if self.checkpoints.get(method) is not None:
            return checkpoint_for_fold(self.checkpoints[method], fold, weights_name)
        folder = checkpoint_for_fold(self.checkpoints.get(DEFAULT_METHOD), fold)
        if method == DEFAULT_METHOD or folder is None:
            return folder
        return folder / weights_name if folder.is_dir() else None

    def __call__(self, key: str, fold: int) -> Method:
        if key == "prototype":
            return Method(key, PrototypeMatcher.title, PrototypeMatcher(self.prototype_resolution))
        if key == "registration":
            return Method(key, RegistrationPropagation.title, RegistrationPropagation(self.registration_resolution))
        if key == "nearest-slice":
            return Method(key, NearestSliceCopy.title, NearestSliceCopy())
        if key == "interpolation":
            return Method(key, SliceInterpolation.title, SliceInterpolation())
        if key not in MODEL_KEYS:
            raise ValueError(f"unknown method {key!r} (known: {', '.join(METHODS)})")
        method, ablation = MODEL_KEYS[key]
        checkpoint = self._checkpoint(method, fold)
        if self._loaded is not None and self._loaded[:2] == (key, checkpoint):
            return self._loaded[2]
        self._loaded = None  # in memory: the current row's model, and the fold's model for its ablations
        if self.backbone is None:
            raise ValueError(f"method {key} needs --backbone")
        option = weights_option(method)
        if checkpoint is None:
            print(f"WARNING: no {option}: {key} is untrained, its scores are a floor", file=sys.stderr)
        elif not checkpoint.exists():
            raise FileNotFoundError(f"{option} for fold {fold} not found: {checkpoint}")
        if self._base is None or self._base[:2] != (method, checkpoint):
            self._base = None
            config = copy.deepcopy(self.config)  # each model changes its own section (ablations)
            predictor = Predictor.from_pretrained(method, self.backbone, config, checkpoint, self.device)
            self._base = (method, checkpoint, predictor.model)  # loaded and prepared as the product serves it
        model = self._base[2] if ablation is None else self._base[2].ablated(ablation)
        title = MODELS[method].title if ablation is None else MODELS[method].ablations[ablation]
        untrained = "" if checkpoint else " (untrained)"
        # the decision rule the method's paper states (SD-FSMIS: 0.25 x the chunk's maximum, largest
        # component per slice); DPL: ADNet's P > 0.5 from the learned threshold, no post-processing
        decision = MODELS[method].paper_decision
        built = Method(key, f"{title}, backbone {Path(str(self.backbone)).name}{untrained}", model, **decision)
        self._loaded = (key, checkpoint, built)
        return built
