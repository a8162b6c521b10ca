"""Volume reading: NRRD (what Slicer uploads) gives the same voxels and RAS geometry as the
NIfTI it was converted from by ITK, on an oblique LPS grid; size limits act before the data is
read; header-only geometry agrees with the full load."""

from __future__ import annotations

import dataclasses

import itk
import nibabel as nib
import numpy as np
import pytest

from sdfsmis.io.volume import VolumeError, VolumeTooLarge, check_same_geometry, load_volume, read_geometry
from sdfsmis.memory import release_freed_memory
from sdfsmis.samples.synthetic import make_volume, write_nifti


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """An oblique LPS image and label as NIfTI, and the same converted to NRRD by ITK."""
    folder = tmp_path_factory.mktemp("volumes")
    image, label, affine = make_volume(5, shape=(40, 36, 12), oblique=True, orientation="LPS")
    write_nifti(folder / "image.nii.gz", image, affine)
    write_nifti(folder / "label.nii.gz", label, affine, dtype=np.uint8)
    itk.imwrite(itk.imread(str(folder / "image.nii.gz"), itk.F), str(folder / "image.nrrd"))
    itk.imwrite(itk.imread(str(folder / "label.nii.gz"), itk.UC), str(folder / "label.nrrd"))
    return folder


@pytest.mark.parametrize("name,label", [("image", False), ("label", True)])
def test_nrrd_reads_as_the_nifti_it_came_from(pair, name, label):
    nifti = load_volume(pair / f"{name}.nii.gz", label=label)
    nrrd = load_volume(pair / f"{name}.nrrd", label=label)
    np.testing.assert_array_equal(nrrd.data, nifti.data)  # full precision, same RAS voxel order
    np.testing.assert_allclose(nrrd.affine, nifti.affine, atol=1e-5)
    assert nrrd.data.dtype == nifti.data.dtype and nrrd.shape == nifti.shape


def test_label_of_an_nrrd_query_is_written_in_its_geometry(pair, tmp_path):
    query = load_volume(pair / "image.nrrd")
    out = query.save_label((query.data > 0).astype(np.uint8), tmp_path / "out.nii.gz")
    np.testing.assert_allclose(nib.load(out).affine, nib.load(pair / "image.nii.gz").affine, atol=1e-4)
    check_same_geometry(read_geometry(pair / "image.nii.gz"), load_volume(out, label=True))


def test_an_nrrd_is_recognised_by_its_content_whatever_its_name(pair, tmp_path):
    renamed = tmp_path / "upload.nii.gz"  # an upload keeps the suffix its client gave it
    renamed.write_bytes((pair / "label.nrrd").read_bytes())
    np.testing.assert_array_equal(load_volume(renamed, label=True).data, load_volume(pair / "label.nrrd", True).data)


@pytest.mark.parametrize("name", ["image.nii.gz", "image.nrrd"])
def test_volumes_beyond_the_limit_are_refused_from_the_header(pair, name):
    with pytest.raises(VolumeTooLarge, match="17280 voxels .* more than the limit of 17279"):
        load_volume(pair / name, max_voxels=17279)
    assert load_volume(pair / name, max_voxels=17280).shape == (40, 36, 12)


@pytest.mark.parametrize("name", ["image.nii.gz", "image.nrrd"])
def test_geometry_from_the_header_equals_the_full_load(pair, name):
    geometry, volume = read_geometry(pair / name), load_volume(pair / name)
    assert geometry.shape == volume.shape
    np.testing.assert_allclose(geometry.affine, volume.affine, atol=1e-6)


def test_a_label_on_another_grid_is_refused(pair, tmp_path):
    image = read_geometry(pair / "image.nii.gz")
    moved = nib.load(pair / "label.nii.gz")
    write_nifti(tmp_path / "moved.nii.gz", np.asarray(moved.dataobj), moved.affine @ np.diag([1, 1, 2, 1]))
    with pytest.raises(VolumeError, match="different affines"):
        check_same_geometry(image, load_volume(tmp_path / "moved.nii.gz", label=True))


