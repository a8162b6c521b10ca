"""One-shot segmentation of a volume with any one-shot method (SD-FSMIS, DPL) from one or several
annotated volumes: pick support slices from each annotation, place each support in the query
(:mod:`sdfsmis.pipeline.placement`), segment the query slices in batches against their nearest support
slices of every support volume with the support work done once, and return labels in the query's
own geometry. Where the members disagree (DPL's K prototype variants, or several supports serving
a slice) there is also a voxel uncertainty map, a per-slice confidence and a review region."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from sdfsmis.config import InferenceConfig
from sdfsmis.io.volume import (
    Intensity,
    SliceGrid,
    Volume,
    VolumeError,
    axial_slices,
    label_type,
    present_label_ids,
    ras_spacing,
)
from sdfsmis.methods import OneShotModel, Prediction
from sdfsmis.pipeline import components, grounding, placement
from sdfsmis.pipeline.acceleration import InferenceOptions
from sdfsmis.pipeline.cache import ComputeCache, cached, digest
from sdfsmis.pipeline.compact import PackedMask, SparseMap, levels
from sdfsmis.pipeline.components import PlaneComponents
from sdfsmis.pipeline.grounding import Box
from sdfsmis.pipeline.placement import Placement
from sdfsmis.pipeline.stages import Stages


@dataclass
class ServedBy:
    """One support volume's part in a label: its support slices, where it was placed in the
    query and by which rule."""

    name: str
    support_slices: list[int]
    placement: Placement

    def describe(self) -> dict:
        return {"image": self.name, "support_slices": self.support_slices, **self.placement.describe()}


@dataclass
class LabelReport:
    support_slices: list[int]
    query_slices: list[int]
    voxels: int = 0
    confidence: list[float] | None = None  # per query slice, when the method gives uncertainty
    served_by: list[ServedBy] = field(default_factory=list)
    computed_slices: int = 0  # query slices the model segmented in this run (the others were cached)
    computed_passes: int = 0  # of their passes (a slice against one serving support), those the model ran

    def review_slices(self, count: int) -> list[int]:
        """The ``count`` query slices of lowest confidence (below 1), lowest first."""
        if self.confidence is None:
            return []
        order = sorted(range(len(self.query_slices)), key=lambda i: self.confidence[i])
        return [self.query_slices[i] for i in order if self.confidence[i] < 1.0][:count]


#: A label's review segment has id ``label + REVIEW_ID_OFFSET``, so a viewer can list it before any
#: result exists (OHIF builds its segments from ``/info``) and it fits a uint8 labelmap.
REVIEW_ID_OFFSET = 100
#: The largest id OHIF can show: it reads the result as a uint8 labelmap.
MAX_REVIEW_ID = 255


def review_ids(label_ids: list[int] | set[int]) -> dict[int, int]:
    """{label id: review segment id}, from the label ids alone so that the same labels always get
    the same review ids: ``label + 100``; where that is taken or above 255, the next free id after
    every id given so far; where that is above 255 too, the largest free id below it. A label
    gets none when all of 1..255 are taken."""
    taken = set(label_ids)
    ids: dict[int, int] = {}
    for label_id in sorted(taken):
        wanted = label_id + REVIEW_ID_OFFSET
        if wanted in taken or wanted > MAX_REVIEW_ID:
            wanted = max(taken) + 1
        if wanted > MAX_REVIEW_ID:
            free = [i for i in range(MAX_REVIEW_ID, 0, -1) if i not in taken]
            if not free:
                continue
            wanted = free[0]
        ids[label_id] = wanted
        taken.add(wanted)
    return ids


#: The maps a label's batches hold per voxel, and their type (:class:`FusedSlices`).
MAP_TYPES = {"probability": np.uint8, "uncertainty": np.float16, "review": np.bool_}


@dataclass
class LabelMaps:
    """One label's maps over its region (``index``: its in-plane box x its query slices): the fused
    batches of the slices the model segmented (``rows``: each batch's among the region's slices)
    and, where the query is its own support, its drawing over the region, which stands on the
    slices drawn in it (``drawn_slices``) for a model that is not run there. The maps a request
    rarely shows (the doubt, the review segment) are built from them only when asked for."""

    index: tuple[slice, slice, slice]
    parts: list[FusedSlices]
    rows: list[np.ndarray]
    keys: list[bytes]  # each batch's digest (what it is kept under)
    drawn: np.ndarray | None  # [X, Y, n] bool
    drawn_slices: np.ndarray  # [n] bool
    report: LabelReport

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.index)

    def stacked(self, name: str) -> np.ndarray | None:
        """A map of :data:`MAP_TYPES` over the whole region in Fortran order, a new array: the
        batches' (:meth:`FusedSlices.unpacked`), and on the drawn slices the drawing (probability 1
        inside, 0 outside; no doubt). None where members cannot disagree (or nothing was segmented).
        The probability is in :func:`~sdfsmis.pipeline.compact.levels`."""
        if (getattr(self.parts[0], name) if self.parts else None) is None and name != "probability":
            return None  # no members to disagree, or the request did not keep the doubt map
        stack = np.zeros(self.shape, dtype=MAP_TYPES[name], order="F")
        for part, rows in zip(self.parts, self.rows):
            stack[..., rows] = part.unpacked(name)
        if name == "probability" and self.drawn is not None:
            stack[..., self.drawn_slices] = levels(self.drawn[..., self.drawn_slices])
        return stack

    def variance(self) -> np.ndarray:
        """[X, Y, n] float16: the members' variance (0 off the drawn shape's contour)."""
        return self.stacked("uncertainty")

    def review(self) -> np.ndarray:
        """[X, Y, n] bool: the voxels to review, where enough members vote against the majority."""
        return self.stacked("review")

    def slices(self) -> tuple[SliceMasks, list[PlaneComponents], list[bytes]]:
        """Each region slice's mask [X, Y] (unpacked from its batch's when asked for, or the
        drawing), its 2-D components, and a digest of it (its batch's and its place there, or the
        drawing's)."""
        depth = self.shape[2]
        masks = SliceMasks([None] * depth)
        planes: list[PlaneComponents] = [None] * depth
        keys: list[bytes] = [None] * depth
        for part, rows, key in zip(self.parts, self.rows, self.keys):
            for i, z in enumerate(rows):
                masks.sources[z], planes[z], keys[z] = (part.mask, i), part.planes[i], digest(key, i)
        for z in np.flatnonzero(self.drawn_slices):
            masks.sources[z] = self.drawn[..., z]
            planes[z], keys[z] = PlaneComponents.of(masks[z]), digest(b"drawn", masks[z])
        return masks, planes, keys


class SliceMasks(Sequence):
    """A region's slice masks [X, Y], each unpacked from its batch's bits when asked for: the 3-D
    steps visit them one or two at a time, and unpacking all at once would hold the region's mask
    as bytes again."""

    def __init__(self, sources: list[tuple[PackedMask, int] | np.ndarray | None]):
        self.sources = sources  # per slice: (a batch's mask, its place there), or the mask itself

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, z: int) -> np.ndarray:
        source = self.sources[z]
        return source[0].slice(source[1]) if isinstance(source, tuple) else source


