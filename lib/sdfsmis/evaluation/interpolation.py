"""Interpolation between drawn slices: the second floor of same-volume propagation, what 3D
Slicer's "fill between slices" gives a radiologist for free. Between two consecutive annotated
slices each slice is the zero level of the signed distances of the two drawn masks, blended
linearly in z (a shape morphs from one drawing into the next); beyond the outer annotated slices
the outermost drawing is copied within the nearest-slice copy's reach."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from sdfsmis.evaluation.nearest_slice import NearestSliceCopy


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Pixels to the contour, positive inside and negative outside; an empty mask is far outside."""
    if not mask.any():
        return np.full(mask.shape, -float(sum(mask.shape)))
    return ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)


class SliceInterpolation:
    """Signed-distance interpolation between annotated slices (drawn slices kept as drawn)."""

    title = "interpolation between drawn slices (training-free)"
    reach = staticmethod(NearestSliceCopy.reach)

    def propagate(self, drawn: np.ndarray, annotated: list[int] | None = None) -> np.ndarray:
        """``drawn`` [X, Y, Z] bool: the annotated slices' masks; ``annotated``: those slices
        (default: where ``drawn`` has voxels). Returns the propagated mask [X, Y, Z]."""
        drawn = np.asarray(drawn, dtype=bool)
        if annotated is None:
            annotated = np.flatnonzero(drawn.any(axis=(0, 1)))
        annotated = np.unique(np.asarray(annotated, dtype=np.int64))
        out = NearestSliceCopy().propagate(drawn, annotated)  # the ends, within the copy's reach
        distances = {int(z): signed_distance(drawn[..., z]) for z in annotated}
        for low, high in zip(annotated[:-1], annotated[1:]):
            for z in range(low + 1, high):
                t = (z - low) / (high - low)
                out[..., z] = (1 - t) * distances[int(low)] + t * distances[int(high)] > 0
        return out