def test_intensity_bounds_are_taken_once_per_volume_and_anew_for_a_replaced_one(pair):
    volume = load_volume(pair / "image.nii.gz")
    bounds = volume.intensity((0.5, 99.5))
    low, high = np.percentile(volume.data, [0.5, 99.5])  # a small volume: every voxel counts
    assert (float(bounds.low), float(bounds.high)) == pytest.approx((low, high), rel=1e-6)
    assert volume.intensity((0.5, 99.5)) is bounds  # a re-run on the kept volume takes no percentiles
    brighter = dataclasses.replace(volume, data=volume.data * 2 + 100)
    moved = brighter.intensity((0.5, 99.5))
    assert (float(moved.low), float(moved.high)) == pytest.approx((2 * low + 100, 2 * high + 100), rel=1e-6)


@pytest.mark.parametrize(
    ("dtype", "shape", "label"),
    [("i2", (20, 18, 37), False), ("u2", (20, 18, 37, 1), False), ("u1", (21, 19, 17), True)],
)
def test_a_compressed_nifti_is_read_slab_by_slab_into_the_voxels_nibabel_reads(tmp_path, dtype, shape, label):
    """Depths that are no multiple of the slab, a 4-D file of one frame, a label."""
    voxels = np.random.default_rng(3).integers(0, 200, size=shape).astype(dtype)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    path = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(voxels, affine), path)
    whole = np.asanyarray(nib.load(path).dataobj.get_unscaled())  # nibabel's own read of all of it
    expected = whole[..., 0] if len(shape) == 4 else whole
    np.testing.assert_array_equal(expected, voxels.reshape(expected.shape))
    read = load_volume(path, label=label)
    np.testing.assert_array_equal(read.to_original(read.data), expected)
    assert read.data.dtype == (np.uint8 if label else whole.dtype)


def test_reading_a_compressed_image_holds_it_about_once(tmp_path, resident_mb):
    """In a server's heap (freed memory kept, the CPU default) a whole-file read left the
    decompression buffer resident beside the image: twice the image."""
    ramp = np.add.outer(np.arange(512, dtype=np.int16), np.arange(512, dtype=np.int16))
    image = np.repeat(ramp[..., None], 96, axis=2)  # 48 MB, compresses fast
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(image, np.eye(4)), path)
    before = resident_mb()
    volume = load_volume(path)
    assert resident_mb() - before < 1.3 * volume.data.nbytes / 2**20


@pytest.mark.parametrize(
    ("name", "stored"), [("label.nii.gz", np.uint8), ("label.nii.gz", np.int16), ("label.nrrd", np.uint8)]
)
def test_a_label_drawn_on_a_few_slices_holds_those_slices(tmp_path, resident_mb, name, stored):
    """A radiologist's drawing on 3 slices of a 512 x 512 x 256 grid (64 MB as uint8): read from
    a compressed NIfTI (in the type a label needs, or converted from a wider one) or from an NRRD
    as Slicer uploads it, the same ids, in well under the dense array's memory (the 3 slices and a
    slab of the file read at a time, which the heap keeps for the next read)."""
    shape = (512, 512, 256)
    drawn = np.zeros(shape, dtype=stored)
    rows, cols = np.ogrid[:512, :512]
    for z, label_id in ((20, 1), (21, 3), (240, 1)):  # whole slices written: every page of them touched
        drawn[..., z] = np.where((rows - 256) ** 2 + (cols - 200) ** 2 < 80**2, label_id, 0)
    affine = np.diag([-0.7, -0.7, 1.25, 1.0])  # LPS-like: flipped in the working RAS order
    path = tmp_path / name
    nib.save(nib.Nifti1Image(drawn, affine), tmp_path / "label.nii.gz")
    if name.endswith(".nrrd"):
        itk.imwrite(itk.imread(str(tmp_path / "label.nii.gz"), itk.UC), str(path))
    expected = drawn.astype(np.uint8)
    dense_mb = expected.nbytes / 2**20
    release_freed_memory()  # the read may not reuse heap that earlier work freed and the heap kept
    before = resident_mb()
    label = load_volume(path, label=True)
    held = resident_mb() - before
    np.testing.assert_array_equal(label.to_original(label.data), expected)
    assert label.data.dtype == np.uint8
    assert held < 0.4 * dense_mb, f"{held:.1f} MB held for a {dense_mb:.0f} MB label drawn on 3 slices"
