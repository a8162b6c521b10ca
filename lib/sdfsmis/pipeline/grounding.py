"""Spatial grounding: the annotation says where the structure is, so a one-shot result is looked
for only there. Appearance alone matches the structure's twin on the other side and every slice
to the volume's edge; a radiologist's drawing does not.

- In-plane: a box around the drawn structure (:func:`box_around`), with a margin in millimetres
  and in share of its size, is the region each slice is segmented in, zoomed to the model's input
  so that a 5 mm structure and a liver both fill a useful part of it. In another patient's scan the
  box is carried through the 3-D registration that places its slices (:func:`carried_box`).
- Along z: beyond the outermost drawn slices the structure is followed outwards only while it
  stays continuous (:func:`where_it_ends`): the first slice whose area falls below a share of its
  neighbour's ends it, and nothing beyond is kept.
- The drawn shape: in the annotated volume, the drawings themselves say most of what each
  slice looks like. :class:`DrawnShape` interpolates their signed distances between the two drawn
  slices that decide a slice (Slicer's "fill between slices") and closes the structure beyond
  the outermost ones; in another patient's scan, :func:`carried_shape` is the whole drawing
  carried through the registration (an atlas). :func:`with_drawn_shape` lets the model move that
  contour by at most a few millimetres where the image says so, as a radiologist corrects an
  interpolation, and never paint far from it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sdfsmis.pipeline.placement import Registration


@dataclass(frozen=True)
class Box:
    """An in-plane region [x0, x1) x [y0, y1) of a RAS working array."""

    x0: int
    x1: int
    y0: int
    y1: int

    @classmethod
    def whole(cls, shape: tuple[int, ...]) -> Box:
        return cls(0, int(shape[0]), 0, int(shape[1]))

    @property
    def index(self) -> tuple[slice, slice]:
        return slice(self.x0, self.x1), slice(self.y0, self.y1)

    def union(self, other: Box) -> Box:
        return Box(min(self.x0, other.x0), max(self.x1, other.x1), min(self.y0, other.y0), max(self.y1, other.y1))


def _expanded(
    low: float, high: float, spacing: float, size: int, margin_mm: float, margin_share: float
) -> tuple[int, int]:
    """[low, high] (voxel indices, inclusive) widened on each side by the larger of ``margin_mm``
    and ``margin_share`` of its extent, clipped to [0, size)."""
    margin = max(margin_mm / spacing, margin_share * (high - low + 1))
    return max(0, int(np.floor(low - margin))), min(size, int(np.ceil(high + 1 + margin)))


def box_around(drawn: np.ndarray, spacing: tuple[float, ...], margin_mm: float, margin_share: float) -> Box:
    """The box of every drawn voxel [X, Y, Z] of a label, with its margin."""
    xs, ys = np.flatnonzero(drawn.any(axis=(1, 2))), np.flatnonzero(drawn.any(axis=(0, 2)))
    x0, x1 = _expanded(xs[0], xs[-1], spacing[0], drawn.shape[0], margin_mm, margin_share)
    y0, y1 = _expanded(ys[0], ys[-1], spacing[1], drawn.shape[1], margin_mm, margin_share)
    return Box(x0, x1, y0, y1)


def carried_box(
    registration: Registration,
    drawn: np.ndarray,
    query_shape: tuple[int, ...],
    query_spacing: tuple[float, ...],
    margin_mm: float,
    margin_share: float,
) -> Box | None:
    """The drawn structure's box carried into the query through a trusted registration (its 8
    corners, support voxels -> world -> query voxels), with the margin; None when the registration
    is not trusted or the structure lands outside the query."""
    if registration.problem is not None:
        return None
    ends = [np.flatnonzero(drawn.any(axis=tuple(a for a in range(3) if a != axis)))[[0, -1]] for axis in range(3)]
    corners = np.array([[x, y, z, 1.0] for x in ends[0] for y in ends[1] for z in ends[2]])
    world = (registration.support_affine @ corners.T).T[:, :3]
    inverse = registration.transform.GetInverse()
    query_world = np.array([inverse.TransformPoint(p.tolist()) for p in world])
    voxels = np.linalg.solve(registration.query_affine, np.c_[query_world, np.ones(len(query_world))].T).T[:, :3]
    low, high = voxels.min(axis=0), voxels.max(axis=0)
    if high[0] < 0 or high[1] < 0 or low[0] >= query_shape[0] or low[1] >= query_shape[1]:
        return None
    x0, x1 = _expanded(low[0], high[0], query_spacing[0], query_shape[0], margin_mm, margin_share)
    y0, y1 = _expanded(low[1], high[1], query_spacing[1], query_shape[1], margin_mm, margin_share)
    return Box(x0, x1, y0, y1)


def where_it_ends(area: np.ndarray, annotated: np.ndarray, continuity: float) -> tuple[int, int]:
    """The first and last slice (inclusive) of a structure whose slices have ``area`` voxels,
    followed outwards from the outermost ``annotated`` slices only while each slice keeps at least
    ``continuity`` of its inner neighbour's area: the first slice that does not (an empty one
    included) ends it. Every slice without annotations."""
    if not len(annotated):
        return 0, len(area) - 1
    ends = []
    for start, step in ((int(np.min(annotated)), -1), (int(np.max(annotated)), 1)):
        z = start + step
        while 0 <= z < len(area) and area[z] > 0 and area[z] >= continuity * area[z - step]:
            z += step
        ends.append(z - step)
    return ends[0], ends[1]


#: Beyond the outermost drawn slice, the drawn shape closes this share of the drawn span further
#: out. Drawings spread over a structure at 1/6 ... 5/6 of its slices (EP1, and what a user drawing
#: a few slices does) leave a quarter of their span beyond each end; closing 1.5 times that far
#: measured best on Colin27 (docs/evaluation.md: 1, 1.5, 2, 3 quarters x -> Dice 82.0, 82.3, 80.8, 77.0).
END_SHARE = 0.375


def signed_distance_mm(mask: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Millimetres to the contour of a 2-D ``mask``, positive inside and negative outside."""
    if not mask.any():
        return np.full(mask.shape, -float(np.hypot(*(np.array(mask.shape) * spacing))), dtype=np.float32)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return (inside - outside).astype(np.float32)


