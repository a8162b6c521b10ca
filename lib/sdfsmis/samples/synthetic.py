"""Generated look-alike abdominal volumes for tests, quick-start sample data and learning tests.

The real data sets (CHAOS, Synapse) cannot be shipped, so the code is exercised on volumes that
share the properties that matter to the method: smooth organs with distinct mean intensities
inside a body, air outside, a bias field and noise, organs covering only part of the z-range,
per-patient variation, and a real (non-identity, optionally oblique or LPS-flipped) affine.

Anatomy is defined in the patient frame (RAS millimetres relative to the centre of the field of
view, in units of the half field of view), so the same seed gives the same patient whatever the
voxel grid orientation: an LPS volume is the RAS one with the first two array axes reversed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage

DEFAULT_SHAPE = (96, 96, 40)
DEFAULT_SPACING = (1.5, 1.5, 5.0)

#: CHAOS label ids, the abdominal set used by the synthetic volumes.
ABDOMINAL_LABELS = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}


@dataclass(frozen=True)
class SyntheticOrgan:
    """An ellipsoid-like structure in the patient frame.

    ``centre`` and ``radii`` are (x right, y anterior, z superior) in units of the half field of
    view, so the anatomy scales with the volume. ``label`` 0 marks an unlabelled structure: it
    makes the background non-trivial, as real abdomens are.
    """

    name: str
    label: int
    ct: float  # mean intensity in HU
    mr: float  # mean T2-like intensity, arbitrary positive units
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]


ORGANS: tuple[SyntheticOrgan, ...] = (
    SyntheticOrgan("liver", 1, 60.0, 200.0, (0.33, 0.05, 0.35), (0.42, 0.45, 0.45)),
    SyntheticOrgan("right_kidney", 2, 150.0, 750.0, (0.38, -0.30, -0.40), (0.15, 0.17, 0.30)),
    SyntheticOrgan("left_kidney", 3, 150.0, 750.0, (-0.38, -0.30, -0.20), (0.15, 0.17, 0.30)),
    SyntheticOrgan("spleen", 4, 45.0, 550.0, (-0.50, -0.10, 0.25), (0.16, 0.24, 0.25)),
    SyntheticOrgan("stomach", 0, 110.0, 1000.0, (-0.15, 0.35, 0.35), (0.20, 0.18, 0.25)),
    SyntheticOrgan("aorta", 0, 180.0, 60.0, (-0.08, -0.30, 0.0), (0.06, 0.06, 5.0)),
    SyntheticOrgan("spine", 0, 400.0, 180.0, (0.0, -0.50, 0.0), (0.11, 0.11, 5.0)),
)

# Background intensities (air, subcutaneous fat, body soft tissue) and noise level per modality.
_BACKGROUND = {"CT": (-1000.0, -100.0, -20.0), "MR": (0.0, 120.0, 350.0)}
_NOISE_SIGMA = {"CT": 12.0, "MR": 20.0}
_BODY_SEMI_AXES = (0.90, 0.70)
_FAT_INNER = 0.88  # inner edge of the fat shell, as a fraction of the body ellipse


def _plane_waves(rng: np.random.Generator, n_terms: int, cycles: float) -> tuple[np.ndarray, np.ndarray]:
    """Wave vectors and phases of a random low-frequency field (see ``_smooth_field``)."""
    k = rng.uniform(-cycles, cycles, size=(n_terms, 3)) * 2.0 * np.pi
    phase = rng.uniform(0.0, 2.0 * np.pi, size=n_terms)
    return k, phase


def _smooth_field(waves: tuple[np.ndarray, np.ndarray], u: list[np.ndarray]) -> np.ndarray:
    """Sum of random plane waves, roughly unit variance, evaluated at patient coordinates ``u``.

    Patient coordinates make the field independent of the voxel grid orientation.
    """
    k, phase = waves
    field = np.zeros(np.broadcast_shapes(*(np.shape(a) for a in u)), dtype=np.float32)
    for (kx, ky, kz), p in zip(k, phase):
        field += np.cos(kx * u[0] + ky * u[1] + kz * u[2] + p, dtype=np.float32)
    field *= np.float32(np.sqrt(2.0 / len(phase)))
    return field


def _rotation(rx_deg: float, rz_deg: float) -> np.ndarray:
    """Gantry tilt about x then an in-plane rotation about z."""
    ax, az = np.deg2rad(rx_deg), np.deg2rad(rz_deg)
    rot_x = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rot_z = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rot_x @ rot_z


def _patient_coordinates(shape: tuple[int, int, int], linear: np.ndarray, half_extent: np.ndarray) -> list[np.ndarray]:
    """Patient coordinates (units of half field of view) of every voxel, as broadcastable arrays.

    Zero terms of the linear map are skipped so that an axis-aligned grid stays cheap.
    """
    centre = (np.asarray(shape) - 1) / 2.0
    index = np.ogrid[tuple(slice(0, n) for n in shape)]
    coords = []
    for a in range(3):
        terms = [
            ((linear[a, b] / half_extent[a]) * (index[b] - centre[b])).astype(np.float32)
            for b in range(3)
            if abs(linear[a, b]) > 1e-9
        ]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        coords.append(total)
    return coords


def make_volume(
    seed: int,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    modality: Literal["CT", "MR"] = "CT",
    oblique: bool = False,
    orientation: Literal["RAS", "LPS"] = "RAS",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic abdominal "patient": (image float32, label uint8, 4x4 affine).

    Labels follow CHAOS: liver 1, right kidney 2, left kidney 3, spleen 4. CT intensities are in
    HU (air -1000), MR intensities are positive (0..~1500). Organ positions and sizes vary by
    about 10 % between seeds; the same seed always gives the same volume. ``oblique`` tilts the
    grid relative to the patient; ``orientation="LPS"`` stores the same patient with the first
    two array axes reversed and the affine adjusted, as DICOM-derived NIfTI files often are.
    """
    if modality not in _BACKGROUND:
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    if orientation not in ("RAS", "LPS"):
        raise ValueError(f"orientation must be 'RAS' or 'LPS', got {orientation!r}")
    shape = tuple(int(n) for n in shape)
    spacing_arr = np.asarray(spacing, dtype=float)
    rng = np.random.default_rng(seed)

    # Draw every random parameter in a fixed order so options do not change the patient.
    tilt = rng.uniform(6.0, 12.0) * rng.choice([-1.0, 1.0])
    spin = rng.uniform(2.0, 6.0) * rng.choice([-1.0, 1.0])
    world_centre = np.array([rng.uniform(-10, 10), rng.uniform(-30, 30), rng.uniform(-500, -300)])
    body_axes = np.asarray(_BODY_SEMI_AXES) * rng.uniform(0.95, 1.05, size=2)
    organ_centres = [np.asarray(o.centre) + rng.uniform(-0.05, 0.05, size=3) for o in ORGANS]
    organ_radii = [np.asarray(o.radii) * rng.uniform(0.9, 1.1, size=3) for o in ORGANS]

    rotation = _rotation(tilt, spin) if oblique else np.eye(3)
    linear = rotation @ np.diag(spacing_arr)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = world_centre - linear @ ((np.asarray(shape) - 1) / 2.0)

    u = _patient_coordinates(shape, linear, spacing_arr * np.asarray(shape) / 2.0)
    deform_waves = _plane_waves(rng, n_terms=6, cycles=0.75)
    deform = _smooth_field(deform_waves, u)
    bias = _smooth_field(_plane_waves(rng, n_terms=4, cycles=0.5), u)

    air, fat, soft = _BACKGROUND[modality]
    body_r = np.sqrt((u[0] / body_axes[0]) ** 2 + (u[1] / body_axes[1]) ** 2)
    body_r = np.broadcast_to(body_r, shape)
    image = np.full(shape, air, dtype=np.float32)
    image[body_r < 1.0] = fat
    image[body_r < _FAT_INNER] = soft

    # Each voxel belongs to the structure whose deformed normalised radius is smallest (< 1).
    best = np.full(shape, np.inf, dtype=np.float32)
    owner = np.full(shape, -1, dtype=np.int8)
    for index, (centre, radii) in enumerate(zip(organ_centres, organ_radii)):
        r = ((u[0] - centre[0]) / radii[0]) ** 2 + ((u[1] - centre[1]) / radii[1]) ** 2
        r = r + ((u[2] - centre[2]) / radii[2]) ** 2
        # The field relative to its value at the centre deforms the shape without rescaling it.
        r = np.sqrt(r) * (1.0 + 0.08 * (deform - _smooth_field(deform_waves, list(centre))))
        inside = (r < 1.0) & (r < best) & (body_r < _FAT_INNER)
        best[inside] = r[inside]
        owner[inside] = index

    label = np.zeros(shape, dtype=np.uint8)
    for index, organ in enumerate(ORGANS):
        region = owner == index
        image[region] = organ.ct if modality == "CT" else organ.mr
        label[region] = organ.label

    # Partial-volume blur (thinner across slices), then bias field and noise.
    ndimage.gaussian_filter(image, sigma=(0.7, 0.7, 0.35), output=image)
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(_NOISE_SIGMA[modality])
    if modality == "CT":
        image += 8.0 * bias + noise
    else:
        image *= 1.0 + 0.15 * bias
        # Magnitude images have Rician noise: air is positive, never negative.
        image = np.hypot(image + noise, rng.standard_normal(shape, dtype=np.float32) * _NOISE_SIGMA[modality])

    if orientation == "LPS":
        image, label = image[::-1, ::-1].copy(), label[::-1, ::-1].copy()
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = np.asarray(shape[:2]) - 1
        affine = affine @ flip
    return image.astype(np.float32, copy=False), label, affine


