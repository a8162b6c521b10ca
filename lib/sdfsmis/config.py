"""The settings sections every method shares: how a volume is turned into slices and back
(``inference:``) and the episodic training recipe (``training:``). Each method adds its own
section (``sdfsmis.methods``); :mod:`sdfsmis.settings` puts them together."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class InferenceConfig:
    """How a volume is turned into slices and back (the app's and the CLI's behaviour)."""

    threshold: float = 0.5
    batch_size: int = 8
    # on a CPU: query slices per model call, and so the fewest a correction recomputes (DINOv2-small on
    # 2 cores: 108 ms a slice at 2, 104 at 8; a GPU keeps batch_size)
    cpu_batch_size: int = 2
    max_supports: int = 3  # from another volume: support slices spread over the annotation
    max_volume_supports: int = 32  # same volume: every drawn or corrected slice, at most this many
    supports_per_query: int = 2  # nearest supports combined per query slice (> 1: their agreement is a confidence)
    placement: str = "registration"  # another patient's support: "registration" or "relative" (pipeline.placement)
    review_dissent: float = 0.2  # share of members voting against the majority from which a voxel is reviewed
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    z_margin: float = 0.25
    min_extent_slices: int = 3
    largest_component: bool = True
    grounding: bool = True  # segment only around where the structure was drawn (sdfsmis.pipeline.grounding)
    roi_margin_mm: float = 10.0  # in-plane margin of the grounding box, the larger of these two
    roi_margin_share: float = 0.5  # ... and this share of the drawn structure's extent
    reach_mm: float = 10.0  # same volume: the least reach beyond the outermost drawn slices
    end_continuity: float = 0.3  # beyond them, a slice with less than this share of its neighbour's area ends it
    shape_reach_mm: float = 2.0  # same volume: how far the model may move the drawn shape's contour (0: model alone)
    carried_reach_mm: float = 10.0  # another patient's drawing carried by the registration: a soft prior


@dataclass
class TrainingConfig:
    """The optimiser recipe of the paper plus the episode sampler's knobs (protocol.md)."""

    lr_unet: float = 1e-5
    lr_mlp: float = 5e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 42
    iterations: int = 15000
    checkpoint_every: int = 1000
    validate_every: int = 1000
    validation_episodes: int = 16
    min_foreground: int = 200  # pixels of an episode's masks, at model resolution
    supervoxel_min_size: int | str = "auto"  # voxels; "auto": from the voxel size and min_foreground
    gt_rate: float = 0.0
    gradient_checkpointing: bool = False
    zoom_episodes: bool = True  # crop episodes around the support as grounded inference does (training.episodes)


def merge_section(section: Any, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown setting {where}.{key} (known: {', '.join(known)})")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            merge_section(current, value or {}, f"{where}.{key}")
        else:
            setattr(section, key, tuple(value) if isinstance(current, tuple) else value)
    return section
