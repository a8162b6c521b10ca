"""``sdfsmis prepare`` on generated look-alike raw data in the CHAOS (DICOM + PNG) and Synapse
(NIfTI) layouts and a Decathlon-style folder: label ids, 256 x 256 in-plane, spacing, RAS
orientation, and every organ still where it was in the patient (world coordinates)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from sdfsmis.cli import main
from sdfsmis.dicom.reader import read_series
from sdfsmis.evaluation.dataset import PreparedDataset
from sdfsmis.evaluation.lookalike import SYNAPSE_IDS, write_chaos, write_synapse
from sdfsmis.samples.synthetic import make_studies, make_volume
from sdfsmis.training.supervoxels import supervoxel_cache_path

SHAPE = (64, 64, 10)


def _world_centroid(label: np.ndarray, affine: np.ndarray, label_id: int) -> np.ndarray:
    return affine[:3, :3] @ np.argwhere(label == label_id).mean(axis=0) + affine[:3, 3]


def _load(path):
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image


def test_dicom_series_reads_back_the_written_geometry(tmp_path):
    mr = write_chaos(tmp_path, 1, shape=SHAPE, spacing=(5.0, 5.0, 8.0))
    image, _, affine = make_volume(100, SHAPE, (5.0, 5.0, 8.0), modality="MR", orientation="LPS")
    files = sorted((mr / "1" / "T2SPIR" / "DICOM_anon").glob("*.dcm"))
    series = read_series(files)
    assert np.allclose(series.affine, affine, atol=1e-4)
    # Files are numbered from the feet up: name order is the reverse of position order.
    assert [f.name for f in series.files] == [f.name for f in files[::-1]]
    # 16-bit linear code of the float MR: within half a rescale step of the true intensities
    slope = (image.max() - image.min()) / 65535
    assert np.abs(series.data - image).max() <= slope / 2 + 1e-3


def test_prepare_chaos(tmp_path):
    write_chaos(tmp_path / "raw", 2, shape=SHAPE, spacing=(5.0, 5.0, 8.0))
    main(["prepare", "chaos", str(tmp_path / "raw"), str(tmp_path / "chaos"), "--supervoxel-min-size", "2000"])
    dataset = PreparedDataset.load(tmp_path / "chaos")
    assert dataset.cases == ["chaos_01", "chaos_02"] and dataset.modality == "MR"
    assert dataset.labels == {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
    assert dataset.test_labels == [1, 2, 3, 4]
    for n, case in enumerate(dataset.cases):
        image, image_nii = _load(dataset.image(case))
        label, label_nii = _load(dataset.label(case))
        assert image.shape == label.shape == (256, 256, 10)  # 10 x 8 mm -> round(80 / 7.7) slices
        assert np.allclose(image_nii.header.get_zooms(), (1.25, 1.25, 7.70))
        assert nib.aff2axcodes(image_nii.affine) == ("R", "A", "S")
        assert np.allclose(image_nii.affine, label_nii.affine)
        assert set(np.unique(label)) == {0, 1, 2, 3, 4}
        raw, truth, raw_affine = make_volume(100 + n, SHAPE, (5.0, 5.0, 8.0), modality="MR", orientation="LPS")
        step = (raw.max() - raw.min()) / 65535  # the DICOM 16-bit code of the float MR
        assert image.max() <= np.percentile(raw, 99.5) + step  # top 0.5 % clipped
        for organ in (1, 2, 3, 4):
            shift = _world_centroid(label, label_nii.affine, organ) - _world_centroid(truth, raw_affine, organ)
            assert np.all(np.abs(shift) <= (1.25, 1.25, 7.7)), (organ, shift)
            volume_ml = (label == organ).sum() * 1.25 * 1.25 * 7.7
            assert volume_ml == pytest.approx((truth == organ).sum() * 5 * 5 * 8, rel=0.1)
        assert supervoxel_cache_path(dataset.image(case)).is_file()


def test_prepare_synapse(tmp_path):
    write_synapse(tmp_path / "raw", 2, shape=SHAPE, spacing=(6.0, 6.0, 6.0))
    main(["prepare", "synapse", str(tmp_path / "raw"), str(tmp_path / "synapse"), "--supervoxel-min-size", "2000"])
    dataset = PreparedDataset.load(tmp_path / "synapse")
    assert dataset.cases == ["synapse_0001", "synapse_0002"] and dataset.test_labels == [1, 2, 3, 6]
    assert dataset.organ(6) == "liver" and dataset.organ(1) == "spleen"
    for n, case in enumerate(dataset.cases):
        image, nii = _load(dataset.image(case))
        label, _ = _load(dataset.label(case))
        assert image.shape == (256, 256, 10)
        # a 32/512 border (4 px of 64) cropped on each side, then 56 px -> 256 px
        assert np.allclose(nii.header.get_zooms(), (6.0 * 56 / 256, 6.0 * 56 / 256, 6.0))
        assert nib.aff2axcodes(nii.affine) == ("R", "A", "S")
        assert image.min() == pytest.approx(-125) and image.max() == pytest.approx(275)  # CT window
        assert set(np.unique(label)) == {0, 1, 2, 3, 6}
        _, truth, raw_affine = make_volume(200 + n, SHAPE, (6.0, 6.0, 6.0), modality="CT", orientation="LPS")
        for synthetic_id, synapse_id in SYNAPSE_IDS.items():
            shift = _world_centroid(label, nii.affine, synapse_id) - _world_centroid(truth, raw_affine, synthetic_id)
            assert np.all(np.abs(shift) <= (1.5, 1.5, 6.0)), (synapse_id, shift)


def test_prepare_decathlon_folder(tmp_path):
    src = tmp_path / "Task99_Abdomen"
    make_studies(src / "imagesTr", 2, with_labels=True, shape=(48, 40, 8))
    (src / "labelsTr").mkdir()
    for path in (src / "imagesTr" / "labels" / "final").iterdir():
        path.rename(src / "labelsTr" / path.name)
    (src / "imagesTr" / "labels" / "final").rmdir()
    (src / "imagesTr" / "labels").rmdir()
    (src / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "3": "left kidney"}}))
    main(["prepare", "folder", str(src), str(tmp_path / "out"), "--labels", "1,3", "--supervoxel-min-size", "500"])
    dataset = PreparedDataset.load(tmp_path / "out")
    assert dataset.cases == ["case_000", "case_001"] and dataset.test_labels == [1, 3]
    assert dataset.labels == {"liver": 1, "left_kidney": 3}
    image, nii = _load(dataset.image("case_000"))
    assert image.shape == (256, 256, 8)  # padded to a 48 x 48 square, then 256 x 256; z untouched
    assert np.allclose(nii.header.get_zooms(), (1.5 * 48 / 256, 1.5 * 48 / 256, 5.0))
    with pytest.raises(SystemExit, match="--labels"):
        main(["prepare", "folder", str(src), str(tmp_path / "again")])
