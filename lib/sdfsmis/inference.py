"""One-shot segmentation of a volume with any one-shot method (SD-FSMIS, DPL): pick support
slices from an annotation, map the support z-range to the query, segment the query slices in
batches with the support work done once, and return labels in the query's own geometry; a
method that samples its support (DPL's K prototype variants) also gives a voxel uncertainty map
and a per-slice confidence."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from .acceleration import InferenceOptions
from .config import InferenceConfig
from .models import OneShotModel, Prediction
from .volume import SliceGrid, Volume, VolumeError, axial_slices, normalise_intensity


@dataclass
class LabelReport:
    support_slices: list[int]
    query_slices: list[int]
    voxels: int = 0
    confidence: list[float] | None = None  # per query slice, when the method gives uncertainty

    def review_slices(self, count: int) -> list[int]:
        """The ``count`` query slices of lowest confidence (below 1), lowest first."""
        if self.confidence is None:
            return []
        order = sorted(range(len(self.query_slices)), key=lambda i: self.confidence[i])
        return [self.query_slices[i] for i in order if self.confidence[i] < 1.0][:count]


@dataclass
class SegmentationResult:
    labels: np.ndarray  # [X, Y, Z] in the query's RAS working orientation
    reports: dict[int, LabelReport] = field(default_factory=dict)
    seconds: float = 0.0
    uncertainty: np.ndarray | None = None  # [X, Y, Z] variance of the variants' probabilities, max over labels

    def confidence(self, query: Volume) -> dict[int, dict[int, float]]:
        """Per label: {slice: confidence} with slices numbered as in the query's own file."""
        return {
            k: {query.original_slice(z): c for z, c in zip(r.query_slices, r.confidence)}
            for k, r in self.reports.items()
            if r.confidence is not None
        }

    def review_slices(self, query: Volume, count: int = 5) -> dict[int, list[int]]:
        """Per label: the slices most worth reviewing (lowest confidence first), numbered as in
        the query's own file; empty for a method without uncertainty."""
        return {
            k: [query.original_slice(z) for z in r.review_slices(count)]
            for k, r in self.reports.items()
            if r.confidence is not None
        }

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


