"""DICOM inputs as the volumes the pipeline takes: an image series folder as an image
:class:`~sdfsmis.io.volume.Volume` in the series' own geometry, and a DICOM SEG or RTSTRUCT
as a label volume on the grid of the series it references, picked by what a file holds (its
SOP class or modality), not by its name.

A SEG or RTSTRUCT drawn on another series than the one given beside it is refused: its
voxels or contours would land on the wrong anatomy without any error."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from sdfsmis.dicom.reader import DicomSeries, read_series_folder
from sdfsmis.dicom.rtstruct import RTSTRUCT_STORAGE, referenced_series_uids, rtstruct_to_labels, structures_of
from sdfsmis.dicom.seg import SEG_STORAGE, seg_to_series_labels, segments_of
from sdfsmis.io.volume import Volume, VolumeError

SEG, RTSTRUCT = "SEG", "RTSTRUCT"
GZIP_MAGIC = b"\x1f\x8b"


def _other_format(path: Path) -> bool:
    """NIfTI (plain or gzip) and NRRD files, told by their magic bytes (a DICOM file without a
    preamble has none of its own)."""
    with open(path, "rb") as f:
        head = f.read(348)
    if head[128:132] == b"DICM":
        return False
    nifti = head[344:347] in (b"n+1", b"ni1") or head[4:7] in (b"n+2", b"ni2")  # NIfTI-1 / NIfTI-2 magic
    return head[:2] == GZIP_MAGIC or head[:4] == b"NRRD" or nifti


def dicom_header(path: str | Path) -> Dataset | None:
    """The header of a DICOM file (also one without the 128-byte preamble), None for anything else."""
    path = Path(path)
    if not path.is_file() or _other_format(path):
        return None
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
        return None
    return ds if ("SOPClassUID" in ds or "Modality" in ds) else None


def dicom_kind(path: str | Path) -> str | None:
    """``SEG``, ``RTSTRUCT``, another DICOM modality, or None for a file that is not DICOM."""
    header = dicom_header(path)
    if header is None:
        return None
    sop_class = str(header.get("SOPClassUID", ""))
    if sop_class == SEG_STORAGE or header.get("Modality") == SEG:
        return SEG
    if sop_class == RTSTRUCT_STORAGE or header.get("Modality") == RTSTRUCT:
        return RTSTRUCT
    return str(header.get("Modality", "DICOM"))


def series_volume(series: DicomSeries, path: Path) -> Volume:
    """A series as an image volume: voxels in the series' [column, row, slice] order with its
    affine, so that results are written in the series' geometry."""
    return _volume(series.data, series, path)


def load_series(folder: str | Path) -> tuple[Volume, DicomSeries]:
    """A DICOM series folder -> (its image volume, the series)."""
    series = read_series_folder(folder)
    return series_volume(series, Path(folder)), series


def _volume(data: np.ndarray, series: DicomSeries, path: Path) -> Volume:
    header = nib.Nifti1Image(np.zeros((1, 1, 1), np.float32), series.affine).header
    volume = Volume(data, series.affine, data.shape, header, path)
    volume.data = volume.from_original(data)
    return volume


def onto_series_grid(label: Volume, image: Volume) -> Volume:
    """A labelmap drawn on a NIfTI conversion of a DICOM series, stored in another voxel order
    (converters flip or permute axes: dcm2niix, ITK) -> the same label on the series' grid. Both
    are the same voxels where the label's affine is the series' up to a permutation and flips of
    its axes; their RAS working arrays are then identical, and only the original geometry, which
    results are written in, changes. Any other label is returned as it is (and refused later)."""
    mapping = np.linalg.inv(image.affine) @ label.affine  # label voxel -> series voxel
    permutation = np.round(mapping[:3, :3])
    same_voxels = (
        np.allclose(mapping[:3, :3], permutation, atol=1e-4)
        and np.array_equal(np.abs(permutation).sum(axis=0), np.ones(3))
        and np.array_equal(np.abs(permutation).sum(axis=1), np.ones(3))
        and sorted(label.shape) == sorted(image.shape)
    )
    if not same_voxels:
        return label
    corners = mapping @ np.array([[0, n - 1] for n in label.shape] + [[1, 1]], dtype=float)
    inside = np.allclose(np.sort(corners[:3], axis=1), [[0, n - 1] for n in image.shape], atol=1e-3)
    return Volume(label.data, image.affine, image.shape, image.header, label.path) if inside else label


