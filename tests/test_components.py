"""3-D components built from each slice's 2-D components (sdfsmis.pipeline.components) against
scipy's labelling of the whole stack, and by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sdfsmis.pipeline import components
from sdfsmis.pipeline.components import kept_components, kept_mask, overlaps, plane_components


def _consistent(mask: np.ndarray, seeds: np.ndarray | None) -> np.ndarray:
    """The stack [X, Y, Z] with the components the seeds touch (or the largest), slice by slice."""
    planes = plane_components(mask)
    slices = [mask[..., z] for z in range(mask.shape[2])]
    per_slice = [None if seeds is None or not seeds[..., z].any() else seeds[..., z] for z in range(mask.shape[2])]
    joins = [overlaps(slices[z], planes[z], slices[z + 1], planes[z + 1]) for z in range(len(slices) - 1)]
    keep = kept_components(slices, planes, joins, per_slice)
    return np.stack([kept_mask(m, p, k) for m, p, k in zip(slices, planes, keep)], axis=-1)


def test_the_annotated_component_or_else_the_largest():
    mask = np.zeros((6, 6, 12), bool, order="F")
    mask[:3, :3, 0:3] = True  # 27 voxels, slices 0-2
    mask[:4, :4, 6:12] = True  # 96 voxels, slices 6-11
    mask[5, 5, 1] = True  # a third, one voxel, beside the first on slice 1: two components there
    first = np.zeros_like(mask)
    first[:3, :3, 0:3] = True
    seeds = np.zeros_like(mask)
    seeds[1, 1, 1] = True
    np.testing.assert_array_equal(_consistent(mask, seeds), first)
    largest = np.zeros_like(mask)
    largest[:4, :4, 6:12] = True
    np.testing.assert_array_equal(_consistent(mask, None), largest)
    outside = np.zeros_like(mask)
    outside[4, 4, 4] = True  # an annotation touching no component: the largest
    np.testing.assert_array_equal(_consistent(mask, outside), largest)
    both = seeds.copy()
    both[1, 1, 7] = True
    np.testing.assert_array_equal(_consistent(mask, both), first | largest)
    one = first.copy()
    np.testing.assert_array_equal(_consistent(one, None), one)  # a single component is kept whole


def test_components_join_through_one_overlapping_pixel_and_not_through_a_corner():
    mask = np.zeros((5, 5, 3), bool, order="F")
    mask[0:2, 0:2, 0] = True  # 4 voxels
    mask[1, 1:5, 1] = True  # overlaps slice 0 at (1, 1) only: joined, 8 voxels together
    mask[2:5, 0, 2] = True  # 3 voxels touching slice 1's (1, 1) only along an edge: apart
    mask[2, 2, 2] = mask[3, 3, 2] = True  # in-plane diagonal neighbours: two more components
    np.testing.assert_array_equal(_consistent(mask, None), mask & (np.arange(3) < 2))
    seeds = np.zeros_like(mask)
    seeds[3, 3, 2] = True
    only = np.zeros_like(mask)
    only[3, 3, 2] = True
    np.testing.assert_array_equal(_consistent(mask, seeds), only)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("counted", [True, False])  # the overlapping pairs counted, or sorted (many components)
def test_equals_scipy_labelling_the_whole_stack(seed, counted, monkeypatch):
    if not counted:
        monkeypatch.setattr(components, "DENSE_PAIRS", 0)
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(40, 36, 30)), sigma=(2.0, 2.0, 1.5))
    mask = np.asfortranarray(noise > np.quantile(noise, 0.8))  # blobs of all sizes
    labels, count = ndimage.label(mask.T)  # the reference: scipy numbers in z, y, x order
    labels = labels.T
    assert count > 3
    sizes = np.bincount(labels.ravel())[1:]
    np.testing.assert_array_equal(_consistent(mask, None), labels == np.argmax(sizes) + 1)
    seeds = np.zeros_like(mask)
    chosen = rng.choice(count, size=2, replace=False) + 1
    for k in chosen:  # one voxel of two components, on their first slice
        x, y, z = np.argwhere(labels == k)[0]
        seeds[x, y, z] = True
    np.testing.assert_array_equal(_consistent(mask, seeds), np.isin(labels, chosen))
