"""What the server keeps between requests lives outside the C library's heap
(``sdfsmis.pipeline.mapped``): a kept copy is the original value for every reader, laid out in
memory as the original was (kernels that walk it give the same bits), and an entry the cache lets
go returns its memory to the system at once, although the heap keeps what it frees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pytest
import torch

from sdfsmis.pipeline.cache import ComputeCache, cached
from sdfsmis.pipeline.mapped import mapped_copy


@dataclass(frozen=True)
class Kept:
    fortran: np.ndarray
    permuted: np.ndarray
    every_other: np.ndarray
    name: str


class Outputs(NamedTuple):
    permuted_view: torch.Tensor
    half: torch.Tensor
    empty: torch.Tensor
    absent: torch.Tensor | None = None


def _value() -> dict:
    grid = np.arange(3 * 4 * 5, dtype=np.float64)
    tensor = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    return {
        "kept": Kept(
            np.asfortranarray(grid.reshape(3, 4, 5)),
            grid.reshape(3, 4, 5).transpose(1, 2, 0),
            np.arange(48, dtype=np.float64).reshape(6, 8)[::2, ::2],
            "left caudate",
        ),
        "outputs": Outputs(
            tensor.permute(0, 2, 3, 1), torch.linspace(0, 1, 7, dtype=torch.bfloat16), torch.zeros(0, 3)
        ),
        "runs": [np.array([1, 5, 9], dtype=np.uint16), (np.ones((2, 2), dtype=bool),)],
    }


def test_a_kept_copy_reads_as_the_original_and_lies_in_memory_as_it_did():
    value = _value()
    copy = mapped_copy(value)
    kept, original = copy["kept"], value["kept"]
    assert isinstance(kept, Kept) and kept.name is original.name
    # strides worked out by hand: a Fortran (3, 4, 5) float64, the C (3, 4, 5) seen as (4, 5, 3),
    # and every other row and column of a (6, 8): dense again, rows first
    expected = {"fortran": (8, 24, 96), "permuted": (40, 8, 160), "every_other": (32, 8)}
    for name, strides in expected.items():
        a, b = getattr(original, name), getattr(kept, name)
        np.testing.assert_array_equal(b, a)
        assert b.dtype == a.dtype and b.strides == strides
        assert not np.shares_memory(a, b)
    outputs = copy["outputs"]
    assert isinstance(outputs, Outputs) and outputs.absent is None
    assert outputs.permuted_view.stride() == (60, 5, 1, 20)  # [2, 3, 4, 5] seen as [2, 4, 5, 3]
    assert torch.equal(outputs.permuted_view, value["outputs"].permuted_view)
    assert outputs.half.dtype == torch.bfloat16 and torch.equal(outputs.half, value["outputs"].half)
    assert outputs.empty.shape == (0, 3)
    assert outputs.permuted_view.data_ptr() != value["outputs"].permuted_view.data_ptr()
    runs, (bits,) = copy["runs"]
    assert runs.dtype == np.uint16 and runs.tolist() == [1, 5, 9] and bits.dtype == bool and bits.all()


def test_a_value_without_arrays_is_kept_as_it_is():
    value = ("served by", 3, None)
    assert mapped_copy(value) is value


def test_what_the_cache_returns_is_the_copy_it_keeps():
    cache = ComputeCache(2**20)
    computed = np.arange(12.0).reshape(3, 4)
    first = cached(cache, b"key", lambda: computed)
    again = cached(cache, b"key", lambda: pytest.fail("computed twice"))
    assert first is again and not np.shares_memory(first, computed)
    np.testing.assert_array_equal(first, computed)


def test_an_entry_the_cache_lets_go_gives_its_memory_back(resident_mb):
    """With freed memory kept by the heap (the CPU default of a server), kept values that lived in
    the heap would stay resident after eviction; each in its own map is returned whole."""
    entry_mb, entries = 8, 8  # a batch's kept maps are a few MB each
    cache = ComputeCache(2 * entry_mb * entries * 2**20)
    for i in range(entries):
        computed = np.full(entry_mb * 2**20 // 8, float(i))  # in the heap, which keeps it once freed
        cache.put(bytes([i]), computed)
    del computed
    before = resident_mb()
    cache.clear()
    assert before - resident_mb() >= 0.9 * entry_mb * entries


def test_a_whole_block_is_kept_where_it_was_computed():
    """An image read whole is one block the heap reuses once freed: copying it would only hold it
    twice for a moment."""
    cache = ComputeCache(2**30)
    image = np.zeros((512, 512, 40), dtype=np.int16)  # 20 MB
    assert cached(cache, b"image", lambda: image) is image
