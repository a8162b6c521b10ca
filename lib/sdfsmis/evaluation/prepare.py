"""``sdfsmis prepare``: the data sets' official raw layouts -> the lineage's preprocessed volumes
(protocol.md "Data sets"), written as a :class:`PreparedDataset` with supervoxels.

Every volume is first brought to the closest canonical (RAS) orientation, so that the third
array axis is axial; resampling and cropping keep the affine exact (the world position of every
voxel is preserved), so prepared labels overlay their images in any viewer."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

from sdfsmis.dicom.reader import read_series
from sdfsmis.evaluation.dataset import PreparedDataset
from sdfsmis.samples.synthetic import write_nifti
from sdfsmis.training.supervoxels import load_or_compute_supervoxels

CHAOS_LABELS = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
#: CHAOS ground-truth PNG intensity ranges (the challenge's own ranges) -> label ids.
CHAOS_PNG_RANGES = ((55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))
SYNAPSE_LABELS = {
    name: i + 1
    for i, name in enumerate(
        (
            "spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
            "inferior_vena_cava", "portal_splenic_vein", "pancreas", "right_adrenal_gland", "left_adrenal_gland",
        )
    )
}  # fmt: skip
SYNAPSE_TEST_LABELS = [1, 2, 3, 6]


@dataclass(frozen=True)
class Preprocessing:
    """One data set's recipe. ``fit='crop'``: centre-crop (or pad) in-plane to ``size`` after
    resampling to ``spacing``; ``fit='resize'``: pad to a square and resample in-plane to
    ``size`` x ``size`` (z untouched). ``slice_spacing`` (``prepare --slice-spacing``) replaces the
    slice thickness of either: e.g. the same patients at another slice thickness."""

    window: tuple[float, float] | None = None  # CT window in HU
    clip_top: float | None = None  # percent of the histogram clipped at the top
    spacing: tuple[float, float, float] | None = None  # target mm (fit='crop')
    border: float = 0.0  # fraction of each in-plane side cropped first (Synapse: 32 px of 512)
    size: int = 256
    fit: str = "crop"
    slice_spacing: float | None = None  # target slice thickness in mm, for either fit


CHAOS_RECIPE = Preprocessing(clip_top=0.5, spacing=(1.25, 1.25, 7.70), fit="crop")
SYNAPSE_RECIPE = Preprocessing(window=(-125.0, 275.0), border=32 / 512, fit="resize")
FOLDER_RECIPE = Preprocessing(clip_top=0.5, fit="resize")


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine in the closest canonical (RAS) voxel order."""
    image = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asarray(image.dataobj), image.affine


def resample(
    data: np.ndarray, affine: np.ndarray, ratio: np.ndarray, shape: tuple[int, ...], order: int
) -> tuple[np.ndarray, np.ndarray]:
    """Output voxel o samples input index ratio * o + (ratio - 1) / 2, so the volumes' outer
    edges coincide; images are low-pass filtered first when downsampled (no aliasing)."""
    ratio = np.asarray(ratio, dtype=float)
    offset = (ratio - 1) / 2
    if order > 0:
        data = data.astype(np.float32)
        sigma = np.maximum(0.0, (ratio - 1) / 2)
        if sigma.any():
            data = ndimage.gaussian_filter(data, sigma)
    out = ndimage.affine_transform(data, ratio, offset, output_shape=shape, order=order, mode="nearest")
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(ratio)
    index_map[:3, 3] = offset
    return out, affine @ index_map


def crop_or_pad(data: np.ndarray, affine: np.ndarray, start: tuple[int, int], size: tuple[int, int], fill: float):
    """In-plane window [start, start + size) of the first two axes; outside the volume: ``fill``."""
    pads, slices = [], []
    for axis, (s, n) in enumerate(zip(start, size)):
        before, after = max(0, -s), max(0, s + n - data.shape[axis])
        pads.append((before, after))
        slices.append(slice(s + before, s + before + n))
    data = np.pad(data, [*pads, (0, 0)], constant_values=fill)[tuple(slices)]
    shift = np.eye(4)
    shift[:2, 3] = start
    return data, affine @ shift


