"""How the process holds CPU memory: glibc's heap keeps what is freed for the next buffer (a
server's choice, for speed) and gives it back when asked; a large array can have memory of its
own outside the heap, which the kernel takes back when the array goes, and whose pages take
memory only once written."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap


def private_map(size: int) -> mmap.mmap:
    """``size`` bytes of zeros in an anonymous private map. Private, not shared (Python's default):
    a page never written is the kernel's zero page, read or not, and a forked process copies what
    it writes instead of sharing it."""
    if hasattr(mmap, "MAP_PRIVATE"):  # Unix
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    return mmap.mmap(-1, size)


#: glibc ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@functools.cache
def _c_library() -> ctypes.CDLL | None:
    """The process's C library, looked up once (``find_library`` runs a program)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def retain_freed_memory(largest_buffer: int = 2**30) -> bool:
    """Have glibc serve buffers up to ``largest_buffer`` bytes from its heap and keep freed
    memory for the next request instead of returning it to the kernel.

    By default every buffer above 32 MiB is a fresh ``mmap`` whose pages the kernel zeroes on
    first touch; a full-size VAE at 256 x 256 allocates and frees such activations layer after
    layer, so ~20 % of the CPU time went to the kernel (measured: SD1.5 shape, 8 query slices,
    32 s -> 27 s). The process keeps its peak memory, as a server does anyway. Process-wide;
    returns False where the C library is not glibc (nothing changed)."""
    mallopt = getattr(_c_library(), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, largest_buffer)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> bool:
    """Give the heap's freed pages back to the kernel now (glibc's ``malloc_trim``): what the
    process holds is then what it uses. A measurement takes its baseline after this, or a run
    would reuse memory that earlier work freed and the heap retained, and look smaller than it
    is. Returns False where the C library is not glibc (nothing done)."""
    trim = getattr(_c_library(), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True
