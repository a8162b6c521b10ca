"""Properties of the volume geometry over random voxel grids (hypothesis): any affine that a
scanner or a converter writes (axes permuted and flipped, a tilt, any spacing and origin) loads
into a RAS working array that holds the same voxels at the same world points, and goes back to
the file's own voxel order, for images and for labels; the model's slice grid keeps its shapes;
intensities normalise into [-1, 1] without reordering them.

Every expectation comes from how the grid was drawn (which world axis each voxel axis runs along,
in which direction, with which spacing), never from the code under test."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sdfsmis.io.volume import SliceGrid, load_volume, normalise_intensity, ras_spacing
from sdfsmis.pipeline.placement import _ras_affine

#: apps/mutation.sh sets fewer examples: each surviving mutant reruns every test that reaches it
PROPERTY = settings(max_examples=int(os.environ.get("SDFSMIS_PROPERTY_EXAMPLES", "30")), deadline=None)


@dataclass(frozen=True)
class Grid:
    """A voxel grid: voxel axis j runs along world axis ``axes[j]`` (0: R, 1: A, 2: S) towards
    (+1) or away from (-1) its positive end, ``spacing[j]`` mm per voxel, the whole tilted by up to
    0.5 rad about one world axis (a tilt under 45 degrees leaves each voxel axis nearest its world axis)."""

    shape: tuple[int, int, int]
    axes: tuple[int, int, int]
    signs: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray

    def write(self, path: Path, data: np.ndarray) -> Path:
        nib.save(nib.Nifti1Image(data, self.affine), str(path))
        return path

    def ras_index(self, original: np.ndarray) -> np.ndarray:
        """Original voxel indices [..., 3] -> where they lie in a RAS working array [..., 3]."""
        ras = np.empty_like(original)
        for j, (axis, sign, n) in enumerate(zip(self.axes, self.signs, self.shape)):
            ras[..., axis] = original[..., j] if sign > 0 else n - 1 - original[..., j]
        return ras


@st.composite
def grids(draw: st.DrawFn) -> Grid:
    shape = draw(st.tuples(*[st.integers(2, 6)] * 3))
    axes = tuple(draw(st.permutations([0, 1, 2])))
    signs = draw(st.tuples(*[st.sampled_from([-1, 1])] * 3))
    spacing = draw(st.tuples(*[st.floats(0.3, 6.0)] * 3))
    tilt, about = draw(st.floats(-0.5, 0.5)), draw(st.integers(0, 2))
    origin = draw(st.tuples(*[st.floats(-300.0, 300.0)] * 3))
    directions = np.zeros((3, 3))
    directions[list(axes), [0, 1, 2]] = signs  # column j: voxel axis j's world direction
    c, s = np.cos(tilt), np.sin(tilt)
    u, v = [k for k in range(3) if k != about]
    rotation = np.eye(3)
    rotation[[u, u, v, v], [u, v, u, v]] = c, -s, s, c
    affine = np.eye(4)
    affine[:3, :3] = rotation @ directions @ np.diag(spacing)
    affine[:3, 3] = origin
    return Grid(shape, axes, signs, spacing, affine)


def _voxels(shape: tuple[int, ...]) -> np.ndarray:
    """Every voxel index of ``shape``, [N, 3]."""
    return np.indices(shape).reshape(3, -1).T


@PROPERTY
@given(grids())
def test_an_image_loads_in_ras_order_at_the_same_world_points_and_goes_back(grid):
    data = np.arange(np.prod(grid.shape), dtype=np.float32).reshape(grid.shape)  # each voxel tells its index
    with tempfile.TemporaryDirectory() as folder:
        path = grid.write(Path(folder) / "image.nii.gz", data)
        stored = nib.load(str(path)).affine  # what the file holds (float32 in the header)
        volume = load_volume(path)

    assert volume.shape == grid.shape
    np.testing.assert_array_equal(volume.to_original(volume.data), data)
    original = np.stack(np.unravel_index(volume.data.astype(np.int64).ravel(), grid.shape), axis=1)
    ras = _voxels(volume.data.shape)  # C order, as ravel() above
    np.testing.assert_array_equal(grid.ras_index(original), ras)  # the voxel sits where the grid says
    # the same world point through the file's affine (original index) and the working array's (RAS index)
    world = (stored @ np.c_[original, np.ones(len(original))].T).T
    np.testing.assert_allclose((_ras_affine(volume) @ np.c_[ras, np.ones(len(ras))].T).T, world, atol=1e-6)
    expected_spacing = np.empty(3)
    expected_spacing[list(grid.axes)] = grid.spacing
    np.testing.assert_allclose(ras_spacing(volume), expected_spacing, rtol=1e-5)  # float32 header
    # RAS axial slice z is this slice of the file's own slice axis (the one running along S)
    j = grid.axes.index(2)
    depth = grid.shape[j]
    assert [volume.original_slice(z) for z in range(depth)] == [
        z if grid.signs[j] > 0 else depth - 1 - z for z in range(depth)
    ]


@PROPERTY
@given(grids(), st.sampled_from([3, 300]), st.sampled_from([".nii.gz", ".nrrd"]), st.integers(0, 2**16))
def test_a_label_written_back_has_the_voxels_and_affine_of_the_file(grid, top, suffix, seed):
    labels = np.random.default_rng(seed).integers(0, top + 1, grid.shape).astype(np.uint16)
    with tempfile.TemporaryDirectory() as folder:
        stored = nib.load(str(grid.write(Path(folder) / "label.nii.gz", labels))).affine
        volume = load_volume(Path(folder) / "label.nii.gz", label=True)
        out = volume.save_label(volume.data, Path(folder) / f"out{suffix}")
        if suffix == ".nrrd":  # ITK's frame is LPS: read back through ITK, compared in the file's terms
            back = load_volume(out, label=True)
            written, affine = back.to_original(back.data), back.affine
        else:
            image = nib.load(str(out))
            written, affine = np.asarray(image.dataobj), image.affine
    np.testing.assert_array_equal(written, labels)
    np.testing.assert_allclose(affine, stored, atol=1e-4)


@PROPERTY
@given(
    st.integers(1, 3),
    st.integers(1, 48),
    st.integers(1, 48),
    st.integers(2, 40),
    st.floats(-2.0, 2.0, width=32),
)
def test_slice_grid_keeps_shapes_and_a_constant(n, height, width, resolution, value):
    grid = SliceGrid(height, width, resolution)
    slices = torch.full((n, 1, height, width), value)
    model = grid.to_model(slices, pad_value=value)  # padded with the same value: still constant
    assert model.shape == (n, 1, resolution, resolution)
    back = grid.from_model(model)
    assert back.shape == (n, 1, height, width)
    # interpolation weights sum to 1: a constant stays that constant, up to float32 rounding
    torch.testing.assert_close(model, torch.full_like(model, value), rtol=0, atol=1e-5)
    torch.testing.assert_close(back, torch.full_like(back, value), rtol=0, atol=1e-5)
    labels = torch.randint(0, 4, (n, 1, height, width)).float()
    nearest = grid.to_model(labels, mode="nearest", pad_value=0.0)
    assert set(nearest.unique().tolist()) <= set(labels.unique().tolist()) | {0.0}  # no blended label


@PROPERTY
@given(
    hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=8), elements=st.floats(-1e4, 1e4, width=32)
    ),
    st.floats(0.0, 49.0),
    st.floats(51.0, 100.0),
)
def test_normalised_intensities_lie_in_minus_one_one_in_the_same_order(data, low, high):
    out = normalise_intensity(data, (low, high))
    assert out.shape == data.shape
    # float32: (x - low) / (high - low) * 2 - 1 rounds three times, each within half a unit in the last
    # place (6e-8 near 1): the ends may land a few of those outside [-1, 1]
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6
    order = np.argsort(data, axis=None, kind="stable")
    assert (np.diff(out.ravel()[order]) >= 0).all()  # clip, shift and scale never reorder voxels
    full = normalise_intensity(data, (0.0, 100.0))
    if data.max() > data.min():  # the darkest voxel is -1, the brightest +1
        assert full.ravel()[order[0]] == -1.0 and full.ravel()[order[-1]] == 1.0
