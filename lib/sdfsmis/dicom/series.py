"""NIfTI volume -> a DICOM image series (CT or MR Image Storage), so that any NIfTI collection
can be served to OHIF through a DICOMweb server.

Geometry is written exactly: every slice gets its ImagePositionPatient, the in-plane axes
become ImageOrientationPatient and PixelSpacing (NIfTI's RAS affine turned into DICOM's LPS).
Intensities keep 16 bits: integer volumes (CT in HU) are stored as they are with slope 1, other
volumes are mapped linearly onto 0..65535 with RescaleSlope/RescaleIntercept (quantisation error
at most half a slope step). UIDs are derived from the file's content, so uploading the same file
twice gives the same instances (the server keeps one copy).
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from sdfsmis.io.volume import VolumeError

STORAGE_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SeriesIdentity:
    """Who and what a generated series belongs to."""

    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    description: str


@dataclass(frozen=True)
class StoredIntensity:
    """How voxel values are stored: ``value = stored * slope + intercept``."""

    dtype: type
    slope: float
    intercept: float

    @classmethod
    def for_volume(cls, data: np.ndarray) -> StoredIntensity:
        low, high = float(data.min()), float(data.max())
        if np.array_equal(data, np.round(data)):
            if low >= -32768 and high <= 32767:
                return cls(np.int16, 1.0, 0.0)
            if low >= 0 and high <= 65535:
                return cls(np.uint16, 1.0, 0.0)
        return cls(np.uint16, (high - low) / 65535 if high > low else 1.0, low)

    def encode(self, data: np.ndarray) -> np.ndarray:
        limits = np.iinfo(self.dtype)
        stored = np.round((data.astype(np.float64) - self.intercept) / self.slope)
        return np.clip(stored, limits.min, limits.max).astype(self.dtype)


def _slice_geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS affine, unit in-plane directions (columns i, j) and spacing, checking that slices are
    stacked perpendicular to their plane (a sheared grid has no DICOM image-plane equivalent)."""
    lps = RAS_TO_LPS @ affine
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise VolumeError(f"affine has a zero-length voxel axis: spacing {spacing.tolist()}")
    unit = axes / spacing
    normal = np.cross(unit[:, 0], unit[:, 1])
    if abs(abs(float(normal @ unit[:, 2])) - 1) > 1e-4 or abs(float(unit[:, 0] @ unit[:, 1])) > 1e-4:
        raise VolumeError("the volume's voxel grid is sheared (non-orthogonal axes): it cannot be a DICOM series")
    return lps, unit, spacing


def _window(data: np.ndarray, modality: str) -> tuple[float, float]:
    if modality == "CT":
        return 40.0, 400.0
    low, high = np.percentile(data, (1, 99))
    return float((low + high) / 2), float(max(high - low, 1.0))


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=list(parts))


def identity_for(data: np.ndarray, affine: np.ndarray, modality: str, patient_id: str, description: str):
    """Stable UIDs from the volume's content and geometry (and patient id)."""
    digest = hashlib.sha256(np.ascontiguousarray(data).tobytes() + np.asarray(affine).tobytes()).hexdigest()
    return SeriesIdentity(
        patient_id=patient_id,
        study_uid=_uid("study", patient_id, digest),
        series_uid=_uid("series", patient_id, digest, modality),
        modality=modality,
        description=description,
    )


def nifti_to_series(path: str | Path, modality: str, patient_id: str | None = None) -> list[Dataset]:
    """One DICOM dataset per slice along the volume's third voxel axis."""
    path = Path(path)
    try:
        image = nib.load(str(path))
        data = image.get_fdata(dtype=np.float32)
    except Exception as error:
        raise VolumeError(f"{path.name} is not a readable NIfTI volume: {error}") from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 2:
        raise VolumeError(f"{path.name} has shape {data.shape}: a 3-D volume is expected")
    if not np.isfinite(data).all():
        raise VolumeError(f"{path.name} contains NaN or infinite voxels")
    patient = patient_id or path.name.split(".")[0]
    return volume_to_series(data, image.affine, modality, patient, f"{modality} {path.name}")


def volume_to_series(
    data: np.ndarray, affine: np.ndarray, modality: str, patient_id: str, description: str
) -> list[Dataset]:
    """A [i, j, k] volume with its RAS affine -> one DICOM dataset per k slice."""
    if modality not in STORAGE_CLASSES:
        raise ValueError(f"modality must be one of {sorted(STORAGE_CLASSES)}, not {modality!r}")
    lps, unit, spacing = _slice_geometry(affine)
    normal = np.cross(unit[:, 0], unit[:, 1])
    identity = identity_for(data, affine, modality, patient_id, description)
    stored = StoredIntensity.for_volume(data)
    center, width = _window(data, modality)
    frame_of_reference = _uid("frame", identity.study_uid)
    now = datetime.datetime.now()
    datasets = []
    for k in range(data.shape[2]):
        ds = _image_dataset(identity, k)
        ds.FrameOfReferenceUID = frame_of_reference
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        position = lps[:3] @ np.array([0, 0, k, 1.0])
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*unit[:, 0], *unit[:, 1])]
        ds.PixelSpacing = [round(float(spacing[1]), 6), round(float(spacing[0]), 6)]  # rows, then columns
        ds.SliceThickness = ds.SpacingBetweenSlices = round(float(spacing[2]), 6)
        ds.SliceLocation = round(float(normal @ position), 6)
        pixels = stored.encode(data[:, :, k].T)  # DICOM rows follow the j axis, columns the i axis
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{stored.slope:.10g}", f"{stored.intercept:.10g}"
        if modality == "CT":
            ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = f"{center:.6g}", f"{width:.6g}"
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        datasets.append(ds)
    return datasets


def _image_dataset(identity: SeriesIdentity, index: int) -> Dataset:
    sop_class = STORAGE_CLASSES[identity.modality]
    sop_instance = _uid("instance", identity.series_uid, str(index))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128  # a complete Part-10 file, whatever writer sends it on
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    ds.PatientName = identity.patient_id
    ds.PatientID = identity.patient_id
    ds.StudyInstanceUID = identity.study_uid
    ds.SeriesInstanceUID = identity.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.Modality = identity.modality
    ds.SeriesDescription = identity.description
    ds.StudyDescription = f"sdfsmis upload {identity.patient_id}"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    return ds


def write_series(datasets: list[Dataset], folder: str | Path, names: list[str] | None = None) -> list[Path]:
    """One file per dataset: ``names`` (as a scanner or an anonymiser named them) or the instance number."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets):
        path = folder / (names[index] if names else f"{ds.InstanceNumber:04d}.dcm")
        ds.save_as(str(path), write_like_original=False)
        paths.append(path)
    return paths
