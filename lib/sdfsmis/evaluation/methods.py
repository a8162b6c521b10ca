"""The methods the harness compares. Each wraps an object with the one-shot interface of
:class:`sdfsmis.models.base.OneShotModel` (``encode_support`` / ``predict`` -> ``Prediction``,
``resolution``, ``device``): SD-FSMIS, DPL and DPL's ablations (loaded with
:func:`sdfsmis.models.load_model`) or a training-free baseline, plus the paper protocol's decision
rule of that method. The nearest-slice copy (``nearest-slice``) has no model: it is the floor of
same-volume propagation and runs only under that protocol."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .baselines import PrototypeMatcher, RegistrationPropagation
from .interpolation import SliceInterpolation
from .nearest_slice import NearestSliceCopy

#: DPL and its ablations (../shared/docs/dpl.md "Ablations worth printing"), all from the same
#: fold weights, changed after loading: lambda 0 (config.dpl.fusion_lambda = 0: the plain ADNet
#: head on the same features), untrained denoiser (``reset_denoiser()``: Gaussian prototype
#: augmentation), no condition (config.dpl.use_condition = False: the denoiser, trained with the
#: condition, runs without it). Key -> title in the tables.
DPL_VARIANTS = {
    "dpl": "DPL",
    "dpl-lambda0": "DPL, lambda 0 (plain prototype head)",
    "dpl-untrained-denoiser": "DPL, untrained denoiser",
    "dpl-no-condition": "DPL, no spatial condition",
}
METHODS = ("sdfsmis", *DPL_VARIANTS, "prototype", "registration", "nearest-slice", "interpolation")
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
    (DPL's ablations are copies of the loaded DPL, changed). DPL's weights come from
    ``dpl_checkpoint``, else from ``checkpoint`` when that names a folder (its dpl.safetensors)."""

    def __init__(
        self,
        backbone: str | Path | None,
        checkpoint: str | None,
        config: Any,
        device: str = "cpu",
        prototype_resolution: int = 256,
        registration_resolution: int = 128,
        dpl_checkpoint: str | None = None,
    ):
        self.backbone, self.checkpoint, self.config, self.device = backbone, checkpoint, config, device
        self.dpl_checkpoint = dpl_checkpoint
        self.prototype_resolution = prototype_resolution
        self.registration_resolution = registration_resolution
        self._loaded: tuple[str, Path | None, Method] | None = None
        self._dpl: tuple[Path | None, Any] | None = None  # the fold's DPL as loaded, never changed

    def _checkpoint(self, key: str, fold: int, weights_name: str) -> Path | None:
        if key == "sdfsmis":
            return checkpoint_for_fold(self.checkpoint, fold, weights_name)
        if self.dpl_checkpoint is not None:
            return checkpoint_for_fold(self.dpl_checkpoint, fold, weights_name)
        folder = checkpoint_for_fold(self.checkpoint, fold)
        return folder / weights_name if folder is not None and folder.is_dir() else None

    def __call__(self, key: str, fold: int) -> Method:
        if key == "prototype":
            return Method(key, PrototypeMatcher.title, PrototypeMatcher(self.prototype_resolution))
        if key == "registration":
            return Method(key, RegistrationPropagation.title, RegistrationPropagation(self.registration_resolution))
        if key == "nearest-slice":
            return Method(key, NearestSliceCopy.title, NearestSliceCopy())
        if key == "interpolation":
            return Method(key, SliceInterpolation.title, SliceInterpolation())
        if key != "sdfsmis" and key not in DPL_VARIANTS:
            raise ValueError(f"unknown method {key!r} (known: {', '.join(METHODS)})")
        from ..models import load_model, method_class

        method = "sdfsmis" if key == "sdfsmis" else "dpl"
        checkpoint = self._checkpoint(key, fold, method_class(method).weights_name)
        if self._loaded is not None and self._loaded[:2] == (key, checkpoint):
            return self._loaded[2]
        self._loaded = None  # in memory: the current method's model, and the fold's DPL for its ablations
        if self.backbone is None:
            raise ValueError(f"method {key} needs --backbone")
        option = "--checkpoint" if method == "sdfsmis" else "--dpl-checkpoint"
        if checkpoint is None:
            print(f"WARNING: no {option}: {key} is untrained, its scores are a floor", file=sys.stderr)
        elif not checkpoint.exists():
            raise FileNotFoundError(f"{option} for fold {fold} not found: {checkpoint}")
        untrained = "" if checkpoint else " (untrained)"
        if method == "sdfsmis":
            self._dpl, config = None, copy.deepcopy(self.config)
            model = load_model("sdfsmis", self.backbone, config, checkpoint, device=self.device).eval()
            title = f"SD-FSMIS, backbone {Path(str(self.backbone)).name}{untrained}"
            # The paper's decision: 0.25 x the chunk's maximum, largest component per slice.
            built = Method(key, title, model, relative_threshold=0.25, largest_per_slice=True)
        else:
            if self._dpl is None or self._dpl[0] != checkpoint:
                self._dpl = None
                config = copy.deepcopy(self.config)
                self._dpl = (
                    checkpoint,
                    load_model("dpl", self.backbone, config, checkpoint, device=self.device).eval(),
                )
            model = self._dpl[1] if key == "dpl" else copy.deepcopy(self._dpl[1])  # its own config too
            if key == "dpl-lambda0":
                model.config.fusion_lambda = 0.0
            elif key == "dpl-no-condition":
                model.config.use_condition = False
            elif key == "dpl-untrained-denoiser":
                model.reset_denoiser()
            # ADNet's decision (P > 0.5 from the learned threshold T), no post-processing: neither
            # the DPL abstract nor the ADNet lineage states a relative threshold or component rule.
            built = Method(key, f"{DPL_VARIANTS[key]}, backbone {Path(str(self.backbone)).name}{untrained}", model)
        self._loaded = (key, checkpoint, built)
        return built