def preprocess(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, recipe: Preprocessing
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32, label uint8, affine) of one case, RAS, ``size`` x ``size`` in-plane."""
    image, ras = canonical(np.asarray(image, dtype=np.float32), affine)
    label, _ = canonical(np.asarray(label, dtype=np.uint8), affine)
    if recipe.window is not None:
        image = np.clip(image, *recipe.window)
    if recipe.clip_top is not None:
        image = np.minimum(image, np.percentile(image, 100 - recipe.clip_top))
    fill = float(image.min())
    if recipe.border:
        border = [int(round(n * recipe.border)) for n in image.shape[:2]]
        inner = [n - 2 * b for n, b in zip(image.shape[:2], border)]
        image, _ = crop_or_pad(image, ras, border, inner, fill)
        label, ras = crop_or_pad(label, ras, border, inner, 0)
    spacing = np.linalg.norm(ras[:3, :3], axis=0)
    if recipe.fit == "crop":
        target = np.array(recipe.spacing or spacing, dtype=float)
        if recipe.slice_spacing:
            target[2] = recipe.slice_spacing
        ratio = target / spacing
        shape = tuple(max(1, int(round(n / r))) for n, r in zip(image.shape, ratio))
        image, _ = resample(image, ras, ratio, shape, order=1)
        label, ras = resample(label, ras, ratio, shape, order=0)
        start = tuple((n - recipe.size) // 2 for n in shape[:2])
    elif recipe.fit == "resize":
        side = max(image.shape[:2])
        start = tuple((n - side) // 2 for n in image.shape[:2])
        image, _ = crop_or_pad(image, ras, start, (side, side), fill)
        label, ras = crop_or_pad(label, ras, start, (side, side), 0)
        ratio = np.array([side / recipe.size, side / recipe.size, (recipe.slice_spacing or spacing[2]) / spacing[2]])
        shape = (recipe.size, recipe.size, max(1, int(round(image.shape[2] / ratio[2]))))
        image, _ = resample(image, ras, ratio, shape, order=1)
        label, ras = resample(label, ras, ratio, shape, order=0)
        start = (0, 0)
    else:
        raise ValueError(f"unknown fit {recipe.fit!r}: use 'crop' or 'resize'")
    image, _ = crop_or_pad(image, ras, start, (recipe.size, recipe.size), fill)
    label, ras = crop_or_pad(label, ras, start, (recipe.size, recipe.size), 0)
    return image.astype(np.float32), label.astype(np.uint8), ras


def chaos_png_labels(png: np.ndarray) -> np.ndarray:
    """CHAOS ground-truth intensities (63, 126, 189, 252 nominal) -> label ids 1..4."""
    labels = np.zeros(png.shape, dtype=np.uint8)
    for low, high, label_id in CHAOS_PNG_RANGES:
        labels[(png >= low) & (png <= high)] = label_id
    return labels


def _trailing_number(path: Path) -> int:
    found = re.findall(r"\d+", path.stem)
    return int(found[-1]) if found else 0


def _chaos_root(src: Path) -> Path:
    for candidate in ("CHAOS_Train_Sets/Train_Sets/MR", "Train_Sets/MR", "MR", "."):
        if (src / candidate).is_dir() and any((src / candidate).glob("*/T2SPIR/DICOM_anon")):
            return src / candidate
    raise FileNotFoundError(f"{src}: no CHAOS layout found (expected CHAOS_Train_Sets/Train_Sets/MR/<id>/T2SPIR/...)")


def read_chaos_patient(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One CHAOS T2-SPIR patient: the DICOM series and its per-slice PNG ground truth.

    A PNG belongs to the DICOM file of the same name (``IMG-0002-00001``); when the names differ,
    PNGs sorted by their trailing number pair with the slices sorted by instance number."""
    series = read_series(sorted((folder / "T2SPIR" / "DICOM_anon").glob("*.dcm")))
    pngs = {p.stem: p for p in (folder / "T2SPIR" / "Ground").glob("*.png")}
    if len(pngs) != len(series.files):
        raise ValueError(f"{folder}: {len(series.files)} DICOM slices but {len(pngs)} ground-truth PNGs")
    if all(f.stem in pngs for f in series.files):
        matched = [pngs[f.stem] for f in series.files]
    else:
        import pydicom

        by_instance = sorted(
            series.files, key=lambda f: int(pydicom.dcmread(str(f), stop_before_pixels=True).InstanceNumber)
        )
        ordered = dict(zip(by_instance, sorted(pngs.values(), key=_trailing_number)))
        matched = [ordered[f] for f in series.files]
    label = np.stack([chaos_png_labels(np.asarray(Image.open(p).convert("L"))).T for p in matched], axis=-1)
    return series.data, label, series.affine


def _chaos_cases(src: Path) -> Iterator[tuple[str, Callable]]:
    root = _chaos_root(src)
    patients = sorted((p for p in root.iterdir() if (p / "T2SPIR" / "DICOM_anon").is_dir()), key=_trailing_number)
    for patient in patients:
        yield f"chaos_{_trailing_number(patient):02d}", lambda p=patient: read_chaos_patient(p)


def _nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    return (data[..., 0] if data.ndim == 4 and data.shape[3] == 1 else data), image.affine


