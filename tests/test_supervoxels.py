"""Supervoxel pseudo-labels: body mask, id and size contract, spacing, organ purity, cache, CLI."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from skimage import measure

from sdfsmis.samples.synthetic import make_volume, write_nifti
from sdfsmis.training import supervoxels as sv
from sdfsmis.training.supervoxels import compute_supervoxels  # unpatched, for reference results

SPACING = (1.5, 1.5, 5.0)
MIN_SIZE = 400  # the synthetic patients are small: a kidney has ~1500 voxels


@pytest.fixture(scope="module", params=["CT", "MR"])
def case(request):
    image, label, affine = make_volume(0, modality=request.param)
    return image, label, sv.compute_supervoxels(image, SPACING, min_size=MIN_SIZE)


def test_body_mask_keeps_the_body_fills_holes_and_drops_other_objects():
    for modality, air in (("CT", -1000.0), ("MR", 0.0)):
        image, label, _ = make_volume(1, modality=modality)
        image[40:50, 40:50, 15:25] = air  # gas inside the body
        image[:4, :4, :] = image[label == 1].mean()  # a separate object (scanner table)
        mask = sv.body_mask(image)
        assert mask[label > 0].all()
        assert mask[40:50, 40:50, 15:25].all()
        assert not mask[:4, :4, :].any()
        assert not mask[:, :, 20][[0, 0, -1, -1], [0, -1, 0, -1]].any()  # air in the corners
        assert ndimage.label(mask)[1] == 1
        assert 0.3 < mask.mean() < 0.7


def test_body_mask_fills_holes_open_in_3d_slice_by_slice():
    image, _, _ = make_volume(2)
    image[44:52, 44:52, 30:] = -1000.0  # a tube of air leaving the field of view (like a trachea)
    mask = sv.body_mask(image)
    assert mask[44:52, 44:52, 30:].all()
    assert not sv.body_mask(image, slice_axis=0)[44:52, 44:52, 30:].all()


def test_ids_are_contiguous_and_zero_exactly_outside_the_body(case):
    image, _, labels = case
    assert labels.dtype == np.int32 and labels.shape == image.shape
    np.testing.assert_array_equal(labels > 0, sv.body_mask(image))
    ids = np.unique(labels)
    np.testing.assert_array_equal(ids, np.arange(labels.max() + 1))
    assert 50 < labels.max() < 1000


def test_supervoxels_are_connected_and_at_least_min_size(case):
    _, _, labels = case
    sizes = np.bincount(labels.ravel())[1:]
    assert sizes.min() >= MIN_SIZE
    assert np.median(sizes) < 4 * MIN_SIZE  # about twice min_size on average, not a few giants
    assert measure.label(labels, background=0, connectivity=1).max() == labels.max()


def test_each_organ_is_captured_by_pure_supervoxels(case):
    """What self-supervision learns organs from: supervoxels that are mostly one organ."""
    _, label, labels = case
    sizes = np.bincount(labels.ravel())
    for organ in range(1, 5):
        inside = label == organ
        ids, counts = np.unique(labels[inside], return_counts=True)
        purity = counts / sizes[ids]
        assert purity.max() >= 0.7, f"organ {organ}"
        assert counts[purity >= 0.7].sum() >= 0.5 * inside.sum(), f"organ {organ}"


def test_physical_spacing_shapes_the_supervoxels():
    image, _, _ = make_volume(3)
    thick = sv.compute_supervoxels(image, (1.5, 1.5, 5.0), min_size=MIN_SIZE)
    iso = sv.compute_supervoxels(image, (1.5, 1.5, 1.5), min_size=MIN_SIZE)
    assert not np.array_equal(thick, iso)

    def mean_slices(labels: np.ndarray) -> float:
        return float(np.mean([box[2].stop - box[2].start for box in ndimage.find_objects(labels)]))

    # With 5 mm slices a supervoxel of a given physical size spans fewer slices.
    assert mean_slices(thick) < 0.8 * mean_slices(iso)
    # Only relative spacing matters (min_size is in voxels): a uniform scale changes nothing.
    np.testing.assert_array_equal(thick, sv.compute_supervoxels(image, (3.0, 3.0, 10.0), min_size=MIN_SIZE))


def test_large_volumes_are_computed_on_a_downsampled_grid():
    image, label, _ = make_volume(4, shape=(128, 120, 24))
    labels = sv.compute_supervoxels(image, SPACING, min_size=4 * MIN_SIZE, max_inplane=64)
    assert labels.shape == image.shape
    np.testing.assert_array_equal(np.unique(labels), np.arange(labels.max() + 1))
    assert np.bincount(labels.ravel())[1:].min() >= 4 * MIN_SIZE
    # Nearest-neighbour replication of the 2 x 2 working voxels.
    np.testing.assert_array_equal(labels[0::2, 0::2], labels[1::2, 1::2])
    assert (labels[label > 0] > 0).all()


def test_cache_path_keeps_the_base_name(tmp_path):
    for name in ("case_000.nii.gz", "case_000.nii", "case_000.nrrd"):
        assert sv.supervoxel_cache_path(tmp_path / name) == tmp_path / ".supervoxels" / "case_000.sv.nii.gz"


@pytest.fixture()
def counted(monkeypatch):
    """Count calls of compute_supervoxels made through load_or_compute_supervoxels."""
    calls = []
    original = sv.compute_supervoxels

    def wrapper(*args, **kwargs):
        calls.append(kwargs.get("min_size"))
        return original(*args, **kwargs)

    monkeypatch.setattr(sv, "compute_supervoxels", wrapper)
    return calls


def test_cache_is_written_once_reused_and_invalidated(tmp_path, counted):
    image, _, affine = make_volume(5, oblique=True, orientation="LPS")
    path = write_nifti(tmp_path / "case_000.nii.gz", np.rint(image).astype(np.int16), affine)
    cache = sv.supervoxel_cache_path(path)

    first = sv.load_or_compute_supervoxels(path, min_size=MIN_SIZE)
    assert counted == [MIN_SIZE] and cache.exists()
    stored = nib.load(str(cache))
    np.testing.assert_allclose(stored.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(stored.dataobj), first)
    np.testing.assert_array_equal(first, compute_supervoxels(image.round(), SPACING, min_size=MIN_SIZE))
    assert os.listdir(cache.parent) == [cache.name]  # no temp file left behind
    mtime = cache.stat().st_mtime_ns

    second = sv.load_or_compute_supervoxels(path, min_size=MIN_SIZE)
    assert counted == [MIN_SIZE] and cache.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second, first)

    third = sv.load_or_compute_supervoxels(path, min_size=2 * MIN_SIZE)
    assert counted == [MIN_SIZE, 2 * MIN_SIZE]
    assert np.bincount(third.ravel())[1:].min() >= 2 * MIN_SIZE

    # An image rewritten after its cache invalidates it, even with the same parameters.
    later = cache.stat().st_mtime_ns + 10**9
    os.utime(path, ns=(later, later))
    sv.load_or_compute_supervoxels(path, min_size=2 * MIN_SIZE)
    assert counted == [MIN_SIZE, 2 * MIN_SIZE, 2 * MIN_SIZE]


@pytest.mark.parametrize("change", ["origin", "shape"])
def test_cache_is_recomputed_for_a_different_image_geometry(tmp_path, counted, change):
    image, _, affine = make_volume(6, shape=(64, 64, 20))
    path = write_nifti(tmp_path / "case.nii", image, affine)
    sv.load_or_compute_supervoxels(path, min_size=MIN_SIZE)
    cache = sv.supervoxel_cache_path(path)
    if change == "origin":
        affine = affine.copy()
        affine[:3, 3] += 10.0
    else:
        image = image[:, :, :-2]
    write_nifti(path, image, affine)
    os.utime(path, ns=(cache.stat().st_mtime_ns,) * 2)  # same age: only the geometry differs
    labels = sv.load_or_compute_supervoxels(path, min_size=MIN_SIZE)
    assert len(counted) == 2 and labels.shape == image.shape
    np.testing.assert_allclose(nib.load(str(cache)).affine, affine, atol=1e-4)


def test_nrrd_images_are_read_with_their_spacing_and_lps_geometry(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    image, _, _ = make_volume(7, shape=(64, 64, 20), modality="MR")
    path = tmp_path / "case.nrrd"
    origin = np.array([100.0, 120.0, -300.0])
    header = {"space": "left-posterior-superior", "space directions": np.diag(SPACING), "space origin": origin}
    nrrd.write(str(path), image, header)
    labels = sv.load_or_compute_supervoxels(path, min_size=MIN_SIZE)
    np.testing.assert_array_equal(labels, compute_supervoxels(image, SPACING, min_size=MIN_SIZE))
    expected = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    expected[:3, 3] = origin * [-1, -1, 1]
    np.testing.assert_allclose(nib.load(str(sv.supervoxel_cache_path(path))).affine, expected)


def test_cli_writes_output_with_the_image_affine_and_reports(tmp_path, capsys):
    image, _, affine = make_volume(8, shape=(64, 64, 20), oblique=True)
    path = write_nifti(tmp_path / "in.nii.gz", image, affine)
    output = tmp_path / "out" / "sv.nii.gz"
    sv.run_supervoxels_cli(path, output, min_size=MIN_SIZE)
    written = nib.load(str(output))
    np.testing.assert_allclose(written.affine, affine, atol=1e-4)
    data = np.asarray(written.dataobj)
    np.testing.assert_array_equal(data, compute_supervoxels(image, SPACING, min_size=MIN_SIZE))
    message = capsys.readouterr().out
    assert message.startswith(f"supervoxels: {data.max()} segments in ") and "(64x64x20)" in message
