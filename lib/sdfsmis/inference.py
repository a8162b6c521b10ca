"""One-shot segmentation of a volume: pick support slices from an annotation, map the support
z-range to the query, segment the query slices in batches with the support work done once,
and return labels in the query's own geometry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from .acceleration import InferenceOptions
from .config import InferenceConfig
from .models.sdfsmis import SDFSMIS, SupportFeatures
from .volume import SliceGrid, Volume, VolumeError, axial_slices, normalise_intensity


@dataclass
class LabelReport:
    support_slices: list[int]
    query_slices: list[int]
    voxels: int = 0


@dataclass
class SegmentationResult:
    labels: np.ndarray  # [X, Y, Z] in the query's RAS working orientation
    reports: dict[int, LabelReport] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def slices_segmented(self) -> int:
        return sum(len(r.query_slices) for r in self.reports.values())

    def summary(self) -> dict:
        return {
            "labels": {str(k): r.voxels for k, r in self.reports.items()},
            "support_slices": {str(k): r.support_slices for k, r in self.reports.items()},
            "query_slices": {str(k): [min(r.query_slices), max(r.query_slices)] for k, r in self.reports.items()},
            "seconds": round(self.seconds, 3),
            "seconds_per_slice": round(self.seconds / max(self.slices_segmented, 1), 4),
        }


def choose_support_slices(annotated: np.ndarray, count: int) -> list[int]:
    """At most ``count`` annotated slices, spread at (2i+1)/(2n) of the annotated list
    (1/6, 1/2, 5/6 for three, as in the EP1 protocol)."""
    if len(annotated) <= count:
        return [int(z) for z in annotated]
    positions = [(2 * i + 1) / (2 * count) for i in range(count)]
    return sorted({int(annotated[min(int(p * len(annotated)), len(annotated) - 1)]) for p in positions})


def query_range(
    annotated: np.ndarray, support_depth: int, query_depth: int, config: InferenceConfig
) -> tuple[int, int]:
    """The query slices to segment. A full annotation (>= min_extent_slices) gives the organ's
    relative z-range, mapped to the query with a margin; a sparse one says nothing of the
    extent, so every slice is segmented."""
    first, last = int(annotated.min()), int(annotated.max())
    if last - first + 1 < config.min_extent_slices:
        return 0, query_depth - 1
    start, stop = first / support_depth, (last + 1) / support_depth
    margin = config.z_margin * (stop - start)
    return max(0, int(np.floor((start - margin) * query_depth))), min(
        query_depth - 1, int(np.ceil((stop + margin) * query_depth)) - 1
    )


def assign_supports(
    query_z: np.ndarray, support_z: list[int], mapping: tuple[float, float, float, float]
) -> np.ndarray:
    """Each query slice uses the support slice nearest to it once the query range is mapped
    linearly onto the support's annotated range (chunking of EP1, generalised)."""
    q0, q1, s0, s1 = mapping
    position = s0 + (query_z - q0) * ((s1 - s0) / (q1 - q0) if q1 > q0 else 0.0)
    return np.abs(position[:, None] - np.asarray(support_z)[None, :]).argmin(axis=1)


def keep_consistent_components(mask: np.ndarray, seeds: np.ndarray | None) -> np.ndarray:
    """3-D consistency: keep the components that touch the annotation (same volume), or the
    largest component (another volume)."""
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    if seeds is not None and seeds.any():
        keep = np.unique(components[seeds & mask])
        keep = keep[keep > 0]
        if keep.size:
            return np.isin(components, keep)
    sizes = np.bincount(components.ravel())[1:]
    return components == (sizes.argmax() + 1)


def select_label_ids(support_label: Volume, requested: list[int] | None = None) -> list[int]:
    """The label ids to segment: all drawn ones by default; an empty support is an error."""
    present = [int(k) for k in np.unique(support_label.data) if k > 0]
    if not present:
        raise VolumeError(f"support label {support_label.path.name} is empty: draw the structure on at least one slice")
    absent = [k for k in requested or [] if k not in present]
    if absent:
        raise VolumeError(
            f"label ids {absent} are not in the support label {support_label.path.name} (it has {present})"
        )
    return requested or present


def segment_slices(
    model: SDFSMIS,
    support: SupportFeatures,
    queries: torch.Tensor,
    index: torch.Tensor,
    batch_size: int,
    progress: bool = False,
) -> torch.Tensor:
    """Query slices [Q, 1, H, W] on the model's device -> probabilities [Q, 1, H, W] on the same
    device, in batches that share the cached support; nothing goes back to the host per batch."""
    starts = range(0, queries.shape[0], batch_size)
    bar = tqdm(starts, desc="query slices", unit="batch", disable=not progress or len(starts) < 2)
    return torch.cat(
        [model.segment(support, queries[s : s + batch_size], index[s : s + batch_size]).float() for s in bar]
    )


