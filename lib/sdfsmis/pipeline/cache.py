"""What a served model has already computed, kept for the next request on the same image: the
radiologist corrects one slice and runs again, and only the query slices whose serving supports
changed are recomputed.

Entries are keyed by the digest of everything that decides them (the model's input crops, the
support rows' crops and masks, the serving weights, the threshold), never by names or paths, so a
hit is by construction what recomputing would give; the segmenter computes every unit in a fixed
composition (each support row alone, query slices in batches aligned to absolute slice numbers) so
that the same inputs give the same bits whether the rest of the request was cached or not. The
cache is bounded in bytes and evicts the least recently used entries; the owner clears it when
the weights change."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from sdfsmis.pipeline.mapped import mapped_copy

T = TypeVar("T")


def digest(*parts: bytes | str | float | int | np.ndarray | torch.Tensor) -> bytes:
    """A 16-byte digest of arrays (their dtype, shape, memory order and bytes) and scalars, in order.
    The memory order is part of it, so that no array is copied to another order to be hashed."""
    h = hashlib.sha256()  # the fastest hashlib digest where the CPU has SHA instructions (x86-64 since 2017)
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous().numpy()
        if isinstance(part, np.ndarray):
            if not (part.flags.c_contiguous or part.flags.f_contiguous):
                part = part.copy(order="K")  # a crop of a Fortran-ordered volume stays Fortran: no transposing copy
                if not (part.flags.c_contiguous or part.flags.f_contiguous):  # axes permuted: neither order
                    part = np.ascontiguousarray(part)
            fortran = not part.flags.c_contiguous
            h.update(f"{part.dtype}{part.shape}{'F' if fortran else 'C'}".encode())
            h.update((part.T if fortran else part).data)
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(repr(part).encode())
        h.update(b"\x00")
    return h.digest()[:16]


def nbytes(value: Any) -> int:
    """Bytes held by the tensors and arrays of ``value`` (dataclasses, tuples, lists, dicts)."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 0


#: Values from this size on are kept where they were computed: one block that size pins nothing
#: the heap could not reuse once it is freed (an image read, a drawing carried into the query),
#: and a copy would hold it twice for a moment (a 512 x 512 x 180 CT: 94 MB more at its read).
WHOLE_BLOCK_BYTES = 16 * 2**20

#: What an entry costs beyond its arrays (its key, the bookkeeping): so that many small entries
#: (a pair of slices' overlapping components) count too, and are evicted like large ones.
ENTRY_BYTES = 256


class ComputeCache:
    """A thread-safe LRU of computed values, bounded by ``max_bytes`` (0 keeps nothing), each
    counted as its arrays' bytes plus :data:`ENTRY_BYTES`. A value larger than the bound is not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: bytes, value: T) -> T:
        """Keep ``value`` under ``key`` and return what is kept. Below :data:`WHOLE_BLOCK_BYTES` its
        arrays are copied outside the heap (:func:`~sdfsmis.pipeline.mapped.mapped_copy`): the caller
        goes on with the copy and lets the original go. A value larger than the bound is returned as
        it is, not kept."""
        size = nbytes(value) + ENTRY_BYTES
        if size <= self.max_bytes and size < WHOLE_BLOCK_BYTES:
            value = mapped_copy(value)
        with self._lock:
            if key in self._entries:
                self.bytes -= self._entries.pop(key)[1]
            if size > self.max_bytes:
                return value
            self._entries[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                self.bytes -= self._entries.popitem(last=False)[1][1]
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def stats(self) -> dict:
        return {
            "entries": len(self),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
        }


def cached(cache: ComputeCache | None, key: bytes, compute: Callable[[], T]) -> T:
    """The value kept under ``key``, else ``compute()``, kept for next time (no cache: computed)."""
    value = cache.get(key) if cache is not None else None
    if value is None:
        value = compute()
        if cache is not None:
            value = cache.put(key, value)
    return value
