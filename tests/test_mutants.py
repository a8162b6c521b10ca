"""Behaviour that mutation testing (apps/mutation.sh, docs/testing.md) found unchecked in the core
modules: the edges of volume reading and writing, the placement rules' arithmetic, the way the
supports' predictions are combined and reported, the evaluation's aggregation, and where the app
takes a request's support from. Every expected value is worked out by hand in the test."""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import sys
import time
from pathlib import Path

import itk
import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from app_server import APP
from sdfsmis.config import InferenceConfig
from sdfsmis.evaluation.metrics import margins_over, score_volume, summarise, uncertainty_correlation
from sdfsmis.io.volume import (
    SliceGrid,
    VolumeError,
    check_same_geometry,
    load_volume,
    normalise_intensity,
    present_label_ids,
    read_geometry,
)
from sdfsmis.methods import load_model
from sdfsmis.methods.base import Prediction
from sdfsmis.pipeline import placement
from sdfsmis.pipeline.placement import Placement, Registration, registered_position, relative_position
from sdfsmis.pipeline.segmenter import (
    FusedSlices,
    LabelMaps,
    LabelReport,
    SegmentationResult,
    ServedBy,
    SupportVolume,
    VolumeSegmenter,
    choose_support_slices,
    combine_supports,
    dissent,
    drawn_voxels,
    member_variance,
    review_ids,
    select_label_ids,
    select_supported_ids,
    serving_supports,
    slice_confidence,
)
from sdfsmis.samples.synthetic import make_volume, write_nifti
from sdfsmis.settings import load_config


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine, dtype=data.dtype), str(path))
    return path


# volume: reading, refusing and writing


def test_a_single_frame_4d_volume_is_3d_and_two_frames_are_refused(tmp_path):
    image = np.arange(60, dtype=np.float32).reshape(5, 4, 3, 1)
    path = _nifti(tmp_path / "frame.nii.gz", image)
    volume = load_volume(path)
    assert volume.shape == (5, 4, 3) and read_geometry(path).shape == (5, 4, 3)
    np.testing.assert_array_equal(volume.data, image[..., 0])
    label = load_volume(_nifti(tmp_path / "label.nii.gz", np.ones((5, 4, 3, 1), np.uint8)), label=True)
    assert label.shape == (5, 4, 3)
    two = _nifti(tmp_path / "two.nii.gz", np.zeros((5, 4, 3, 2), np.float32))
    with pytest.raises(VolumeError, match=r"image two.nii.gz has shape \(5, 4, 3, 2\): a 3-D volume is expected"):
        load_volume(two)
    assert read_geometry(two).shape == (5, 4, 3, 2)  # the header as it is: not a single frame


def test_an_image_of_one_slice_is_refused_and_two_slices_are_a_volume(tmp_path):
    with pytest.raises(VolumeError, match=r"image flat.nii.gz has shape \(6, 5, 1\): a 2-D slice"):
        load_volume(_nifti(tmp_path / "flat.nii.gz", np.zeros((6, 5, 1), np.float32)))
    assert load_volume(_nifti(tmp_path / "thin.nii.gz", np.zeros((6, 5, 2), np.float32))).shape == (6, 5, 2)


def test_a_label_of_two_axes_is_refused_by_its_shape(tmp_path):
    # int16: converted to the label's type on the way, which must not fail first with another message
    flat = _nifti(tmp_path / "flat_label.nii.gz", np.ones((6, 5), np.int16))
    with pytest.raises(VolumeError, match=r"label flat_label.nii.gz has shape \(6, 5\): a 3-D volume is expected"):
        load_volume(flat, label=True)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_image_with_non_finite_voxels_is_refused(tmp_path, bad):
    data = np.zeros((4, 4, 3), np.float32)
    data[1, 2, 0] = bad
    with pytest.raises(VolumeError, match="image nan.nii.gz contains NaN or infinite voxels"):
        load_volume(_nifti(tmp_path / "nan.nii.gz", data))


@pytest.mark.parametrize("bad", [-1.0, 1.5, np.nan])
def test_a_label_must_hold_non_negative_integer_ids(tmp_path, bad):
    data = np.ones((4, 4, 3), np.float32)
    data[0, 0, 0] = bad
    with pytest.raises(VolumeError, match="label l.nii.gz must hold non-negative integer label ids"):
        load_volume(_nifti(tmp_path / "l.nii.gz", data), label=True)


def test_an_unreadable_file_is_named_with_its_kind(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(gzip.compress(b"not a volume at all" * 10))
    with pytest.raises(VolumeError, match="^label broken.nii.gz is not a readable NIfTI or NRRD volume"):
        load_volume(broken, label=True)
    with pytest.raises(VolumeError, match="^image broken.nii.gz is not a readable NIfTI or NRRD volume"):
        load_volume(broken)
    with pytest.raises(VolumeError, match="^image broken.nii.gz is not a readable NIfTI or NRRD volume"):
        read_geometry(broken)


def test_a_label_within_the_geometry_tolerance_is_on_the_image_grid(tmp_path):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-120.0, 80.0, 310.0)
    image = read_geometry(_nifti(tmp_path / "img.nii.gz", np.zeros((4, 4, 4), np.float32), affine))
    nudged = affine.copy()
    nudged[0, 1] = 2e-4  # a shear of 2e-4 mm per voxel: within the 1e-3 mm check_same_geometry allows
    check_same_geometry(image, read_geometry(_nifti(tmp_path / "near.nii.gz", np.zeros((4, 4, 4), np.uint8), nudged)))
    moved = affine.copy()
    moved[2, 3] += 0.5  # half a millimetre off: another grid
    with pytest.raises(VolumeError, match="different affines"):
        check_same_geometry(image, read_geometry(_nifti(tmp_path / "far.nii.gz", np.zeros((4, 4, 4)), moved)))
    with pytest.raises(VolumeError, match=r"label short.nii.gz has shape \(4, 4, 3\) but its image img.nii.gz has"):
        check_same_geometry(image, read_geometry(_nifti(tmp_path / "short.nii.gz", np.zeros((4, 4, 3)), affine)))


@pytest.mark.parametrize("top,dtype", [(255, np.uint8), (256, np.uint16)])
def test_a_written_label_is_stored_in_the_smallest_type_that_holds_its_ids(tmp_path, top, dtype):
    query = load_volume(_nifti(tmp_path / "q.nii.gz", np.zeros((4, 3, 2), np.float32)))
    labels = np.zeros((4, 3, 2), np.int32)
    labels[1, 1, 1] = top
    written = nib.load(str(query.save_label(labels, tmp_path / "out.nii.gz")))
    assert written.get_data_dtype() == dtype
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)


