"""How a batch's maps are held between requests (sdfsmis.pipeline.compact): bits for the masks,
the voxels off their background for the doubt and the probability, float16 for both."""

import numpy as np
import pytest

from sdfsmis.pipeline.cache import nbytes
from sdfsmis.pipeline.compact import SPARSE_SHARE, PackedMask, SparseMap, half
from sdfsmis.pipeline.segmenter import FusedSlices, LabelMaps, LabelReport, claim


def test_half_precision_is_numpys_bit_for_bit_in_the_same_memory_order():
    values = np.asfortranarray(np.random.default_rng(0).normal(scale=3e4, size=(7, 5, 3)).astype(np.float32))
    values[0, 0, 0], values[1, 0, 0], values[2, 0, 0] = np.nan, 1e-8, 1e6  # NaN, subnormal, overflow
    halved = half(values)
    assert halved.dtype == np.float16 and halved.flags.f_contiguous
    np.testing.assert_array_equal(halved.view(np.uint16), values.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("order", ["C", "F"])
def test_a_packed_mask_gives_back_each_slice_and_the_stack(order):
    # 5 x 3 = 15 voxels a slice: not a whole number of bytes, so a slice's bits end inside a byte
    mask = np.random.default_rng(1).random((5, 3, 4)) > 0.5
    mask = np.array(mask, order=order)
    packed = PackedMask.of(mask)
    assert packed.depth == 4 and packed.bits.shape == (4, 2)  # 15 bits -> 2 bytes per slice
    for i in range(4):
        np.testing.assert_array_equal(packed.slice(i), mask[..., i])
    stack = packed.unpacked()
    assert stack.dtype == bool and stack.flags.f_contiguous
    np.testing.assert_array_equal(stack, mask)


def test_a_sparse_map_keeps_the_voxels_off_its_background_as_float16():
    values = np.zeros((6, 4, 3), np.float32, order="F")
    values[1, 2, 0], values[5, 3, 2] = 0.125, 1 / 3  # 1/3 is not a float16: rounded as numpy rounds it
    sparse = SparseMap.of(values)
    assert sparse.index.tolist() == [1 + 2 * 6, 5 + 3 * 6 + 2 * 24]  # Fortran order: x, then y, then z
    assert nbytes(sparse) == 2 * 4 + 2 * 2  # two int32 indices, two float16 values
    dense = sparse.dense()
    assert dense.dtype == np.float16 and dense.flags.f_contiguous
    np.testing.assert_array_equal(dense, values.astype(np.float16))


def test_a_sparse_map_on_a_mask_keeps_only_what_differs_from_it():
    mask = np.zeros((4, 4, 2), bool, order="F")
    mask[:2] = True  # 16 voxels at 1
    probability = mask.astype(np.float32)
    probability[0, 0, 0], probability[3, 3, 1] = 0.75, 0.25
    sparse = SparseMap.of(probability, background=mask)
    assert len(sparse.index) == 2
    np.testing.assert_array_equal(sparse.dense(background=mask), probability.astype(np.float16))


def test_a_voxel_that_is_its_background_in_float16_is_not_kept():
    # deep inside a large structure the fused probability is 1 to within float16's step, and far
    # off a contour the doubt is below float16's smallest number: both read back as they would be kept
    mask = np.ones((5, 4, 2), bool, order="F")
    probability = np.ones(mask.shape, np.float32, order="F")
    probability[0, 0, 0] = 1 - 2.0**-13  # float16: 1
    probability[1, 0, 0] = 0.9999  # float16: 1
    probability[2, 0, 0] = 0.999  # float16: 0.999 (1 - 2**-10 is float16's step below 1): kept
    doubt = np.zeros(mask.shape, np.float32, order="F")
    doubt[0, 1, 1], doubt[3, 3, 1] = 1e-9, 0.01  # the first underflows float16 to 0
    kept = SparseMap.of(probability, background=mask)
    assert kept.index.tolist() == [2]
    np.testing.assert_array_equal(kept.dense(background=mask), probability.astype(np.float16))
    kept = SparseMap.of(doubt)
    assert kept.index.tolist() == [3 + 3 * 5 + 20]
    np.testing.assert_array_equal(kept.dense(), doubt.astype(np.float16))


def test_a_map_off_its_background_almost_everywhere_is_kept_whole():
    values = np.asfortranarray(np.random.default_rng(2).random((8, 8, 2)).astype(np.float32))
    values[values < 0.5] = 0  # about half the voxels differ from zero: more than SPARSE_SHARE
    assert np.count_nonzero(values) > SPARSE_SHARE * values.size
    sparse = SparseMap.of(values)
    assert sparse.index is None and sparse.values.shape == values.shape
    np.testing.assert_array_equal(sparse.dense(), values.astype(np.float16))


def test_a_batch_keeps_its_probability_within_its_mask_and_gives_its_maps_back():
    rng = np.random.default_rng(3)
    probability = np.asfortranarray(rng.random((20, 9, 3)).astype(np.float32))
    probability[:17] = 1.0  # inside, far from the contour: exactly 1
    mask = probability >= 0.5
    uncertainty = np.zeros_like(probability)
    uncertainty[2, 3, 1] = 0.01
    review = np.zeros_like(mask)
    review[7, 7, 2] = True
    fused = FusedSlices.of(probability, mask, uncertainty, review, np.ones(3))
    # in steps of 1/255, and outside the mask no label's win reads it
    within = np.where(mask, np.rint(probability * np.float32(255)), 0).astype(np.uint8)
    np.testing.assert_array_equal(fused.unpacked("probability"), within)
    np.testing.assert_array_equal(fused.unpacked("uncertainty"), uncertainty.astype(np.float16))
    np.testing.assert_array_equal(fused.unpacked("review"), review)
    np.testing.assert_array_equal(fused.mask.unpacked(), mask)
    # kept: the voxels of the mask below the last step (of the random half of x 17..19 above 0.5,
    # those under 254.5 / 255), not the whole map
    assert len(fused.probability.index) == np.count_nonzero(within[17:] % 255)
    assert 0 < len(fused.probability.index) < np.count_nonzero(mask[17:])
    assert len(fused.uncertainty.index) == 1


def test_overlapping_labels_go_to_the_likelier_one_from_the_kept_probabilities():
    shape = (4, 3, 2)
    first = np.full(shape, 0.71, np.float32, order="F")  # label 1 everywhere, at 0.71 (181 / 255)
    second = np.zeros(shape, np.float32, order="F")
    second[:2], second[2] = 0.9, 0.6  # label 2 at x 0-1 (0.9) and x 2 (0.6), not at x 3
    second[0, 0, 0] = 1.0  # exactly 1: kept as the mask itself, not as a stored voxel
    second[3, 0, 0] = 0.7105  # the same step of 1/255 as 0.71: a tie, which the first label keeps
    labels = np.zeros(shape, np.uint8, order="F")
    best = np.zeros(shape, np.uint8, order="F")
    for label_id, probability in ((1, first), (2, second)):
        mask = probability >= 0.5
        fused = FusedSlices.of(probability, mask)
        maps = LabelMaps(
            (slice(0, 4), slice(0, 3), slice(0, 2)), [fused], [np.array([0, 1])], [b"batch"], None,
            np.zeros(2, bool), LabelReport([0], [0, 1]),
        )  # fmt: skip
        claim(labels, best, label_id, ((z, mask[..., z]) for z in range(2)), maps)
    expected = np.ones(shape, np.uint8)
    expected[:2] = 2  # 0.9 and 1.0 beat 0.71; 0.6 and 0.7105 do not
    np.testing.assert_array_equal(labels, expected)