@dataclass
class SegmentationResult:
    labels: np.ndarray  # [X, Y, Z] in the query's RAS working orientation
    reports: dict[int, LabelReport] = field(default_factory=dict)
    seconds: float = 0.0
    doubt: dict[int, LabelMaps] = field(default_factory=dict)  # per label, where members can disagree
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage of the run

    @property
    def has_uncertainty(self) -> bool:
        return bool(self.doubt)

    @property
    def uncertainty(self) -> np.ndarray | None:
        """[X, Y, Z] variance of the members' probabilities, max over labels (built on each call);
        None for a method and supports without members that can disagree, or for a request that did
        not keep the doubt map (``doubt_map`` of :meth:`VolumeSegmenter.segment_with`)."""
        variances = [(doubt.index, doubt.variance()) for doubt in self.doubt.values()]
        if not variances or any(v is None for _, v in variances):
            return None
        volume = np.zeros(self.labels.shape, dtype=np.float32)
        for index, variance in variances:
            np.maximum(volume[index], variance, out=volume[index])
        return volume

    def review(self, label_id: int) -> np.ndarray | None:
        """[X, Y, Z] bool: the voxels of a label to review (:meth:`LabelMaps.review`); None where
        its members cannot disagree."""
        if label_id not in self.doubt:
            return None
        volume = np.zeros(self.labels.shape, dtype=bool, order="F" if self.labels.flags.f_contiguous else "C")
        volume[self.doubt[label_id].index] = self.doubt[label_id].review()
        return volume

    def with_review(self) -> tuple[np.ndarray, dict[int, int]]:
        """The labels with each non-empty review region as a segment of its own (:func:`review_ids`)
        and {label id: review id}. A review voxel leaves its label's segment: a labelmap holds one
        segment per voxel."""
        labels = self.labels.copy(order="K")
        ids = {}
        for label_id, review_id in review_ids(set(self.reports)).items():
            if label_id in self.doubt and (review := self.doubt[label_id].review()).any():
                labels[self.doubt[label_id].index][review] = review_id
                ids[label_id] = review_id
        return labels, ids

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
            "supports": {str(k): [s.describe() for s in r.served_by] for k, r in self.reports.items()},
            "query_slices": {str(k): [min(r.query_slices), max(r.query_slices)] for k, r in self.reports.items()},
            "seconds": round(self.seconds, 3),
            "seconds_per_slice": round(self.seconds / max(self.slices_segmented, 1), 4),
            "slices_computed": {str(k): r.computed_slices for k, r in self.reports.items()},
            "passes_computed": {str(k): r.computed_passes for k, r in self.reports.items()},
            "stages": {stage: round(seconds, 3) for stage, seconds in self.stages.items()},
        }


def claim(
    labels: np.ndarray,
    best: np.ndarray | None,
    label_id: int,
    slices: Iterable[tuple[int, np.ndarray]],
    maps: LabelMaps,
) -> None:
    """Write one label's mask, given slice by slice (``slices``: region slice, [X, Y] mask), into
    ``labels`` over its region. With several labels, ``best`` (the same region) holds the
    probability of the label each voxel went to so far: a voxel of this mask goes to this label
    only where its probability (:meth:`LabelMaps.stacked`, in levels of 1/255) is higher, the
    first label on a tie."""
    probability = None if best is None else maps.stacked("probability")
    for z, mask in slices:
        if best is None:
            np.copyto(labels[..., z], label_id, where=mask)
            continue
        win = mask & (probability[..., z] > best[..., z])
        np.copyto(labels[..., z], label_id, where=win)
        np.copyto(best[..., z], probability[..., z], where=win)


def choose_support_slices(annotated: np.ndarray, count: int) -> list[int]:
    """At most ``count`` annotated slices, spread at (2i+1)/(2n) of the annotated list
    (1/6, 1/2, 5/6 for three, as in the EP1 protocol)."""
    if len(annotated) <= count:
        return [int(z) for z in annotated]
    positions = [(2 * i + 1) / (2 * count) for i in range(count)]
    return sorted({int(annotated[min(int(p * len(annotated)), len(annotated) - 1)]) for p in positions})


class Serving(NamedTuple):
    """Which support slices serve each query slice, and how much each one decides."""

    index: np.ndarray  # [Q, k] support rows, nearest first
    weights: np.ndarray  # [Q, k] share of each in the result, rows sum to 1 (0: a member of the doubt only)


