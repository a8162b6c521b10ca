"""Labelmaps <-> DICOM RT Structure Sets (RTSTRUCT), on the voxel grid of the image series the
structures were drawn on.

An RTSTRUCT holds each structure (ROI) as closed polygons in patient coordinates (mm), one or
more per slice plane. Written here, each polygon is a marching-squares contour of the label at
level 0.5 (scikit-image): it runs half-way between voxel centres inside and outside, so filling
the polygons again (pixel centres inside, even-odd for holes) gives back exactly the voxels they
came from. Read, a polygon may come from any tool: its points are taken to the series' voxel
grid through the series' own affine (any orientation: axial, coronal, oblique), must lie in one
slice plane, and the voxels whose centres are inside or on it (within 0.05 voxel) are filled
(scikit-image), holes and islands by the even-odd rule.

Not rt-utils (the registries' RTSTRUCT library): its 1.2.7 release reads masks back transposed
for images that are not square and swaps the two pixel spacings; nor highdicom, which has no
RTSTRUCT and needs pydicom 3 (MONAI Label 0.8.5 pins pydicom < 3).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from skimage import draw, measure

from sdfsmis.dicom.reader import DicomSeries
from sdfsmis.dicom.seg import palette_colour
from sdfsmis.dicom.series import RAS_TO_LPS
from sdfsmis.io.volume import VolumeError, label_type

RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: what RTSTRUCT writers put as the referenced study's SOP class (Detached Study Management)
STUDY_REFERENCE_CLASS = "1.2.840.10008.3.1.2.3.1"
#: a contour point may lie this far (in slice steps) from a slice plane
PLANE_TOLERANCE = 0.1
#: a voxel centre this close (in voxels) to an outline counts as inside; ours keep >= 0.35 away
OUTLINE_TOLERANCE = 0.05


def structures_of(rtstruct: Dataset) -> list[dict]:
    """[{"idx": ROI number, "name", "color"}] of an RTSTRUCT, in the file's order."""
    colours = {
        int(item.ReferencedROINumber): [int(v) for v in item.ROIDisplayColor]
        for item in rtstruct.get("ROIContourSequence", [])
        if "ROIDisplayColor" in item
    }
    entries = []
    for roi in rtstruct.get("StructureSetROISequence", []):
        entry = {"idx": int(roi.ROINumber), "name": str(roi.get("ROIName", f"ROI {roi.ROINumber}"))}
        if int(roi.ROINumber) in colours:
            entry["color"] = colours[int(roi.ROINumber)]
        entries.append(entry)
    return entries


def referenced_series_uids(rtstruct: Dataset) -> set[str]:
    """The image series an RTSTRUCT says its contours were drawn on."""
    return {
        str(series.SeriesInstanceUID)
        for frame in rtstruct.get("ReferencedFrameOfReferenceSequence", [])
        for study in frame.get("RTReferencedStudySequence", [])
        for series in study.get("RTReferencedSeriesSequence", [])
    }


def rtstruct_to_labels(rtstruct: Dataset, series: DicomSeries, numbers: Sequence[int]) -> np.ndarray:
    """The ROIs ``numbers`` of an RTSTRUCT -> a label array on ``series``' voxel grid [i, j, k]
    (ids = ROI numbers; where ROIs overlap, the later in ``numbers`` wins). Only closed planar
    contours are areas: a ROI of points or open lines is refused, as is a contour off the
    series' slice planes or outside it."""
    inverse = np.linalg.inv(RAS_TO_LPS @ series.affine)
    labels = np.zeros(series.data.shape, dtype=label_type(max(numbers, default=0)))
    contours = {int(item.ReferencedROINumber): item.get("ContourSequence", []) for item in rtstruct.ROIContourSequence}
    names = {entry["idx"]: entry["name"] for entry in structures_of(rtstruct)}
    for number in numbers:
        closed = [c for c in contours.get(number, []) if str(c.get("ContourGeometricType", "")) == "CLOSED_PLANAR"]
        if not closed:
            raise VolumeError(f"structure {names.get(number, number)!r} has no closed contour: it is not an area")
        mask = np.zeros(labels.shape, dtype=bool)
        for contour in closed:
            points = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            voxels = (inverse[:3, :3] @ points.T).T + inverse[:3, 3]
            k = float(np.median(voxels[:, 2]))
            if np.abs(voxels[:, 2] - round(k)).max() > PLANE_TOLERANCE:
                raise VolumeError(
                    f"a contour of {names.get(number, number)!r} does not lie in a slice plane of the series "
                    f"(slice index {voxels[:, 2].min():.2f} to {voxels[:, 2].max():.2f}): another series' geometry?"
                )
            if not 0 <= round(k) < labels.shape[2]:
                raise VolumeError(f"a contour of {names.get(number, number)!r} lies outside the series (slice {k:.1f})")
            mask[:, :, round(k)] ^= _fill(voxels[:, :2], labels.shape[:2])  # even-odd: a contour inside is a hole
        labels[mask] = number
    return labels