def nearest_supports(
    query_z: np.ndarray, support_z: list[int], mapping: tuple[float, float, float, float], count: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` support slices nearest each query slice once the query range is mapped
    linearly onto the support's annotated range (chunking of EP1, generalised): indices [Q, k]
    and weights [Q, k] (1 / (1 + distance in slices), normalised per query slice)."""
    q0, q1, s0, s1 = mapping
    position = s0 + (query_z - q0) * ((s1 - s0) / (q1 - q0) if q1 > q0 else 0.0)
    distance = np.abs(position[:, None] - np.asarray(support_z, dtype=np.float64)[None, :])
    order = np.argsort(distance, axis=1, kind="stable")[:, : max(1, min(count, len(support_z)))]
    weights = 1.0 / (1.0 + np.take_along_axis(distance, order, axis=1))
    return order, (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def assign_supports(
    query_z: np.ndarray, support_z: list[int], mapping: tuple[float, float, float, float]
) -> np.ndarray:
    """The nearest support slice of each query slice (see :func:`nearest_supports`)."""
    return nearest_supports(query_z, support_z, mapping)[0][:, 0]


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


def combine_supports(predictions: list[Prediction], weights: torch.Tensor) -> Prediction:
    """The predictions of a query batch from its k nearest supports -> their weighted mean, with
    every support's variants (DPL) or its probability (SD-FSMIS) as the members whose
    disagreement is the uncertainty. ``weights`` [B, k]."""
    w = weights[:, :, None, None, None].to(predictions[0].probability.dtype)  # [B, k, 1, 1, 1]
    probability = (w[:, :, 0] * torch.cat([p.probability for p in predictions], dim=1)).sum(dim=1, keepdim=True)
    if len(predictions) == 1 and predictions[0].variants is None:
        return Prediction(probability)
    members = [p.variants if p.variants is not None else p.probability for p in predictions]
    return Prediction(probability, torch.stack(members, dim=1))  # [B, k, M, H, W]


def member_variance(prediction: Prediction, weights: torch.Tensor) -> torch.Tensor | None:
    """Voxel uncertainty [B, 1, H, W]: the weighted variance of the members' probabilities (the
    variants of each support, or the supports themselves); 0 when they agree (K = 1, identical
    variants, one support); None for a single support without variants."""
    if prediction.variants is None:
        return None
    members = prediction.variants.float()  # [B, k, M, H, W]
    w = (weights.float() / members.shape[2])[:, :, None, None, None]
    mean = (w * members).sum(dim=(1, 2), keepdim=True)
    return (w * (members - mean) ** 2).sum(dim=(1, 2))[:, None]


def slice_confidence(prediction: Prediction, uncertainty: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per slice: 1 - 4 x the mean variance where the result or any member says foreground (a
    probability's variance is at most 1/4); 1 where none does."""
    members = prediction.variants.flatten(1, 2) >= threshold
    region = (prediction.probability >= threshold) | members.any(dim=1, keepdim=True)
    area = region.flatten(1).sum(dim=1)
    mean = (uncertainty * region).flatten(1).sum(dim=1) / area.clamp_min(1)
    return torch.where(area > 0, 1 - 4 * mean, torch.ones_like(mean))


def segment_slices(
    model: OneShotModel,
    support,
    queries: torch.Tensor,
    index: torch.Tensor,
    batch_size: int,
    progress: bool = False,
    threshold: float = 0.5,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Query slices [Q, 1, H, W] on the model's device, each against support rows ``index`` [Q]
    or its k nearest [Q, k] combined with ``weights`` [Q, k] -> probabilities [Q, 1, H, W], and
    where members disagree (DPL's variants, several supports) the uncertainty [Q, 1, H, W] and
    per-slice confidence [Q], on the same device, in batches that share the encoded support;
    nothing goes back to the host per batch."""
    if index.dim() == 1:
        index = index[:, None]
    if weights is None:
        weights = torch.full(index.shape, 1.0 / index.shape[1], device=index.device)
    starts = range(0, queries.shape[0], batch_size)
    bar = tqdm(starts, desc="query slices", unit="batch", disable=not progress or len(starts) < 2)
    probabilities, uncertainties, confidences = [], [], []
    for s in bar:
        part = slice(s, s + batch_size)
        predictions = [model.predict(support, queries[part], index[part, j]) for j in range(index.shape[1])]
        prediction = combine_supports(predictions, weights[part])
        probabilities.append(prediction.probability.float())
        uncertainty = member_variance(prediction, weights[part])
        if uncertainty is not None:
            uncertainties.append(uncertainty)
            confidences.append(slice_confidence(prediction, uncertainty, threshold))
    if not uncertainties:
        return torch.cat(probabilities), None, None
    return torch.cat(probabilities), torch.cat(uncertainties), torch.cat(confidences)


class VolumeSegmenter:
    """Runs a one-shot model (:class:`~sdfsmis.models.base.OneShotModel`) over volumes.
    ``options`` gives the autocast precision (bf16 on CUDA by default); the model itself is
    prepared with :func:`~sdfsmis.acceleration.accelerate` where it is loaded."""

    def __init__(
        self,
        model: OneShotModel,
        config: InferenceConfig,
        progress: bool = True,
        options: InferenceOptions | None = None,
    ):
        self.model = model
        self.config = config
        self.progress = progress
        self.options = options or InferenceOptions()

    @property
    def resolution(self) -> int:
        return self.model.resolution

    def _model_slices(self, data: np.ndarray, indices, grid: SliceGrid, mode: str = "bilinear") -> torch.Tensor:
        pad = -1.0 if mode == "bilinear" else 0.0
        return grid.to_model(axial_slices(data, indices), mode=mode, pad_value=pad).to(self.model.device)

    def _segment_label(
        self, support_image: np.ndarray, support_mask: np.ndarray, query_image: np.ndarray, same_volume: bool
    ) -> tuple[np.ndarray, np.ndarray | None, LabelReport]:
        annotated = np.flatnonzero(support_mask.any(axis=(0, 1)))
        # in the same volume every drawn or corrected slice is a support (bounded); from another
        # volume, a few spread over the structure (EP1)
        count = self.config.max_volume_supports if same_volume else self.config.max_supports
        support_z = choose_support_slices(annotated, count)
        depth = query_image.shape[2]
        if same_volume:
            q0, q1 = 0, depth - 1
            mapping = (0.0, 1.0, 0.0, 1.0)
        else:
            q0, q1 = query_range(annotated, support_image.shape[2], depth, self.config)
            mapping = (q0, q1, float(annotated.min()), float(annotated.max()))
        query_z = np.arange(q0, q1 + 1)
        nearest, weights = nearest_supports(query_z, support_z, mapping, self.config.supports_per_query)
        index, weights = (torch.from_numpy(a).to(self.model.device) for a in (nearest, weights))

        support_grid = SliceGrid(*support_image.shape[:2], self.resolution)
        coverage = self._model_slices(support_mask.astype(np.float32), support_z, support_grid, "bilinear")
        mask = (coverage > 0.5).float()
        if (mask.flatten(1).sum(dim=1) == 0).any():  # a structure thinner than a model pixel: keep any overlap
            mask = (coverage > 0).float()
        grid = SliceGrid(*query_image.shape[:2], self.resolution)
        queries = self._model_slices(query_image, query_z, grid)  # one upload for the whole stack
        with torch.inference_mode(), self.options.autocast(self.model.device):
            support = self.model.encode_support(self._model_slices(support_image, support_z, support_grid), mask)
            prob, spread, confidence = segment_slices(
                self.model,
                support,
                queries,
                index,
                self.config.batch_size,
                self.progress,
                self.config.threshold,
                weights,
            )

        def volume_of(slices: torch.Tensor) -> np.ndarray:
            array = np.zeros(query_image.shape, dtype=np.float32)
            array[..., query_z] = np.moveaxis(grid.from_model(slices).cpu().numpy()[:, 0], 0, -1)  # one download
            return array

        report = LabelReport(support_slices=support_z, query_slices=[int(z) for z in query_z])
        if confidence is not None:
            report.confidence = [round(float(c), 4) for c in confidence.cpu()]
        return volume_of(prob), None if spread is None else volume_of(spread), report

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
            probability, uncertainty, report = self._segment_label(support_data, drawn, query_data, same_volume)
            mask = probability >= self.config.threshold
            if self.config.largest_component:
                mask = keep_consistent_components(mask, drawn if same_volume else None)
            if same_volume:
                annotated = drawn.any(axis=(0, 1))
                mask[..., annotated] = drawn[..., annotated]
                probability[drawn] = 1.0
                if uncertainty is not None:  # drawn slices are certain
                    uncertainty[..., annotated] = 0.0
                    report.confidence = [
                        1.0 if annotated[z] else c for z, c in zip(report.query_slices, report.confidence)
                    ]
            if uncertainty is not None:
                result.uncertainty = (
                    uncertainty if result.uncertainty is None else np.maximum(result.uncertainty, uncertainty)
                )
            win = mask & (probability > best)
            labels[win] = label_id
            best[win] = probability[win]
            result.reports[label_id] = report
        for label_id, report in result.reports.items():
            report.voxels = int((labels == label_id).sum())
        result.seconds = time.perf_counter() - started
        return result
