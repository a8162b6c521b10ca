"""Medical volumes in and out: NIfTI (nibabel) or NRRD/MetaImage (ITK: what Slicer uploads) with
their affines, a bound on size checked from the header before any voxel is read, a canonical
(RAS) working orientation whose third axis is axial, images held as stored where float32 holds every
value (a CT's int16) and else as float32, in-plane resampling to the model resolution in float32 (no
8-bit round trip), and the way back to the exact geometry of the image that was sent."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations

from sdfsmis.memory import private_map, release_freed_memory

LABEL_FORMATS = (".nii.gz", ".nii", ".nrrd")
#: Slices read at a time from a compressed NIfTI file (:func:`_stored_voxels`).
READ_SLAB = 16


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
    _bounds: dict[tuple[float, float], Intensity] = field(default_factory=dict, init=False, repr=False, compare=False)

    def intensity(self, percentiles: tuple[float, float]) -> Intensity:
        """The intensity bounds of :attr:`data` (:class:`Intensity`), taken once per volume: a re-run
        on the same volume (kept by a server, never changed in place) skips the percentiles. A
        volume made with ``dataclasses.replace`` takes its own."""
        key = (float(percentiles[0]), float(percentiles[1]))
        if key not in self._bounds:
            self._bounds[key] = Intensity.of(self.data, key)
        return self._bounds[key]

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
            _write_itk(labels.astype(dtype, copy=False), self.affine, Path(path))
            return Path(path)
        header = self.header.copy()
        header.set_data_dtype(dtype)
        image = nib.Nifti1Image(labels.astype(dtype), self.affine, header)
        image.header.set_slope_inter(1, 0)
        nib.save(image, str(path))
        return Path(path)


def _to_ras(affine: np.ndarray) -> np.ndarray:
    return orientations.ornt_transform(orientations.io_orientation(affine), orientations.axcodes2ornt("RAS"))


def _write_itk(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``array`` (voxel order of ``affine``, RAS) uncompressed with ITK, the inverse of
    :func:`_itk_information`. Not MONAI's ITKWriter: it takes a grid whose voxel axes are permuted
    (a coronal or sagittal scan) for a 2-D one and fails on its singular 2 x 2 corner."""
    import itk

    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]  # our affine is RAS, ITK's frame LPS
    spacing = np.linalg.norm(lps, axis=0)
    voxels = np.ascontiguousarray(array.transpose(2, 1, 0))  # ITK arrays are [z, y, x]; Fortran order: no copy
    image = itk.image_view_from_array(voxels)  # a view: ``voxels`` outlives it here
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]).tolist())
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(lps / spacing)))  # columns: axis directions
    itk.imwrite(image, str(path), compression=False)


def _is_nrrd_content(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"NRRD"
    except OSError:
        return False


def _is_itk_file(path: Path) -> bool:
    return path.name.lower().endswith(ITK_SUFFIXES) or _is_nrrd_content(path)


def _itk_io(path: Path):
    """ITK picks its reader by file name, and its MetaImage reader only by a lower-case suffix: NRRD
    content under another name gets the NRRD reader, a MetaImage suffix in any case (``SCAN.MHA``,
    as :data:`ITK_SUFFIXES` are matched) the MetaImage reader."""
    import itk  # slow to import (~4 s): only when such a file comes

    if _is_nrrd_content(path):
        return itk.NrrdImageIO.New()
    if path.name.lower().endswith((".mha", ".mhd")):
        return itk.MetaImageIO.New()
    return itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)


def _check_size(what: str, path: Path, shape: tuple[int, ...], max_voxels: int | None) -> None:
    voxels = int(np.prod(shape, dtype=np.int64))
    if max_voxels is not None and voxels > max_voxels:
        raise VolumeTooLarge(
            f"{what} {path.name} has {voxels} voxels (shape {tuple(shape)}), more than the limit of {max_voxels}"
        )


#: ITK's voxel type of a label file -> the pixel type read: the narrowest one ITK's Python
#: wrapping reads that holds every stored value exactly (64-bit signed and double: float64).
#: Stored voxel types whose every value float32 holds exactly: an image stored as one of them, and
#: not scaled, is held as stored (a CT's int16 in half the memory of float32, every value the same)
#: and converted to float32 a slice at a time, where a run reads it (:meth:`Intensity.apply`).
EXACT_IN_FLOAT32 = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16))
#: ITK's component names of those types -> ITK's pixel types (char as short: ITK wraps no signed char image).
ITK_EXACT_PIXELS = {"unsigned_char": "UC", "char": "SS", "unsigned_short": "US", "short": "SS"}

ITK_LABEL_PIXELS = {
    "unsigned_char": "UC",
    "char": "SS",
    "unsigned_short": "US",
    "short": "SS",
    "unsigned_int": "UI",
    "int": "SI",
    "unsigned_long": "ULL",
    "unsigned_long_long": "ULL",
    "float": "F",
}
LABEL_ID_MAX = np.iinfo(np.int32).max


