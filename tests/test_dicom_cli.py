"""DICOM in and out of `sdfsmis infer` and the library: image series folders (axial, coronal with
non-square pixels, oblique) written from NIfTI with real affines, SEG and RTSTRUCT supports (also
RTSTRUCTs written by other tools: pydicom's test file and rt-utils), SEG and RTSTRUCT results that
reference the query series, SEG segments numbered 1..N that read back as their label ids (and a
SEG of another tool, built by hand, read by its segment numbers), and the refusals (gantry tilt,
gap, another series' segmentation).

Expected voxels always come from the NIfTI the series was written from, taken onto the
series' grid through world coordinates (:func:`on_grid`), and DICOM outputs are read back with
readers other than ours where one exists (pydicom-seg's SegmentReader; a matplotlib polygon fill)."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom_seg
import pytest
from matplotlib.path import Path as Polygon
from pydicom.data import get_testdata_file

from sdfsmis.cli import main
from sdfsmis.dicom.rtstruct import labels_to_rtstruct
from sdfsmis.dicom.seg import labelmap_to_seg, seg_to_labelmap, segments_of
from sdfsmis.dicom.series import volume_to_series, write_series
from sdfsmis.dicom.volume import load_segmentation, load_series
from sdfsmis.io.volume import VolumeError
from sdfsmis.samples.synthetic import make_volume, write_nifti

NAMES = [
    {"idx": 1, "name": "liver", "color": [221, 130, 101]},
    {"idx": 2, "name": "right kidney", "color": [185, 102, 83]},
    {"idx": 3, "name": "left kidney", "color": [90, 200, 40]},
    {"idx": 4, "name": "spleen", "color": [157, 108, 162]},
]
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _coronal(image: np.ndarray, label: np.ndarray, affine: np.ndarray):
    """The same patient stored as coronal slices: the array's second and third axes swapped."""
    swapped = affine.copy()
    swapped[:, [1, 2]] = affine[:, [2, 1]]
    return image.transpose(0, 2, 1), label.transpose(0, 2, 1), swapped


GEOMETRIES = {
    "axial": lambda: make_volume(3, shape=(48, 40, 12)),
    # coronal slices of 1.5 x 2 mm pixels (non-square), 4 mm apart
    "coronal": lambda: _coronal(*make_volume(4, shape=(48, 12, 40), spacing=(1.5, 4.0, 2.0))),
    "oblique": lambda: make_volume(5, shape=(48, 40, 12), orientation="LPS", oblique=True),
}


def on_grid(array: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, shape: tuple) -> np.ndarray:
    """``array`` (voxel grid ``affine``) sampled at the voxel centres of another grid of the same
    voxels, through world coordinates: each target voxel must fall on a source voxel centre."""
    index = np.indices(shape).reshape(3, -1)
    source = np.linalg.inv(affine) @ target_affine @ np.vstack([index, np.ones(index.shape[1])])
    nearest = np.round(source[:3]).astype(int)
    assert np.abs(source[:3] - nearest).max() < 1e-3, "the grids are not the same voxels"
    return array[nearest[0], nearest[1], nearest[2]].reshape(shape)