def serving_supports(position: np.ndarray, support_z: list[int], count: int = 1) -> Serving:
    """The ``count`` support slices nearest each query slice's ``position`` (:meth:`Placement.position`),
    of which only the two that bracket it decide (weights linear in the position between them, as
    interpolation), or the nearest alone where none brackets it (beyond the outermost support, on a
    support, or ``count`` 1). The others are members of the doubt only: so a correction changes the result
    between its neighbouring supports and nowhere else, as interpolating drawn slices does.

    Beyond the outermost support, the doubt's members are first those at least as far from the
    deciding support as the query slice is: the doubt of carrying a drawing d slices on is how much
    the structure changes over d slices, which a drawing one slice from the deciding one cannot
    show. So a correction next to the outermost drawing leaves the doubt of the slices far beyond it
    (and their passes) as they were."""
    position = np.asarray(position, dtype=np.float64)
    z = np.asarray(support_z, dtype=np.float64)
    distance = np.abs(position[:, None] - z[None, :])
    k = max(1, min(count, len(z)))
    order = np.argsort(distance, axis=1, kind="stable")
    lower, upper = z[None, :] < position[:, None], z[None, :] > position[:, None]
    bracketed = lower.any(axis=1) & upper.any(axis=1) & (distance.min(axis=1) > 0) & (k >= 2)
    below = np.where(lower, distance, np.inf).argmin(axis=1)
    above = np.where(upper, distance, np.inf).argmin(axis=1)
    rows = []
    for q in range(len(position)):  # the deciding ones first (nearer one first), then the nearest others
        if bracketed[q]:
            first = sorted((int(below[q]), int(above[q])), key=lambda i: distance[q, i])
            others = [int(i) for i in order[q] if i not in first]
        else:
            first, rest = [int(order[q][0])], [int(i) for i in order[q][1:]]
            distant = [i for i in rest if abs(z[i] - z[first[0]]) >= distance[q, first[0]]]
            others = distant + [i for i in rest if i not in distant]
        rows.append((first + others)[:k])
    index = np.array(rows, dtype=np.int64).reshape(len(position), k)
    near, far = (np.take_along_axis(distance, index[:, i : i + 1], axis=1)[:, 0] for i in (0, min(1, k - 1)))
    weights = np.zeros(index.shape, dtype=np.float32)
    weights[:, 0] = np.where(bracketed, far / np.maximum(near + far, 1e-12), 1.0)  # linear between the pair
    if k >= 2:
        weights[:, 1] = np.where(bracketed, 1.0 - weights[:, 0], 0.0)
    return Serving(index, weights)


