"""Medical volumes in and out: NIfTI (nibabel) or NRRD/MetaImage (ITK: what Slicer uploads) with
their affines, a bound on size checked from the header before any voxel is read, a canonical
(RAS) working orientation whose third axis is axial, in-plane resampling to the model resolution in float32 (no 8-bit
round trip), and the way back to the exact geometry of the image that was sent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations

LABEL_FORMATS = (".nii.gz", ".nii", ".nrrd")


class VolumeError(ValueError):
    """An input volume that cannot be used; the message says what is wrong with it."""


class VolumeTooLarge(VolumeError):
    """A volume with more voxels than the configured limit (checked before reading the data)."""


#: Read by ITK; everything else by nibabel. An NRRD is also recognised by its magic bytes,
#: since an upload keeps only the suffix its client gave it.
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


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

    def original_slice(self, z: int) -> int:
        """The index, along the original file's own slice axis, of RAS axial slice ``z``."""
        ornt = orientations.io_orientation(self.affine)
        axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
        return int(z) if ornt[axis, 1] > 0 else self.shape[axis] - 1 - int(z)

    def save_map(self, array: np.ndarray, path: str | Path) -> Path:
        """Write a float map (RAS working orientation), e.g. an uncertainty, as float32 NIfTI
        with the original shape, voxel order and affine."""
        if not str(path).endswith((".nii.gz", ".nii")):
            raise VolumeError(f"cannot write a map as {Path(path).name}: use .nii.gz or .nii")
        header = self.header.copy()
        header.set_data_dtype(np.float32)
        image = nib.Nifti1Image(self.to_original(array).astype(np.float32), self.affine, header)
        image.header.set_slope_inter(1, 0)
        nib.save(image, str(path))
        return Path(path)

    def save_label(self, array: np.ndarray, path: str | Path) -> Path:
        """Write a label array (RAS working orientation) with the original shape, voxel order and
        affine, as NIfTI or as raw NRRD (what OHIF reads, straight into its volume's voxel order)."""
        if not str(path).endswith(LABEL_FORMATS):
            raise VolumeError(f"cannot write a label as {Path(path).name}: use one of {', '.join(LABEL_FORMATS)}")
        labels = self.to_original(array)
        dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
        if str(path).endswith(".nrrd"):
            from monai.data import ITKWriter  # here: importing monai costs every CLI start ~2 s

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


def _is_nrrd_content(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"NRRD"
    except OSError:
        return False


def _is_itk_file(path: Path) -> bool:
    return path.name.lower().endswith(ITK_SUFFIXES) or _is_nrrd_content(path)


def _itk_io(path: Path):
    """ITK picks its reader by file name; NRRD content under another name gets the NRRD reader."""
    import itk  # slow to import (~4 s): only when such a file comes

    if _is_nrrd_content(path):
        return itk.NrrdImageIO.New()
    return itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)


def _check_size(what: str, path: Path, shape: tuple[int, ...], max_voxels: int | None) -> None:
    voxels = int(np.prod(shape, dtype=np.int64))
    if max_voxels is not None and voxels > max_voxels:
        raise VolumeTooLarge(
            f"{what} {path.name} has {voxels} voxels (shape {tuple(shape)}), more than the limit of {max_voxels}"
        )


def _read_nifti(path: Path, what: str, label: bool, max_voxels: int | None) -> tuple[np.ndarray, np.ndarray, object]:
    image = nib.load(str(path))
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{what} {path.name} is a {type(image).__name__}, not a NIfTI or NRRD volume")
    raw = image.dataobj
    if np.dtype(raw.dtype).names:
        raise VolumeError(f"{what} {path.name} holds RGB/structured voxels, expected one grayscale channel")
    _check_size(what, path, image.shape, max_voxels)
    data = np.asanyarray(raw) if label else image.get_fdata(dtype=np.float32)
    return data, image.affine.astype(np.float64), image.header