def _pair(image: Path, label: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data, affine = _nifti(image)
    labels, label_affine = _nifti(label)
    if labels.shape != data.shape or not np.allclose(affine, label_affine, atol=1e-3):
        raise ValueError(f"{label} does not lie on the grid of {image} (shape or affine differ)")
    return data.astype(np.float32), np.rint(labels).astype(np.uint8), affine


def _synapse_cases(src: Path) -> Iterator[tuple[str, Callable]]:
    for candidate in ("RawData/Training", "Training", "."):
        if (src / candidate / "img").is_dir():
            root = src / candidate
            break
    else:
        raise FileNotFoundError(f"{src}: no Synapse layout found (expected RawData/Training/img/img0001.nii.gz)")
    for image in sorted((root / "img").glob("img*.nii*"), key=_trailing_number):
        number = _trailing_number(image)
        label = next(iter(sorted((root / "label").glob(f"label{number:04d}.nii*"))), None)
        if label is None:
            raise FileNotFoundError(f"no label{number:04d}.nii.gz for {image}")
        yield f"synapse_{number:04d}", lambda i=image, lb=label: _pair(i, lb)


def _folder_cases(src: Path) -> Iterator[tuple[str, Callable]]:
    images = sorted(p for p in (src / "imagesTr").glob("*.nii*") if not p.name.startswith("."))
    if not images:
        raise FileNotFoundError(f"{src}: no imagesTr/NAME.nii.gz (Medical Segmentation Decathlon layout)")
    for image in images:
        label = src / "labelsTr" / image.name
        if not label.is_file():
            raise FileNotFoundError(f"no labelsTr/{image.name} for {image}")
        yield image.name.split(".nii")[0], lambda i=image, lb=label: _pair(i, lb)


def _folder_names(src: Path, test_labels: list[int]) -> dict[str, int]:
    """Class names from the Decathlon ``dataset.json`` when there is one."""
    manifest = src / "dataset.json"
    names = json.loads(manifest.read_text()).get("labels", {}) if manifest.is_file() else {}
    by_id = {int(k): str(v).strip().lower().replace(" ", "_") for k, v in names.items() if str(k).isdigit()}
    return {by_id.get(k, f"class_{k}"): k for k in sorted(set(by_id) - {0} | set(test_labels))}


def prepare(
    kind: str,
    src: str | Path,
    dst: str | Path,
    test_labels: list[int] | None = None,
    supervoxel_min_size: int = 5000,
    limit: int | None = None,
    log: Callable[[str], None] = print,
    slice_spacing: float | None = None,
) -> PreparedDataset:
    """Prepare a whole data set (``kind`` chaos, synapse or folder) into ``dst``; ``slice_spacing``
    (mm) resamples every volume to that slice thickness instead of the recipe's."""
    src, dst = Path(src), Path(dst)
    if kind == "chaos":
        cases, recipe, labels, modality = _chaos_cases(src), CHAOS_RECIPE, CHAOS_LABELS, "MR"
        test_labels = test_labels or list(CHAOS_LABELS.values())
    elif kind == "synapse":
        cases, recipe, labels, modality = _synapse_cases(src), SYNAPSE_RECIPE, SYNAPSE_LABELS, "CT"
        test_labels = test_labels or SYNAPSE_TEST_LABELS
    elif kind == "folder":
        if not test_labels:
            raise ValueError("prepare folder needs --labels: the class ids to test")
        cases, recipe, labels, modality = _folder_cases(src), FOLDER_RECIPE, _folder_names(src, test_labels), "unknown"
    else:
        raise ValueError(f"unknown data set kind {kind!r}")
    if slice_spacing is not None:
        if slice_spacing <= 0:
            raise ValueError(f"--slice-spacing must be positive, got {slice_spacing}")
        recipe = replace(recipe, slice_spacing=float(slice_spacing))
    names = []
    for name, read in cases:
        if limit is not None and len(names) >= limit:
            break
        image, label, affine = preprocess(*read(), recipe)
        write_nifti(dst / f"{name}.nii.gz", image, affine)
        write_nifti(dst / "labels" / "final" / f"{name}.nii.gz", label, affine, dtype=np.uint8)
        supervoxels = load_or_compute_supervoxels(dst / f"{name}.nii.gz", min_size=supervoxel_min_size)
        present = sorted(int(k) for k in np.unique(label) if k)
        log(f"{name}: {'x'.join(map(str, image.shape))} labels {present} supervoxels {int(supervoxels.max())}")
        names.append(name)
    if not names:
        raise FileNotFoundError(f"{src}: no cases found")
    dataset = PreparedDataset(
        dst,
        name=kind if kind != "folder" else src.name,
        modality=modality,
        labels=labels,
        test_labels=list(test_labels),
        cases=names,
        preprocessing={**asdict(recipe), "supervoxel_min_size": supervoxel_min_size, "source": str(src)},
    )
    dataset.save()
    return dataset