def fill_contours(rtstruct: pydicom.Dataset, affine: np.ndarray, shape: tuple) -> dict[str, np.ndarray]:
    """Our own reading of an RTSTRUCT, independent of the product: each closed contour (LPS mm)
    taken to the voxel grid ``affine``, its slice's voxel centres inside it filled (matplotlib),
    contours of one slice combined even-odd."""
    inverse = np.linalg.inv(LPS @ affine)
    centres = np.indices(shape[:2]).reshape(2, -1).T
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in rtstruct.StructureSetROISequence}
    masks = {}
    for item in rtstruct.ROIContourSequence:
        mask = np.zeros(shape, dtype=bool)
        for contour in item.ContourSequence:
            if contour.ContourGeometricType != "CLOSED_PLANAR":
                continue
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            voxels = points @ inverse[:3, :3].T + inverse[:3, 3]
            k = int(round(float(voxels[0, 2])))
            assert np.allclose(voxels[:, 2], k, atol=1e-3), "a contour off the slice planes"
            mask[:, :, k] ^= Polygon(voxels[:, :2]).contains_points(centres).reshape(shape[:2])
        masks[names[int(item.ReferencedROINumber)]] = mask
    return masks


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Per geometry: (series folder, image array, label array, NIfTI affine, label file)."""
    root = tmp_path_factory.mktemp("dicom_series")
    made = {}
    for name, make in GEOMETRIES.items():
        image, label, affine = make()
        modality = "MR" if name == "coronal" else "CT"  # MR: float intensities, stored with a rescale slope
        image = image if modality == "MR" else image.astype(np.int16)
        write_series(volume_to_series(image, affine, modality, f"patient-{name}", name), root / name)
        label_file = write_nifti(root / f"{name}_label.nii.gz", label, affine, np.uint8)
        made[name] = (root / name, image, label, affine, label_file)
    return made


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_series_folder_is_read_in_its_own_geometry(series, geometry):
    folder, image, _, affine, _ = series[geometry]
    volume, read = load_series(folder)
    # every voxel where the NIfTI put it in the patient, in the series' own voxel order; CT in
    # integer HU exactly, MR within half a step of its 16-bit code (the rescale applied)
    half_step = 0.0 if image.dtype == np.int16 else (image.max() - image.min()) / 65535 / 2 + 1e-3
    np.testing.assert_allclose(read.data, on_grid(image, affine, read.affine, read.data.shape), rtol=0, atol=half_step)
    np.testing.assert_array_equal(volume.to_original(volume.data), read.data)
    normal = np.cross(*np.asarray(read.datasets[0].ImageOrientationPatient, dtype=float).reshape(2, 3))
    assert np.allclose((LPS @ read.affine)[:3, 2] / np.linalg.norm(read.affine[:3, 2]), normal)  # k: along the normal


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_labelmap_rtstruct_and_seg_round_trips(series, geometry, tmp_path):
    folder, _, label, affine, label_file = series[geometry]
    _, read = load_series(folder)
    truth = on_grid(label, affine, read.affine, read.data.shape)

    labels_to_rtstruct(truth, read, NAMES, "round trip", "sdfsmis test", "0").save_as(str(tmp_path / "rt.dcm"))
    back, entries = load_segmentation(tmp_path / "rt.dcm", read)
    ours = back.to_original(back.data)
    independent = fill_contours(pydicom.dcmread(str(tmp_path / "rt.dcm")), affine, label.shape)
    assert [e["name"] for e in entries] == ["liver", "right kidney", "left kidney", "spleen"]
    for entry in NAMES:
        assert dice(ours == entry["idx"], truth == entry["idx"]) >= 0.95
        assert dice(independent[entry["name"]], label == entry["idx"]) >= 0.95
    # marching-squares polygons half-way between voxel centres: exact, not just >= 0.95
    np.testing.assert_array_equal(ours, truth)

    labelmap_to_seg(label_file, read.datasets, NAMES, "round trip").save_as(str(tmp_path / "seg.dcm"))
    back, entries = load_segmentation(tmp_path / "seg.dcm", read)
    np.testing.assert_array_equal(back.to_original(back.data), truth)
    assert [(e["idx"], e["name"]) for e in entries] == [(e["idx"], e["name"]) for e in NAMES]


def test_seg_numbers_its_segments_1_to_n_and_reads_back_the_label_ids(series, tmp_path):
    """Labels 1 and 4 (liver, spleen) become Segment Numbers 1 and 2 (DICOM: from 1 by 1, what OHIF
    reads), each segment's frames the voxels of its label (read by pydicom-seg, not our reader),
    and our readers give back 1 and 4, voxel for voxel, with their names."""
    folder, _, label, affine, _ = series["oblique"]
    _, read = load_series(folder)
    gapped = np.where(np.isin(label, [1, 4]), label, 0)
    label_file = write_nifti(tmp_path / "gapped.nii.gz", gapped, affine, np.uint8)
    labelmap_to_seg(label_file, read.datasets, NAMES, "gapped").save_as(str(tmp_path / "seg.dcm"))

    seg = pydicom.dcmread(str(tmp_path / "seg.dcm"))
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
    assert numbers == [1, 2] and [str(item.SegmentLabel) for item in seg.SegmentSequence] == ["liver", "spleen"]
    referenced = {
        int(g.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for g in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced == {1, 2}
    truth = on_grid(gapped, affine, read.affine, read.data.shape)
    for number, idx in ((1, 1), (2, 4)):
        np.testing.assert_array_equal(
            _seg_on_grid(tmp_path / "seg.dcm", number, read.affine, truth.shape), truth == idx
        )
    # the label id rides in each segment's Tracking ID, beside the Tracking UID the standard requires with it
    assert [str(item.TrackingID) for item in seg.SegmentSequence] == ["SDFSMIS label 1", "SDFSMIS label 4"]
    uids = [pydicom.uid.UID(str(item.TrackingUID)) for item in seg.SegmentSequence]
    assert all(uid.is_valid for uid in uids) and len(set(uids)) == 2

    back, entries = load_segmentation(tmp_path / "seg.dcm", read)  # the CLI's and the app's support reader
    assert [(e["idx"], e["name"]) for e in entries] == [(1, "liver"), (4, "spleen")]
    np.testing.assert_array_equal(back.to_original(back.data), truth)
    segments = seg_to_labelmap(tmp_path / "seg.dcm", tmp_path / "back.nii.gz")  # the app's import of a stored SEG
    assert [(e["idx"], e["name"]) for e in segments] == [(1, "liver"), (4, "spleen")]
    labelmap = nib.load(tmp_path / "back.nii.gz")
    np.testing.assert_array_equal(
        np.asarray(labelmap.dataobj), on_grid(gapped, affine, labelmap.affine, labelmap.shape)
    )


def _seg_of_another_tool(read, truth: np.ndarray, segments: list[tuple[int, str, str | None]]) -> pydicom.Dataset:
    """A BINARY SEG on ``read``'s series as another tool writes one, built by hand: segments
    numbered 1..N, segment n with the voxels of label id ``segments[n-1][0]`` on every slice that
    has some, named ``segments[n-1][1]``, with that Tracking ID (and a Tracking UID) where one is given."""
    first, (columns, rows, depth) = read.datasets[0], truth.shape
    seg = pydicom.Dataset()
    seg.file_meta = pydicom.dataset.FileMetaDataset()
    seg.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    seg.SOPClassUID = seg.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    seg.Modality, seg.SeriesInstanceUID = "SEG", pydicom.uid.generate_uid()
    seg.StudyInstanceUID, seg.FrameOfReferenceUID = first.StudyInstanceUID, first.FrameOfReferenceUID
    referenced = pydicom.Dataset()
    referenced.SeriesInstanceUID = read.series_uid
    seg.ReferencedSeriesSequence = [referenced]
    seg.SegmentationType, seg.SegmentsOverlap = "BINARY", "NO"
    seg.SamplesPerPixel, seg.PhotometricInterpretation, seg.PixelRepresentation = 1, "MONOCHROME2", 0
    seg.BitsAllocated, seg.BitsStored, seg.HighBit, seg.Rows, seg.Columns = 1, 1, 0, rows, columns
    seg.SegmentSequence = []
    for number, (_, name, tracking) in enumerate(segments, start=1):
        item = pydicom.Dataset()
        item.SegmentNumber, item.SegmentLabel, item.SegmentAlgorithmType = number, name, "MANUAL"
        if tracking is not None:
            item.TrackingID, item.TrackingUID = tracking, pydicom.uid.generate_uid()
        seg.SegmentSequence.append(item)
    shared, orientation, measures = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = measures.SpacingBetweenSlices = float(np.linalg.norm(read.affine[:3, 2]))
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [orientation], [measures]
    seg.SharedFunctionalGroupsSequence = [shared]
    seg.PerFrameFunctionalGroupsSequence, frames = [], []
    for number, (idx, _, _) in enumerate(segments, start=1):
        for k in range(depth):
            if not (truth[..., k] == idx).any():
                continue
            group, position, identification = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
            position.ImagePositionPatient = [float(v) for v in (LPS @ read.affine @ [0, 0, k, 1])[:3]]
            identification.ReferencedSegmentNumber = number
            group.PlanePositionSequence, group.SegmentIdentificationSequence = [position], [identification]
            seg.PerFrameFunctionalGroupsSequence.append(group)
            frames.append((truth[..., k] == idx).T)  # a frame's rows follow the series' j, its columns i
    seg.NumberOfFrames = len(frames)
    packed = np.packbits(np.asarray(frames, dtype=np.uint8).ravel(), bitorder="little").tobytes()  # PS3.5 8.1.1
    seg.PixelData = packed + b"\0" * (len(packed) % 2)
    seg.is_little_endian, seg.is_implicit_VR, seg.preamble = True, False, b"\0" * 128  # a Part-10 file
    return seg


@pytest.mark.parametrize(
    "tracking",
    [
        (None, None),  # no tracking attributes at all
        ("Lesion 7", "Lesion 9"),  # the tool's own tracking text, with numbers in it
        ("SDFSMIS label 4", None),  # one of our segments, one the tool added: not a mix of ids
    ],
)
def test_seg_of_another_tool_reads_as_its_segment_numbers(series, tracking, tmp_path):
    folder, _, label, affine, _ = series["axial"]
    _, read = load_series(folder)
    truth = on_grid(label, affine, read.affine, read.data.shape)
    segments = [(1, "tumour", tracking[0]), (3, "oedema", tracking[1])]  # label ids 1 and 3 as segments 1 and 2
    _seg_of_another_tool(read, truth, segments).save_as(str(tmp_path / "other.dcm"))
    expected = np.select([truth == 1, truth == 3], [1, 2], 0)  # by hand: the segment numbers

    back, entries = load_segmentation(tmp_path / "other.dcm", read)
    assert [(e["idx"], e["name"]) for e in entries] == [(1, "tumour"), (2, "oedema")]
    np.testing.assert_array_equal(back.to_original(back.data), expected)
    segments_read = seg_to_labelmap(tmp_path / "other.dcm", tmp_path / "back.nii.gz")
    assert [(e["idx"], e["name"]) for e in segments_read] == [(1, "tumour"), (2, "oedema")]
    labelmap = nib.load(tmp_path / "back.nii.gz")
    np.testing.assert_array_equal(
        np.asarray(labelmap.dataobj), on_grid(expected, read.affine, labelmap.affine, labelmap.shape)
    )


def _seg_on_grid(path, number: int, target_affine: np.ndarray, shape: tuple) -> np.ndarray:
    """A SEG's segment read by pydicom-seg (not our reader), taken to a grid through world coordinates."""
    result = pydicom_seg.SegmentReader().read(pydicom.dcmread(str(path)))
    seg_affine = np.eye(4)
    seg_affine[:3, :3] = np.asarray(result.direction).reshape(3, 3) * np.asarray(result.spacing)
    seg_affine[:3, 3] = result.origin
    return on_grid(result.segment_data(number).transpose(2, 1, 0), LPS @ seg_affine, target_affine, shape)


