"""The radiologist's loop inside one volume: every drawn or corrected slice is a support, each
query slice is segmented from its nearest supports, a correction changes its neighbours and
nothing far from it, and the supports are encoded once per run, not once per query slice."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sdfsmis.io.volume import load_volume
from sdfsmis.methods import load_model
from sdfsmis.pipeline.segmenter import VolumeSegmenter, review_ids, serving_supports
from sdfsmis.samples.synthetic import make_volume, write_nifti
from sdfsmis.settings import load_config

LIVER = 1


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    image, truth, affine = make_volume(40)
    return root, write_nifti(root / "image.nii.gz", image, affine), truth, affine


def _segment(backbone, image_path, label: np.ndarray, affine, path, **inference) -> tuple[np.ndarray, list[int]]:
    config = load_config(backbone=backbone)
    config.inference = dataclasses.replace(config.inference, **inference)
    torch.manual_seed(0)
    model = load_model("dpl", backbone, config).eval()
    segmenter = VolumeSegmenter(model, config.inference, progress=False)
    label_path = write_nifti(path, label.astype(np.uint8), affine)
    image = load_volume(image_path)
    result = segmenter.segment(image, load_volume(label_path, label=True), image, [LIVER])
    return result.labels, result.reports[LIVER].support_slices


def test_a_correction_changes_its_neighbours_and_nothing_far(tiny_backbone, patient, tmp_path):
    root, image_path, truth, affine = patient
    organ = np.flatnonzero((truth == LIVER).any(axis=(0, 1)))
    low, high = int(organ[len(organ) // 5]), int(organ[4 * len(organ) // 5])
    drawn = np.zeros_like(truth)
    for z in (low, high):
        drawn[..., z] = truth[..., z] == LIVER
    before, supports = _segment(tiny_backbone, image_path, drawn, affine, tmp_path / "a.nii.gz")
    assert supports == [low, high]

    corrected = (low + high) // 2  # the radiologist fixes the middle slice
    drawn[..., corrected] = truth[..., corrected] == LIVER
    after, supports = _segment(tiny_backbone, image_path, drawn, affine, tmp_path / "b.nii.gz")
    assert supports == [low, corrected, high]
    np.testing.assert_array_equal(after[..., corrected] == LIVER, truth[..., corrected] == LIVER)  # kept as drawn

    changed = {int(z) for z in np.flatnonzero((before != after).any(axis=(0, 1)))}
    # by hand: a slice between two drawn slices is decided by those two, one beyond the outermost
    # drawn slice by that one alone; so the correction decides exactly the slices strictly between
    # its neighbours low and high (its own slice is kept as drawn)
    neighbours = set(range(low + 1, high)) - {corrected}
    assert changed - {corrected} <= neighbours, sorted(changed - neighbours)  # nothing far changed
    assert len(changed) >= 0.5 * len(neighbours)  # the neighbours did change


def test_serving_supports_bracket_each_slice_and_doubt_with_the_next_nearest():
    # supports at slices 3, 6, 10; two per query slice; weights worked out by hand
    serving = serving_supports(np.arange(12), [3, 6, 10], 2)
    expected = {
        0: ([0, 1], [1, 0]),  # below the first support: it alone decides, the next one doubts
        3: ([0, 1], [1, 0]),  # on a support: it alone
        4: ([0, 1], [2 / 3, 1 / 3]),  # between 3 and 6: linear, 1 slice from 3 and 2 from 6
        5: ([1, 0], [2 / 3, 1 / 3]),
        7: ([1, 2], [3 / 4, 1 / 4]),
        8: ([1, 2], [1 / 2, 1 / 2]),
        11: ([2, 1], [1, 0]),  # beyond the last support
    }
    for z, (index, weights) in expected.items():
        assert serving.index[z].tolist() == index, z
        np.testing.assert_allclose(serving.weights[z], weights, atol=1e-6, err_msg=str(z))
    # the bracketing pair decides even when a third support is nearer than one of them
    far = serving_supports(np.array([9.0]), [0, 10, 11], 2)
    assert far.index.tolist() == [[1, 0]] and np.allclose(far.weights, [[0.9, 0.1]])
    # beyond the outermost support, the doubt comes from a support at least as far from the deciding
    # one as the slice is: from slice 0 (3 slices below 3), not 4 (1 from 3) but 10; from 2, 4 will do
    beyond = serving_supports(np.array([0.0, 1.0, 2.0]), [3, 4, 10], 2)
    assert beyond.index.tolist() == [[0, 2], [0, 2], [0, 1]] and (beyond.weights[:, 0] == 1).all()
    one = serving_supports(np.arange(5), [0, 4], 1)  # one per slice: the nearest, ties to the first
    assert one.index[:, 0].tolist() == [0, 0, 0, 1, 1] and (one.weights == 1).all()


def test_thirty_supports_are_encoded_once_not_per_query_slice(tiny_backbone, patient, tmp_path):
    root, image_path, truth, affine = patient
    organ = np.flatnonzero((truth == LIVER).any(axis=(0, 1)))
    drawn = np.zeros_like(truth)
    annotated = organ[: min(30, len(organ))]
    for z in annotated:
        drawn[..., z] = truth[..., z] == LIVER
    config = load_config(backbone=tiny_backbone)
    model = load_model("dpl", tiny_backbone, config).eval()
    encoded, predicted = [], []
    encode, encode_queries = model.encode_support, model.encode_queries

    def counting_encode(image, mask):
        encoded.append(image.shape[0])
        return encode(image, mask)

    def counting_encode_queries(query):
        predicted.append(query.shape[0])
        return encode_queries(query)

    model.encode_support, model.encode_queries = counting_encode, counting_encode_queries
    label_path = write_nifti(tmp_path / "thirty.nii.gz", drawn.astype(np.uint8), affine)
    image = load_volume(image_path)
    result = VolumeSegmenter(model, config.inference, progress=False).segment(
        image, load_volume(label_path, label=True), image, [LIVER]
    )
    assert result.reports[LIVER].support_slices == [int(z) for z in annotated]
    # grounded: the drawn range and a reach of max(25 % of its extent, 10 mm = 2 slices of 5 mm) each side
    extent = int(annotated[-1] - annotated[0] + 1)
    reach = max(int(np.ceil(0.25 * extent)), 2)
    expected = list(range(max(0, int(annotated[0]) - reach), min(truth.shape[2] - 1, int(annotated[-1]) + reach) + 1))
    assert result.reports[LIVER].query_slices == expected
    # each support row once, alone (the same bits whatever rows are with it), and only where the model
    # runs: the drawn run is kept as drawn; a slice d slices beyond an end is served by the end's
    # drawing and doubted by the drawing d slices inside it (the run is contiguous)
    beyond = (int(annotated[0]) - expected[0], expected[-1] - int(annotated[-1]))
    rows = sum(1 + min(n, len(annotated) - 1) for n in beyond if n)
    assert rows and encoded == [1] * rows
    # each query slice once (its features once for all its supports), but the drawn ones: kept as drawn
    assert sum(predicted) == len(expected) - len(annotated)


def test_review_ids_depend_only_on_the_label_ids_and_never_collide():
    # what /info lists before any result (OHIF builds its segments from it) is what a result uses
    assert review_ids({1, 4}) == {1: 101, 4: 104}
    assert review_ids([4, 1]) == review_ids({1, 4})
    crowded = review_ids({1, 101, 200})  # 101 is a label, 300 does not fit a uint8 labelmap
    assert crowded == {1: 201, 101: 202, 200: 203}
    # at the top of the uint8 range: 355 and 256 do not fit, the largest free id below does
    assert review_ids({255}) == {255: 254}
    assert review_ids({200, 254, 255}) == {200: 253, 254: 252, 255: 251}
    assert review_ids(set(range(1, 256))) == {}  # no id left: no review segment rather than a wrong one


@pytest.mark.parametrize("seed", range(20))
def test_review_ids_fit_a_uint8_labelmap_and_are_distinct(seed):
    rng = np.random.default_rng(seed)
    labels = {int(i) for i in rng.choice(np.arange(1, 256), size=int(rng.integers(1, 128)), replace=False)}
    ids = review_ids(labels)
    assert set(ids) == labels  # at most 127 labels: at least 128 ids stay free for their reviews
    assert all(1 <= v <= 255 for v in ids.values()) and len(set(ids.values())) == len(ids)
    assert not set(ids.values()) & labels
    assert review_ids(sorted(labels, reverse=True)) == ids
