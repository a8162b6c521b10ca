"""A DICOM image series read as one volume with its RAS affine (pydicom); look-alike raw data is
written with :mod:`sdfsmis.dicom.series`. Slices are ordered by their position along the slice normal, never by
file name or instance number, which scanners and anonymisers do not keep consistent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom


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
