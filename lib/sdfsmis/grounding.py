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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .placement import Registration


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


def where_it_ends(mask: np.ndarray, annotated: np.ndarray, continuity: float) -> np.ndarray:
    """``mask`` [X, Y, Z] with the structure followed outwards from the outermost annotated
    slices only while each slice keeps at least ``continuity`` of its inner neighbour's area; the
    first slice that does not (an empty one included) and everything beyond it are cleared."""
    if not len(annotated):
        return mask
    mask = mask.copy()
    area = mask.sum(axis=(0, 1))
    for start, step in ((int(np.max(annotated)), 1), (int(np.min(annotated)), -1)):
        z = start + step
        while 0 <= z < mask.shape[2] and area[z] > 0 and area[z] >= continuity * area[z - step]:
            z += step
        if step > 0:
            mask[..., z:] = False
        else:
            mask[..., : max(z + 1, 0)] = False
    return mask
