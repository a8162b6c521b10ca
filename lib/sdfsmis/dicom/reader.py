"""A DICOM image series read as one volume with its RAS affine (pydicom); look-alike raw data is
written with :mod:`sdfsmis.dicom.series`. Slices are ordered by their position along the slice normal, never by
file name or instance number, which scanners and anonymisers do not keep consistent.

A series whose slices do not form a regular grid is refused rather than read with a wrong affine:
a gantry tilt (each slice shifted in its own plane: a sheared grid), a gap or uneven spacing (a
missing slice, two stacks in one folder), slices of different orientation or size."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from sdfsmis.io.volume import VolumeError

#: Positions agree within this many mm plus this fraction of the slice step (scanners round them).
POSITION_TOLERANCE_MM = 0.01
STEP_TOLERANCE = 0.01


@dataclass
class DicomSeries:
    data: np.ndarray  # [columns, rows, slices] float32 (DICOM i, j, k order), rescaled
    affine: np.ndarray  # voxel (i, j, k) -> RAS mm
    files: list[Path]  # the slice files in k order
    datasets: list[Dataset] = field(default_factory=list)  # the slices in k order (what SEG and RTSTRUCT reference)

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].get("FrameOfReferenceUID", ""))


def read_series(files: list[Path]) -> DicomSeries:
    """Stack single-frame slices of one series; rescale slope/intercept are applied."""
    if not files:
        raise FileNotFoundError("no DICOM files given")
    return _stack([(Path(f), pydicom.dcmread(str(f))) for f in files])


def read_series_folder(folder: str | Path) -> DicomSeries:
    """The one image series in ``folder`` (subfolders included). Files that are not DICOM, and
    DICOM objects without image planes (a SEG, an RTSTRUCT, a DICOMDIR), are passed over; a
    folder with images of several series is refused, naming them."""
    folder = Path(folder)
    images: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(path))
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds:
            images.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if not images:
        raise VolumeError(f"{folder} holds no DICOM image slices (with ImagePositionPatient and pixel data)")
    if len(images) > 1:
        found = ", ".join(f"{uid} ({len(slices)} slices)" for uid, slices in images.items())
        raise VolumeError(f"{folder} holds several DICOM series: {found}; give a folder with one series")
    return _stack(next(iter(images.values())))


def _stack(slices: list[tuple[Path, Dataset]]) -> DicomSeries:
    first = slices[0][1]
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise VolumeError(f"{slices[0][0].name} is a multi-frame image: only single-frame slices are read")
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    for path, ds in slices[1:]:
        same = (ds.Rows, ds.Columns) == (first.Rows, first.Columns) and np.allclose(
            [float(v) for v in ds.PixelSpacing], [float(v) for v in first.PixelSpacing], atol=1e-4
        )
        if not same or not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), orientation, atol=1e-4):
            raise VolumeError(
                f"{path.name} differs from {slices[0][0].name} in orientation, size or pixel spacing: "
                "not one stack of slices"
            )
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    slices.sort(key=lambda item: float(np.dot(np.asarray(item[1].ImagePositionPatient, dtype=float), normal)))
    first = slices[0][1]
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    positions = np.asarray([np.asarray(ds.ImagePositionPatient, dtype=float) for _, ds in slices])
    if len(slices) > 1:
        _check_regular(positions, normal, [path for path, _ in slices])
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
    return DicomSeries(data, affine, [f for f, _ in slices], [ds for _, ds in slices])


def _check_regular(positions: np.ndarray, normal: np.ndarray, files: list[Path]) -> None:
    """Slice positions sorted along ``normal`` -> an error naming the first irregular pair: the
    affine of a stack holds one step, so a tilt, a gap or a duplicate would misplace slices."""
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    typical = float(np.median(along))
    for index, (step, distance) in enumerate(zip(steps, along)):
        pair = f"{files[index].name} and {files[index + 1].name}"
        if distance <= POSITION_TOLERANCE_MM:
            raise VolumeError(f"two slices at the same position ({pair}): duplicates or two stacks in one series")
        sideways = float(np.linalg.norm(step - distance * normal))
        if sideways > POSITION_TOLERANCE_MM + STEP_TOLERANCE * distance:
            raise VolumeError(
                f"gantry tilt: the slices are shifted {sideways:.3g} mm in their own plane per {distance:.3g} mm step "
                f"(between {pair}), a sheared grid; resample the series to an untilted one first"
            )
        if abs(distance - typical) > POSITION_TOLERANCE_MM + STEP_TOLERANCE * typical:
            raise VolumeError(
                f"uneven slice spacing: {distance:.3g} mm between {pair} but {typical:.3g} mm between most slices "
                "(a missing slice or a gap); give a complete, evenly spaced series"
            )
