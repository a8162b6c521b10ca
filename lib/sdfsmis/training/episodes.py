"""Self-supervised episodes (protocol.md): adjacent support/query slices of one volume that
share a random 3-D supervoxel, optionally mixed with ground-truth labels, with Setting-2
exclusion judged on ground truth.

Zoomed episodes (:class:`EpisodeZoom`, the default) are cropped and resampled exactly as grounded
inference crops a query slice (:mod:`sdfsmis.pipeline.grounding`): the box around the support's mask with
the same margins, for support and query alike. The model then learns the task it is served for,
a structure filling a share of its input whatever its size in millimetres, and small supervoxels
make episodes as well as large ones. Without a zoom the whole slice is the input (the paper's
episodes).

Every episode is drawn from a generator seeded with (run seed, iteration), so the data order
is reproducible and a resumed run continues exactly where it stopped, with no sampler state.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from sdfsmis.io.volume import SliceGrid, Volume, axial_slices, load_volume, normalise_intensity, ras_spacing
from sdfsmis.pipeline.grounding import box_around
from sdfsmis.training.augment import augment
from sdfsmis.training.supervoxels import load_or_compute_supervoxels

AUTO = "auto"


class NoEpisodes(RuntimeError):
    """No training volume yields an episode; the message names the setting to change."""


def auto_supervoxel_min_size(volume: Volume, resolution: int, min_foreground: int) -> int:
    """The smallest supervoxel (in voxels) that can make an episode at model resolution.

    A model pixel covers ``side * spacing / resolution`` mm (the slice is padded to a square of
    ``side`` voxels, then resized), so an episode's ``min_foreground`` pixels are an area in mm².
    The smallest supervoxel is a cube (SLIC makes them roughly isotropic in mm) whose cross-section
    is twice that area, at least two slices thick, so that a typical supervoxel covers the minimum
    on two adjacent slices whatever the voxel size, slice thickness and field of view.
    """
    spacing = np.asarray(ras_spacing(volume))
    side = max(volume.data.shape[:2])
    pixel_mm2 = float(np.prod(spacing[:2])) * (side / resolution) ** 2
    area = 2.0 * min_foreground * pixel_mm2
    thickness = max(np.sqrt(area), 2.0 * spacing[2])
    return max(1, round(area * thickness / float(np.prod(spacing))))


@dataclass(frozen=True)
class EpisodeZoom:
    """Crop every episode to the box around its support mask, with grounded inference's margins
    (``inference.roi_margin_mm`` / ``roi_margin_share``), and resample it to the model's input."""

    margin_mm: float
    margin_share: float
    min_voxels: int = 4  # of the target on each of the two slices, at native resolution

    def smallest_supervoxel(self, volume: Volume, resolution: int, min_foreground: int) -> int:
        """The smallest supervoxel (voxels) worth an episode once zoomed: a cube whose side ``s``
        fills twice ``min_foreground`` pixels of the input when framed by the margin
        (``s / (s + 2 margin)`` of the side), at least 5 mm and two slices thick."""
        share = np.sqrt(min(0.5, 2.0 * min_foreground / resolution**2))
        side = max(5.0, 2 * self.margin_mm * share / (1 - share))
        spacing = np.asarray(ras_spacing(volume))
        return max(1, round(side * side * max(side, 2.0 * spacing[2]) / float(np.prod(spacing))))


def _areas(maps: torch.Tensor) -> np.ndarray:
    """[ids + 1, Z] pixel count of every id on every slice of ``maps`` [Z, R, R]."""
    depth = maps.shape[0]
    flat = maps.flatten(1).long()
    ids = int(flat.max()) + 1 if flat.numel() else 1
    keys = (flat * depth + torch.arange(depth)[:, None]).flatten()
    return torch.bincount(keys, minlength=ids * depth).view(ids, depth).numpy()


@dataclass
class Episode:
    support_image: torch.Tensor  # [1, 1, R, R] in [-1, 1]
    support_mask: torch.Tensor  # [1, 1, R, R] in {0, 1}
    query_image: torch.Tensor
    query_mask: torch.Tensor
    source: str  # "supervoxel" or "ground_truth"

    def pin_memory(self) -> Episode:
        """Page-locked copies (DataLoader ``pin_memory``), for asynchronous host-to-GPU copies."""
        tensors = (self.support_image, self.support_mask, self.query_image, self.query_mask)
        return Episode(*(t.pin_memory() for t in tensors), source=self.source)


