"""A batch of query slices' maps held small, as the segmenter keeps them between requests.

On a structure across a 512 x 512 x 180 volume, a label's region is the whole volume: held as
arrays (a float16 probability and doubt, a boolean mask and review), its maps took 240 MB, more
than the int16 image itself. Most of those voxels say nothing: the mask is one bit, the doubt is
zero off the drawn shape's contour, and the fused probability is exactly 0 or 1 away from it. So
the mask and the review are kept as bits, and the doubt and the probability as the voxels that
differ from their background (zero, or the mask itself). The probability, which only decides
which of two overlapping labels a voxel goes to, is kept in :data:`LEVELS` steps: in float16 it
took 51 of the 110 MB kept after a first run over a head (a structure across the volume)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: A sparse map costs an index (4 bytes) and a value per voxel it keeps: past this share of its
#: voxels, it is kept as the array itself.
SPARSE_SHARE = 0.25
#: 1.0 in float16, as an integer: a boolean background's 1.
ONE_BITS = np.float16(1).view(np.uint16)
#: A probability in [0, 1] kept as an integer level 0..LEVELS (uint8).
LEVELS = 255


def levels(probability: np.ndarray) -> np.ndarray:
    """float32 probabilities in [0, 1] -> uint8 levels 0..:data:`LEVELS` (nearest), same memory order."""
    return np.rint(probability * np.float32(LEVELS)).astype(np.uint8, order="K")


def half(values: np.ndarray) -> np.ndarray:
    """float32 -> float16 in the array's own memory order, through torch: the same bits as numpy's
    conversion at a sixth of its time (numpy's does not use the CPU's conversion instructions)."""
    return torch.from_numpy(values).to(torch.float16).numpy()


@dataclass(frozen=True)
class PackedMask:
    """A boolean [X, Y, n] stack (Fortran order) as bits, one row of bytes per slice."""

    bits: np.ndarray  # [n, ceil(X * Y / 8)] uint8
    plane: tuple[int, int]  # X, Y

    @classmethod
    def of(cls, mask: np.ndarray) -> PackedMask:
        flat = mask.reshape(-1, mask.shape[2], order="F")  # [X * Y, n]: each slice a column
        return cls(np.packbits(flat, axis=0).T.copy(), mask.shape[:2])

    @property
    def depth(self) -> int:
        return self.bits.shape[0]

    def slice(self, i: int) -> np.ndarray:
        """Slice ``i`` as a boolean [X, Y] array (Fortran order), a new one."""
        count = self.plane[0] * self.plane[1]
        return np.unpackbits(self.bits[i], count=count).view(bool).reshape(self.plane, order="F")

    def unpacked(self) -> np.ndarray:
        """The whole [X, Y, n] boolean stack (Fortran order)."""
        count = self.plane[0] * self.plane[1]
        flat = np.unpackbits(self.bits, axis=1, count=count).view(bool)  # [n, X * Y]
        return flat.T.reshape(self.plane + (self.depth,), order="F")


@dataclass(frozen=True)
class SparseMap:
    """An [X, Y, n] map kept as the voxels that differ from a background the caller holds (zero, or
    the batch's own mask): their flat indices (Fortran order) and values; or as the array itself
    where more than :data:`SPARSE_SHARE` of the voxels differ."""

    shape: tuple[int, int, int]
    index: np.ndarray | None  # [m] int32 (int64 past 2**31 voxels)
    values: np.ndarray  # [m], or the whole map [X, Y, n] where ``index`` is None

    @classmethod
    def of(cls, values: np.ndarray, background: np.ndarray | None = None) -> SparseMap:
        """``values`` [X, Y, n], float32 (kept as float16) or uint8 :func:`levels` (kept as they
        are), against ``background`` (None: zero; a boolean background is 0 and 1, or 0 and
        :data:`LEVELS`), which must be given back to :meth:`dense` to rebuild them. A voxel is kept
        where its stored bits differ from the background's: a probability within 2**-12 of 1 is 1
        in float16, a doubt below float16's smallest step is 0, and :meth:`dense` gives the same
        bits whether they were kept or not. float16 bits are compared as integers (numpy has no
        float16 arithmetic of its own)."""
        stored = values if values.dtype == np.uint8 else half(np.asfortranarray(values))
        stored = stored.reshape(-1, order="F")
        bits = _bits(stored)
        if background is None:
            differs = bits != 0
        else:
            differs = bits != background.reshape(-1, order="F") * _one(stored.dtype)
        index = np.flatnonzero(differs)
        if len(index) > SPARSE_SHARE * bits.size:
            return cls(values.shape, None, stored.reshape(values.shape, order="F"))
        dtype = np.int32 if bits.size < 2**31 else np.int64
        return cls(values.shape, index.astype(dtype), stored[index])

    def dense(self, background: np.ndarray | None = None) -> np.ndarray:
        """The map [X, Y, n] (Fortran order), a new array, on ``background`` (None: zero)."""
        if self.index is None:
            return np.array(self.values, order="F")
        out = np.zeros(self.shape, dtype=self.values.dtype, order="F")
        if background is not None:  # 0 and 1 in the kept type's bits
            _bits(out)[...] = background * _one(out.dtype)
        out.reshape(-1, order="F")[self.index] = self.values
        return out


def _bits(array: np.ndarray) -> np.ndarray:
    """``array`` viewed as unsigned integers of its item size: uint8 levels as they are, float16 as
    uint16, whose bits numpy compares without float16 arithmetic."""
    return array.view(f"u{array.itemsize}")


def _one(dtype: np.dtype) -> np.uint8 | np.uint16:
    """A boolean background's 1 in the bits of a kept ``dtype``: :data:`LEVELS`, or 1.0 in float16."""
    return np.uint8(LEVELS) if dtype == np.uint8 else ONE_BITS
