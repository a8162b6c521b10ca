"""Nearest-slice copy: the floor of same-volume propagation. A one-shot tool is only worth using
where it beats copying the nearest annotated slice, so the ``propagation`` protocol reports every
method against this baseline. It needs no model and no image: only the drawn slices."""

from __future__ import annotations

import numpy as np


class NearestSliceCopy:
    """Every slice within reach takes the mask of the nearest annotated slice (a tie between two
    annotated slices goes to the lower one).

    Reach: the annotated z-range extended at each end by half the median gap between consecutive
    annotated slices. Why: the annotated slices are spread over the structure at (2i + 1) / (2n)
    of its slices (EP1's rule, and what a user drawing a few slices of an organ does), so the
    structure's first and last slices lie about half a gap beyond the outer annotated ones; that is
    as far as the annotation says the structure goes. Copying into every slice of the volume
    would paint the structure where it is not (false positives on every slice beyond it) and make
    the floor artificially low. With a single annotated slice no gap is known: nothing is copied
    beyond that slice. Drawn slices are kept as drawn, as the product keeps them."""

    title = "nearest-slice copy (training-free)"

    def propagate(self, drawn: np.ndarray, annotated: list[int] | None = None) -> np.ndarray:
        """``drawn`` [X, Y, Z] bool: the annotated slices' masks (other slices ignored);
        ``annotated``: the annotated slices (default: the slices where ``drawn`` has voxels; pass
        them when an annotated slice may be empty). Returns the propagated mask [X, Y, Z]."""
        drawn = np.asarray(drawn, dtype=bool)
        if annotated is None:
            annotated = np.flatnonzero(drawn.any(axis=(0, 1)))
        annotated = np.unique(np.asarray(annotated, dtype=np.int64))
        out = np.zeros_like(drawn)
        if annotated.size == 0:
            return out
        low, high = self.reach(annotated, drawn.shape[2])
        z = np.arange(low, high + 1)
        nearest = annotated[np.abs(z[:, None] - annotated[None, :]).argmin(axis=1)]  # first = lower on a tie
        out[..., z] = drawn[..., nearest]
        return out

    @staticmethod
    def reach(annotated: np.ndarray, depth: int) -> tuple[int, int]:
        """First and last slice that get a copy: the annotated range +- half the median gap,
        within the volume."""
        annotated = np.sort(np.asarray(annotated))
        half = float(np.median(np.diff(annotated))) / 2 if annotated.size > 1 else 0.0
        return max(0, int(np.ceil(annotated[0] - half))), min(depth - 1, int(np.floor(annotated[-1] + half)))