def _drawn(label: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The liver drawn on two axial planes of the volume (as a reader annotates): (label, planes)."""
    axial = int(np.argmax(np.abs(affine[2, :3])))
    planes = np.zeros(label.shape, dtype=bool)
    present = np.flatnonzero(np.moveaxis(label == 1, axial, -1).any(axis=(0, 1)))
    for index in present[[1, -2]]:
        np.moveaxis(planes, axial, -1)[..., index] = True
    return np.where(planes & (label == 1), 1, 0).astype(np.uint8), planes


def _infer(tiny_backbone, *args: str, capsys=None) -> dict:
    main(["infer", "--method", "dpl", "--config", "tiny", "--backbone", str(tiny_backbone), *args])
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") :])


@pytest.mark.parametrize(
    "geometry, support_as",
    # the coronal NIfTI stacks its slices back to front, the series front to back: same voxels, other order
    [("axial", "labelmap"), ("coronal", "labelmap"), ("coronal", "SEG"), ("oblique", "RTSTRUCT")],
)
def test_infer_on_a_series_writes_labels_seg_and_rtstruct_in_its_geometry(
    series, geometry, support_as, tiny_backbone, tmp_path, capsys
):
    """The query as its own support, drawn on two planes: those planes come back as drawn, in
    the series' geometry, in the NIfTI result, the SEG and the RTSTRUCT alike."""
    folder, _, label, affine, _ = series[geometry]
    drawn, planes = _drawn(label, affine)
    drawn_file = write_nifti(tmp_path / "drawn.nii.gz", drawn, affine)
    _, read = load_series(folder)
    names = [{"idx": 1, "name": "hepar", "color": [10, 200, 30]}]
    support = drawn_file
    if support_as == "SEG":
        support = tmp_path / "support_seg.dcm"
        labelmap_to_seg(drawn_file, read.datasets, names, "support").save_as(str(support))
    elif support_as == "RTSTRUCT":
        support = tmp_path / "support_rt.dcm"
        drawn_on_series = on_grid(drawn, affine, read.affine, read.data.shape)
        labels_to_rtstruct(drawn_on_series, read, names, "support", "a reader", "1").save_as(str(support))
    out = {name: tmp_path / name for name in ("result.nii.gz", "result_seg.dcm", "result_rt.dcm")}
    summary = _infer(
        tiny_backbone,
        *("--support-image", str(folder), "--support-label", str(support), "--image", str(folder)),
        *("--output", str(out["result.nii.gz"]), "--output-seg", str(out["result_seg.dcm"])),
        *("--output-rtstruct", str(out["result_rt.dcm"])),
        capsys=capsys,
    )
    assert summary["output_seg"] == str(out["result_seg.dcm"])
    expected = on_grid(drawn, affine, read.affine, read.data.shape)
    on_planes = on_grid(planes, affine, read.affine, read.data.shape)

    result = nib.load(out["result.nii.gz"])
    np.testing.assert_allclose(result.affine, read.affine, atol=1e-4)  # the series' geometry, its voxel order
    labels = np.asarray(result.dataobj)
    np.testing.assert_array_equal(labels[on_planes], expected[on_planes])

    seg = pydicom.dcmread(str(out["result_seg.dcm"]))
    rtstruct = pydicom.dcmread(str(out["result_rt.dcm"]))
    query_uid = pydicom.dcmread(str(next(folder.iterdir()))).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == query_uid
    referenced = rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert referenced.RTReferencedSeriesSequence[0].SeriesInstanceUID == query_uid
    assert seg.StudyInstanceUID == rtstruct.StudyInstanceUID == read.datasets[0].StudyInstanceUID
    np.testing.assert_array_equal(_seg_on_grid(out["result_seg.dcm"], 1, read.affine, labels.shape), labels == 1)
    filled = fill_contours(rtstruct, read.affine, labels.shape)
    name = "label_1" if support_as == "labelmap" else "hepar"
    assert list(filled) == [name] and dice(filled[name], labels == 1) >= 0.95
    np.testing.assert_array_equal(filled[name], labels == 1)

    algorithm = f"sdfsmis dpl {version('sdfsmis')}"
    assert seg.SegmentSequence[0].SegmentLabel == name and seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "sdfsmis dpl" and algorithm in seg.SoftwareVersions
    roi = rtstruct.StructureSetROISequence[0]
    assert roi.ROIName == name and roi.ROIGenerationAlgorithm == "AUTOMATIC"
    assert roi.ROIGenerationDescription == algorithm
    if support_as != "labelmap":  # the support's colour carried to both results
        assert np.abs(np.subtract(segments_of(seg)[0]["color"], [10, 200, 30])).max() <= 1
        assert [int(v) for v in rtstruct.ROIContourSequence[0].ROIDisplayColor] == [10, 200, 30]


#: pydicom's test RTSTRUCT (Manufacturer "pydicom", model "TPS", 2009; no preamble): three closed
#: contours of ROI "patient" (the rectangle x in [-200, 200], y in [-150, 150] mm, LPS) on the
#: planes z = -200, -190, -180, and two isocentre points, on a series it names but does not ship
FOREIGN_STUDY = "1.2.826.0.1.3680043.8.498.2010020400001.1"
FOREIGN_SERIES = "1.2.826.0.1.3680043.8.498.2010020400001.2.1.1"
FOREIGN_FRAME = "1.2.826.0.1.3680043.8.498.2010020400001.2"


def _foreign_series(folder) -> None:
    """The series that RTSTRUCT references: 70 x 50 pixels of 7 mm from (-241.5, -171.5) LPS,
    slices every 10 mm from z = -210; no voxel centre lies on the rectangle's edges."""
    affine = LPS @ np.array([[7.0, 0, 0, -241.5], [0, 7.0, 0, -171.5], [0, 0, 10.0, -210.0], [0, 0, 0, 1]])
    image = np.random.default_rng(0).integers(-100, 100, size=(70, 50, 5)).astype(np.int16)
    datasets = volume_to_series(image, affine, "CT", "tPhantom30sep", "phantom")
    for ds in datasets:
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = FOREIGN_STUDY, FOREIGN_SERIES, FOREIGN_FRAME
    write_series(datasets, folder)


def test_rtstruct_of_another_tool_serves_as_support(tiny_backbone, tmp_path, capsys):
    foreign = get_testdata_file("rtstruct.dcm")  # no DICOM preamble: told by content, not by its header
    assert Path(foreign).read_bytes()[128:132] != b"DICM"
    _foreign_series(tmp_path / "ct")
    # by hand: voxel centres -241.5 + 7 i in (-200, 200) -> i = 6..63; -171.5 + 7 j in (-150, 150) -> j = 4..45
    expected = np.zeros((70, 50, 5), dtype=bool)
    expected[6:64, 4:46, 1:4] = True

    _, read = load_series(tmp_path / "ct")
    volume, entries = load_segmentation(foreign, read)  # default: the areas only, not the isocentre points
    assert [(e["idx"], e["name"], e["color"]) for e in entries] == [(1, "patient", [220, 160, 120])]
    np.testing.assert_array_equal(volume.to_original(volume.data) == 1, expected)

    summary = _infer(
        tiny_backbone,
        *("--support-image", str(tmp_path / "ct"), "--support-label", foreign, "--structures", "patient"),
        *("--image", str(tmp_path / "ct"), "--output", str(tmp_path / "out.nii.gz")),
        *("--output-rtstruct", str(tmp_path / "out_rt.dcm")),
        capsys=capsys,
    )
    result = np.asarray(nib.load(tmp_path / "out.nii.gz").dataobj)
    np.testing.assert_array_equal(result[..., 1:4] == 1, expected[..., 1:4])  # the drawn planes, as drawn
    assert set(summary["labels"]) == {"1"}
    rtstruct = pydicom.dcmread(str(tmp_path / "out_rt.dcm"))
    assert rtstruct.StructureSetROISequence[0].ROIName == "patient"
    assert rtstruct.StudyInstanceUID == FOREIGN_STUDY
    with pytest.raises(SystemExit, match="'Isocenter 1' has no closed contour"):
        _infer(
            tiny_backbone,
            *("--support-image", str(tmp_path / "ct"), "--support-label", foreign, "--structures", "Isocenter 1"),
            *("--image", str(tmp_path / "ct"), "--output", str(tmp_path / "points.nii.gz")),
            capsys=capsys,
        )


@pytest.mark.parametrize("oblique", [False, True])
def test_rtstruct_written_by_rt_utils_reads_back_voxel_for_voxel(oblique, tiny_backbone, tmp_path, capsys):
    """rt-utils (OpenCV) traces each mask through its boundary voxels' centres, in float32: those
    voxels are inside, not a hair outside. (rt-utils 1.2.7 needs square images.)"""
    from rt_utils import RTStructBuilder

    image, label, affine = make_volume(6, shape=(40, 40, 10), orientation="LPS" if oblique else "RAS", oblique=oblique)
    write_series(volume_to_series(image.astype(np.int16), affine, "CT", "rt-utils", "square"), tmp_path / "ct")
    _, read = load_series(tmp_path / "ct")
    truth = on_grid(label, affine, read.affine, read.data.shape)
    written = RTStructBuilder.create_new(str(tmp_path / "ct"))
    for entry in NAMES:  # rt-utils' masks are [row, column, slice], slices ordered along the normal as ours
        written.add_roi(mask=(truth == entry["idx"]).transpose(1, 0, 2), name=entry["name"], color=entry["color"])
    written.ds.save_as(str(tmp_path / "rt_utils.dcm"))

    volume, entries = load_segmentation(tmp_path / "rt_utils.dcm", read)
    back = volume.to_original(volume.data)
    for number, entry in enumerate(NAMES, start=1):  # rt-utils numbers its ROIs 1, 2, ... in order
        assert entries[number - 1] == {"idx": number, "name": entry["name"], "color": entry["color"]}
        np.testing.assert_array_equal(back == number, truth == entry["idx"])

    drawn, planes = _drawn(label, affine)
    summary = _infer(
        tiny_backbone,
        *("--support-image", str(tmp_path / "ct"), "--support-label", str(tmp_path / "rt_utils.dcm")),
        *("--structures", "liver", "--image", str(tmp_path / "ct"), "--output", str(tmp_path / "out.nii.gz")),
        capsys=capsys,
    )
    result = np.asarray(nib.load(tmp_path / "out.nii.gz").dataobj)
    on_planes = on_grid(planes, affine, read.affine, read.data.shape)
    np.testing.assert_array_equal(result[on_planes] == 1, truth[on_planes] == 1)
    assert set(summary["labels"]) == {"1"}


def _irregular(series, tmp_path, name: str, change) -> str:
    folder = tmp_path / name
    shutil.copytree(series["axial"][0], folder)
    files = sorted(folder.iterdir())
    change(files)
    return str(folder)


def _tilt(files):
    for k, path in enumerate(files):  # each slice 0.5 mm further along its rows: a gantry tilt of ~5.7 deg
        ds = pydicom.dcmread(str(path))
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + 0.5 * k, *ds.ImagePositionPatient[1:]]
        ds.save_as(str(path))