def _itk_information(path: Path, what: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and RAS affine from an ITK-readable header (ITK's physical frame is LPS)."""
    io = _itk_io(path)
    if io is None:
        raise VolumeError(f"{what} {path.name} is not a readable NIfTI or NRRD volume")
    io.SetFileName(str(path))
    io.ReadImageInformation()
    if io.GetNumberOfComponents() != 1:
        raise VolumeError(
            f"{what} {path.name} has {io.GetNumberOfComponents()} components per voxel (RGB/vector), "
            "expected one grayscale channel"
        )
    dims = io.GetNumberOfDimensions()
    shape = tuple(io.GetDimensions(i) for i in range(dims))
    if dims != 3:
        raise VolumeError(f"{what} {path.name} has shape {shape}: a 3-D volume is expected")
    direction = np.array([io.GetDirection(i) for i in range(3)], dtype=np.float64).T  # columns: axis directions
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array([io.GetSpacing(i) for i in range(3)])[None, :]
    affine[:3, 3] = [io.GetOrigin(i) for i in range(3)]
    return shape, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _read_itk(path: Path, what: str, label: bool, max_voxels: int | None) -> tuple[np.ndarray, np.ndarray, object]:
    import itk

    shape, affine = _itk_information(path, what)
    _check_size(what, path, shape, max_voxels)
    pixel = itk.D if label else itk.F  # float64 keeps any integer label id exact
    reader = itk.ImageFileReader[itk.Image[pixel, 3]].New(FileName=str(path), ImageIO=_itk_io(path))
    reader.Update()
    image = reader.GetOutput()
    data = itk.array_from_image(image).transpose(2, 1, 0)  # ITK arrays are [z, y, x]
    header = nib.Nifti1Image(np.zeros((1, 1, 1), np.float32), affine).header
    return data, affine, header


def load_volume(path: str | Path, label: bool = False, max_voxels: int | None = None) -> Volume:
    """Load a 3-D volume (a 4-D one with a single frame is accepted) in RAS order, refusing one
    of more than ``max_voxels`` voxels before reading its data."""
    path = Path(path)
    what = "label" if label else "image"
    read = _read_itk if _is_itk_file(path) else _read_nifti
    try:
        data, affine, header = read(path, what, label, max_voxels)
    except VolumeError:
        raise
    except Exception as error:  # nibabel and ITK raise many types for truncated or foreign files
        raise VolumeError(f"{what} {path.name} is not a readable NIfTI or NRRD volume: {error}") from error
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
    volume = Volume(data, affine, data.shape, header, path)
    volume.data = volume.from_original(data)
    return volume


@dataclass(frozen=True)
class Geometry:
    """The voxel grid of a volume file, read from its header alone."""

    shape: tuple[int, ...]
    affine: np.ndarray
    path: Path


def read_geometry(path: str | Path) -> Geometry:
    """Shape (a single-frame 4-D squeezed, as :func:`load_volume` does) and affine, no voxel read."""
    path = Path(path)
    try:
        if _is_itk_file(path):
            shape, affine = _itk_information(path, "image")
        else:
            image = nib.load(str(path))
            shape, affine = image.shape, image.affine.astype(np.float64)
    except VolumeError:
        raise
    except Exception as error:
        raise VolumeError(f"image {path.name} is not a readable NIfTI or NRRD volume: {error}") from error
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    return Geometry(tuple(int(n) for n in shape), affine, path)


def check_same_geometry(image: Volume | Geometry, label: Volume | Geometry, atol: float = 1e-3) -> None:
    """A label must lie on its image's voxel grid: same shape, same affine."""
    if image.shape != label.shape:
        raise VolumeError(
            f"label {label.path.name} has shape {label.shape} but its image {image.path.name} has {image.shape}"
        )
    if not np.allclose(image.affine, label.affine, atol=atol):
        raise VolumeError(
            f"label {label.path.name} and image {image.path.name} have different affines (orientation/spacing/origin)"
        )


def ras_spacing(volume: Volume) -> tuple[float, float, float]:
    """Voxel size (mm) along the axes of the RAS working array."""
    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
    out = np.zeros(3)
    out[orientations.io_orientation(volume.affine)[:, 0].astype(int)] = spacing
    return tuple(float(v) for v in out)


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