class DrawnShape:
    """The signed distance (mm) of the structure the drawings ``drawn`` [X, Y, Z] on ``support_z``
    imply on any query slice (:meth:`on`). Each drawing's signed distance is computed once, when a
    slice it serves first asks for it: a re-run after a correction asks only for the slices the
    correction changed.

    - Between two drawn slices: their signed distances blended with the serving weights
      (``index``/``weights`` [Q, k], :func:`~sdfsmis.pipeline.segmenter.serving_supports`), linear in z; where
      the blend keeps less than half of the smaller drawing's area (two pieces that do not overlap
      blend to nothing), the nearer drawing as it is.
    - Beyond the outermost drawn slice: its drawing shrinks until it closes ``END_SHARE`` of the
      drawn span further out, or, from a single drawn slice, by one millimetre per millimetre (a
      rounded end). So the structure ends where the drawings say instead of running on as a prism;
      the span, not the gaps, so that a correction between drawn slices leaves the ends alone.
    """

    #: Signed distances held at once: the query slices are asked for in batches along z, each served
    #: by the two or three drawings around it, so the drawings behind are not asked for again; all
    #: held, the 20 drawings of a 512 x 512 structure took 20 MB until the request ended.
    KEPT_DISTANCES = 4

    def __init__(self, drawn: np.ndarray, support_z: list[int], spacing: tuple[float, float, float]):
        self.drawn, self.support_z, self.spacing = drawn, list(support_z), spacing
        self.areas = np.array([np.count_nonzero(drawn[..., z]) for z in self.support_z])
        self.low, self.high = min(self.support_z), max(self.support_z)
        self._distances: OrderedDict[int, np.ndarray] = OrderedDict()

    def distance(self, i: int) -> np.ndarray:
        """Support ``i``'s signed distance (mm), computed on first use and held while it is among
        the :attr:`KEPT_DISTANCES` last used."""
        if i in self._distances:
            self._distances.move_to_end(i)
        else:
            self._distances[i] = signed_distance_mm(self.drawn[..., self.support_z[i]], self.spacing[:2])
            if len(self._distances) > self.KEPT_DISTANCES:
                self._distances.popitem(last=False)
        return self._distances[i]

    def on(self, query_z: np.ndarray, index: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """[X, Y, Q]: the shape on query slices ``query_z`` served by support rows ``index`` [Q, k]."""
        beyond = np.maximum(self.low - query_z, query_z - self.high).clip(min=0)
        closes = END_SHARE * (self.high - self.low)  # slices beyond the outermost drawn one
        shape = np.empty(self.drawn.shape[:2] + (len(query_z),), dtype=np.float32, order="F")
        for q in range(len(query_z)):
            deciding = index[q][weights[q] > 0]
            blend = np.zeros(self.drawn.shape[:2], dtype=np.float32)
            for i, w in zip(index[q], weights[q]):
                if w > 0:
                    blend += np.float32(w) * self.distance(int(i))
            if len(deciding) > 1 and np.count_nonzero(blend > 0) < 0.5 * self.areas[deciding].min():
                blend = self.distance(int(index[q][0]))
            if beyond[q]:
                nearest = self.distance(int(index[q][0]))
                per_slice = nearest.max() / closes if closes else self.spacing[2]
                blend = blend - np.float32(beyond[q] * per_slice)
            shape[..., q] = blend
        return shape


def carried_shape(carried: np.ndarray, query_z: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The signed distance (mm) [X, Y, Q] of another patient's drawing ``carried`` into the query
    (:func:`~sdfsmis.pipeline.placement.carried_drawing`) on each query slice: the atlas's answer, which the
    model then corrects as it corrects the drawn shape."""
    return np.stack([signed_distance_mm(carried[..., z], spacing[:2]) for z in query_z], axis=-1)


def with_drawn_shape(probability: np.ndarray, shape_mm: np.ndarray, reach_mm: float, threshold: float) -> np.ndarray:
    """The model's ``probability`` fused with the drawn ``shape_mm`` (signed mm): the model's vote
    (-1 at 0, +1 at 1, 0 at ``threshold``) moves the drawn contour outwards or inwards by up to
    ``reach_mm``. Returned as a probability that crosses ``threshold`` on the fused contour."""
    t = np.float32(threshold)
    vote = np.where(probability >= t, (probability - t) / (1 - t), probability / t - 1)
    fused = np.tanh(vote + shape_mm / np.float32(reach_mm), out=vote)
    fused = np.where(fused >= 0, t + fused * (1 - t), (fused + 1) * t)
    return fused.astype(np.float32, copy=False)