def check_reference(segmentation: Dataset, series: DicomSeries, path: Path) -> None:
    """A SEG or RTSTRUCT must have been drawn on ``series``: by its referenced series, or where
    it names none, by its frame of reference."""
    if str(segmentation.get("SOPClassUID", "")) == RTSTRUCT_STORAGE or segmentation.get("Modality") == RTSTRUCT:
        referenced = referenced_series_uids(segmentation)
        frames = {str(f.FrameOfReferenceUID) for f in segmentation.get("ReferencedFrameOfReferenceSequence", [])}
    else:
        referenced = {str(item.SeriesInstanceUID) for item in segmentation.get("ReferencedSeriesSequence", [])}
        frames = {str(segmentation.get("FrameOfReferenceUID", ""))} - {""}
    if referenced and series.series_uid not in referenced:
        raise VolumeError(
            f"{path.name} references series {', '.join(sorted(referenced))}, not the support image's series "
            f"{series.series_uid}: give the series it was drawn on"
        )
    if not referenced and series.frame_of_reference_uid not in frames:
        raise VolumeError(
            f"{path.name} names no referenced series and its frame of reference {', '.join(sorted(frames)) or '(none)'}"
            f" is not the support image's {series.frame_of_reference_uid or '(none)'}"
        )


def pick_structures(available: list[dict], structures: Sequence[str] | None, path: Path) -> list[dict]:
    """The entries named in ``structures`` (all by default), refusing a name the file lacks."""
    if not structures:
        return available
    by_name = {entry["name"]: entry for entry in available}
    missing = [name for name in structures if name not in by_name]
    if missing:
        names = ", ".join(repr(entry["name"]) for entry in available)
        raise VolumeError(f"{path.name} has no structure {', '.join(map(repr, missing))}; it has {names}")
    return [by_name[name] for name in structures]


def load_segmentation(
    path: str | Path, series: DicomSeries, structures: Sequence[str] | None = None
) -> tuple[Volume, list[dict]]:
    """A DICOM SEG or RTSTRUCT file drawn on ``series`` -> (a label volume on the series' grid,
    [{"idx", "name", "color"}] of the structures read). ``structures`` picks segments or ROIs by
    name (default: every segment; every ROI that has closed contours)."""
    path = Path(path)
    kind = dicom_kind(path)
    if kind not in (SEG, RTSTRUCT):
        raise VolumeError(f"{path.name} is not a DICOM SEG or RTSTRUCT ({kind or 'not DICOM'})")
    segmentation = pydicom.dcmread(str(path), force=True)
    check_reference(segmentation, series, path)
    if kind == SEG:
        picked = pick_structures(segments_of(segmentation), structures, path)
        labels = seg_to_series_labels(segmentation, series, [entry["idx"] for entry in picked])
    else:
        available = structures_of(segmentation)
        if not structures:  # points (isocentres) and open lines are no areas to segment
            closed = {
                int(item.ReferencedROINumber)
                for item in segmentation.get("ROIContourSequence", [])
                for contour in item.get("ContourSequence", [])
                if str(contour.get("ContourGeometricType", "")) == "CLOSED_PLANAR"
            }
            available = [entry for entry in available if entry["idx"] in closed]
        picked = pick_structures(available, structures, path)
        labels = rtstruct_to_labels(segmentation, series, [entry["idx"] for entry in picked])
    return _volume(labels, series, path), picked