def drawn_voxels(label: np.ndarray, label_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The voxels [X, Y, Z] of ``label`` that are ``label_id``, and the slices that have any. Only
    those slices are written: the rest of the mask stays the untouched zero pages of its allocation
    (a volume-sized comparison writes 47 MB for a 512 x 512 x 180 label drawn on a few slices)."""
    drawn = np.zeros(label.shape, dtype=bool, order="F" if label.flags.f_contiguous else "C")
    annotated = []
    for z in range(label.shape[2]):
        on_slice = label[..., z] == label_id
        if on_slice.any():
            drawn[..., z] = on_slice
            annotated.append(z)
    return drawn, np.array(annotated, dtype=np.int64)


def select_label_ids(support_label: Volume, requested: list[int] | None = None) -> list[int]:
    """The label ids to segment: all drawn ones by default; an empty support is an error."""
    present = present_label_ids(support_label.data)
    if not present:
        raise VolumeError(f"support label {support_label.path.name} is empty: draw the structure on at least one slice")
    absent = [k for k in requested or [] if k not in present]
    if absent:
        raise VolumeError(
            f"label ids {absent} are not in the support label {support_label.path.name} (it has {present})"
        )
    return requested or present


@dataclass
class SupportVolume:
    """An annotated volume that serves as support; ``name`` is how reports call it."""

    image: Volume
    label: Volume
    name: str | None = None

    def __post_init__(self) -> None:
        self.name = self.name or self.image.path.name

    def is_query(self, query: Volume) -> bool:
        return self.image.path.resolve() == query.path.resolve()


def select_supported_ids(supports: list[SupportVolume], requested: list[int] | None = None) -> list[int]:
    """The label ids to segment: every id drawn in some support by default; an empty support or
    an id that no support has is an error naming it."""
    if len(supports) == 1:
        return select_label_ids(supports[0].label, requested)
    present = sorted({k for s in supports for k in select_label_ids(s.label)})
    absent = [k for k in requested or [] if k not in present]
    if absent:
        names = ", ".join(s.label.path.name for s in supports)
        raise VolumeError(f"label ids {absent} are not in the support label(s) {names} (they have {present})")
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


def dissent(prediction: Prediction, weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per voxel [B, 1, H, W]: the weighted share of the members that vote against the majority's
    decision (0: unanimous, 0.5: split evenly). Decisions, not probabilities: members at 0.45 and
    0.55 disagree on the label although their variance is small."""
    votes = (prediction.variants.float() >= threshold).float()  # [B, k, M, H, W]
    w = (weights.float() / votes.shape[2])[:, :, None, None, None]
    share = (w * votes).sum(dim=(1, 2))[:, None]
    return torch.minimum(share, 1 - share)


class SliceOutputs(NamedTuple):
    """What :func:`segment_slices` gives, each [Q, ...] on the model's device; the last three only
    where members can disagree (DPL's variants, several supports)."""

    probability: torch.Tensor  # [Q, 1, H, W]
    uncertainty: torch.Tensor | None = None  # [Q, 1, H, W] members' variance
    confidence: torch.Tensor | None = None  # [Q]
    dissent: torch.Tensor | None = None  # [Q, 1, H, W] see :func:`dissent`


def slice_confidence(prediction: Prediction, uncertainty: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per slice: 1 - 4 x the mean variance where the result or any member says foreground (a
    probability's variance is at most 1/4); 1 where none does."""
    members = prediction.variants.flatten(1, 2) >= threshold
    region = (prediction.probability >= threshold) | members.any(dim=1, keepdim=True)
    area = region.flatten(1).sum(dim=1)
    mean = (uncertainty * region).flatten(1).sum(dim=1) / area.clamp_min(1)
    return torch.where(area > 0, 1 - 4 * mean, torch.ones_like(mean))


def slice_outputs(predictions: list[Prediction], weights: torch.Tensor, threshold: float) -> SliceOutputs:
    """Query slices' predictions from each of their k serving supports (``weights`` [B, k],
    :func:`serving_supports`) -> their outputs; all k weigh alike in the doubt."""
    prediction = combine_supports(predictions, weights)
    members = torch.full_like(weights, 1.0 / weights.shape[1])  # every serving support doubts alike
    uncertainty = member_variance(prediction, members)
    if uncertainty is None:
        return SliceOutputs(prediction.probability.float())
    confidence = slice_confidence(prediction, uncertainty, threshold)
    return SliceOutputs(
        prediction.probability.float(), uncertainty, confidence, dissent(prediction, members, threshold)
    )


def segment_slices(
    model: OneShotModel,
    support,
    queries: torch.Tensor,
    index: torch.Tensor,
    batch_size: int,
    progress: bool = False,
    threshold: float = 0.5,
    weights: torch.Tensor | None = None,
) -> SliceOutputs:
    """Query slices [Q, 1, H, W] on the model's device, each against support rows ``index`` [Q]
    or its k serving ones [Q, k] combined with ``weights`` [Q, k] (:func:`slice_outputs`), in
    batches that share the encoded support; nothing goes back to the host per batch."""
    if index.dim() == 1:
        index = index[:, None]
    if weights is None:
        weights = torch.full(index.shape, 1.0 / index.shape[1], device=index.device)
    starts = range(0, queries.shape[0], batch_size)
    bar = tqdm(starts, desc="query slices", unit="batch", disable=not progress or len(starts) < 2)
    outputs = []
    for s in bar:
        part = slice(s, s + batch_size)
        predictions = model.predict_each(support, queries[part], index[part])
        outputs.append(slice_outputs(predictions, weights[part], threshold))
    return SliceOutputs(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*outputs)))


#: Slices cropped and resampled together: every slice's voxels pass through a few float32 copies
#: on the way, and 17 whole 512 x 512 support slices at once took 83 MB, more than the batch
#: of query slices the model then runs. The crops are the same whatever the grouping.
CROP_SLICES = 2


def _grouped(boxes: list[Box], size: int | None = None) -> list[tuple[Box, list[int]]]:
    """(box, rows that have it), at most ``size`` rows each (None: all), in first-seen order."""
    rows: dict[Box, list[int]] = {}
    for row, box in enumerate(boxes):
        rows.setdefault(box, []).append(row)
    size = size or len(boxes)
    return [(box, group[i : i + size]) for box, group in rows.items() for i in range(0, len(group), size)]


@dataclass
class Source:
    """One support volume's part in one label: its data and intensity bounds, the label's drawn voxels, where
    it is placed in the query, whether it is grounded (:mod:`sdfsmis.pipeline.grounding`) and, from another
    volume, the box its drawing is carried to in the query and, for a complete drawing, the drawing
    itself carried there (the atlas shape)."""

    volume: SupportVolume
    data: np.ndarray
    intensity: Intensity
    drawn: np.ndarray
    annotated: np.ndarray  # the slices it is drawn on
    place: Placement
    grounded: bool = False
    carried: Box | None = None
    carried_drawing: np.ndarray | None = None


class FusedSlices(NamedTuple):
    """A batch of query slices' maps over the label's region after the fusion with its shape: what
    a re-run takes from the cache where nothing that decides them changed. Held small
    (:mod:`sdfsmis.pipeline.compact`): a request reads the masks, and the other maps only when it
    asks for them (:meth:`unpacked`)."""

    probability: SparseMap  # [X, Y, n] uint8 levels within the mask (0 elsewhere), on the mask's 0 and 255
    mask: PackedMask  # [X, Y, n]: the probability at the threshold, decided in float32
    planes: list[PlaneComponents]  # each slice's 2-D components of the mask
    uncertainty: SparseMap | None = None  # [X, Y, n] float16, 0 off the shape's contour
    review: PackedMask | None = None  # [X, Y, n]: the members' dissent at the review level
    confidence: np.ndarray | None = None  # [n]

    @classmethod
    def of(
        cls,
        probability: np.ndarray,
        mask: np.ndarray,
        uncertainty: np.ndarray | None = None,
        review: np.ndarray | None = None,
        confidence: np.ndarray | None = None,
    ) -> FusedSlices:
        """A batch's maps [X, Y, n] (Fortran order) held small. The probability is kept only within
        the mask, in levels of 1/255: only there, and only to compare, does a label's win over
        another read it. The doubt map is None where
        members cannot disagree or the request does not keep it."""
        return cls(
            SparseMap.of(levels(probability) * mask, background=mask),
            PackedMask.of(mask),
            components.plane_components(mask),
            None if uncertainty is None else SparseMap.of(uncertainty),
            None if review is None else PackedMask.of(review),
            confidence,
        )

    def unpacked(self, name: str) -> np.ndarray:
        """One of :data:`MAP_TYPES` as an array [X, Y, n] (Fortran order)."""
        if name == "probability":
            return self.probability.dense(background=self.mask.unpacked())
        if name == "uncertainty":
            return self.uncertainty.dense()
        return self.review.unpacked()


@dataclass
class LabelShape:
    """The shape a label's query slices are fused with (:mod:`sdfsmis.pipeline.grounding`): how far
    the model may move it, the shape on given query rows, and the digest of what decides it there."""

    reach: float
    on_rows: Callable[[np.ndarray], np.ndarray]  # query rows -> signed mm [X, Y, n] over the region
    key: Callable[[np.ndarray], bytes]


@dataclass
class LabelWork:
    """One label's inputs to its batches of query slices: the support rows (crops and masks on the
    host, their digests, their encodings once made), each query slice's serving rows and weights,
    box and digest, the label's region and its shape."""

    support_images: torch.Tensor
    support_masks: torch.Tensor
    rows: list[bytes]
    index: np.ndarray  # [Q, k] support rows serving each query slice
    weights: np.ndarray  # [Q, k]
    query_z: np.ndarray
    boxes: list[Box]
    slices: list[bytes]
    region: Box
    shape: LabelShape | None
    encoded: dict[int, Any] = field(default_factory=dict)


class VolumeSegmenter:
    """Runs a one-shot model (:class:`~sdfsmis.methods.base.OneShotModel`) over volumes.
    ``options`` gives the autocast precision (bf16 on CUDA by default); the model itself is
    prepared with :func:`~sdfsmis.pipeline.acceleration.accelerate` where it is loaded."""

    def __init__(
        self,
        model: OneShotModel,
        config: InferenceConfig,
        progress: bool = True,
        options: InferenceOptions | None = None,
        cache: ComputeCache | None = None,
    ):
        self.model = model
        self.config = config
        self.progress = progress
        self.options = options or InferenceOptions()
        self.cache = cache  # what earlier requests computed (pipeline.cache); None: compute everything

    @property
    def resolution(self) -> int:
        return self.model.resolution

    @property
    def batch_size(self) -> int:
        """Query slices per model call: the preset's on a GPU, ``cpu_batch_size`` on a CPU, where
        batching gains little and a correction then recomputes fewer slices."""
        cfg = self.config
        return max(1, cfg.cpu_batch_size if self.model.device.type == "cpu" else cfg.batch_size)

    def _place(
        self,
        source: SupportVolume,
        intensity: Intensity,
        drawn: np.ndarray,
        annotated: np.ndarray,
        query: Volume,
        registered: Callable[[SupportVolume, Intensity], tuple[placement.Registration, bytes]],
    ) -> Source:
        """Where ``source``'s annotation of one label lies in the query (:mod:`sdfsmis.pipeline.placement`)
        and, grounded (:mod:`sdfsmis.pipeline.grounding`), the in-plane boxes segmented in both. Another
        patient's volume is ``registered`` onto the query (with the digest it is kept under), and a
        drawing it carries into the query is kept under that and the drawing's digest: a re-run after
        a correction in the query resamples neither again."""
        data = source.image.data
        depth = query.data.shape[2]
        cfg = self.config
        if source.is_query(query):
            place = placement.same_volume(depth)
            if not cfg.grounding:
                return Source(source, data, intensity, drawn, annotated, place)
            extent = int(annotated[-1] - annotated[0] + 1)
            reach = max(int(np.ceil(cfg.z_margin * extent)), int(np.ceil(cfg.reach_mm / ras_spacing(query)[2])))
            first, last = max(0, int(annotated[0]) - reach), min(depth - 1, int(annotated[-1]) + reach)
            place = dataclasses.replace(place, first=first, last=last)
            return Source(source, data, intensity, drawn, annotated, place, grounded=True)
        if cfg.placement != "registration":
            place = placement.relative_position(annotated, data.shape[2], depth, cfg)
            return Source(source, data, intensity, drawn, annotated, place)
        registration, registration_key = registered(source, intensity)
        place = placement.registered_position(registration, annotated, drawn, depth, cfg)
        carried = grounding.carried_box(registration, drawn, query.data.shape, ras_spacing(query), *self._margins)
        if not cfg.grounding or carried is None:
            return Source(source, data, intensity, drawn, annotated, place)
        drawing = None
        complete = len(annotated) >= cfg.min_extent_slices and len(annotated) == annotated[-1] - annotated[0] + 1
        if complete and cfg.shape_reach_mm > 0:  # every slice of the structure drawn: an atlas of it
            drawing = cached(
                self.cache,
                digest(b"carried", registration_key, drawn),
                lambda: placement.carried_drawing(registration, source.image, drawn, query),
            )
        return Source(
            source,
            data,
            intensity,
            drawn,
            annotated,
            place,
            True,
            carried,
            drawing if drawing is not None and drawing.any() else None,
        )

    @property
    def _margins(self) -> tuple[float, float]:
        return self.config.roi_margin_mm, self.config.roi_margin_share

    def _boxes(self, source: Source, support_z: list[int], serving: Serving) -> tuple[list[Box], list[Box] | None]:
        """The in-plane box of each support slice and of each query slice (None: the whole slice).
        In the same volume each support slice's box is around its own drawing, and a query slice's
        the union of those of the supports that decide it (a correction moves only the boxes between
        its neighbours); from another volume, the whole drawing's box and the registered one."""
        whole = Box.whole(source.data.shape)
        if not source.grounded:
            return [whole] * len(support_z), None
        spacing = ras_spacing(source.volume.image)
        if source.carried is not None:
            drawing = grounding.box_around(source.drawn[..., source.annotated], spacing, *self._margins)
            return [drawing] * len(support_z), [source.carried] * len(serving.index)
        own = [grounding.box_around(source.drawn[..., [z]], spacing, *self._margins) for z in support_z]
        deciding = [
            functools.reduce(Box.union, [own[i] for i, w in zip(row, weights) if w > 0])
            for row, weights in zip(serving.index, serving.weights)
        ]
        return own, deciding

    def _crops(
        self,
        data: np.ndarray,
        z: list[int] | np.ndarray,
        boxes: list[Box],
        intensity: Intensity | None = None,
        mode: str = "bilinear",
    ) -> torch.Tensor:
        """Axial slices ``z`` of ``data``, each cropped to its box, normalised by ``intensity`` (only
        these voxels are) and resampled to the model's input [N, 1, R, R] (slices sharing a box in
        one call), on the host."""
        pad = -1.0 if mode == "bilinear" else 0.0
        out = torch.empty((len(z), 1, self.resolution, self.resolution), dtype=torch.float32)
        for box, rows in _grouped(boxes, CROP_SLICES):
            crop = data[box.index + (np.asarray(z)[rows],)]
            if intensity is not None:
                crop = intensity.apply(crop)
            grid = SliceGrid(box.x1 - box.x0, box.y1 - box.y0, self.resolution)
            out[rows] = grid.to_model(axial_slices(crop, np.arange(len(rows))), mode=mode, pad_value=pad)
        return out

    def _segment_label(
        self, sources: list[Source], query: Volume, intensity: Intensity, doubt_map: bool, clock: Stages
    ) -> LabelMaps:
        """Probability, uncertainty and dissent maps (None where members cannot disagree) of one
        label from every support volume that has it, over its region: each query slice against its
        serving support slices of each volume (equal weight per volume), each support row encoded
        once; only the query slices and the in-plane boxes the sources place it in are segmented.
        The slices go in batches aligned to absolute slice numbers, each fused with the drawn shape
        on its own (:meth:`_fused_batch`), so that a re-run takes every batch nothing changed in
        from the cache."""
        query_spacing = ras_spacing(query)
        first = min(s.place.first for s in sources)
        last = max(s.place.last for s in sources)
        query_z = np.arange(first, last + 1)
        images, masks, indices, weights, served, query_boxes = [], [], [], [], [], []
        own = None  # the annotated volume itself: (drawn, support slices, serving), for its drawn shape
        for source in sources:
            drawn, place, annotated = source.drawn, source.place, source.annotated
            # in the same volume every drawn or corrected slice is a support (bounded); from another
            # volume, a few spread over the structure (EP1)
            same = place.rule == "same volume"
            support_z = choose_support_slices(
                annotated, self.config.max_volume_supports if same else self.config.max_supports
            )
            serving = serving_supports(place.position(query_z), support_z, self.config.supports_per_query)
            if same and source.grounded and self.config.shape_reach_mm > 0:
                own = (drawn, support_z, serving)
            indices.append(serving.index + sum(len(s.support_slices) for s in served))
            weights.append(serving.weights / len(sources))
            served.append(ServedBy(source.volume.name, support_z, place))
            support_boxes, boxes = self._boxes(source, support_z, serving)
            query_boxes.append(boxes)
            image, mask = self._support_crops(source, support_z, support_boxes)
            images.append(image)
            masks.append(mask)
        whole = Box.whole(query.data.shape)
        boxes = [
            whole if any(b is None for b in per_source) else functools.reduce(Box.union, per_source)
            for per_source in zip(*[b or [None] * len(query_z) for b in query_boxes])
        ]
        region = functools.reduce(Box.union, boxes)
        drawing = next((s for s in sources if s.volume.is_query(query)), None)  # the query's own
        if drawing is not None:  # it lies inside the region, every slice of it
            region = region.union(grounding.box_around(drawing.drawn[..., drawing.annotated], (1.0, 1.0), 0.0, 0.0))
        support_images, support_masks = torch.cat(images), torch.cat(masks)
        work = LabelWork(
            support_images,
            support_masks,
            # the crops' own digests, not their sources': a drawing held in another memory order is the same row
            [digest(image, mask) for image, mask in zip(support_images, support_masks)],
            np.concatenate(indices, axis=1),
            np.concatenate(weights, axis=1),
            query_z,
            boxes,
            [digest(query.data[b.index + (int(z),)], b, intensity.low, intensity.high) for b, z in zip(boxes, query_z)],
            region,
            self._label_shape(own, sources, region, query_z, query_spacing),
        )
        clock.lap("crops")
        index = region.index + (slice(first, last + 1),)
        # the slices drawn in the query itself are kept as drawn: the model is not run on them
        drawn = None if drawing is None else drawing.drawn[index]
        drawn_slices = np.isin(query_z, [] if drawing is None else drawing.annotated)
        chunks = [rows[~drawn_slices[rows]] for rows in self._batches(query_z)]
        chunks = [rows for rows in chunks if len(rows)]
        batches = Stages(self.model.method, log=False)
        parts, keys, computed, passes = [], [], 0, 0
        for rows in tqdm(chunks, desc="query slices", unit="batch", disable=not self.progress or len(chunks) < 2):
            part, key, batch_passes = self._fused_batch(work, rows, query, intensity, query_spacing, doubt_map, batches)
            parts.append(part)
            keys.append(key)
            computed, passes = computed + (len(rows) if batch_passes else 0), passes + batch_passes
        clock.absorb(batches.seconds, log=True)
        report = LabelReport(
            support_slices=[z for s in served for z in s.support_slices],
            query_slices=[int(z) for z in query_z],
            served_by=served,
            computed_slices=computed,
            computed_passes=passes,
        )
        if parts and parts[0].confidence is not None:  # drawn slices are certain
            confidence = np.ones(len(query_z))
            for part, rows in zip(parts, chunks):
                confidence[rows] = part.confidence
            report.confidence = [round(float(c), 4) for c in confidence]
        return LabelMaps(index, parts, chunks, keys, drawn, drawn_slices, report)

    def _support_crops(
        self, source: Source, support_z: list[int], boxes: list[Box]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The support slices' image crops and masks at the model's input [N, 1, R, R], each kept by
        the content of its slice and box: a re-run resamples only a corrected drawing."""
        low, high = source.intensity.low, source.intensity.high
        keys = [
            digest(b"support crop", source.data[b.index + (z,)], source.drawn[b.index + (z,)], b, low, high)
            for z, b in zip(support_z, boxes)
        ]
        found = [self.cache.get(key) if self.cache is not None else None for key in keys]
        todo = [i for i, crops in enumerate(found) if crops is None]
        if todo:
            z, box = [support_z[i] for i in todo], [boxes[i] for i in todo]
            images = self._crops(source.data, z, box, source.intensity)
            coverage = self._crops(source.drawn, z, box)
            mask = (coverage > 0.5).float()
            thin = mask.flatten(1).sum(dim=1) == 0  # a structure thinner than a model pixel: keep any overlap
            masks = torch.where(thin[:, None, None, None], (coverage > 0).float(), mask)
            for j, i in enumerate(todo):
                found[i] = (images[j : j + 1].clone(), masks[j : j + 1].clone())
                if self.cache is not None:
                    found[i] = self.cache.put(keys[i], found[i])
        return torch.cat([crops[0] for crops in found]), torch.cat([crops[1] for crops in found])

    def _label_shape(
        self,
        own: tuple[np.ndarray, list[int], Serving] | None,
        sources: list[Source],
        region: Box,
        query_z: np.ndarray,
        spacing: tuple[float, float, float],
    ) -> LabelShape | None:
        """The shape a label's slices are fused with, over its region: the drawn one in the annotated
        volume, else the mean of the drawings carried from other volumes; None without either."""
        if own is not None:
            drawn, support_z, serving = own
            inside = drawn[region.index]
            shape = grounding.DrawnShape(inside, support_z, spacing)
            drawings = [digest(inside[..., z]) for z in support_z]
            return LabelShape(
                self.config.shape_reach_mm,
                lambda rows: shape.on(query_z[rows], serving.index[rows], serving.weights[rows]),
                lambda rows: digest(
                    b"drawn",
                    shape.low,
                    shape.high,
                    query_z[rows],
                    *(drawings[i] for i in serving.index[rows].ravel()),
                    serving.weights[rows],
                ),
            )
        atlases = [s.carried_drawing[region.index] for s in sources if s.carried_drawing is not None]
        if not atlases:
            return None
        return LabelShape(
            max(self.config.shape_reach_mm, self.config.carried_reach_mm),
            lambda rows: sum(grounding.carried_shape(a, query_z[rows], spacing) for a in atlases) / len(atlases),
            lambda rows: digest(b"carried", *(a[..., query_z[rows]] for a in atlases)),
        )

    def _batches(self, query_z: np.ndarray) -> list[np.ndarray]:
        """The query slices' rows in batches aligned to absolute slice numbers (``z // batch_size``):
        a batch holds the same slices whatever else a request segments."""
        chunk_of = query_z // self.batch_size
        return [np.flatnonzero(chunk_of == c) for c in np.unique(chunk_of)]

    def _model_key(self, work: LabelWork, rows: np.ndarray) -> bytes:
        """The digest of everything a batch's model outputs depend on."""
        parts = (part for q in rows for part in (work.slices[q], *(work.rows[i] for i in work.index[q])))
        return digest(self.config.threshold, *parts, work.weights[rows])

    def _fused_batch(
        self,
        work: LabelWork,
        rows: np.ndarray,
        query: Volume,
        intensity: Intensity,
        spacing: tuple[float, float, float],
        doubt_map: bool,
        clock: Stages,
    ) -> tuple[FusedSlices, bytes, int]:
        """One batch of query slices fused with the label's shape over its region (from the cache
        when nothing that decides it changed), the digest it is kept under, and the model passes it
        took (0: none ran)."""
        shape, model_key = work.shape, self._model_key(work, rows)
        key = digest(
            b"fused",
            model_key,
            work.region,
            *(work.boxes[q] for q in rows),
            b"" if shape is None else shape.key(rows),
            None if shape is None else shape.reach,
            spacing,
            self.config.review_dissent,
            doubt_map,
        )
        passes = 0

        def fuse() -> FusedSlices:
            nonlocal passes
            outputs, passes = self._model_outputs(work, rows, model_key, query.data, intensity, clock)
            fused = self._fuse(work, rows, outputs, spacing, doubt_map)
            clock.lap("fusion")
            return fused

        return cached(self.cache, key, fuse), key, passes

    def _fuse(
        self,
        work: LabelWork,
        rows: np.ndarray,
        outputs: SliceOutputs,
        spacing: tuple[float, float, float],
        doubt_map: bool,
    ) -> FusedSlices:
        """One batch's model outputs back in the label's region, fused with its shape; with the
        members' doubt as a voxel map if ``doubt_map`` (its slices' confidence and the review voxels
        are kept either way)."""
        shape, region, threshold = work.shape, work.region, self.config.threshold

        def region_of(slices: torch.Tensor) -> np.ndarray:
            array = np.zeros((region.x1 - region.x0, region.y1 - region.y0, len(rows)), dtype=np.float32, order="F")
            for box, local in _grouped([work.boxes[q] for q in rows]):
                grid = SliceGrid(box.x1 - box.x0, box.y1 - box.y0, self.resolution)
                pixels = grid.from_model(slices[local]).numpy()[:, 0]
                inside = (slice(box.x0 - region.x0, box.x1 - region.x0), slice(box.y0 - region.y0, box.y1 - region.y0))
                array[inside + (local,)] = np.moveaxis(pixels, 0, -1)
            return array

        probability = region_of(outputs.probability)
        shape_mm = None if shape is None else shape.on_rows(rows)
        if shape_mm is not None:
            probability = grounding.with_drawn_shape(probability, shape_mm, shape.reach, threshold)
        mask = probability >= threshold
        if outputs.confidence is None:
            return FusedSlices.of(probability, mask)
        uncertainty, dissent = region_of(outputs.uncertainty), region_of(outputs.dissent)
        confidence = outputs.confidence.numpy()
        if shape_mm is not None:
            # the members' doubt counts only along the shape's contour (within the model's reach of it,
            # at least a pixel): elsewhere the shape decides, and their doubt there changes nothing
            contour = np.abs(shape_mm) <= max(shape.reach, *spacing[:2])
            uncertainty *= contour
            dissent *= contour
            area = contour.sum(axis=(0, 1))  # as slice_confidence, over the contour the model can still move
            confidence = np.where(area > 0, 1 - 4 * uncertainty.sum(axis=(0, 1)) / np.maximum(area, 1), 1.0)
        review = dissent >= self.config.review_dissent
        return FusedSlices.of(probability, mask, uncertainty if doubt_map else None, review, confidence)

    def _model_outputs(
        self, work: LabelWork, rows: np.ndarray, key: bytes, data: np.ndarray, intensity: Intensity, clock: Stages
    ) -> tuple[SliceOutputs, int]:
        """The model's outputs for one batch of query slices (:func:`slice_outputs`), on the host,
        and the passes the model ran for them (0: all were kept). Every unit is computed in a fixed
        composition, so that a cached unit and a recomputed one are the same bits: each support row
        encoded alone, the batch against each serving column alone. The query work that does not
        depend on the support (DPL's features, SD-FSMIS's latents) is kept per batch; a method whose
        passes are costly (SD-FSMIS's UNet and decoder) keeps each column's prediction too: a
        correction that adds one serving support to a slice costs one pass, not k. Such a method's
        outputs are kept under ``key`` (:meth:`_model_key`) too: a fusion that changes alone (a new
        region, a moved shape) reuses them. DPL's are a few similarities of kept features, cheaper
        to redo than to hold (120 MB at the model's resolution over a 180-slice head)."""
        passes = 0

        def compute() -> SliceOutputs:
            nonlocal passes
            outputs, passes = self._run_model(work, rows, data, intensity, clock)
            return outputs

        return cached(self.cache if self.model.costly_passes else None, key, compute), passes

    def _run_model(
        self, work: LabelWork, rows: np.ndarray, data: np.ndarray, intensity: Intensity, clock: Stages
    ) -> tuple[SliceOutputs, int]:
        """:meth:`_model_outputs` computed, with the passes that ran (kept columns cost none)."""
        device = self.model.device
        slices = [work.slices[q] for q in rows]
        per_column = self.cache if self.model.costly_passes else None
        encoded = None
        predictions, passes = [], 0

        def queries():  # cropped and encoded once, when a pass first needs them
            nonlocal encoded
            if encoded is None:
                crops = self._crops(data, work.query_z[rows], [work.boxes[q] for q in rows], intensity)
                clock.lap("crops")
                encoded = self._encoded_queries(crops, slices)
            return encoded

        with torch.inference_mode(), self.options.autocast(device):
            for column in work.index[rows].T:

                def predict(column: np.ndarray = column) -> Prediction:
                    nonlocal passes
                    passes += len(column)
                    batch = queries()  # first, so that the crops' lap does not take the support's encoding
                    needed = np.unique(column)
                    support = self.model.join_supports([self._support_row(work, int(i)) for i in needed])
                    position = torch.from_numpy(np.searchsorted(needed, column)).to(device)
                    p = self.model.predict_encoded(support, batch, position[:, None])[0]
                    variants = None if p.variants is None else p.variants.float().cpu()
                    return Prediction(p.probability.float().cpu(), variants)

                column_key = digest(b"column", *slices, *(work.rows[i] for i in column))
                predictions.append(cached(per_column, column_key, predict))
        outputs = slice_outputs(predictions, torch.from_numpy(work.weights[rows]), self.config.threshold)
        clock.lap("model")
        return outputs, passes

    def _encoded_queries(self, queries: torch.Tensor, slices: list[bytes]):
        """One batch of query slices through the model's ``encode_queries``, kept when that is work
        (DPL's features, SD-FSMIS's latents): a correction that changes only which supports serve
        these slices, not their crops, does not encode them again."""
        queries = queries.to(self.model.device)
        if not self.model.encodes_queries:
            return queries
        return cached(self.cache, b"queries" + digest(*slices), lambda: self.model.encode_queries(queries))

    def _support_row(self, work: LabelWork, i: int):
        """Support row ``i`` encoded alone, once per request (and from the cache when the same crop
        and mask were encoded before)."""
        if i not in work.encoded:
            work.encoded[i] = cached(
                self.cache,
                b"support" + work.rows[i],
                lambda: self.model.encode_support(
                    work.support_images[i : i + 1].to(self.model.device),
                    work.support_masks[i : i + 1].to(self.model.device),
                ),
            )
        return work.encoded[i]

    def _consistent_slices(self, maps: LabelMaps) -> Iterator[tuple[int, np.ndarray]]:
        """A label's mask over its region after the 3-D steps, slice by slice (region slice, [X, Y]
        mask; the slices not given are empty), from its batches' masks and their slices' 2-D
        components (:mod:`sdfsmis.pipeline.components`, nothing labelled again), the drawn slices
        as drawn. In the annotated volume: followed outwards from the drawing only while it stays
        continuous (:func:`grounding.where_it_ends`), and its 3-D components that touch the drawing
        kept (elsewhere the largest). Slice by slice: a region-sized mask is not held."""
        cfg = self.config
        drawn, annotated = maps.drawn, maps.drawn_slices
        masks, planes, keys = maps.slices()
        first, last = 0, len(masks) - 1
        if drawn is not None and cfg.grounding:
            area = np.array([plane.sizes.sum() for plane in planes])
            first, last = grounding.where_it_ends(area, np.flatnonzero(annotated), cfg.end_continuity)
        span = range(first, last + 1)
        keep = None
        if cfg.largest_component:
            joins = [  # kept by the slices' digests: a re-run joins only the slices next to a changed batch
                cached(
                    self.cache,
                    digest(b"overlaps", keys[z], keys[z + 1]),
                    lambda z=z: components.overlaps(masks[z], planes[z], masks[z + 1], planes[z + 1]),
                )
                for z in span[:-1]
            ]
            seeds = [drawn[..., z] if annotated[z] else None for z in span]
            in_span = SliceMasks(masks.sources[first : last + 1])
            keep = components.kept_components(in_span, planes[first : last + 1], joins, seeds)
        for i, z in enumerate(span):
            yield z, masks[z] if keep is None else components.kept_mask(masks[z], planes[z], keep[i])

    def segment(
        self, support_image: Volume, support_label: Volume, query: Volume, label_ids: list[int] | None = None
    ) -> SegmentationResult:
        """Segment ``query`` with each label of one support volume (see :meth:`segment_with`)."""
        return self.segment_with([SupportVolume(support_image, support_label)], query, label_ids)

    def segment_with(
        self,
        supports: list[SupportVolume],
        query: Volume,
        label_ids: list[int] | None = None,
        doubt_map: bool = True,
    ) -> SegmentationResult:
        """Segment ``query`` with each label of the supports as its own 1-way task, merged.

        A label is served by every support volume that has it. When a support is the query itself,
        its annotated voxels are kept as drawn. Each label's work stays within its region: the
        volume-sized arrays are the query, the support labels and the result. ``doubt_map``: keep
        the voxel map of the members' doubt (:attr:`SegmentationResult.uncertainty`), which only the
        command line's ``--uncertainty`` and a preview show (35 MB over a structure across a
        512 x 512 x 180 CT); the slices' confidence and the review voxels are kept either way."""
        clock = Stages(self.model.method)
        cfg = self.config
        label_ids = select_supported_ids(supports, label_ids)
        query_intensity = query.intensity(cfg.clip_percentiles)
        intensities = [
            query_intensity if s.is_query(query) else s.image.intensity(cfg.clip_percentiles) for s in supports
        ]
        clock.lap("prepare")
        contents: dict[int, bytes] = {}
        registrations: dict[int, tuple[placement.Registration, bytes]] = {}

        def content(volume: Volume) -> bytes:  # what an image holds and where, digested once per request
            if id(volume) not in contents:
                contents[id(volume)] = digest(volume.data, volume.affine)
            return contents[id(volume)]

        def registered(source: SupportVolume, intensity: Intensity) -> tuple[placement.Registration, bytes]:
            """Once per request for all of a support's labels, and kept by both images' content."""
            if id(source) not in registrations:
                key = digest(b"registration", content(source.image), content(query), cfg.clip_percentiles)

                def register(image: Volume = source.image) -> placement.Registration:
                    return placement.register_volumes(image, intensity, query, query_intensity)

                registrations[id(source)] = cached(self.cache, key, register), key
            return registrations[id(source)]

        # volume-sized arrays in the volume's memory order (Fortran, as NIfTI stores it): slice by slice
        # operations then run over contiguous memory
        order = "F" if query.data.flags.f_contiguous else "C"
        labels = np.zeros(query.data.shape, dtype=label_type(max(label_ids)), order=order)
        # each label's most likely voxels, for several labels: in the levels the probabilities are kept in
        best = np.zeros(query.data.shape, dtype=MAP_TYPES["probability"], order=order) if len(label_ids) > 1 else None
        result = SegmentationResult(labels)
        regions: dict[int, tuple[slice, slice, slice]] = {}
        for label_id in label_ids:
            sources = []
            for source, intensity in zip(supports, intensities):
                drawn, annotated = drawn_voxels(source.label.data, label_id)
                if len(annotated):
                    sources.append(self._place(source, intensity, drawn, annotated, query, registered))
            clock.lap("placement")
            maps = self._segment_label(sources, query, query_intensity, doubt_map, clock)
            clock.lap("fusion")
            region, report = maps.index, maps.report
            if report.confidence is not None:
                result.doubt[label_id] = maps
            claim(labels[region], None if best is None else best[region], label_id, self._consistent_slices(maps), maps)
            result.reports[label_id] = report
            regions[label_id] = region
            clock.lap("post-processing")
        for label_id, report in result.reports.items():  # a label is written within its region only
            within = labels[regions[label_id]]  # counted slice by slice: no region-sized comparison
            report.voxels = sum(int(np.count_nonzero(within[..., z] == label_id)) for z in range(within.shape[2]))
        clock.lap("post-processing")
        result.stages, result.seconds = clock.seconds, clock.total
        return result