class VolumeSegmenter:
    """Runs an :class:`SDFSMIS` model over volumes. ``options`` gives the autocast precision
    (bf16 on CUDA by default); the model itself is prepared with
    :func:`~sdfsmis.acceleration.accelerate` where it is loaded."""

    def __init__(
        self, model: SDFSMIS, config: InferenceConfig, progress: bool = True, options: InferenceOptions | None = None
    ):
        self.model = model
        self.config = config
        self.progress = progress
        self.options = options or InferenceOptions()

    @property
    def resolution(self) -> int:
        return self.model.config.resolution

    def _model_slices(self, data: np.ndarray, indices, grid: SliceGrid, mode: str = "bilinear") -> torch.Tensor:
        pad = -1.0 if mode == "bilinear" else 0.0
        return grid.to_model(axial_slices(data, indices), mode=mode, pad_value=pad).to(self.model.device)

    def _segment_label(
        self, support_image: np.ndarray, support_mask: np.ndarray, query_image: np.ndarray, same_volume: bool
    ) -> tuple[np.ndarray, LabelReport]:
        annotated = np.flatnonzero(support_mask.any(axis=(0, 1)))
        support_z = choose_support_slices(annotated, self.config.max_supports)
        depth = query_image.shape[2]
        if same_volume:
            q0, q1 = 0, depth - 1
            mapping = (0.0, 1.0, 0.0, 1.0)
        else:
            q0, q1 = query_range(annotated, support_image.shape[2], depth, self.config)
            mapping = (q0, q1, float(annotated.min()), float(annotated.max()))
        query_z = np.arange(q0, q1 + 1)
        index = torch.from_numpy(assign_supports(query_z, support_z, mapping)).to(self.model.device)

        support_grid = SliceGrid(*support_image.shape[:2], self.resolution)
        coverage = self._model_slices(support_mask.astype(np.float32), support_z, support_grid, "bilinear")
        mask = (coverage > 0.5).float()
        if (mask.flatten(1).sum(dim=1) == 0).any():  # a structure thinner than a model pixel: keep any overlap
            mask = (coverage > 0).float()
        grid = SliceGrid(*query_image.shape[:2], self.resolution)
        queries = self._model_slices(query_image, query_z, grid)  # one upload for the whole stack
        with torch.inference_mode(), self.options.autocast(self.model.device):
            support = self.model.encode_support(self._model_slices(support_image, support_z, support_grid), mask)
            prob = segment_slices(self.model, support, queries, index, self.config.batch_size, self.progress)
        probability = np.zeros(query_image.shape, dtype=np.float32)
        probability[..., query_z] = np.moveaxis(grid.from_model(prob).cpu().numpy()[:, 0], 0, -1)  # one download
        return probability, LabelReport(support_slices=support_z, query_slices=[int(z) for z in query_z])

    def segment(
        self, support_image: Volume, support_label: Volume, query: Volume, label_ids: list[int] | None = None
    ) -> SegmentationResult:
        """Segment ``query`` with each label of ``support_label`` as its own 1-way task, merged.

        When the query is the support image itself, the annotated voxels are kept as drawn.
        """
        started = time.perf_counter()
        label_ids = select_label_ids(support_label, label_ids)
        same_volume = support_image.path.resolve() == query.path.resolve()
        support_data = normalise_intensity(support_image.data, self.config.clip_percentiles)
        query_data = support_data if same_volume else normalise_intensity(query.data, self.config.clip_percentiles)

        best = np.zeros(query.data.shape, dtype=np.float32)
        labels = np.zeros(query.data.shape, dtype=np.int32)
        result = SegmentationResult(labels)
        for label_id in label_ids:
            drawn = support_label.data == label_id
            probability, report = self._segment_label(support_data, drawn, query_data, same_volume)
            mask = probability >= self.config.threshold
            if self.config.largest_component:
                mask = keep_consistent_components(mask, drawn if same_volume else None)
            if same_volume:
                annotated = drawn.any(axis=(0, 1))
                mask[..., annotated] = drawn[..., annotated]
                probability[drawn] = 1.0
            win = mask & (probability > best)
            labels[win] = label_id
            best[win] = probability[win]
            result.reports[label_id] = report
        for label_id, report in result.reports.items():
            report.voxels = int((labels == label_id).sum())
        result.seconds = time.perf_counter() - started
        return result