def label_type(largest: int) -> type:
    """The smallest array type for label ids up to ``largest``."""
    return (
        np.uint8 if largest <= np.iinfo(np.uint8).max else np.uint16 if largest <= np.iinfo(np.uint16).max else np.int32
    )


def _label_ids(stored: np.ndarray, name: str, slope: float = 1.0, inter: float = 0.0) -> np.ndarray:
    """The label ids of ``stored`` (values ``stored * slope + inter``), checked: stored integers in
    the smallest type that holds them (uint8 for most labels: a 512 x 512 x 180 label is 47 MB, not
    189), scaled ones as int32.

    A label is decoded in the type it is stored in, and floats are checked and rounded one
    slice at a time: a whole-volume float64 copy (and the temporaries of checking it) would take
    8 bytes a voxel and more, 2 GiB for a 512 x 512 x 1024 label within the voxel limit that
    arrives as a few hundred kilobytes of gzip. Here a stored uint8 label costs 1 + 4 bytes a voxel.
    """
    invalid = VolumeError(f"label {name} must hold non-negative integer label ids")
    if stored.dtype.kind in "biu" and slope == 1 and inter == 0:
        if stored.size and (stored.min() < 0 or stored.max() > LABEL_ID_MAX):
            raise invalid
        ids_type = label_type(int(stored.max()) if stored.size else 0)
        return stored if stored.dtype == ids_type else _drawn_copy(stored, ids_type)
    ids = _drawn_zeros(stored.shape, np.int32, stored)
    for index in np.ndindex(stored.shape[2:]):  # one slice (of one frame) at a time
        values = np.asarray(stored[(Ellipsis, *index)], dtype=np.float64) * slope + inter
        if not np.isfinite(values).all() or (values < 0).any() or (values > LABEL_ID_MAX).any():
            raise invalid
        rounded = np.round(values)
        if not np.allclose(values, rounded):
            raise invalid
        if rounded.any():
            ids[(Ellipsis, *index)] = rounded
    return ids


def _drawn_zeros(shape: tuple[int, ...], dtype: np.dtype | type, like: np.ndarray | None = None) -> np.ndarray:
    """An empty label in an anonymous memory map of its own, in ``like``'s memory order (else
    Fortran's, as NIfTI stores voxels): a page takes memory only once written, so a drawing on a
    few slices of a 512 x 512 x 180 CT holds those slices, not 47 MB. (From the heap, a reused
    block is cleared page by page, and every page is held.)"""
    dtype = np.dtype(dtype)
    order = "C" if like is not None and like.flags.c_contiguous and not like.flags.f_contiguous else "F"
    size = int(np.prod(shape)) * dtype.itemsize
    if size == 0:
        return np.zeros(shape, dtype, order=order)
    return np.ndarray(shape, dtype, buffer=private_map(size), order=order)


def _write_drawn(target: np.ndarray, source: np.ndarray, first: int = 0) -> None:
    """Copy into ``target``, from its slice ``first`` on, the slices (third axis) of ``source``
    that hold any label: an empty slice is not written, and its pages stay free. A label of fewer
    than three axes (refused by the caller, which names its shape) is copied whole."""
    if source.ndim < 3:
        target[...] = source
        return
    for j in range(source.shape[2]):
        part = source[:, :, j]
        if part.any():
            target[:, :, first + j] = part


