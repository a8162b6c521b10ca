"""Self-supervised episodes (protocol.md): adjacent support/query slices of one volume that
share a random 3-D supervoxel, optionally mixed with ground-truth labels, with Setting-2
exclusion judged on ground truth.

Every episode is drawn from a generator seeded with (run seed, iteration), so the data order
is reproducible and a resumed run continues exactly where it stopped, with no sampler state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .augment import augment
from .supervoxels import load_or_compute_supervoxels
from .volume import SliceGrid, axial_slices, load_volume, normalise_intensity


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
    """A volume's axial slices at model resolution, with its supervoxels and optional labels."""

    name: str
    images: torch.Tensor  # [Z, 1, R, R] in [-1, 1]
    supervoxels: torch.Tensor  # [Z, R, R] int32
    labels: torch.Tensor | None  # [Z, R, R] int32 ground truth, when the volume has one
    excluded: np.ndarray  # [Z] bool: slices removed for Setting 2

    @classmethod
    def load(
        cls,
        image_path: Path,
        resolution: int,
        label_path: Path | None = None,
        supervoxel_min_size: int = 5000,
        clip_percentiles: tuple[float, float] = (0.5, 99.5),
    ) -> TrainingVolume:
        volume = load_volume(image_path)
        supervoxels = volume.from_original(load_or_compute_supervoxels(image_path, min_size=supervoxel_min_size))
        grid = SliceGrid(*volume.data.shape[:2], resolution)
        every = np.arange(volume.data.shape[2])
        data = normalise_intensity(volume.data, clip_percentiles)

        def labelmap(array: np.ndarray) -> torch.Tensor:
            return grid.to_model(axial_slices(array.astype(np.float32), every), "nearest", 0.0)[:, 0].int()

        labels = labelmap(load_volume(label_path, label=True).data) if label_path else None
        return cls(
            name=image_path.name,
            images=grid.to_model(axial_slices(data, every)),
            supervoxels=labelmap(supervoxels),
            labels=labels,
            excluded=np.zeros(len(every), dtype=bool),
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
            maps = volume.labels if use_gt else volume.supervoxels
            ids = np.unique(maps.numpy())
            ids = ids[ids > 0]
            if ids.size == 0:
                continue
            target = int(rng.choice(ids))
            masks = maps == target
            area = masks.flatten(1).sum(dim=1).numpy()
            usable = (area >= self.min_foreground) & ~volume.excluded
            pairs = np.flatnonzero(usable[:-1] & usable[1:])
            if pairs.size == 0:
                continue
            z = int(rng.choice(pairs))
            support, query = (z, z + 1) if rng.random() < 0.5 else (z + 1, z)
            episode = Episode(
                volume.images[support : support + 1],
                masks[support : support + 1, None].float(),
                volume.images[query : query + 1],
                masks[query : query + 1, None].float(),
                "ground_truth" if use_gt else "supervoxel",
            )
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
