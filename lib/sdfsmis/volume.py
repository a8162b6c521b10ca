"""Medical volumes in and out: NIfTI with its affine, a canonical (RAS) working orientation
whose third axis is axial, in-plane resampling to the model resolution in float32 (no 8-bit
round trip), and the way back to the exact geometry of the image that was sent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import ITKWriter
from nibabel import orientations

LABEL_FORMATS = (".nii.gz", ".nii", ".nrrd")


class VolumeError(ValueError):
    """An input volume that cannot be used; the message says what is wrong with it."""


@dataclass
class Volume:
    """A 3-D volume held in RAS orientation, with what is needed to return to the original."""

    data: np.ndarray  # [X, Y, Z] in RAS order
    affine: np.ndarray  # the ORIGINAL affine
    shape: tuple[int, ...]  # the ORIGINAL shape
    header: nib.Nifti1Header
    path: Path

    def from_original(self, array: np.ndarray) -> np.ndarray:
        """An array in the original voxel order (e.g. a cached label) -> RAS working orientation."""
        return orientations.apply_orientation(array, _to_ras(self.affine))

    def to_original(self, array: np.ndarray) -> np.ndarray:
        """An array in this volume's RAS working orientation -> the original voxel order."""
        back = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), orientations.io_orientation(self.affine))
        return orientations.apply_orientation(array, back)

    def save_label(self, array: np.ndarray, path: str | Path) -> Path:
        """Write a label array (RAS working orientation) with the original shape, voxel order and
        affine, as NIfTI or as raw NRRD (what OHIF reads, straight into its volume's voxel order)."""
        if not str(path).endswith(LABEL_FORMATS):
            raise VolumeError(f"cannot write a label as {Path(path).name}: use one of {', '.join(LABEL_FORMATS)}")
        labels = self.to_original(array)
        dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
        if str(path).endswith(".nrrd"):
            writer = ITKWriter(output_dtype=dtype, affine_lps_to_ras=True)  # our affine is RAS, ITK's LPS
            writer.set_data_array(labels.astype(dtype), channel_dim=None)
            writer.set_metadata({"affine": self.affine, "original_affine": self.affine}, resample=False)
            writer.write(str(path), compression=False)
            return Path(path)
        header = self.header.copy()
        header.set_data_dtype(dtype)
        image = nib.Nifti1Image(labels.astype(dtype), self.affine, header)
        image.header.set_slope_inter(1, 0)
        nib.save(image, str(path))
        return Path(path)


def _to_ras(affine: np.ndarray) -> np.ndarray:
    return orientations.ornt_transform(orientations.io_orientation(affine), orientations.axcodes2ornt("RAS"))


def load_volume(path: str | Path, label: bool = False) -> Volume:
    """Load a 3-D NIfTI volume (a 4-D one with a single frame is accepted) in RAS order."""
    path = Path(path)
    what = "label" if label else "image"
    try:
        image = nib.load(str(path))
        raw = image.dataobj
        if np.dtype(raw.dtype).names:
            raise VolumeError(f"{what} {path.name} holds RGB/structured voxels, expected one grayscale channel")
        data = np.asanyarray(raw) if label else image.get_fdata(dtype=np.float32)
    except VolumeError:
        raise
    except Exception as error:  # nibabel raises many types for truncated or foreign files
        raise VolumeError(f"{what} {path.name} is not a readable NIfTI volume: {error}") from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{what} {path.name} has shape {data.shape}: a 3-D volume is expected")
    if min(data.shape) < 2 and not label:
        raise VolumeError(f"{what} {path.name} has shape {data.shape}: a 2-D slice, a 3-D volume is expected")
    if not label and not np.isfinite(data).all():
        raise VolumeError(f"image {path.name} contains NaN or infinite voxels")
    if label:
        if not np.isfinite(data).all() or (data < 0).any() or not np.allclose(data, np.round(data)):
            raise VolumeError(f"label {path.name} must hold non-negative integer label ids")
        data = np.round(data).astype(np.int32)
    affine = image.affine.astype(np.float64)
    volume = Volume(data, affine, data.shape, image.header, path)
    volume.data = volume.from_original(data)
    return volume


def check_same_geometry(image: Volume, label: Volume, atol: float = 1e-3) -> None:
    """A label must lie on its image's voxel grid: same shape, same affine."""
    if image.shape != label.shape:
        raise VolumeError(
            f"label {label.path.name} has shape {label.shape} but its image {image.path.name} has {image.shape}"
        )
    if not np.allclose(image.affine, label.affine, atol=atol):
        raise VolumeError(
            f"label {label.path.name} and image {image.path.name} have different affines (orientation/spacing/origin)"
        )


def normalise_intensity(data: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Robust per-volume min-max to [-1, 1] (SD-FSMIS's loader), in float32."""
    low, high = np.percentile(data, percentiles)
    if high <= low:
        high = low + 1.0
    return (np.clip(data, low, high) - low) / (high - low) * 2 - 1


@dataclass(frozen=True)
class SliceGrid:
    """In-plane mapping between a volume's axial slices and square model slices: pad to a
    square (keeps the aspect ratio), then resize."""

    height: int
    width: int
    resolution: int

    @property
    def side(self) -> int:
        return max(self.height, self.width)

    def to_model(self, slices: torch.Tensor, mode: str = "bilinear", pad_value: float = -1.0) -> torch.Tensor:
        """[N, 1, X, Y] -> [N, 1, R, R]."""
        padded = F.pad(slices, (0, self.side - self.width, 0, self.side - self.height), value=pad_value)
        if mode == "nearest":
            return F.interpolate(padded, size=(self.resolution,) * 2, mode="nearest-exact")
        return F.interpolate(padded, size=(self.resolution,) * 2, mode=mode, align_corners=False, antialias=True)

    def from_model(self, slices: torch.Tensor) -> torch.Tensor:
        """[N, 1, R, R] -> [N, 1, X, Y] (bilinear: meant for probabilities)."""
        full = F.interpolate(slices, size=(self.side,) * 2, mode="bilinear", align_corners=False)
        return full[..., : self.height, : self.width]


def axial_slices(data: np.ndarray, indices: list[int] | np.ndarray) -> torch.Tensor:
    """Selected axial slices of a [X, Y, Z] array as a float tensor [N, 1, X, Y]."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(data[..., indices], -1, 0)[:, None])).float()
