"""A DICOM image series as one volume with its RAS affine (pydicom), and the inverse, used to
write look-alike raw data. Slices are ordered by their position along the slice normal, never by
file name or instance number, which scanners and anonymisers do not keep consistent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


@dataclass
class DicomSeries:
    data: np.ndarray  # [columns, rows, slices] float32 (DICOM i, j, k order), rescaled
    affine: np.ndarray  # voxel (i, j, k) -> RAS mm
    files: list[Path]  # the slice files in k order


def read_series(files: list[Path]) -> DicomSeries:
    """Stack single-frame slices of one series; rescale slope/intercept are applied."""
    if not files:
        raise FileNotFoundError("no DICOM files given")
    slices = [(Path(f), pydicom.dcmread(str(f))) for f in files]
    orientation = np.asarray(slices[0][1].ImageOrientationPatient, dtype=float)
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    slices.sort(key=lambda item: float(np.dot(np.asarray(item[1].ImagePositionPatient, dtype=float), normal)))
    first = slices[0][1]
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    positions = np.asarray([np.asarray(ds.ImagePositionPatient, dtype=float) for _, ds in slices])
    if len(slices) > 1:
        step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        step = normal * float(getattr(first, "SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row * col_spacing  # i: along a row, i.e. across columns
    lps[:3, 1] = col * row_spacing  # j: down a column, i.e. across rows
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    data = np.stack(
        [
            ds.pixel_array.astype(np.float32).T * float(getattr(ds, "RescaleSlope", 1) or 1)
            + float(getattr(ds, "RescaleIntercept", 0) or 0)
            for _, ds in slices
        ],
        axis=-1,
    )
    return DicomSeries(data, affine, [f for f, _ in slices])


def write_series(
    folder: Path, data: np.ndarray, affine: np.ndarray, patient_id: str, names: list[str], modality: str = "MR"
) -> list[Path]:
    """Write ``data`` [i, j, k] (uint16 range) as one single-frame file per slice ``names[k]``,
    with the geometry of ``affine`` (RAS). The inverse of :func:`read_series`."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing_i, spacing_j = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = [*(lps[:3, 0] / spacing_i), *(lps[:3, 1] / spacing_j)]
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k, name in enumerate(names):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / name
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = modality, patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = k + 1
        position = lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{spacing_j:.6f}", f"{spacing_i:.6f}"]
        ds.SliceThickness = f"{np.linalg.norm(lps[:3, 2]):.6f}"
        ds.SliceLocation = f"{position[2]:.6f}"
        pixels = np.ascontiguousarray(np.clip(np.rint(data[..., k].T), 0, 65535).astype(np.uint16))
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels.tobytes()
        ds.save_as(str(path), write_like_original=False)
        paths.append(path)
    return paths