def test_irregular_series_and_other_series_segmentations_are_refused(series, tmp_path):
    axial, coronal = series["axial"], series["coronal"]
    common = ["infer", "--method", "dpl", "--backbone", str(tmp_path / "never loaded"), "--output", str(tmp_path / "o")]

    def refused(image: str, support_image: str, support_label: str, *more: str, match: str) -> None:
        with pytest.raises(SystemExit, match=match):
            main([*common, "--image", image, "--support-image", support_image, "--support-label", support_label, *more])

    label = str(axial[4])
    tilted = _irregular(series, tmp_path, "tilted", _tilt)
    refused(tilted, str(axial[0]), label, match=r"gantry tilt: the slices are shifted 0\.5 mm in their own plane")
    gapped = _irregular(series, tmp_path, "gapped", lambda files: files[5].unlink())
    refused(gapped, str(axial[0]), label, match=r"uneven slice spacing: 10 mm between .* but 5 mm")

    _, read_axial = load_series(axial[0])
    labelmap_to_seg(axial[4], read_axial.datasets, NAMES, "axial").save_as(str(tmp_path / "axial_seg.dcm"))
    truth = on_grid(axial[2], axial[3], read_axial.affine, read_axial.data.shape)
    labels_to_rtstruct(truth, read_axial, NAMES, "axial", "t", "0").save_as(str(tmp_path / "axial_rt.dcm"))
    # another patient's series on the very same grid: only the reference tells them apart
    twin = tmp_path / "twin"
    write_series(volume_to_series(axial[1], axial[3], "CT", "another patient", "twin"), twin)
    for segmentation in ("axial_seg.dcm", "axial_rt.dcm"):
        refused(str(twin), str(twin), str(tmp_path / segmentation), match=f"{segmentation} references series")
    _, read_coronal = load_series(coronal[0])
    refused(
        str(coronal[0]), str(coronal[0]), str(tmp_path / "axial_seg.dcm"),
        match=f"axial_seg.dcm references series {read_axial.series_uid}, not the support image's series "
        f"{read_coronal.series_uid}",
    )  # fmt: skip
    refused(str(coronal[0]), str(coronal[0]), str(tmp_path / "axial_rt.dcm"), match="axial_rt.dcm references series")
    refused(str(axial[0]), str(axial[0]), str(tmp_path / "axial_rt.dcm"), "--structures", "liver,pancreas",
            match="axial_rt.dcm has no structure 'pancreas'; it has 'liver', 'right kidney'")  # fmt: skip
    refused(str(axial[0]), str(axial[0]), label, "--structures", "liver", match="labelmap")
    nifti = str(write_nifti(tmp_path / "image.nii.gz", axial[1], axial[3]))
    refused(nifti, nifti, label, "--output-seg", str(tmp_path / "s.dcm"), match="give --image as a DICOM series")
    refused(str(axial[0]), nifti, str(tmp_path / "axial_seg.dcm"), match="give the series it was drawn on")
    with pytest.raises(VolumeError, match="several DICOM series"):
        both = tmp_path / "both"
        shutil.copytree(axial[0], both / "a")
        shutil.copytree(coronal[0], both / "b")
        load_series(both)