def _drawn_copy(source: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """``source`` as ``dtype`` in an empty label of its own (:func:`_drawn_zeros`), its empty slices
    not written."""
    copy = _drawn_zeros(source.shape, dtype, source)
    _write_drawn(copy, source)
    return copy


def present_label_ids(data: np.ndarray) -> list[int]:
    """The non-zero ids in a label array, found one slice at a time: ``np.unique`` of the whole
    array would copy and sort all of it (4 more bytes a voxel, 1 GiB for a label of 256 M voxels)."""
    ids: set[int] = set()
    for index in np.ndindex(data.shape[2:]):
        part = data[(Ellipsis, *index)]
        ids.update(np.unique(part[part != 0]).tolist())
    return sorted(ids)


def _stored_voxels(image: nib.Nifti1Image, path: Path, label: bool = False) -> np.ndarray:
    """The voxels as the file stores them. A compressed file is read :data:`READ_SLAB` slices at a
    time into the array: read whole, nibabel first decompresses it into a buffer of its own and then
    copies that into the array, and a server's heap keeps the freed buffer (a 94 MB CT took 184 MB).
    Of a ``label``, only the slices drawn on are written (:func:`_drawn_zeros`). An uncompressed
    file stays mapped from its file, as nibabel gives it."""
    raw = image.dataobj
    unscaled = (raw.slope, raw.inter) == (1.0, 0.0)  # then nibabel's slices are the stored voxels
    if not (path.name.endswith(".gz") and unscaled and len(image.shape) >= 3):
        return np.asanyarray(raw.get_unscaled())
    data = _drawn_zeros(image.shape, raw.dtype) if label else np.empty(image.shape, dtype=raw.dtype, order="F")
    for first in range(0, image.shape[2], READ_SLAB):
        slab = (slice(None), slice(None), slice(first, first + READ_SLAB))
        if label:
            _write_drawn(data, raw[slab], first)
        else:
            data[slab] = raw[slab]
    return data


def _read_nifti(path: Path, what: str, label: bool, max_voxels: int | None) -> tuple[np.ndarray, np.ndarray, object]:
    image = nib.load(str(path), keep_file_open=True)  # slabs read in order: the stream is decompressed once
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{what} {path.name} is a {type(image).__name__}, not a NIfTI or NRRD volume")
    raw = image.dataobj
    if np.dtype(raw.dtype).names:
        raise VolumeError(f"{what} {path.name} holds RGB/structured voxels, expected one grayscale channel")
    _check_size(what, path, image.shape, max_voxels)
    if label:  # the stored integers, scaled slice by slice (nibabel would scale all of it to float64)
        data = _label_ids(_stored_voxels(image, path, label=True), path.name, float(raw.slope), float(raw.inter))
    elif np.dtype(raw.dtype) in EXACT_IN_FLOAT32 and nib.is_proxy(raw) and (raw.slope, raw.inter) == (1.0, 0.0):
        data = _stored_voxels(image, path)
    else:
        data = image.get_fdata(dtype=np.float32)
    return data, image.affine.astype(np.float64), image.header


def _itk_information(path: Path, what: str) -> tuple[tuple[int, ...], np.ndarray, str]:
    """Shape, RAS affine (ITK's physical frame is LPS) and voxel type (e.g. ``unsigned_char``)
    from an ITK-readable header."""
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
    return shape, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine, io.GetComponentTypeAsString(io.GetComponentType())


def _read_itk(path: Path, what: str, label: bool, max_voxels: int | None) -> tuple[np.ndarray, np.ndarray, object]:
    import itk

    shape, affine, component = _itk_information(path, what)
    _check_size(what, path, shape, max_voxels)
    if label:
        pixel = getattr(itk, ITK_LABEL_PIXELS.get(component, "D"))
    else:  # kept as stored where float32 holds every value exactly (ITK scales nothing), else float32
        pixel = getattr(itk, ITK_EXACT_PIXELS.get(component, "F"))
    reader = itk.ImageFileReader[itk.Image[pixel, 3]].New(FileName=str(path), ImageIO=_itk_io(path))
    reader.Update()
    image = reader.GetOutput()
    if label:  # straight from ITK's buffer to label ids, one copy at most
        view = np.asarray(itk.array_view_from_image(image))  # ITK's buffer, valid while ``image`` lives
        data = _label_ids(view.transpose(2, 1, 0), path.name)  # ITK arrays are [z, y, x]
        if np.shares_memory(data, view):  # kept in its stored type: own it before ITK frees its buffer
            data = _drawn_copy(data, data.dtype)
        del view, image, reader
        release_freed_memory()  # ITK's buffer was the whole volume: the label holds its drawn slices
    else:
        data = itk.array_from_image(image).transpose(2, 1, 0)
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
    if not label and data.dtype.kind == "f" and not np.isfinite(data).all():
        raise VolumeError(f"image {path.name} contains NaN or infinite voxels")
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
            shape, affine, _ = _itk_information(path, "image")
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


#: Above this many voxels the clip percentiles are taken on an even subsample of this size: the
#: bounds of a robust min-max do not need every voxel, and sorting 47 M of them costs seconds.
PERCENTILE_SAMPLE = 2**22


@dataclass(frozen=True)
class Intensity:
    """A volume's robust min-max to [-1, 1] (SD-FSMIS's loader): the clip bounds, applied to any
    part of the volume, so that only the slices a run reads are normalised."""

    low: np.float32
    high: np.float32

    @classmethod
    def of(cls, data: np.ndarray, percentiles: tuple[float, float]) -> Intensity:
        """The bounds in float32 (clipped float32 voxels then never exceed them, so the ends stay
        within [-1, 1]); a volume above :data:`PERCENTILE_SAMPLE` voxels is sampled evenly."""
        flat = data.ravel(order="K")
        sample = flat[:: max(1, flat.size // PERCENTILE_SAMPLE)].astype(np.float32, copy=False)
        low, high = np.float32(np.percentile(sample, percentiles))
        return cls(low, high if high > low else low + np.float32(1.0))

    def apply(self, data: np.ndarray) -> np.ndarray:
        """``data`` (float32, or stored integers that float32 holds exactly) -> float32 in [-1, 1]."""
        clipped = np.clip(data.astype(np.float32, copy=False), self.low, self.high)
        return (clipped - self.low) / (self.high - self.low) * 2 - 1


def normalise_intensity(data: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """The whole volume through :class:`Intensity`, in float32."""
    return Intensity.of(data, percentiles).apply(data)


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