def test_a_label_written_for_a_scaled_ct_keeps_its_ids(tmp_path):
    """CT is often stored as int16 with a rescale slope and intercept: the label written in the
    query's header must not inherit them (its ids would be read back scaled)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    image = nib.Nifti1Image(np.full((4, 3, 2), 100, np.int16), np.eye(4), header)
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, str(tmp_path / "ct.nii.gz"))
    query = load_volume(tmp_path / "ct.nii.gz")
    assert query.data.max() == 100 * 2 - 1024  # the image itself is read scaled
    labels = np.zeros((4, 3, 2), np.int32)
    labels[:2] = 3
    written = nib.load(str(query.save_label(labels, tmp_path / "label.nii.gz")))
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
    assert (written.dataobj.slope, written.dataobj.inter) == (1.0, 0.0)


def test_metaimage_and_upper_case_suffixes_are_read_by_itk(tmp_path):
    affine = np.diag([-1.5, -1.5, 4.0, 1.0])
    data = np.arange(60, dtype=np.float32).reshape(5, 4, 3)
    nifti = _nifti(tmp_path / "scan.nii.gz", data, affine)
    itk.imwrite(itk.imread(str(nifti), itk.F), str(tmp_path / "scan.mha"))
    upper = (tmp_path / "scan.mha").rename(tmp_path / "SCAN.MHA")
    volume = load_volume(upper)
    np.testing.assert_array_equal(volume.data, load_volume(nifti).data)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    itk.imwrite(itk.imread(str(nifti), itk.F), str(tmp_path / "scan.mhd"))  # a header and its scan.raw
    header = (tmp_path / "scan.mhd").rename(tmp_path / "SCAN.MHD")
    np.testing.assert_array_equal(load_volume(header).data, volume.data)


def test_label_ids_are_decoded_from_the_stored_type_and_its_scaling(tmp_path):
    raw = np.array([0, 1, 3, 5], np.uint8).reshape(2, 2, 1).repeat(2, axis=2)
    scaled = nib.Nifti1Image(raw, np.eye(4))
    scaled.header.set_slope_inter(2.0, 1.0)  # stored values x 2 + 1 are the ids
    nib.save(scaled, str(tmp_path / "scaled.nii.gz"))
    np.testing.assert_array_equal(load_volume(tmp_path / "scaled.nii.gz", label=True).data, 2 * raw.astype(int) + 1)
    for slope, inter in ((2.0, 0.0), (1.0, 1.0)):  # either alone scales too
        scaled.header.set_slope_inter(slope, inter)
        nib.save(scaled, str(tmp_path / "alone.nii.gz"))
        ids = load_volume(tmp_path / "alone.nii.gz", label=True).data
        np.testing.assert_array_equal(ids, slope * raw + inter)
    nearly = np.zeros((2, 2, 2))
    nearly[1] = 2.0 + 1e-9  # a float label off by rounding is its integer; background 0 stays 0
    ids = load_volume(_nifti(tmp_path / "nearly.nii.gz", nearly), label=True).data
    assert ids.dtype == np.int32 and ids.tolist() == [[[0, 0], [0, 0]], [[2, 2], [2, 2]]]
    top = np.full((2, 2, 2), np.iinfo(np.int32).max, np.int32)  # the largest id an int32 holds
    ids = load_volume(_nifti(tmp_path / "top.nii.gz", top), label=True).data
    assert ids.dtype == np.int32 and (ids == top).all()
    refused = {
        "negative.nii.gz": np.full((2, 2, 2), -1, np.int16),
        "wide.nii.gz": np.full((2, 2, 2), 2**31, np.int64),  # beyond an int32 id
        "huge.nii.gz": np.full((2, 2, 2), 3e9),
    }
    for name, data in refused.items():
        with pytest.raises(VolumeError, match=f"label {name} must hold non-negative integer label ids"):
            load_volume(_nifti(tmp_path / name, data), label=True)


def test_itk_volumes_of_other_types_and_shapes(tmp_path):
    nrrd.write(str(tmp_path / "double.nrrd"), np.full((3, 4, 2), 7.0))  # a label stored as float64
    assert (load_volume(tmp_path / "double.nrrd", label=True).data == 7).all()
    nrrd.write(str(tmp_path / "negative.nrrd"), np.full((3, 4, 2), -1, np.int16))
    with pytest.raises(VolumeError, match="label negative.nrrd must hold non-negative integer label ids"):
        load_volume(tmp_path / "negative.nrrd", label=True)
    nrrd.write(str(tmp_path / "flat.nrrd"), np.zeros((4, 5), np.float32))
    with pytest.raises(VolumeError, match=r"image flat.nrrd has shape \(4, 5\): a 3-D volume is expected"):
        load_volume(tmp_path / "flat.nrrd")
    rgb = {"kinds": ["RGB-color", "domain", "domain", "domain"]}
    nrrd.write(str(tmp_path / "rgb.nrrd"), np.zeros((3, 4, 5, 2), np.uint8), rgb)
    with pytest.raises(
        VolumeError, match=r"label rgb.nrrd has 3 components per voxel \(RGB/vector\), expected one grayscale"
    ):
        load_volume(tmp_path / "rgb.nrrd", label=True)
    nrrd.write(str(tmp_path / "ct.nrrd"), np.full((3, 4, 2), -1000, np.int16))  # held as stored: float32 holds it
    ct = load_volume(tmp_path / "ct.nrrd")
    assert ct.data.dtype == np.int16 and (ct.data == -1000).all()
    nrrd.write(str(tmp_path / "wide.nrrd"), np.full((3, 4, 2), 2**24 + 1, np.int32))  # not exactly: float32
    assert load_volume(tmp_path / "wide.nrrd").data.dtype == np.float32
    with pytest.raises(VolumeError, match=r"^label double.nrrd has 24 voxels"):
        load_volume(tmp_path / "double.nrrd", label=True, max_voxels=23)
    (tmp_path / "broken.nrrd").write_bytes(b"neither NRRD nor anything else")
    with pytest.raises(VolumeError, match="^image broken.nrrd is not a readable NIfTI or NRRD volume"):
        read_geometry(tmp_path / "broken.nrrd")


def test_limits_and_rgb_voxels_are_refused_naming_the_kind(tmp_path):
    path = _nifti(tmp_path / "big.nii.gz", np.ones((5, 4, 3), np.uint8))
    with pytest.raises(
        VolumeError, match=r"^label big.nii.gz has 60 voxels \(shape \(5, 4, 3\)\), more than the limit of 59"
    ):
        load_volume(path, label=True, max_voxels=59)
    rgb = np.zeros((5, 4, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    with pytest.raises(VolumeError, match="^image rgb.nii.gz holds RGB/structured voxels"):
        load_volume(_nifti(tmp_path / "rgb.nii.gz", rgb))


def test_an_nrrd_label_is_written_raw_in_the_query_geometry(tmp_path):
    """What OHIF reads straight into its volume: raw bytes of the smallest type, in the query's voxel
    order, its LPS directions and origin (ITK's frame: x and y of our RAS affine negated)."""
    image, _, affine = make_volume(5, shape=(20, 18, 6), oblique=True, orientation="LPS")
    query = load_volume(write_nifti(tmp_path / "query.nii.gz", image, affine))
    labels = np.zeros((20, 18, 6), np.uint16)  # in the file's own voxel order
    labels[2:9, 3:7, 1:4] = 300
    ras = load_volume(write_nifti(tmp_path / "label.nii.gz", labels, affine, np.uint16), label=True).data
    data, header = nrrd.read(str(query.save_label(ras, tmp_path / "out.nrrd")))
    stored = nib.load(str(tmp_path / "query.nii.gz")).affine
    flip = np.diag([-1.0, -1.0, 1.0])
    assert (header["type"], header["encoding"], header["space"]) == ("unsigned short", "raw", "left-posterior-superior")
    np.testing.assert_allclose(header["space directions"], (flip @ stored[:3, :3]).T, atol=1e-5)  # one row per axis
    np.testing.assert_allclose(header["space origin"], flip @ stored[:3, 3], atol=1e-4)
    np.testing.assert_array_equal(data, labels)
    assert nrrd.read_header(str(query.save_label(ras // 300, tmp_path / "small.nrrd")))["type"] == "unsigned char"
    with pytest.raises(VolumeError, match=r"cannot write a label as out.png: use one of .nii.gz, .nii, .nrrd"):
        query.save_label(ras, tmp_path / "out.png")


def test_constant_intensities_model_grid_padding_and_slice_numbers(tmp_path):
    assert (normalise_intensity(np.full((3, 3, 2), 40.0, np.float32), (0.5, 99.5)) == -1.0).all()  # no range: -1
    ramp = np.arange(5, dtype=np.float32).reshape(1, 1, 5)  # 0..4 onto [-1, 1] linearly: steps of 0.5
    assert normalise_intensity(ramp, (0.0, 100.0)).ravel().tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    grid = SliceGrid(2, 4, 4)  # a 2 x 4 slice padded to 4 x 4 below its rows; at 4 px no resizing
    model = grid.to_model(torch.ones(1, 1, 2, 4), pad_value=-1.0)[0, 0]
    np.testing.assert_allclose(model.numpy(), [[1] * 4, [1] * 4, [-1] * 4, [-1] * 4], atol=1e-6)
    np.testing.assert_allclose(grid.from_model(model[None, None]).numpy()[0, 0], np.ones((2, 4)), atol=1e-6)
    up = load_volume(_nifti(tmp_path / "up.nii.gz", np.zeros((2, 2, 6), np.float32), np.diag([1, 1, 2.0, 1])))
    assert [up.original_slice(z) for z in range(6)] == list(range(6))  # the file's slices run upwards: the same


def test_a_map_is_written_as_float32_in_the_file_geometry_and_ids_are_listed(tmp_path):
    affine = np.diag([-1.5, 2.0, -4.0, 1.0])  # L, A, I: every axis differs from RAS in sign or not
    original = np.arange(24, dtype=np.float32).reshape(4, 3, 2) / 7
    image = nib.Nifti1Image(original.astype(np.int16), affine, dtype=np.int16)
    image.header.set_slope_inter(3.0, -5.0)  # a scaled header must not scale the map
    nib.save(image, str(tmp_path / "q.nii.gz"))
    query = load_volume(tmp_path / "q.nii.gz")
    ras = load_volume(_nifti(tmp_path / "m.nii.gz", original, affine)).data  # the map in RAS order
    written = nib.load(str(query.save_map(ras, tmp_path / "map.nii.gz")))
    assert written.get_data_dtype() == np.float32 and (written.dataobj.slope, written.dataobj.inter) == (1.0, 0.0)
    np.testing.assert_array_equal(np.asarray(written.dataobj), original)
    np.testing.assert_array_equal(written.affine, nib.load(str(tmp_path / "q.nii.gz")).affine)
    assert nib.load(str(query.save_map(ras, tmp_path / "map.nii"))).shape == (4, 3, 2)  # uncompressed too
    with pytest.raises(VolumeError, match=r"cannot write a map as map.nrrd: use .nii.gz or .nii"):
        query.save_map(ras, tmp_path / "map.nrrd")
    labels = np.zeros((3, 3, 4), np.int32)
    labels[0, 0, 3], labels[2, 1, 0], labels[1, 1, 1] = 7, 2, 7
    assert present_label_ids(labels) == [2, 7] and present_label_ids(np.zeros((2, 2, 2), np.int32)) == []
    nib.save(nib.MGHImage(np.zeros((4, 4, 3), np.float32), np.eye(4)), str(tmp_path / "brain.mgz"))
    with pytest.raises(VolumeError, match="^image brain.mgz is a MGHImage, not a NIfTI or NRRD volume"):
        load_volume(tmp_path / "brain.mgz")


def test_the_model_grid_resamples_as_worked_out_by_hand():
    # back to the slice: bilinear, pixel centres aligned (align_corners off): 2 -> 4 px of a row 0, 4
    # samples at -0.25 (edge), 0.25, 0.75, 1.25 (edge) of the input: 0, 1, 3, 4
    grid = SliceGrid(4, 4, 2)
    up = grid.from_model(torch.tensor([[0.0, 4.0], [0.0, 4.0]]).reshape(1, 1, 2, 2))[0, 0]
    np.testing.assert_allclose(up.numpy(), [[0.0, 1.0, 3.0, 4.0]] * 4, atol=1e-6)
    # labels to the model: nearest-exact takes the pixel under each output centre, 3 -> 2 px: 0 and 2
    labels = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    down = SliceGrid(3, 3, 2).to_model(labels, mode="nearest", pad_value=0.0)[0, 0]
    assert down.tolist() == [[1.0, 3.0], [7.0, 9.0]]


# placement: the relative rule and a registration's range, by hand


def test_relative_position_maps_the_annotated_range_with_its_margin():
    config = InferenceConfig()  # z_margin 0.25, min_extent_slices 3
    # slices 8..11 of 16: relative range [0.5, 0.75), margin 0.25 x 0.25 = 0.0625 of the volume;
    # into 16 query slices: floor(0.4375 x 16) = 7 .. ceil(0.8125 x 16) - 1 = 12
    place = relative_position(np.arange(8, 12), 16, 16, config)
    assert place == Placement(7, 12, 8 - 0.6 * 7, 0.6, "relative position")  # scale (11 - 8) / (12 - 7)
    assert place.position(np.array([7, 12])).tolist() == [8.0, 11.0]  # the query range onto the annotated one
    # at the top: 12..15 -> 11 .. ceil(1.0625 x 16) - 1 = 16, kept to 15
    assert relative_position(np.arange(12, 16), 16, 16, config) == Placement(
        11, 15, 12 - 0.75 * 11, 0.75, "relative position"
    )
    # at the bottom: 0..3 -> floor(-1) = -1 kept to 0 .. ceil(0.3125 x 16) - 1 = 4
    assert relative_position(np.arange(0, 4), 16, 16, config) == Placement(0, 4, 0.0, 0.75, "relative position")
    # into a twice as deep query: 8..11 of 16 -> floor(0.4375 x 32) = 14 .. ceil(0.8125 x 32) - 1 = 25
    assert relative_position(np.arange(8, 12), 16, 32, config) == Placement(
        14, 25, 8 - 3 / 11 * 14, 3 / 11, "relative position"
    )


def test_a_sparse_annotation_places_every_query_slice():
    config = InferenceConfig()
    # 5 and 6: 2 slices from first to last, under min_extent_slices (3): where, not how far
    assert relative_position(np.array([5, 6]), 16, 16, config) == Placement(
        0, 15, 5.0, 1 / 15, "all slices: sparse annotation"
    )
    # 5 and 7: 3 slices from first to last (one of them not drawn) is an extent: [5/16, 8/16) + 3/64
    assert relative_position(np.array([5, 7]), 16, 16, config).rule == "relative position"
    # a one-slice query: the annotation's first slice serves it
    assert relative_position(np.arange(4, 9), 16, 1, config) == Placement(0, 0, 4.0, 0.0, "relative position")


SUPPORT_AFFINE = np.diag([2.0, 2.0, 5.0, 1.0])  # 5 mm slices
QUERY_AFFINE = np.diag([2.0, 2.0, 1.25, 1.0])  # 1.25 mm slices: query slice z lies at support slice z / 4


def _drawn(first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
    drawn = np.zeros((8, 8, 40), bool)
    drawn[2:6, 3:5, first : last + 1] = True
    return np.arange(first, last + 1), drawn


def _similarity(shift_mm: float = 0.0, scale: float = 1.0) -> sitk.Similarity3DTransform:
    """Query world point -> support world point: a z shift (and an isotropic scale about the origin)."""
    transform = sitk.Similarity3DTransform()
    transform.SetTranslation((0.0, 0.0, shift_mm))
    transform.SetScale(scale)
    return transform


def test_a_registration_carries_the_annotated_slices_into_the_query():
    config = InferenceConfig()
    annotated, drawn = _drawn(10, 19)  # margin 0.25 x 10 = 2.5 support slices each side
    registration = Registration(_similarity(), SUPPORT_AFFINE, QUERY_AFFINE)
    # support slice = 1.25 z / 5 = z / 4: offset 0, slope 0.25; query range (10 - 2.5) x 4 = 30 .. (19 + 2.5) x 4 = 86
    assert registered_position(registration, annotated, drawn, 120, config) == Placement(
        30, 86, 0.0, 0.25, "registration"
    )
    # the support lies 10 mm higher: support slice = (1.25 z + 10) / 5 = z / 4 + 2 -> (7.5 - 2) x 4 = 22 .. 78
    shifted = Registration(_similarity(10.0), SUPPORT_AFFINE, QUERY_AFFINE)
    assert registered_position(shifted, annotated, drawn, 120, config) == Placement(22, 78, 2.0, 0.25, "registration")
    assert registered_position(shifted, annotated, drawn, 60, config).last == 59  # kept inside a shorter query
    sparse, sparse_drawn = _drawn(10, 11)
    assert registered_position(shifted, sparse, sparse_drawn, 120, config) == Placement(
        0, 119, 2.0, 0.25, "registration (all slices: sparse annotation)"
    )


def test_an_unusable_registration_places_every_slice_by_the_relative_rule():
    config = InferenceConfig()
    annotated, drawn = _drawn(10, 19)
    # the relative rule on 10..19 of 40 into 120: [0.25, 0.5) +- 0.0625 -> floor(22.5) = 22 .. ceil(67.5) - 1 = 67,
    # scale 9 / 45 = 0.2, offset 10 - 0.2 x 22
    fallback = (0, 119, 10 - 0.2 * 22, 0.2)
    cases = {
        "all slices: registration failed (no overlap)": Registration(
            None, SUPPORT_AFFINE, QUERY_AFFINE, "registration failed (no overlap)"
        ),
        "all slices: the registered structure lies outside the query": Registration(
            _similarity(1000.0), SUPPORT_AFFINE, QUERY_AFFINE
        ),
        "all slices: registration flattened the z-axis": Registration(
            _similarity(scale=1e-7), SUPPORT_AFFINE, QUERY_AFFINE
        ),
    }
    for rule, registration in cases.items():
        place = registered_position(registration, annotated, drawn, 120, config)
        assert (place.first, place.last, place.offset, place.scale, place.rule) == pytest.approx((*fallback, rule))


def test_registered_ranges_are_kept_inside_the_query():
    config = InferenceConfig()
    identity = Registration(_similarity(), SUPPORT_AFFINE, QUERY_AFFINE)
    low, low_drawn = _drawn(1, 10)  # (1 - 2.5) x 4 = -6 kept to 0 .. (10 + 2.5) x 4 = 50
    assert registered_position(identity, low, low_drawn, 120, config) == Placement(0, 50, 0.0, 0.25, "registration")
    # shifted 10 mm: from (7.5 - 2) x 4 = 22; a 23-slice query holds it on its last slice only
    shifted = Registration(_similarity(10.0), SUPPORT_AFFINE, QUERY_AFFINE)
    annotated, drawn = _drawn(10, 19)
    assert registered_position(shifted, annotated, drawn, 23, config) == Placement(22, 22, 2.0, 0.25, "registration")
    assert placement.same_volume(5).position(np.arange(5)).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_tilted_registration_follows_the_structure_in_plane_centre():
    """A rotation about the x and y axes mixes the query's x and y into the support's z: the support
    slice of a query slice depends on where, in plane, the structure lies. Worked out here with numpy."""
    support_affine, query_affine = SUPPORT_AFFINE.copy(), QUERY_AFFINE.copy()
    support_affine[:3, 3], query_affine[:3, 3] = (10.0, -20.0, 30.0), (-4.0, 6.0, -8.0)
    tilt_x = np.array([[1.0, 0.0, 0.0], [0.0, 0.96, -0.28], [0.0, 0.28, 0.96]])
    tilt_y = np.array([[0.8, 0.0, 0.6], [0.0, 1.0, 0.0], [-0.6, 0.0, 0.8]])
    rotation = tilt_x @ tilt_y  # query world -> support world: x and y both reach the support's z
    transform = sitk.Similarity3DTransform()
    transform.SetMatrix(rotation.flatten().tolist())
    annotated, drawn = _drawn(10, 19)
    centre = support_affine @ [3.5, 3.5, 14.5, 1.0]  # the drawn block's mean voxel, in the world
    in_plane = np.linalg.solve(query_affine[:3, :3], rotation.T @ centre[:3] - query_affine[:3, 3])[:2]

    def support_slice(z: float) -> float:
        world = rotation @ (query_affine[:3, :3] @ [*in_plane, z] + query_affine[:3, 3])
        return float(np.linalg.solve(support_affine[:3, :3], world - support_affine[:3, 3])[2])

    offset, slope = support_slice(0.0), support_slice(1.0) - support_slice(0.0)
    first, last = (10 - 2.5 - offset) / slope, (19 + 2.5 - offset) / slope
    place = registered_position(
        Registration(transform, support_affine, query_affine), annotated, drawn, 200, InferenceConfig()
    )
    assert (place.first, place.last) == (int(np.floor(first)), int(np.ceil(last)))
    assert (place.offset, place.scale) == pytest.approx((offset, slope))
    assert place.scale == pytest.approx(0.96 * 0.8 * 1.25 / 5)  # the tilt shortens the query's slices along z


def test_a_registration_itk_cannot_run_says_why(tmp_path):
    rng = np.random.default_rng(0)
    support = load_volume(_nifti(tmp_path / "s.nii.gz", rng.standard_normal((40, 40, 20)).astype(np.float32)))
    query = load_volume(_nifti(tmp_path / "q.nii.gz", rng.standard_normal((3, 3, 2)).astype(np.float32)))
    intensities = support.intensity((0.5, 99.5)), query.intensity((0.5, 99.5))
    result = placement.register_volumes(support, intensities[0], query, intensities[1])  # too small to register
    # ITK's own reason (the last line of its message, not the source file it names before)
    assert result.transform is None and result.problem.startswith("registration failed (ITK ERROR: ")
    np.testing.assert_array_equal(result.query_affine, np.eye(4))


# inference: supports chosen, predictions combined, results reported


def test_support_slices_are_spread_at_odd_sixths_of_the_annotation():
    annotated = np.arange(10, 22)  # 12 slices: 1/6, 1/2, 5/6 -> positions 2, 6, 10
    assert choose_support_slices(annotated, 3) == [12, 16, 20]
    # 5 of them at 0.1, 0.3, 0.5, 0.7, 0.9 -> positions 1, 3, 6, 8, 10
    assert choose_support_slices(annotated, 5) == [11, 13, 16, 18, 20]
    assert choose_support_slices(np.array([4, 9]), 3) == [4, 9]  # fewer than asked: all of them
    assert all(isinstance(z, int) for z in choose_support_slices(np.array([4, 9], np.int64), 3))


def _label_volume(path: Path, ids: list[int]) -> object:
    data = np.zeros((4, 4, 4), np.uint8)
    for k, label_id in enumerate(ids):
        data[k, 0, 0] = label_id
    return load_volume(_nifti(path, data), label=True)


@pytest.mark.parametrize("order", ["C", "F"])
def test_drawn_voxels_are_one_label_id_and_its_slices(order):
    label = np.zeros((5, 4, 6), np.uint8, order=order)
    label[1, 2, 1] = label[0, 0, 4] = 3
    label[2, 2, 2] = 1  # another id on its own slice
    drawn, annotated = drawn_voxels(label, 3)
    np.testing.assert_array_equal(drawn, label == 3)
    assert annotated.tolist() == [1, 4] and drawn.flags.f_contiguous == (order == "F")
    empty, none = drawn_voxels(label, 7)
    assert not empty.any() and none.tolist() == []


def test_label_ids_come_from_the_supports_and_unknown_ones_are_named(tmp_path):
    a = _label_volume(tmp_path / "a.nii.gz", [1, 3])
    b = _label_volume(tmp_path / "b.nii.gz", [2, 3])
    assert select_label_ids(a) == [1, 3] and select_label_ids(a, [3]) == [3]
    with pytest.raises(VolumeError, match=r"label ids \[2\] are not in the support label a.nii.gz \(it has \[1, 3\]\)"):
        select_label_ids(a, [2, 3])
    with pytest.raises(VolumeError, match="support label empty.nii.gz is empty: draw the structure"):
        select_label_ids(_label_volume(tmp_path / "empty.nii.gz", []))
    supports = [SupportVolume(a, a), SupportVolume(b, b)]
    assert select_supported_ids(supports) == [1, 2, 3] and select_supported_ids(supports, [2]) == [2]
    with pytest.raises(
        VolumeError,
        match=r"label ids \[4\] are not in the support label\(s\) a.nii.gz, b.nii.gz \(they have \[1, 2, 3\]\)",
    ):
        select_supported_ids(supports, [4])


def _pixel(*values: float) -> torch.Tensor:
    """Per-member probabilities of one 1 x 1 query slice -> [1, 1, 1, 1] tensors."""
    return [torch.tensor(v).reshape(1, 1, 1, 1) for v in values]


def test_two_supports_are_weighted_and_their_disagreement_is_the_uncertainty():
    weights = torch.tensor([[0.75, 0.25]])
    first, second = (Prediction(p) for p in _pixel(0.2, 0.8))
    combined = combine_supports([first, second], weights)
    assert combined.probability.item() == pytest.approx(0.75 * 0.2 + 0.25 * 0.8)  # 0.35
    assert combined.variants.shape == (1, 2, 1, 1, 1)  # [B, k, members, H, W]
    variance = member_variance(combined, weights)
    assert variance.item() == pytest.approx(0.75 * (0.2 - 0.35) ** 2 + 0.25 * (0.8 - 0.35) ** 2)  # 0.0675
    assert dissent(combined, weights, 0.5).item() == pytest.approx(0.25)  # the 0.25-weighted support says yes
    # the result (0.35) says no but a member says yes: that voxel's variance counts; 1 - 4 x 0.0675
    assert slice_confidence(combined, variance, 0.5).item() == pytest.approx(1 - 4 * 0.0675)
    quiet = combine_supports([Prediction(p) for p in _pixel(0.1, 0.3)], weights)
    assert slice_confidence(quiet, member_variance(quiet, weights), 0.5).item() == 1.0  # nothing foreground
    alone = combine_supports([first], torch.tensor([[1.0]]))
    assert alone.variants is None and member_variance(alone, torch.tensor([[1.0]])) is None


def test_dpl_variants_are_the_members_of_one_support():
    variants = torch.tensor([0.1, 0.3, 0.6, 0.8]).reshape(1, 4, 1, 1)
    weights = torch.tensor([[1.0]])
    combined = combine_supports([Prediction(variants.mean(dim=1, keepdim=True), variants)], weights)
    assert combined.probability.item() == pytest.approx(0.45)
    # equal members: mean 0.45, variance (0.35^2 + 0.15^2 + 0.15^2 + 0.35^2) / 4
    assert member_variance(combined, weights).item() == pytest.approx(0.29 / 4)
    assert dissent(combined, weights, 0.5).item() == pytest.approx(0.5)  # split evenly


def test_reports_order_review_slices_and_summarise_the_run(tmp_path):
    report = LabelReport([3, 9], [10, 11, 12, 13], confidence=[0.9, 1.0, 0.5, 0.7])
    assert report.review_slices(2) == [12, 13] and report.review_slices(5) == [12, 13, 10]  # certain slices never
    assert LabelReport([3], [10]).review_slices(5) == []  # no confidence, nothing to review
    placed = Placement(10, 13, 1.5, 0.5, "relative position")
    report.served_by = [ServedBy("case_a", [3, 9], placed)]
    assert report.served_by[0].describe() == {
        "image": "case_a",
        "support_slices": [3, 9],
        "rule": "relative position",
        "query_slices": [10, 13],
    }
    labels = np.zeros((2, 2, 4), np.int32)
    labels[0, 0, :] = 1
    labels[1, 1, 0] = 2
    review = np.zeros_like(labels, bool, order="F")
    review[0, 0, 2] = True  # only label 1 has voxels to review
    whole = (slice(0, 2), slice(0, 2), slice(0, 4))
    drawn = np.zeros_like(review)
    drawn[1, 0, 1] = True  # slice 1 is drawn: the model's batches hold slices 0 and 2-3

    def maps(review: np.ndarray, report: LabelReport) -> LabelMaps:
        rows = [np.array([0]), np.array([2, 3])]
        doubt = np.zeros_like(review, np.float32)
        parts = [FusedSlices.of(doubt[..., r], review[..., r], doubt[..., r], review[..., r]) for r in rows]
        return LabelMaps(whole, parts, rows, [b"a", b"b"], drawn, drawn.any(axis=(0, 1)), report)

    reports = {1: report, 2: LabelReport([0], [0, 1], voxels=1)}
    doubt = {k: maps(review if k == 1 else np.zeros_like(review), reports[k]) for k in reports}
    result = SegmentationResult(labels, reports, seconds=1.23456, doubt=doubt)
    with_review, ids = result.with_review()
    assert ids == {1: 101}
    expected = labels.copy()
    expected[0, 0, 2] = 101
    np.testing.assert_array_equal(with_review, expected)
    summary = result.summary()
    assert summary["query_slices"] == {"1": [10, 13], "2": [0, 1]}
    assert summary["seconds"] == 1.235 and summary["seconds_per_slice"] == round(1.23456 / 6, 4)  # 4 + 2 slices
    assert summary["labels"] == {"1": 0, "2": 1} and summary["support_slices"] == {"1": [3, 9], "2": [0]}
    # slices numbered as in a query file whose slice axis runs downwards (6 slices): z -> 5 - z
    query = load_volume(_nifti(tmp_path / "down.nii.gz", np.zeros((2, 2, 6), np.float32), np.diag([1, 1, -2.0, 1])))
    flipped = SegmentationResult(labels, {1: LabelReport([0], [1, 2], confidence=[0.4, 0.9])})
    assert flipped.confidence(query) == {1: {4: 0.4, 3: 0.9}}
    assert flipped.review_slices(query) == {1: [4, 3]}


def test_combining_edges_per_pixel_and_beyond_an_even_split():
    weights = torch.tensor([[0.25, 0.75]])
    # two pixels (rows): the first where only the 0.75-weighted support says yes, the second where none does
    first = Prediction(torch.tensor([0.2, 0.1]).reshape(1, 1, 2, 1))
    second = Prediction(torch.tensor([0.8, 0.3]).reshape(1, 1, 2, 1))
    combined = combine_supports([first, second], weights)
    # the majority (0.75) votes yes on the first pixel: a quarter dissents; none on the second
    assert dissent(combined, weights, 0.5).flatten().tolist() == pytest.approx([0.25, 0.0])
    variance = member_variance(combined, weights)
    expected = [0.25 * 0.75 * (0.8 - 0.2) ** 2, 0.25 * 0.75 * (0.3 - 0.1) ** 2]  # w1 w2 (p1 - p2)^2
    assert variance.flatten().tolist() == pytest.approx(expected)
    # only the first pixel is foreground (result 0.65 or a member): its variance alone, 1 - 4 x 0.0675
    assert slice_confidence(combined, variance, 0.5).item() == pytest.approx(1 - 4 * expected[0])
    at = combine_supports([Prediction(torch.full((1, 1, 1, 1), 0.5))] * 2, torch.tensor([[0.5, 0.5]]))
    assert dissent(at, torch.tensor([[0.5, 0.5]]), 0.5).item() == 0.0  # exactly at the threshold is a yes
    alone = combine_supports([first], torch.tensor([[1.0]]))
    assert torch.equal(alone.probability, first.probability)


def test_supports_review_ids_and_summaries_at_their_edges(tmp_path):
    assert choose_support_slices(np.array([5, 6, 8, 9]), 3) == [5, 8, 9]  # 1/6, 1/2, 5/6 of 4: 0, 2, 3
    one = _label_volume(tmp_path / "one.nii.gz", [1, 3])
    assert select_supported_ids([SupportVolume(one, one)], [3]) == [3]
    assert review_ids([155]) == {155: 255}  # 255 still fits a uint8 labelmap
    assert review_ids(range(2, 256)) == {2: 1}  # only id 1 is free: the first label gets it, the rest none
    placed = Placement(0, 3, 0.0, 1.0, "same volume")
    report = LabelReport([2], [0, 1, 2, 3], confidence=[0.2, 0.9, 0.1, 0.5], served_by=[ServedBy("p", [2], placed)])
    result = SegmentationResult(np.zeros((2, 2, 4), np.int32), {1: report}, seconds=2.0)
    summary = result.summary()
    assert summary["supports"] == {
        "1": [{"image": "p", "support_slices": [2], "rule": "same volume", "query_slices": [0, 3]}]
    }
    assert summary["seconds_per_slice"] == 0.5
    assert SegmentationResult(np.zeros((2, 2, 4), np.int32), seconds=2.0).summary()["seconds_per_slice"] == 2.0
    query = load_volume(_nifti(tmp_path / "q.nii.gz", np.zeros((2, 2, 4), np.float32)))
    assert result.review_slices(query, 1) == {1: [2]} and result.review_slices(query) == {1: [2, 0, 3, 1]}


def test_serving_supports_with_three_per_slice_and_on_a_support():
    # position 4 between supports 3 and 6 (and 10): the pair decides linearly, 10 only doubts
    serving = serving_supports(np.array([4.0, 6.0]), [3, 6, 10], 3)
    assert serving.index[0].tolist() == [0, 1, 2]
    np.testing.assert_allclose(serving.weights[0], [2 / 3, 1 / 3, 0.0], atol=1e-6)
    assert serving.index[1, 0] == 1 and serving.weights[1].tolist() == [1.0, 0.0, 0.0]  # on a support: it alone


def _segmenter(backbone: Path, **inference) -> VolumeSegmenter:
    """A random tiny DPL (seed 0): its masks mean nothing, but what the pipeline does with them is
    checked whatever they are."""
    config = load_config(backbone=backbone)
    config.inference = dataclasses.replace(config.inference, **inference)
    torch.manual_seed(0)
    return VolumeSegmenter(load_model("dpl", backbone, config).eval(), config.inference, progress=False)


def _segment(segmenter: VolumeSegmenter, supports: list[SupportVolume], query, label_ids=None) -> SegmentationResult:
    """``segment_with``, and what a result must say about its own labels whatever the model predicted."""
    started = time.perf_counter()
    result = segmenter.segment_with(supports, query, label_ids)
    assert 0 < result.seconds <= time.perf_counter() - started  # its own time, within the call
    depth = query.data.shape[2]
    for label_id, report in result.reports.items():
        assert report.voxels == int((result.labels == label_id).sum()), label_id
        elsewhere = np.setdiff1d(np.arange(depth), report.query_slices)
        assert not (result.labels[..., elsewhere] == label_id).any(), label_id  # only where it was segmented
        assert [s.name for s in report.served_by] == [s.name for s in supports if (s.label.data == label_id).any()]
        if report.confidence is not None:
            assert all(0.0 <= c <= 1.0 and round(c, 4) == c for c in report.confidence), label_id
            assert not (result.review(label_id) & (result.uncertainty <= 0)).any()  # dissent needs disagreement
    if result.uncertainty is not None:  # a variance of probabilities: at most 1/4
        assert (
            np.isfinite(result.uncertainty).all() and 0 <= result.uncertainty.min() <= result.uncertainty.max() <= 0.25
        )
    assert result.summary()["query_slices"] == {
        str(k): [min(r.query_slices), max(r.query_slices)] for k, r in result.reports.items()
    }
    return result


def _patient(folder: Path, seed: int, depth: int) -> SupportVolume:
    image, truth, affine = make_volume(seed, shape=(48, 48, depth))
    name = f"patient{seed}"
    return SupportVolume(
        load_volume(write_nifti(folder / f"{name}.nii.gz", image, affine)),
        load_volume(write_nifti(folder / f"{name}_label.nii.gz", truth, affine, np.uint8), label=True),
        name,
    )


@pytest.mark.parametrize("grounding", [True, False])
def test_a_volume_segmented_from_its_own_slices_reports_them_as_certain(tiny_backbone, tmp_path, grounding):
    image, truth, affine = make_volume(41, shape=(48, 48, 16))
    drawn = np.zeros_like(truth)
    organ = np.flatnonzero((truth == 1).any(axis=(0, 1)))
    kept = organ[[0, len(organ) // 2, -1]]
    drawn[..., kept] = np.where(truth[..., kept] == 1, 1, 0)
    spleen = np.flatnonzero((truth == 4).any(axis=(0, 1)))[0]
    drawn[..., spleen] = np.where(truth[..., spleen] == 4, 4, drawn[..., spleen])
    query = load_volume(write_nifti(tmp_path / "image.nii.gz", image, affine))
    label = load_volume(write_nifti(tmp_path / "label.nii.gz", drawn, affine, np.uint8), label=True)
    own = [SupportVolume(query, label, "drawn")]
    results = [_segment(_segmenter(tiny_backbone, batch_size=b, grounding=grounding), own, query) for b in (1, 16)]
    for result in results:
        for label_id, slices in ((1, kept), (4, [spleen])):
            report = result.reports[label_id]
            assert [s.placement.rule for s in report.served_by] == ["same volume"]
            assert report.support_slices == [int(z) for z in slices]
            segmented = report.query_slices  # a range around the drawn slices (how far: the grounding's tests)
            assert segmented == list(range(segmented[0], segmented[-1] + 1)) and set(slices) <= set(segmented)
            assert grounding or segmented == list(range(16))  # not grounded: every slice of the volume
            certain = [report.confidence[report.query_slices.index(z)] for z in slices]
            assert certain == [1.0] * len(slices) and min(report.confidence) < 1.0  # drawn slices only are certain
            np.testing.assert_array_equal(result.labels[..., slices] == label_id, drawn[..., slices] == label_id)
            assert not result.review(label_id)[..., slices].any()  # nothing to review where it was drawn
    one, batched = results  # the query batches change nothing
    np.testing.assert_array_equal(one.labels, batched.labels)
    np.testing.assert_allclose(one.uncertainty, batched.uncertainty, atol=1e-6)
    assert one.reports[1].confidence == pytest.approx(batched.reports[1].confidence, abs=1e-4)


def test_another_patients_support_is_placed_by_the_relative_rule(tiny_backbone, tmp_path):
    support, query = _patient(tmp_path, 42, 16), _patient(tmp_path, 43, 24).image
    segmenter = _segmenter(tiny_backbone, placement="relative")
    result = _segment(segmenter, [support], query, [1, 4])
    assert set(result.reports) == {1, 4}  # the labels asked for, not every drawn one
    assert set(segmenter.segment(support.image, support.label, query, [4]).reports) == {4}
    for label_id in (1, 4):
        report = result.reports[label_id]
        annotated = np.flatnonzero((support.label.data == label_id).any(axis=(0, 1)))
        # the relative rule (checked by hand above) decides the slices, from 3 support slices spread over the organ
        place = relative_position(annotated, 16, 24, InferenceConfig())
        assert [s.placement.rule for s in report.served_by] == ["relative position"]
        assert report.query_slices == list(range(place.first, place.last + 1))
        assert report.support_slices == choose_support_slices(annotated, 3)


@pytest.mark.parametrize("grounding", [True, False])
def test_registered_supports_are_placed_by_their_registration(tiny_backbone, tmp_path, grounding):
    supports = [_patient(tmp_path, 44, 16), _patient(tmp_path, 45, 20)]
    query = _patient(tmp_path, 46, 24).image
    result = _segment(_segmenter(tiny_backbone, grounding=grounding), supports, query, [1])
    config = InferenceConfig()
    report = result.reports[1]
    for support, served in zip(supports, report.served_by):
        drawn = support.label.data == 1
        clip = config.clip_percentiles
        registration = placement.register_volumes(
            support.image, support.image.intensity(clip), query, query.intensity(clip)
        )
        annotated = np.flatnonzero(drawn.any(axis=(0, 1)))
        expected = registered_position(registration, annotated, drawn, 24, config)  # checked by hand above
        assert served.placement == expected and served.support_slices == choose_support_slices(annotated, 3)
    assert report.support_slices == [z for s in report.served_by for z in s.support_slices]
    first = min(s.placement.first for s in report.served_by)
    assert report.query_slices == list(range(first, max(s.placement.last for s in report.served_by) + 1))


def test_a_method_without_members_reports_no_confidence(tiny_backbone, tmp_path):
    """SD-FSMIS with one support per query slice: one prediction, nothing to disagree."""
    config = load_config(backbone=tiny_backbone)
    config.inference = dataclasses.replace(config.inference, supports_per_query=1, placement="relative")
    torch.manual_seed(0)
    segmenter = VolumeSegmenter(load_model("sdfsmis", tiny_backbone, config).eval(), config.inference, progress=False)
    support, query = _patient(tmp_path, 47, 16), _patient(tmp_path, 48, 16).image
    result = _segment(segmenter, [support], query, [4])
    assert result.uncertainty is None and result.doubt == {} and result.reports[4].confidence is None
    assert result.confidence(query) == {} and result.review_slices(query) == {}


# evaluation: aggregation


def test_a_structure_absent_from_prediction_and_truth_scores_one():
    empty = np.zeros((6, 6, 6), bool)
    score = score_volume(empty, empty, (1.0, 1.0, 1.0))
    assert score["dice"] == 1.0 and np.isnan(score["hd95"]) and np.isnan(score["assd"])
    truth = np.zeros_like(empty)
    truth[1:5, 1:5, 1:5] = True
    shifted = np.zeros_like(empty)
    shifted[2:6, 1:5, 1:5] = True  # one voxel along x: overlap 3 x 4 x 4 of 64 each -> Dice 96 / 128
    assert score_volume(shifted, truth, (1.0, 1.0, 1.0))["dice"] == pytest.approx(0.75)


def _record(method, organ, fold, dice, **extra) -> dict:
    return {"method": method, "organ": organ, "fold": fold, "dice": dice, "hd95": 2.0, "assd": 1.0} | {
        "seconds": 1.0,
        "slices": 10,
        **extra,
    }


def test_summary_means_per_fold_then_over_folds_and_counts_failures():
    records = [
        _record("m", "liver", 0, 1.0, case="a", seconds=2.0, slices=10),
        _record("m", "liver", 0, 0.0, case="b", hd95=float("inf"), seconds=4.0, slices=10),
        _record("m", "liver", 1, 0.8, case="c", hd95=4.0, seconds=6.0, slices=20),
        {"method": "m", "organ": "spleen", "fold": 0, "failed": "RuntimeError: x"},
        {"method": "m", "organ": "spleen", "fold": 1, "failed": "RuntimeError: y"},
    ]
    summary = summarise(records)["m"]
    liver = summary["classes"]["liver"]
    assert liver["dice_per_fold"] == [0.5, 0.8] and liver["dice"] == pytest.approx(0.65)  # not 1.8 / 3 = 0.6
    assert liver["hd95"] == pytest.approx((2.0 + 4.0) / 2)  # fold 0's infinite distance left out: 2.0, then 4.0
    assert (liver["volumes"], liver["empty_predictions"], liver["failed"]) == (3, 1, 0)
    spleen = summary["classes"]["spleen"]  # every volume failed: listed, never scored
    assert spleen["dice"] is None and spleen["failed"] == 2 and spleen["volumes"] == 0
    assert summary["mean"]["dice"] == pytest.approx(0.65)  # the failed class is not a zero
    assert summary["seconds_per_slice"] == pytest.approx(12.0 / 40)


def test_too_few_or_constant_slices_have_no_rank_correlation():
    base = {"method": "m", "fold": 0, "organ": "liver"}
    two = uncertainty_correlation([{**base, "slice_dice": [1.0, 0.5], "slice_confidence": [0.9, 0.2]}])
    assert two["all"] == {"spearman": None, "p_value": None, "slices": 2}
    flat = uncertainty_correlation([{**base, "slice_dice": [1.0, 0.5, 0.0], "slice_confidence": [0.5, 0.5, 0.5]}])
    assert flat["classes"]["liver"]["spearman"] is None and flat["classes"]["liver"]["slices"] == 3


def test_margins_over_the_baseline_per_class():
    records = [
        _record("copy", "liver", 0, 0.6, case="c1"),  # the baseline first: the others still get their margins
        _record("copy", "liver", 0, 0.5, case="c2"),
        _record("copy", "spleen", 0, 0.7, case="c1"),
        {"method": "a", "organ": "kidney", "fold": 0, "case": "c1", "failed": "RuntimeError: x"},  # no Dice
        _record("a", "liver", 0, 0.8, case="c1"),
        _record("a", "liver", 0, 0.4, case="c2"),
        _record("a", "spleen", 0, 0.7, case="c1"),  # a tie is not better
        {"method": "a", "organ": "spleen", "fold": 0, "case": "c2", "failed": "RuntimeError: x"},
        _record("a", "bladder", 0, 0.9, case="c1"),  # a class the baseline has not: no margin
    ]
    summary = summarise(records)
    margins_over(summary, records, "copy")
    versus = summary["a"]["vs_copy"]
    assert set(versus["classes"]) == {"liver", "spleen"}
    assert versus["classes"]["liver"] == {"margin": pytest.approx(0.6 - 0.55), "better": 1, "volumes": 2}
    assert versus["classes"]["spleen"] == {"margin": pytest.approx(0.0), "better": 0, "volumes": 1}
    assert versus["mean"] == pytest.approx(0.05 / 2)
    assert "vs_copy" not in summary["copy"]
    without = summarise(records[4:])
    margins_over(without, records[4:], "copy")  # no baseline in the summary: nothing added
    assert "vs_copy" not in without["a"]
    apart = summarise([records[0], records[8]])  # nothing both scored: no mean either
    margins_over(apart, [records[0], records[8]], "copy")
    assert apart["a"]["vs_copy"] == {"classes": {}, "mean": None}


def test_surface_distances_follow_the_spacing_and_failed_records_are_left_out():
    truth = np.zeros((12, 12, 8), bool)
    truth[3:9, 3:9, 2:6] = True
    same = score_volume(truth, truth, (1.0, 1.0, 1.0))
    assert (same["dice"], same["hd95"], same["assd"]) == (1.0, 0.0, 0.0)
    moved = np.roll(truth, 1, axis=0)
    fine, coarse = (score_volume(moved, truth, (s, s, s)) for s in (1.0, 2.0))
    assert fine["assd"] > 0 and coarse["assd"] == pytest.approx(2 * fine["assd"])  # millimetres, not voxels
    assert coarse["hd95"] == pytest.approx(2 * fine["hd95"])
    base = {"method": "m", "fold": 0, "organ": "liver"}
    records = [
        {**base, "failed": "RuntimeError: x", "slice_dice": [0.0, 1.0, 0.5], "slice_confidence": [0.9, 0.1, 0.5]},
        {**base, "slice_dice": [1.0, 0.5, 0.0], "slice_confidence": [0.9, 0.6, 0.2]},  # after a failed one
    ]
    assert uncertainty_correlation(records)["all"]["slices"] == 3  # the failed volume's slices left out
    flat = uncertainty_correlation([{**base, "slice_dice": [1.0, 1.0, 1.0], "slice_confidence": [0.9, 0.6, 0.2]}])
    assert flat["all"]["spearman"] is None  # every slice perfect: no ranking of errors
    assert summarise([_record("m", "liver", 0, 1.0, seconds=3.0, slices=1)])["m"]["seconds_per_slice"] == 3.0


# the app: where a request's support comes from


@pytest.fixture(scope="module")
def support_module():
    """The app's own ``lib`` as MONAI Label loads it (appended: a copy already on the path wins)."""
    if str(APP) not in sys.path:
        sys.path.append(str(APP))
    return importlib.import_module("lib.infers.support")


def test_label_names_colours_and_support_ids_from_what_clients_send(support_module):
    s = support_module
    info = [{"name": "liver", "idx": 1, "color": [10, 20, 30, 255]}, {"name": "spleen", "idx": 4}, {"idx": 5}]
    assert s.label_names_from_info(info) == {1: "liver", 4: "spleen"}
    assert s.label_names_from_info({"liver": 1, "kidney": "2"}) == {1: "liver", 2: "kidney"}
    assert s.label_names_from_info(None) == {}
    assert s.label_colours_from_info(info) == {1: [10, 20, 30]} and s.label_colours_from_info({"liver": 1}) == {}
    # its own colour, else the anatomy colour of its name (any case), else the palette's
    assert s.label_colour({"idx": 1, "name": "x", "color": (1, 2, 3, 4)}) == [1, 2, 3]
    assert s.label_colour({"idx": 9, "name": "Spleen"}) == [157, 108, 162]  # monailabel's anatomy table
    from sdfsmis.dicom.seg import palette_colour

    assert s.label_colour({"idx": 3, "name": "tumour 3"}) == list(palette_colour(3))
    assert s.support_ids(" a , ,b ") == ["a", "b"] and s.support_ids(["a", " b "]) == ["a", "b"]
    for nothing in ("", " , ", []):
        with pytest.raises(s.SupportNotFound, match="param 'support' names no image"):
            s.support_ids(nothing)
    support = s.Support(Path("i.nii.gz"), Path("l.nii.gz"), "support_param", "case_a", {1: "liver"}, {1: [1, 2, 3]})
    assert support.name(1) == "liver" and support.name(2) == "label_2" and support.colour(1) == [1, 2, 3]
    assert support.colour(2) == list(palette_colour(2))
    assert support.what() == "support 'case_a' (param 'support')"
    assert s.review_name("liver") == "liver - review" and s.is_review_name("liver - review")
    assert not s.is_review_name("liver")


def test_a_support_loads_with_its_review_segment_as_background(support_module, tmp_path):
    s = support_module
    image = _nifti(tmp_path / "img.nii.gz", np.zeros((4, 4, 3), np.float32))
    label = np.zeros((4, 4, 3), np.uint8)
    label[0, 0, 0], label[1, 1, 1] = 1, 101
    names = {1: "liver", 101: "liver - review"}
    support = s.Support(image, _nifti(tmp_path / "l.nii.gz", label), "uploaded_label", None, names)
    loaded = support.volume()
    assert set(np.unique(loaded.label.data)) == {0, 1} and loaded.name == "uploaded label"
    only_review = np.where(label == 1, 0, label).astype(np.uint8)
    alone = s.Support(image, _nifti(tmp_path / "r.nii.gz", only_review), "same_image_label", "case_b", names)
    with pytest.raises(VolumeError, match=r"^the final label of 'case_b': support label r.nii.gz is empty"):
        alone.load()
    other = _nifti(tmp_path / "o.nii.gz", label, np.diag([2.0, 1, 1, 1]))
    latest = s.Support(image, other, "latest_label", "case_c")
    with pytest.raises(VolumeError, match=r"^support 'case_c' \(the newest final label\): .*different affines"):
        latest.load()


def test_a_support_names_itself_and_loads_within_the_limits(support_module, tmp_path):
    s = support_module
    image = _nifti(tmp_path / "img.nii.gz", np.zeros((4, 4, 3), np.float32))
    label = _nifti(tmp_path / "l.nii.gz", np.ones((4, 4, 3), np.uint8))
    sources = {
        "uploaded_label": "the label uploaded with the request",
        "support_param": "support 'p' (param 'support')",
        "same_image_label": "the final label of 'p'",
        "latest_label": "support 'p' (the newest final label)",
    }
    for source, words in sources.items():
        assert s.Support(image, label, source, "p").what() == words
    support = s.Support(image, label, "same_image_label", "p", {2: "spleen"})
    assert support.colour(2) == [157, 108, 162]  # by its name, monailabel's anatomy table
    query = load_volume(image)
    loaded_image, loaded_label = support.load(query)
    assert loaded_image is query and loaded_label.data.shape == (4, 4, 3)  # the query itself, not read twice
    assert support.volume(query).image is query
    with pytest.raises(VolumeError, match=r"^the final label of 'p': label l.nii.gz has 48 voxels"):
        support.load(query, max_voxels=47)
    with pytest.raises(VolumeError, match=r"^the final label of 'p': image img.nii.gz has 48 voxels"):
        support.volume(None, max_voxels=47)


def test_the_support_of_a_request_follows_the_documented_precedence(support_module, tmp_path):
    from monailabel.datastore.local import LocalDatastore

    s = support_module
    studies = tmp_path / "studies"
    studies.mkdir()
    for case in ("a", "b", "c", "d"):
        _nifti(studies / f"{case}.nii.gz", np.zeros((4, 4, 3), np.float32))
    datastore = LocalDatastore(str(studies), extensions=("*.nii.gz",))
    with pytest.raises(s.SupportNotFound) as nothing:
        s.resolve_supports({}, datastore, "a")
    assert str(nothing.value) == (
        "no support: annotate the structure on one slice and submit it as a final label ('Submit Label' in "
        "Slicer), upload a label with the request, or name a labelled image in param 'support'"
    )
    label = _nifti(tmp_path / "label.nii.gz", np.ones((4, 4, 3), np.uint8))
    for case, stamp in (("a", 5), ("b", 2)):
        info = {"label_info": [{"name": "liver", "idx": 1, "color": [1, 2, 3]}, {"name": "liver - review", "idx": 101}]}
        datastore.save_label(case, str(label), s.FINAL, info)
        datastore.update_label_info(case, s.FINAL, {"ts": stamp})  # a submitted last
    datastore.save_label("c", str(label), s.FINAL, {"label_names": {"spleen": 4}})  # Slicer's older form
    datastore.update_label_info("c", s.FINAL, {"ts": 1})
    datastore.save_label("d", str(label), "original", {"label_names": {"heart": 9}})  # not a final label

    def source(request: dict, image: str | None) -> list[tuple[str, str | None]]:
        return [(x.source, x.image_id) for x in s.resolve_supports(request, datastore, image)]

    uploaded = {"label": str(label), "image": "x.nii.gz", "support": "b"}
    assert source(uploaded, "a") == [("uploaded_label", "a")]  # what was drawn with the request wins
    assert source({"support": "a,b"}, "c") == [("support_param", "a"), ("support_param", "b")]
    own = s.resolve_supports({}, datastore, "b")[0]
    assert (own.source, own.image_id) == ("same_image_label", "b")
    assert (own.image, own.label) == (studies / "b.nii.gz", studies / "labels" / "final" / "b.nii.gz")
    assert own.label_names == {1: "liver", 101: "liver - review"} and own.colour(1) == [1, 2, 3]
    assert source({}, None) == [("latest_label", "a")]  # no image of its own: the newest submitted
    assert s.resolve_supports({"support": "c"}, datastore, None)[0].label_names == {4: "spleen"}
    upload = s.resolve_supports(
        {"label": str(label), "image": "x.nii.gz", "label_names": {"liver": 1}, "label_info": None}, datastore, None
    )[0]
    coloured = {
        "label": str(label),
        "image": "x.nii.gz",
        "label_info": [{"name": "liver", "idx": 1, "color": [9, 8, 7]}],
    }
    assert s.resolve_supports(coloured, datastore, None)[0].colour(1) == [9, 8, 7]
    assert upload.label_names == {1: "liver"} and upload.describe() == {
        "source": "uploaded_label",
        "image": None,
        "label_names": {"1": "liver"},
    }
    with pytest.raises(s.SupportNotFound, match="support image 'zz' \\(param 'support'\\) is not in the datastore"):
        s.resolve_supports({"support": "a,zz"}, datastore, "c")
    with pytest.raises(s.SupportNotFound, match="support image 'd' \\(param 'support'\\) has no final label"):
        s.resolve_supports({"support": "d"}, datastore, "a")
    assert s.support_label_ids(datastore) == {"liver": 1, "spleen": 4}  # a review segment is not a structure