@dataclass
class TrainingVolume:
    """A volume's axial slices with its supervoxels and optional labels: at model resolution
    (whole-slice episodes), or at native resolution with the ``zoom`` that crops each episode."""

    name: str
    images: torch.Tensor  # [Z, 1, R, R] (zoom: [Z, 1, X, Y]) in [-1, 1]
    supervoxels: torch.Tensor  # [Z, R, R] (zoom: [Z, X, Y]) int32
    labels: torch.Tensor | None  # ground truth on the same grid, when the volume has one
    excluded: np.ndarray  # [Z] bool: slices removed for Setting 2
    supervoxel_min_size: int = 0
    zoom: EpisodeZoom | None = None
    resolution: int = 0
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def load(
        cls,
        image_path: Path,
        resolution: int,
        label_path: Path | None = None,
        supervoxel_min_size: int | str = 5000,
        clip_percentiles: tuple[float, float] = (0.5, 99.5),
        min_foreground: int = 200,
        zoom: EpisodeZoom | None = None,
    ) -> TrainingVolume:
        """``supervoxel_min_size`` "auto" follows the voxel size and the model resolution
        (:func:`auto_supervoxel_min_size`, from ``min_foreground``), or with a ``zoom`` the
        smallest structure a zoomed episode still shows (:meth:`EpisodeZoom.smallest_supervoxel`)."""
        volume = load_volume(image_path)
        if supervoxel_min_size == AUTO:
            supervoxel_min_size = (
                zoom.smallest_supervoxel(volume, resolution, min_foreground)
                if zoom
                else auto_supervoxel_min_size(volume, resolution, min_foreground)
            )
        supervoxels = volume.from_original(load_or_compute_supervoxels(image_path, min_size=int(supervoxel_min_size)))
        grid = SliceGrid(*volume.data.shape[:2], resolution)
        every = np.arange(volume.data.shape[2])
        data = normalise_intensity(volume.data, clip_percentiles)

        def labelmap(array: np.ndarray) -> torch.Tensor:
            if zoom:
                return torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0))).int()
            return grid.to_model(axial_slices(array.astype(np.float32), every), "nearest", 0.0)[:, 0].int()

        labels = labelmap(load_volume(label_path, label=True).data) if label_path else None
        images = axial_slices(data, every)
        return cls(
            name=image_path.name,
            images=images if zoom else grid.to_model(images),
            supervoxels=labelmap(supervoxels),
            labels=labels,
            excluded=np.zeros(len(every), dtype=bool),
            supervoxel_min_size=int(supervoxel_min_size),
            zoom=zoom,
            resolution=resolution,
            spacing=tuple(float(v) for v in ras_spacing(volume)),
        )

    def pair(self, masks: torch.Tensor, support: int, query: int) -> tuple[torch.Tensor, ...]:
        """Support image, support mask, query image, query mask [1, 1, R, R] of slices ``support``
        and ``query`` of ``masks`` [Z, ...] bool; zoomed, both cropped to the box around the
        support mask and resampled as grounded inference does (masks: the share of a model pixel
        covered, above one half)."""
        rows = [support, query]
        if self.zoom is None:
            images, chosen = self.images[rows], masks[rows, None].float()
        else:
            drawn = masks[support].numpy()[..., None]
            box = box_around(drawn, self.spacing, self.zoom.margin_mm, self.zoom.margin_share)
            grid = SliceGrid(box.x1 - box.x0, box.y1 - box.y0, self.resolution)
            images = grid.to_model(self.images[rows][..., box.x0 : box.x1, box.y0 : box.y1])
            coverage = grid.to_model(masks[rows, None, box.x0 : box.x1, box.y0 : box.y1].float(), pad_value=0.0)
            chosen = (coverage > 0.5).float()
        return images[:1], chosen[:1], images[1:], chosen[1:]

    @cached_property
    def supervoxel_areas(self) -> np.ndarray:
        return _areas(self.supervoxels)

    @cached_property
    def label_areas(self) -> np.ndarray:
        return _areas(self.labels)

    def targets(self, ground_truth: bool, min_foreground: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids with >= ``min_foreground`` pixels on two adjacent kept slices, and [ids + 1, Z - 1]
        whether each pair (z, z + 1) qualifies."""
        areas = self.label_areas if ground_truth else self.supervoxel_areas
        least = self.zoom.min_voxels if self.zoom else min_foreground  # zoomed: checked once cropped
        usable = (areas >= least) & ~self.excluded[None]
        pairs = usable[:, :-1] & usable[:, 1:]
        pairs[0] = False  # background
        return np.flatnonzero(pairs.any(axis=1)), pairs

    def why_no_episodes(self, min_foreground: int) -> str | None:
        """None when the volume yields episodes, else the reason in words."""
        if self.targets(False, min_foreground)[0].size:
            return None
        if self.supervoxel_areas.shape[0] < 2:
            return "no body found (no supervoxel)"
        if self.excluded.any():
            return (
                f"Setting 2 removed {int(self.excluded.sum())} of {len(self.excluded)} slices (those with a test "
                "class): too few adjacent slices are left"
            )
        if self.zoom:
            return (
                f"no supervoxel (>= {self.supervoxel_min_size} voxels) has {self.zoom.min_voxels} voxels on each of "
                "two adjacent slices: the body is thinner than two slices, or training.supervoxel_min_size is too "
                "large for it"
            )
        largest = int(self.supervoxel_areas[1:].max())
        return (
            f"its largest supervoxel covers {largest} model pixels on a slice, fewer than training.min_foreground "
            f"= {min_foreground} on two adjacent slices (supervoxels of >= {self.supervoxel_min_size} voxels)"
        )

    def exclude_classes(self, classes: list[int], rule: str = "any") -> None:
        """Setting 2: drop slices that contain the test classes, judged on GROUND TRUTH."""
        if self.labels is None or not classes:
            return
        present = torch.stack([(self.labels == c).flatten(1).any(dim=1) for c in classes], dim=1).numpy()
        if rule not in ("any", "all"):
            raise ValueError(f"exclusion rule must be 'any' or 'all', not {rule!r}")
        self.excluded = present.any(axis=1) if rule == "any" else present.all(axis=1)


class EpisodeSampler:
    def __init__(
        self,
        volumes: list[TrainingVolume],
        seed: int,
        min_foreground: int = 200,
        gt_rate: float = 0.0,
        augment_episodes: bool = True,
        max_tries: int = 200,
    ):
        if not volumes:
            raise ValueError("no training volumes")
        self.volumes = volumes
        self.seed = seed
        self.min_foreground = min_foreground
        self.gt_rate = gt_rate
        self.augment_episodes = augment_episodes
        self.max_tries = max_tries

    def episode(self, iteration: int) -> Episode:
        """The episode of one iteration: the same (seed, iteration) always gives the same one."""
        rng = np.random.default_rng([self.seed, iteration])
        for _ in range(self.max_tries):
            volume = self.volumes[rng.integers(len(self.volumes))]
            use_gt = volume.labels is not None and rng.random() < self.gt_rate
            ids, pairs = volume.targets(use_gt, self.min_foreground)
            if ids.size == 0:
                continue
            target = int(rng.choice(ids))
            masks = (volume.labels if use_gt else volume.supervoxels) == target
            z = int(rng.choice(np.flatnonzero(pairs[target])))
            support, query = (z, z + 1) if rng.random() < 0.5 else (z + 1, z)
            episode = Episode(*volume.pair(masks, support, query), "ground_truth" if use_gt else "supervoxel")
            if self.augment_episodes:
                if rng.random() < 0.5:
                    episode.support_image, episode.support_mask = augment(
                        episode.support_image, episode.support_mask, rng
                    )
                else:
                    episode.query_image, episode.query_mask = augment(episode.query_image, episode.query_mask, rng)
            if min(episode.support_mask.sum(), episode.query_mask.sum()) < self.min_foreground:
                continue
            return episode
        excluded = sum(int(v.excluded.sum()) for v in self.volumes)
        cause = "the volumes are too small or the supervoxels too fine"
        if excluded:
            total = sum(len(v.excluded) for v in self.volumes)
            cause = (
                f"Setting 2 removed {excluded} of {total} slices (those with a test class); "
                "too few adjacent slices are left: try --exclusion-rule all, or volumes with more slices "
                "outside the test classes"
            )
        raise RuntimeError(
            f"no episode with >= {self.min_foreground} foreground pixels on two adjacent slices after "
            f"{self.max_tries} tries: {cause}"
        )

    def batch(self, iteration: int, size: int) -> Episode:
        """``size`` episodes stacked (episode ids iteration*size ...), for batched training."""
        episodes = [self.episode(iteration * size + i) for i in range(size)]
        return Episode(
            *(
                torch.cat([getattr(e, f) for e in episodes])
                for f in ("support_image", "support_mask", "query_image", "query_mask")
            ),
            source=episodes[0].source,
        )