def _fill(polygon: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The voxels of a slice whose centres lie inside ``polygon`` [(i, j), ...] or within
    :data:`OUTLINE_TOLERANCE` of its outline. Tools that trace a mask through its boundary voxels'
    centres (OpenCV-based writers) store those points rounded or in float32, a hair outside
    an exact polygon test: the tolerance keeps their boundary voxels."""
    area = np.zeros(shape, dtype=bool)
    rows, cols = draw.polygon(polygon[:, 0], polygon[:, 1], shape=shape)
    area[rows, cols] = True
    starts, ends = polygon, np.roll(polygon, -1, axis=0)
    for start, end in zip(starts, ends):
        low = np.maximum(np.floor(np.minimum(start, end) - OUTLINE_TOLERANCE), 0).astype(int)
        high = np.minimum(np.ceil(np.maximum(start, end) + OUTLINE_TOLERANCE), np.asarray(shape) - 1).astype(int)
        if (high < low).any():
            continue
        centres = np.indices(high - low + 1).reshape(2, -1).T + low
        edge = end - start
        along = np.clip((centres - start) @ edge / max(float(edge @ edge), 1e-12), 0.0, 1.0)
        near = np.linalg.norm(centres - (start + along[:, None] * edge), axis=1) <= OUTLINE_TOLERANCE
        area[centres[near, 0], centres[near, 1]] = True
    return area


def slice_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """A 2-D boolean mask [i, j] -> its outlines as closed polygons [(i, j), ...] in voxel
    coordinates, without the repeated closing point. Marching squares at 0.5 on the mask padded
    with background: every outline closes, outer boundaries and holes alike."""
    padded = np.pad(mask.astype(np.float32), 1)
    polygons = []
    for contour in measure.find_contours(padded, 0.5):
        # collinear points dropped: a voxel centre lies >= 0.35 voxel from the outline, 0.1 keeps it exact
        simplified = measure.approximate_polygon(contour, tolerance=0.1)[:-1] - 1.0
        if len(simplified) >= 3:
            polygons.append(simplified)
    return polygons


def labels_to_rtstruct(
    labels: np.ndarray,
    series: DicomSeries,
    label_info: list[dict],
    description: str,
    algorithm: str,
    software_version: str,
) -> Dataset:
    """A label array on ``series``' grid [i, j, k] -> one RTSTRUCT that references the series:
    a ROI per label id present (ROI number = id) with its name and colour from ``label_info``
    (``label_<id>`` and the palette otherwise), generated AUTOMATIC by ``algorithm``."""
    if labels.shape != series.data.shape:
        raise VolumeError(f"labels of shape {labels.shape} are not on the series' grid {series.data.shape}")
    present = sorted(int(v) for v in np.unique(labels) if v)
    if not present:
        raise ValueError("the label is empty: nothing to store as an RTSTRUCT")
    lps = RAS_TO_LPS @ series.affine
    first = series.datasets[0]
    frame_of_reference = series.frame_of_reference_uid or generate_uid()
    by_idx = {int(entry["idx"]): entry for entry in label_info if "idx" in entry}
    ds = _base_dataset(first, description, algorithm, software_version)
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_frame_reference(series, frame_of_reference)])
    ds.StructureSetROISequence = DicomSequence()
    ds.ROIContourSequence = DicomSequence()
    ds.RTROIObservationsSequence = DicomSequence()
    for idx in present:
        entry = by_idx.get(idx, {})
        roi = Dataset()
        roi.ROINumber = idx
        roi.ReferencedFrameOfReferenceUID = frame_of_reference
        roi.ROIName = str(entry.get("name") or f"label_{idx}")
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{algorithm} {software_version}"
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = idx
        item.ROIDisplayColor = [int(v) for v in list(entry.get("color") or palette_colour(idx))[:3]]
        item.ContourSequence = DicomSequence()
        for k in range(labels.shape[2]):
            for polygon in slice_polygons(labels[:, :, k] == idx):
                voxels = np.column_stack([polygon, np.full(len(polygon), k), np.ones(len(polygon))])
                world = (lps @ voxels.T).T[:, :3]
                contour = Dataset()
                image = Dataset()
                image.ReferencedSOPClassUID = series.datasets[k].SOPClassUID
                image.ReferencedSOPInstanceUID = series.datasets[k].SOPInstanceUID
                contour.ContourImageSequence = DicomSequence([image])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(world)
                contour.ContourNumber = len(item.ContourSequence) + 1
                contour.ContourData = [f"{v:.4f}" for v in world.ravel()]
                item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
        observation = Dataset()
        observation.ObservationNumber = idx
        observation.ReferencedROINumber = idx
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""
        ds.RTROIObservationsSequence.append(observation)
    return ds


def _frame_reference(series: DicomSeries, frame_of_reference: str) -> Dataset:
    images = DicomSequence()
    for source in series.datasets:
        image = Dataset()
        image.ReferencedSOPClassUID = source.SOPClassUID
        image.ReferencedSOPInstanceUID = source.SOPInstanceUID
        images.append(image)
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series.series_uid
    referenced_series.ContourImageSequence = images
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_REFERENCE_CLASS
    study.ReferencedSOPInstanceUID = series.datasets[0].StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([referenced_series])
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_of_reference
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _base_dataset(source: Dataset, description: str, algorithm: str, software_version: str) -> Dataset:
    """Patient and study of the image series, a new series, the structure set's own header."""
    instance = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.is_little_endian, ds.is_implicit_VR = True, False
    now = datetime.datetime.now()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_STORAGE, instance
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyDescription",
    ):
        setattr(ds, keyword, source.get(keyword, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 301
    ds.SeriesDescription = description
    ds.InstanceNumber = 1
    ds.Manufacturer = algorithm
    ds.SoftwareVersions = software_version
    ds.OperatorsName = ""
    ds.StructureSetLabel = description[:16]
    ds.StructureSetName = description[:64]
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ApprovalStatus = "UNAPPROVED"
    return ds
