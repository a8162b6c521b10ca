"""NIfTI -> DICOM series, labelmap <-> DICOM SEG, NRRD results: read back by the readers MONAI
Label and OHIF use (SimpleITK/GDCM, pydicom-seg, raw NRRD), compared in scanner space."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from sdfsmis.dicom.seg import labelmap_to_seg, seg_to_labelmap
from sdfsmis.dicom.series import nifti_to_series, write_series
from sdfsmis.io.volume import VolumeError, load_volume
from sdfsmis.samples.synthetic import make_volume, write_nifti

LABEL_INFO = [
    {"idx": 1, "name": "liver", "color": [221, 130, 101]},
    {"idx": 2, "name": "right kidney", "color": [185, 102, 83]},
    {"idx": 3, "name": "left kidney", "color": [90, 200, 40]},
    {"idx": 4, "name": "spleen", "color": [157, 108, 162]},
]


def _read_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _canonical(path):
    image = nib.as_closest_canonical(nib.load(str(path)))
    return image.get_fdata(), image.affine


@pytest.mark.parametrize(
    "modality, orientation, oblique", [("CT", "RAS", False), ("MR", "LPS", True), ("CT", "LPS", True)]
)
def test_series_round_trip_keeps_geometry_and_intensities(tmp_path, modality, orientation, oblique):
    image, _, affine = make_volume(7, shape=(40, 36, 10), modality=modality, orientation=orientation, oblique=oblique)
    stored = image.astype(np.int16) if modality == "CT" else image
    source = write_nifti(tmp_path / "volume.nii.gz", stored, affine)

    datasets = nifti_to_series(source, modality)
    write_series(datasets, tmp_path / "dicom")
    sitk.WriteImage(_read_series(tmp_path / "dicom"), str(tmp_path / "back.nii.gz"))

    expected, expected_affine = _canonical(source)
    got, got_affine = _canonical(tmp_path / "back.nii.gz")
    assert got.shape == expected.shape
    np.testing.assert_allclose(got_affine, expected_affine, atol=1e-3)
    slope = float(datasets[0].RescaleSlope)
    if modality == "CT":  # integer HU: exact, signed 16 bit
        assert slope == 1.0 and datasets[0].PixelRepresentation == 1
        np.testing.assert_array_equal(got, expected)
    else:  # float MR: 16-bit linear code, error within half a step (no 8-bit round trip)
        assert slope < (expected.max() - expected.min()) / 60000
        assert np.abs(got - expected).max() <= slope / 2 + 1e-4
    assert datasets[0].Modality == modality and len(datasets) == 10
    assert nifti_to_series(source, modality)[3].SOPInstanceUID == datasets[3].SOPInstanceUID  # stable UIDs


def test_sheared_volume_is_refused(tmp_path):
    image, _, affine = make_volume(1, shape=(20, 20, 6))
    sheared = affine.copy()
    sheared[0, 2] += 2.0  # slices shifted sideways: a gantry tilt, no DICOM image-plane equivalent
    path = write_nifti(tmp_path / "sheared.nii.gz", image, sheared)
    with pytest.raises(VolumeError, match="sheared"):
        nifti_to_series(path, "CT")


def test_seg_round_trip_keeps_ids_names_and_colours(tmp_path):
    image, label, affine = make_volume(3, shape=(40, 36, 12), orientation="LPS", oblique=True)
    image_path = write_nifti(tmp_path / "image.nii.gz", image.astype(np.int16), affine)
    label[label == 2] = 0  # a label set with a gap: ids 1, 3, 4
    label_path = write_nifti(tmp_path / "label.nii.gz", label, affine, np.uint8)
    sources = nifti_to_series(image_path, "CT")

    seg = labelmap_to_seg(label_path, sources, LABEL_INFO, "test support")
    seg.save_as(str(tmp_path / "seg.dcm"))
    segments = seg_to_labelmap(tmp_path / "seg.dcm", tmp_path / "back.nii.gz")

    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert [(s["idx"], s["name"]) for s in segments] == [(1, "liver"), (3, "left kidney"), (4, "spleen")]
    for segment in segments:  # CIELab in the file, back to RGB within rounding
        wanted = next(e["color"] for e in LABEL_INFO if e["idx"] == segment["idx"])
        assert np.abs(np.subtract(segment["color"], wanted)).max() <= 1
    back = load_volume(tmp_path / "back.nii.gz", label=True)
    original = load_volume(label_path, label=True)
    np.testing.assert_allclose(back.affine, original.affine, atol=1e-3)
    np.testing.assert_array_equal(back.data, original.data)

    del seg.SegmentSequence  # another tool's SEG that describes no segment
    seg.save_as(str(tmp_path / "none.dcm"))
    with pytest.raises(ValueError, match=r"^DICOM SEG none.dcm describes no segment"):
        seg_to_labelmap(tmp_path / "none.dcm", tmp_path / "none.nii.gz")


def test_empty_label_is_not_stored_as_seg(tmp_path):
    image, label, affine = make_volume(3, shape=(24, 24, 6))
    image_path = write_nifti(tmp_path / "image.nii.gz", image.astype(np.int16), affine)
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros_like(label), affine, np.uint8)
    with pytest.raises(ValueError, match="empty"):
        labelmap_to_seg(empty, nifti_to_series(image_path, "CT"), LABEL_INFO, "empty")


@pytest.mark.parametrize("orientation, oblique", [("RAS", False), ("LPS", True)])
def test_nrrd_result_is_raw_in_the_original_voxel_order(tmp_path, orientation, oblique):
    """OHIF copies the NRRD's raw buffer straight into its volume: the voxel order and the
    geometry must be the image's own."""
    image, label, affine = make_volume(5, shape=(30, 26, 8), orientation=orientation, oblique=oblique)
    volume = load_volume(write_nifti(tmp_path / "image.nii.gz", image, affine))
    ras_labels = volume.from_original(label.astype(np.int32))

    volume.save_label(ras_labels, tmp_path / "result.nrrd")
    volume.save_label(ras_labels, tmp_path / "result.nii.gz")

    assert b"encoding: raw" in (tmp_path / "result.nrrd").read_bytes()[:1000]
    nrrd, nifti = sitk.ReadImage(str(tmp_path / "result.nrrd")), sitk.ReadImage(str(tmp_path / "result.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nrrd), label.transpose(2, 1, 0))
    np.testing.assert_allclose(nrrd.GetOrigin(), nifti.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(nrrd.GetDirection(), nifti.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(nrrd.GetSpacing(), nifti.GetSpacing(), atol=1e-5)
    with pytest.raises(VolumeError, match="cannot write a label"):
        volume.save_label(ras_labels, tmp_path / "result.png")