def write_nifti(path: Path | str, array: np.ndarray, affine: np.ndarray, dtype: np.dtype | type | None = None) -> Path:
    """Write ``array`` as NIfTI with both qform and sform set to ``affine`` (scanner space, mm).

    Setting both codes makes every reader (nibabel, ITK, 3D Slicer) agree on the geometry.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(array if dtype is None else array.astype(dtype))
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_data_dtype(data.dtype)
    nib.save(img, str(path))
    return path


def make_studies(
    folder: Path | str,
    n: int,
    seed: int = 0,
    with_labels: bool = False,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    modality: Literal["CT", "MR"] = "CT",
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    orientation: Literal["RAS", "LPS"] = "RAS",
) -> list[Path]:
    """Write ``n`` volumes ``folder/case_000.nii.gz``... (patient ``i`` uses seed ``seed + i``).

    CT is stored as int16 (as scanners do), MR as float32. With ``with_labels`` the ground truth
    goes to ``folder/labels/final/`` -- the MONAI Label LocalDatastore folder for final labels.
    """
    folder = Path(folder)
    paths = []
    for i in range(n):
        image, label, affine = make_volume(
            seed + i, shape=shape, spacing=spacing, modality=modality, orientation=orientation
        )
        name = f"case_{i:03d}.nii.gz"
        if modality == "CT":
            image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
        paths.append(write_nifti(folder / name, image, affine))
        if with_labels:
            write_nifti(folder / "labels" / "final" / name, label, affine, dtype=np.uint8)
    return paths
