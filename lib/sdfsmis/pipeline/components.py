"""3-D connected components of a stack of slice masks, built from each slice's own 2-D components.

The segmenter keeps each batch of query slices with its slices' 2-D components, so a re-run after
a correction labels only the slices the correction changed; joining the slices' components
through their overlaps is a fraction of labelling the whole stack again (on a structure across a
512 x 512 x 180 volume, 0.5 s of scipy's labelling on every request). The connectivity is the
faces', as :func:`scipy.ndimage.label`'s default: 4-connected in the plane, and one overlapping
pixel joins components of neighbouring slices."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

#: Up to this many possible pairs of components, two slices' overlaps are counted, not sorted.
DENSE_PAIRS = 2**16


@dataclass(frozen=True)
class PlaneComponents:
    """The 4-connected components of one slice's mask: each one's size, and where there are two or
    more, the labelled slice as runs of equal labels in its raster order (y then x, as scipy numbers
    a Fortran-ordered [X, Y] slice). A blob crosses each row in a few runs, so a slice of a
    structure across a 512 x 512 image is a few kilobytes instead of the 512 kB of its labels."""

    sizes: np.ndarray  # [count] voxels of components 1..count
    runs: tuple[np.ndarray, np.ndarray] | None  # where count >= 2: each run's first raster index, label
    plane: tuple[int, int]  # X, Y

    @classmethod
    def of(cls, mask: np.ndarray) -> PlaneComponents:
        """The components of a 2-D [X, Y] boolean ``mask``."""
        labels, count = ndimage.label(mask.T)  # the transpose: y then x, and contiguous for a Fortran slice
        if count <= 1:
            return cls(np.array([np.count_nonzero(mask)] if count else [], dtype=np.int64), None, mask.shape)
        raster = labels.ravel()
        starts = np.flatnonzero(raster[1:] != raster[:-1]) + 1
        starts = np.concatenate([[0], starts]).astype(np.int32)
        values = raster[starts].astype(np.uint16 if count < 2**16 else np.int32)
        return cls(np.bincount(raster)[1:], (starts, values), mask.shape)

    @property
    def count(self) -> int:
        return len(self.sizes)

    @property
    def labels(self) -> np.ndarray | None:
        """The labelled slice [X, Y] (built from the runs on each call), None with under two components."""
        if self.runs is None:
            return None
        starts, values = self.runs
        lengths = np.diff(starts, append=self.plane[0] * self.plane[1])
        return np.repeat(values, lengths).reshape(self.plane[::-1]).T

    def at(self, where: np.ndarray) -> np.ndarray:
        """The component (1..count) of each of the slice's pixels that the boolean ``where`` selects
        (pixels of its mask)."""
        if self.runs is None:
            return np.ones(np.count_nonzero(where), dtype=np.int64)
        return self.labels[where].astype(np.int64)


def plane_components(masks: np.ndarray) -> list[PlaneComponents]:
    """Each slice's components of a boolean [X, Y, n] stack."""
    return [PlaneComponents.of(masks[..., i]) for i in range(masks.shape[2])]


def overlaps(mask_a: np.ndarray, a: PlaneComponents, mask_b: np.ndarray, b: PlaneComponents) -> np.ndarray:
    """[m, 2] pairs (component of slice a, component of slice b), 1-based, that overlap: what joins
    the components of two neighbouring slices."""
    if not a.count or not b.count:
        return np.zeros((0, 2), dtype=np.int64)
    both = mask_a & mask_b
    if a.runs is None and b.runs is None:  # one component each: they touch or they do not
        return np.array([[1, 1]] if both.any() else [], dtype=np.int64).reshape(-1, 2)
    width = b.count + 1
    codes = a.at(both) * width + b.at(both)
    bins = (a.count + 1) * width
    if bins <= DENSE_PAIRS:  # counting the pairs is cheaper than sorting them
        pairs = np.flatnonzero(np.bincount(codes, minlength=bins))
    else:
        pairs = np.unique(codes)
    return np.stack(np.divmod(pairs, width), axis=1)


def kept_components(
    masks: Sequence[np.ndarray],
    planes: Sequence[PlaneComponents],
    joins: Sequence[np.ndarray],
    seeds: Sequence[np.ndarray | None],
) -> list[np.ndarray]:
    """3-D consistency over a stack of slices (``masks`` [X, Y] each, ``planes`` their components,
    ``joins`` the :func:`overlaps` of each slice with the next, ``seeds`` the drawn pixels of each
    slice or None): per slice, which of its components to keep ([count + 1] booleans, index 0 the
    background): the 3-D components that the seeds touch, or else the largest one (ties: the first
    in z, y, x order). A single 3-D component is kept whole."""
    offsets = np.cumsum([0] + [p.count for p in planes])
    nodes = int(offsets[-1])
    edges = [pairs - 1 + (offsets[z], offsets[z + 1]) for z, pairs in enumerate(joins) if len(pairs)]
    edges = np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64)
    graph = sparse.coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(nodes, nodes))
    count, component = csgraph.connected_components(graph, directed=False)
    kept = np.ones(count, dtype=bool)
    if count > 1:
        touched = [
            offsets[z] + planes[z].at(seed & masks[z]) - 1
            for z, seed in enumerate(seeds)
            if seed is not None and planes[z].count
        ]
        touched = np.unique(component[np.concatenate(touched)]) if touched else np.zeros(0, dtype=np.int64)
        kept[:] = False
        if len(touched):
            kept[touched] = True
        else:  # component ids follow the nodes' order (z, then raster order): argmax takes the first of ties
            sizes = np.bincount(component, weights=np.concatenate([p.sizes for p in planes]), minlength=count)
            kept[np.argmax(sizes)] = True
    per_node = kept[component]
    return [np.concatenate([[False], per_node[offsets[z] : offsets[z + 1]]]) for z in range(len(planes))]


def kept_mask(mask: np.ndarray, plane: PlaneComponents, keep: np.ndarray) -> np.ndarray:
    """The slice ``mask`` with only the components ``keep`` marks ([count + 1] booleans)."""
    if keep[1:].all():
        return mask
    if not keep.any():
        return np.zeros_like(mask)
    return keep[plane.labels]  # two or more components, some kept: the slice has its labels
