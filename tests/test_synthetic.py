"""Synthetic look-alike volumes: deterministic, CHAOS labels, real geometry, datastore layout."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from sdfsmis.samples.synthetic import ABDOMINAL_LABELS, make_studies, make_volume, write_nifti


def _z_range(label: np.ndarray, value: int) -> tuple[int, int]:
    z = np.flatnonzero((label == value).any(axis=(0, 1)))
    return int(z.min()), int(z.max())


def test_deterministic_per_seed_and_patients_differ():
    a_image, a_label, a_affine = make_volume(3)
    b_image, b_label, b_affine = make_volume(3)
    np.testing.assert_array_equal(a_image, b_image)
    np.testing.assert_array_equal(a_label, b_label)
    np.testing.assert_array_equal(a_affine, b_affine)
    c_image, c_label, _ = make_volume(4)
    assert not np.array_equal(a_label, c_label)
    # Organ sizes vary between patients, but by a bounded amount (about +-10 % per radius).
    sizes = np.array([np.bincount(make_volume(seed)[1].ravel(), minlength=5)[1:] for seed in range(6)])
    spread = sizes.max(axis=0) / sizes.min(axis=0)
    assert (spread > 1.05).all() and (spread < 2.0).all()


def test_labels_shapes_and_dtypes():
    image, label, affine = make_volume(0)
    assert image.shape == label.shape == (96, 96, 40)
    assert image.dtype == np.float32 and label.dtype == np.uint8 and affine.shape == (4, 4)
    assert set(np.unique(label)) == {0, 1, 2, 3, 4}
    assert ABDOMINAL_LABELS == {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}


def test_ct_intensities_are_hounsfield_like_with_contrast_above_noise():
    image, label, _ = make_volume(1, modality="CT")
    assert np.percentile(image, 5) < -900  # air
    medians = {v: float(np.median(image[label == v])) for v in range(1, 5)}
    assert 30 < medians[1] < 100 and 15 < medians[4] < 90  # liver, spleen
    assert medians[2] > 100 and medians[3] > 100  # contrast-enhanced kidneys
    # Organs stand out from the soft tissue around them by several noise standard deviations.
    body = (image > -500) & (label == 0)
    soft = np.median(image[body & (image > -60) & (image < 30)])
    noise = np.std(image[:8, :8, :])  # a corner of air
    for v in range(1, 5):
        assert medians[v] - soft > 4 * noise


def test_mr_intensities_are_positive_and_distinct():
    image, label, _ = make_volume(1, modality="MR")
    assert image.min() >= 0 and np.percentile(image, 99.9) < 1500
    medians = [float(np.median(image[label == v])) for v in range(1, 5)]
    assert medians[1] > medians[0] and medians[3] > medians[0]  # kidneys, spleen brighter than liver


def test_organs_cover_different_parts_of_the_z_range():
    for seed in range(3):
        _, label, _ = make_volume(seed)
        depth = label.shape[2]
        ranges = {v: _z_range(label, v) for v in range(1, 5)}
        for lo, hi in ranges.values():
            assert hi - lo + 1 < 0.8 * depth
        liver_centre = sum(ranges[1]) / 2
        assert liver_centre > depth / 2
        assert sum(ranges[2]) / 2 < depth / 2 and sum(ranges[3]) / 2 < depth / 2
        assert len(set(ranges.values())) >= 3 and ranges[1] not in (ranges[2], ranges[3], ranges[4])


def test_affine_is_real_and_round_trips_through_nifti(tmp_path):
    image, label, affine = make_volume(2, oblique=True)
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), (1.5, 1.5, 5.0))
    assert np.abs(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))).max() > 0.05  # oblique
    assert np.abs(affine[:3, 3]).min() > 0  # non-zero origin
    path = write_nifti(tmp_path / "img.nii.gz", image, affine)
    loaded = nib.load(str(path))
    np.testing.assert_allclose(loaded.affine, affine, atol=1e-4)
    assert int(loaded.header["qform_code"]) == 1 and int(loaded.header["sform_code"]) == 1
    np.testing.assert_allclose(loaded.header.get_zooms(), (1.5, 1.5, 5.0), rtol=1e-5)
    np.testing.assert_array_equal(loaded.get_fdata(dtype=np.float32), image)
    label_path = write_nifti(tmp_path / "lab.nii.gz", label, affine, dtype=np.uint8)
    assert nib.load(str(label_path)).get_data_dtype() == np.uint8


def test_lps_is_the_same_patient_with_flipped_axes():
    ras_image, ras_label, ras_affine = make_volume(5)
    lps_image, lps_label, lps_affine = make_volume(5, orientation="LPS")
    assert lps_affine[0, 0] < 0 and lps_affine[1, 1] < 0 and lps_affine[2, 2] > 0
    assert nib.aff2axcodes(lps_affine) == ("L", "P", "S")
    assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
    canonical = nib.as_closest_canonical(nib.Nifti1Image(lps_label, lps_affine))
    np.testing.assert_array_equal(np.asarray(canonical.dataobj), ras_label)
    np.testing.assert_allclose(canonical.affine, ras_affine, atol=1e-6)
    np.testing.assert_array_equal(lps_image[::-1, ::-1], ras_image)
    # The liver lies on the patient's right in both: at large world x (RAS).
    for label, affine in ((ras_label, ras_affine), (lps_label, lps_affine)):
        liver = nib.affines.apply_affine(affine, np.argwhere(label == 1).mean(axis=0))
        spleen = nib.affines.apply_affine(affine, np.argwhere(label == 4).mean(axis=0))
        assert liver[0] > spleen[0]


def test_rejects_unknown_options():
    with pytest.raises(ValueError):
        make_volume(0, modality="PET")
    with pytest.raises(ValueError):
        make_volume(0, orientation="LAS")


def test_make_studies_writes_the_monai_label_datastore_layout(tmp_path):
    paths = make_studies(tmp_path / "ct", 2, seed=7, with_labels=True, shape=(48, 48, 16))
    assert [p.name for p in paths] == ["case_000.nii.gz", "case_001.nii.gz"]
    first = nib.load(str(paths[0]))
    assert first.get_data_dtype() == np.int16
    image, label, affine = make_volume(7, shape=(48, 48, 16))
    np.testing.assert_allclose(first.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(first.dataobj), np.clip(np.rint(image), -1024, 3071))
    final = nib.load(str(tmp_path / "ct" / "labels" / "final" / "case_000.nii.gz"))
    assert final.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(final.dataobj), label)

    mr = make_studies(tmp_path / "mr", 1, modality="MR", shape=(48, 48, 16))
    assert nib.load(str(mr[0])).get_data_dtype() == np.float32
    assert not (tmp_path / "mr" / "labels").exists()

    local = pytest.importorskip("monailabel.datastore.local")
    datastore = local.LocalDatastore(str(tmp_path / "ct"), extensions=("*.nii.gz", "*.nii"))
    assert sorted(datastore.list_images()) == ["case_000", "case_001"]
    assert sorted(datastore.get_labeled_images()) == ["case_000", "case_001"]
