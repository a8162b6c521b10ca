"""Copies of computed values whose arrays live in an anonymous memory map, outside the C
library's heap.

A server keeps what a request computed (:mod:`sdfsmis.pipeline.cache`) while the request goes on
allocating and freeing buffers around it. In glibc's heap the kept pieces of each batch were
allocated among its freed buffers, and the next batch's larger buffers no longer fitted the holes:
after the first DPL run over a 512 x 512 x 180 head (2 CPU cores, real DINOv2-small shape) the
process held 843 MB of freed heap, and its peak was 877-1305 MB above the loaded model for 368 MB
kept. Held in its own map, each kept value leaves the heap's freed space whole for the next batch
and goes back to the kernel when it is evicted: the peak was 800-822 MB, at the same speed.

One map per value, with all of its arrays packed in it: a value of many small arrays costs one
map, not many. Only CPU arrays are copied; a tensor on an accelerator stays where it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from sdfsmis.memory import private_map

T = TypeVar("T")

#: Each array starts on a cache line, as torch aligns its own allocations.
ALIGNMENT = 64


def _copied(value: Any) -> bool:
    """Whether ``value`` is an array this module copies: a numpy array of numbers or a CPU tensor."""
    if isinstance(value, np.ndarray):
        return not value.dtype.hasobject
    return isinstance(value, torch.Tensor) and value.device.type == "cpu"


def _arrays(value: Any) -> Iterator[np.ndarray | torch.Tensor]:
    """The arrays of ``value`` that are copied, in the order :func:`_rebuilt` takes them."""
    if _copied(value):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            if f.init:
                yield from _arrays(getattr(value, f.name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _arrays(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _arrays(item)


def _rebuilt(value: Any, copies: Iterator[Any]) -> Any:
    """``value`` with each of its copied arrays replaced by the next of ``copies``."""
    if _copied(value):
        return next(copies)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _rebuilt(getattr(value, f.name), copies) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **fields)
    if isinstance(value, dict):
        return {key: _rebuilt(item, copies) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_rebuilt(item, copies) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_rebuilt(item, copies) for item in value)
    return value


def _dense_strides(array: np.ndarray) -> tuple[int, ...]:
    """Strides of a dense array whose axes lie in memory in the order ``array``'s do (numpy's
    ``empty_like`` with order K): a kernel that walks the copy walks it as it walked the original,
    and gives the same bits."""
    strides, step = [0] * array.ndim, array.itemsize
    for axis in sorted(range(array.ndim), key=lambda a: abs(array.strides[a])):
        strides[axis] = step
        step *= array.shape[axis]
    return tuple(strides)


def _padded(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def mapped_copy(value: T) -> T:
    """``value`` (arrays, tensors, and dataclasses, named tuples, tuples, lists and dicts of them)
    with its CPU arrays copied into one anonymous memory map, each keeping its dtype, shape and
    the order of its axes in memory (C, Fortran, permuted); everything else is shared with
    ``value``. A value without arrays is returned as it is."""
    arrays = list(_arrays(value))
    sizes = [a.nbytes if isinstance(a, np.ndarray) else a.element_size() * a.nelement() for a in arrays]
    total = sum(_padded(size) for size in sizes)
    if total == 0:
        return value
    buffer = private_map(total)
    copies, offset = [], 0
    for array, size in zip(arrays, sizes):
        if isinstance(array, np.ndarray):
            strides = _dense_strides(array)
            copy = np.ndarray(array.shape, dtype=array.dtype, buffer=buffer, offset=offset, strides=strides)
            copy[...] = array
        elif size == 0:
            copy = torch.empty(array.shape, dtype=array.dtype)
        else:  # laid out as torch.empty_like lays it: a dense permuted tensor keeps its strides
            strides = torch.empty_like(array, device="meta").stride()
            copy = torch.frombuffer(buffer, dtype=array.dtype, count=array.nelement(), offset=offset)
            copy = copy.as_strided(array.shape, strides).copy_(array)
        copies.append(copy)
        offset += _padded(size)
    return _rebuilt(value, iter(copies))
