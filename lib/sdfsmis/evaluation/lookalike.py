"""Generated look-alike raw data in the CHAOS and Synapse distribution layouts (sdfsmis.samples.synthetic
anatomy), so that ``prepare`` and ``evaluate`` run end to end without the real data sets.

CHAOS: ``CHAOS_Train_Sets/Train_Sets/MR/<id>/T2SPIR/DICOM_anon/IMG-0002-000NN.dcm`` (single-frame
MR slices, standard axial LPS orientation, files numbered from the feet up so that file order is
not position order) and ``.../T2SPIR/Ground/IMG-0002-000NN.png`` (63 liver, 126 right kidney, 189
left kidney, 252 spleen). Synapse: ``RawData/Training/img/img0001.nii.gz`` (int16 HU) and
``label/label0001.nii.gz`` with Synapse's ids (spleen 1, right kidney 2, left kidney 3, liver 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sdfsmis.dicom.series import volume_to_series, write_series
from sdfsmis.samples.synthetic import make_volume, write_nifti

#: The real CHAOS MR training ids (not contiguous).
CHAOS_IDS = (1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39)
CHAOS_PNG_VALUES = {1: 63, 2: 126, 3: 189, 4: 252}
#: synthetic (CHAOS) ids -> Synapse ids.
SYNAPSE_IDS = {1: 6, 2: 2, 3: 3, 4: 1}


def resliced(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], slice_spacing: float | None
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """The grid of the same field of view at another slice thickness: the generated anatomy is
    defined in units of the field of view (:mod:`sdfsmis.samples.synthetic`), so each seed keeps its
    patient, sampled by more (thinner) or fewer (thicker) slices."""
    if slice_spacing is None:
        return shape, spacing
    if slice_spacing <= 0:
        raise ValueError(f"slice spacing must be positive, got {slice_spacing}")
    depth = max(1, int(round(shape[2] * spacing[2] / slice_spacing)))
    return (shape[0], shape[1], depth), (spacing[0], spacing[1], shape[2] * spacing[2] / depth)


def write_chaos(
    root: str | Path,
    patients: int,
    seed: int = 100,
    shape: tuple[int, int, int] = (96, 96, 20),
    spacing: tuple[float, float, float] = (3.5, 3.5, 8.0),
    slice_spacing: float | None = None,
) -> Path:
    """``patients`` look-alike CHAOS T2-SPIR patients under ``root``; returns the MR folder.
    ``slice_spacing``: the same patients sliced at that thickness (see :func:`resliced`)."""
    shape, spacing = resliced(shape, spacing, slice_spacing)
    mr = Path(root) / "CHAOS_Train_Sets" / "Train_Sets" / "MR"
    for n, patient in enumerate(CHAOS_IDS[:patients]):
        image, label, affine = make_volume(seed + n, shape, spacing, modality="MR", orientation="LPS")
        folder = mr / str(patient) / "T2SPIR"
        depth = image.shape[2]
        names = [f"IMG-0002-{depth - k:05d}" for k in range(depth)]  # numbered from the feet up
        series = volume_to_series(image, affine, "MR", f"chaos-{patient}", "T2SPIR")
        write_series(series, folder / "DICOM_anon", [f"{s}.dcm" for s in names])
        (folder / "Ground").mkdir(parents=True, exist_ok=True)
        png_values = np.zeros(256, dtype=np.uint8)
        for label_id, value in CHAOS_PNG_VALUES.items():
            png_values[label_id] = value
        for k, stem in enumerate(names):
            Image.fromarray(png_values[label[..., k].T]).save(folder / "Ground" / f"{stem}.png")
    return mr


def write_synapse(
    root: str | Path,
    patients: int,
    seed: int = 200,
    shape: tuple[int, int, int] = (128, 128, 24),
    spacing: tuple[float, float, float] = (3.0, 3.0, 6.0),
    slice_spacing: float | None = None,
) -> Path:
    """``patients`` look-alike Synapse CT cases under ``root``; returns RawData/Training.
    ``slice_spacing``: the same patients sliced at that thickness (see :func:`resliced`)."""
    shape, spacing = resliced(shape, spacing, slice_spacing)
    training = Path(root) / "RawData" / "Training"
    lut = np.zeros(256, dtype=np.uint8)
    for synthetic_id, synapse_id in SYNAPSE_IDS.items():
        lut[synthetic_id] = synapse_id
    for n in range(patients):
        image, label, affine = make_volume(seed + n, shape, spacing, modality="CT", orientation="LPS")
        hu = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
        write_nifti(training / "img" / f"img{n + 1:04d}.nii.gz", hu, affine)
        write_nifti(training / "label" / f"label{n + 1:04d}.nii.gz", lut[label], affine, dtype=np.uint8)
    return training
