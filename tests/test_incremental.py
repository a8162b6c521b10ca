"""The correction loop without recomputing the volume (issue 27): a predictor that keeps what it
computed (``cache_bytes``) answers a run after one corrected slice, after a second label and after a
support is removed with the labels, confidences and doubt a full recompute gives, voxel for voxel,
while the model sees only the query slices whose serving supports changed; the cache stays within
its bound and forgets what older weights computed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from sdfsmis.config import InferenceConfig
from sdfsmis.io.volume import Volume, load_volume
from sdfsmis.io.weights import save_weights
from sdfsmis.methods import load_model
from sdfsmis.pipeline import placement
from sdfsmis.pipeline.cache import ENTRY_BYTES, ComputeCache, digest
from sdfsmis.pipeline.predictor import Predictor
from sdfsmis.pipeline.segmenter import (
    FusedSlices,
    LabelMaps,
    LabelReport,
    SegmentationResult,
    SupportVolume,
    VolumeSegmenter,
)
from sdfsmis.samples.synthetic import make_volume, write_nifti
from sdfsmis.settings import load_config

BATCH = 4  # query slices per model call, so that a correction touches a few batches of the volume's


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
    """A generated CT in LPS storage order (a real affine) with its full labels."""
    image, truth, affine = make_volume(5, shape=(48, 40, 36), orientation="LPS")
    folder = tmp_path_factory.mktemp("incremental")
    path = write_nifti(folder / "ct.nii.gz", image, affine)
    volume = load_volume(path)
    truth_volume = load_volume(write_nifti(folder / "truth.nii.gz", truth, affine), label=True)
    return volume, truth_volume


def _drawn(truth: Volume, label_ids: tuple[int, ...], slices: list[int]) -> Volume:
    """What a radiologist drew: the true labels ``label_ids`` on ``slices`` (working-array z)."""
    data = np.zeros_like(truth.data)
    for z in slices:
        keep = np.isin(truth.data[..., z], label_ids)
        data[..., z][keep] = truth.data[..., z][keep]
    return dataclasses.replace(truth, data=data)


def _span(truth: Volume, label_id: int) -> np.ndarray:
    return np.flatnonzero((truth.data == label_id).any(axis=(0, 1)))


def _serving(q: int, drawn_z: list[int]) -> tuple[set[int], set[int]]:
    """The two drawn slices that serve ``q``, and those that decide it: the nearest below and above
    where it lies strictly between two; else the nearest (ties to the lower one) decides, and the
    doubt's second is the nearest of those at least as far from it as ``q`` is."""
    below, above = [z for z in drawn_z if z < q], [z for z in drawn_z if z > q]
    if below and above and q not in drawn_z:
        return {max(below), min(above)}, {max(below), min(above)}
    by_distance = sorted(drawn_z, key=lambda z: (abs(z - q), z))
    nearest, rest = by_distance[0], by_distance[1:]
    far = [z for z in rest if abs(z - nearest) >= abs(q - nearest)]
    return {nearest, (far + rest)[0]}, {nearest}


class CountingModel:
    """Counts the model's passes (a query slice against one of its serving supports), and the query
    slices it encodes anew (DPL's features; the model itself runs unchanged)."""

    def __init__(self, model):
        self.passes = self.encoded = 0
        predict_encoded, encode_queries = model.predict_encoded, model.encode_queries

        def counted(support, queries, index):  # the segmenter's one way into the model
            self.passes += index.shape[0] * index.shape[1]
            return predict_encoded(support, queries, index)

        def encoding(query_image):
            self.encoded += query_image.shape[0]
            return encode_queries(query_image)

        model.predict_encoded, model.encode_queries = counted, encoding


def _predictors(
    tiny_backbone, method: str, cache_bytes: int = 2**28, batch: int = BATCH
) -> tuple[Predictor, Predictor]:
    """The same weights twice: one keeping what it computed, one computing everything."""
    settings = load_config(backbone=tiny_backbone)
    settings.inference.batch_size = settings.inference.cpu_batch_size = batch
    torch.manual_seed(0)
    model = load_model(method, tiny_backbone, settings)
    fresh = load_model(method, tiny_backbone, settings)
    fresh.load_state_dict(model.state_dict())
    return Predictor(model, settings, cache_bytes=cache_bytes), Predictor(fresh, settings)


def _same(incremental: SegmentationResult, full: SegmentationResult) -> None:
    np.testing.assert_array_equal(incremental.labels, full.labels)
    assert incremental.reports.keys() == full.reports.keys()
    for label_id, report in full.reports.items():
        assert incremental.reports[label_id].confidence == report.confidence
        np.testing.assert_array_equal(incremental.review(label_id), full.review(label_id))
    np.testing.assert_array_equal(incremental.uncertainty, full.uncertainty)


@pytest.mark.parametrize("method", ["dpl", "sdfsmis"])
def test_a_correction_recomputes_only_the_slices_it_serves(patient, tiny_backbone, method):
    volume, truth = patient
    span = _span(truth, 1)
    drawn_z = [int(z) for z in span[:: max(1, len(span) // 4)]][:4]  # four drawn slices over the liver
    cached, full = _predictors(tiny_backbone, method)
    counter = CountingModel(cached.model)
    first = cached.segment([SupportVolume(volume, _drawn(truth, (1,), drawn_z))], volume, progress=False)
    k = min(cached.settings.inference.supports_per_query, len(drawn_z))  # serving supports per query slice
    first_passes, counter.passes, counter.encoded = counter.passes, 0, 0
    assert first_passes == k * (len(first.reports[1].query_slices) - len(drawn_z))  # drawn slices: as drawn

    low, high = drawn_z[1], drawn_z[2]  # an inner gap: slices outside it keep their two nearest drawings
    corrected = (low + high) // 2
    support = SupportVolume(volume, _drawn(truth, (1,), sorted([*drawn_z, corrected])))
    again = cached.segment([support], volume, progress=False)
    _same(again, full.segment([support], volume, progress=False))
    assert not np.array_equal(again.labels, first.labels)  # the correction shows
    # the slices strictly inside the gap changed supports; the model saw them but the corrected one
    # (now drawn), rounded out to whole batches of BATCH slices (z // BATCH), and nothing else
    changed = set(range(low + 1, high)) - {corrected}
    batches = {z // BATCH for z in changed}
    assert len(changed) <= counter.passes <= len(batches) * BATCH * k < first_passes
    if cached.model.encodes_queries:  # slices whose crops did not change keep their features
        assert counter.encoded <= len(batches) * BATCH

    # a drawn slice redrawn (smaller): the same slices are served by it, its content changed
    counter.passes = 0
    redrawn = support.label.data.copy()
    redrawn[..., high] = ndimage.binary_erosion(redrawn[..., high] > 0, iterations=2) * redrawn[..., high]
    edited = SupportVolume(volume, dataclasses.replace(support.label, data=redrawn))
    once_more = cached.segment([edited], volume, progress=False)
    _same(once_more, full.segment([edited], volume, progress=False))
    assert 0 < counter.passes < first_passes


def test_a_method_that_works_per_support_reruns_only_the_supports_a_correction_adds(patient, tiny_backbone):
    """SD-FSMIS's query work depends on the support, so a slice's prediction against each serving
    support is kept: beyond the outermost drawing, a correction next to it only adds itself as the
    second serving support of the slice next to the drawing (the nearest still decides, its box is
    unchanged); the slices further out keep their doubt and their passes."""
    volume, truth = patient
    span = _span(truth, 1)
    drawn_z = [int(z) for z in span[:: max(1, len(span) // 4)]][:4]
    cached, full = _predictors(tiny_backbone, "sdfsmis", batch=1)
    counter = CountingModel(cached.model)
    first = cached.segment([SupportVolume(volume, _drawn(truth, (1,), drawn_z))], volume, progress=False)
    c, d, last = drawn_z[-2], drawn_z[-1], max(first.reports[1].query_slices)
    corrected = d - 1
    assert c < corrected - 1 and d < last  # a gap before the correction, slices beyond the outermost drawing
    counter.passes = 0
    support = SupportVolume(volume, _drawn(truth, (1,), sorted([*drawn_z, corrected])))
    again = cached.segment([support], volume, progress=False)
    _same(again, full.segment([support], volume, progress=False))
    # a slice whose deciding drawings changed has a new box: both passes anew; one whose deciding
    # drawing stayed (on or beyond a drawing) only its pass against a serving drawing it did not have
    expected = changed = 0
    for q in first.reports[1].query_slices:
        if q in drawn_z or q == corrected:  # kept as drawn: no pass
            continue
        before, after = _serving(q, drawn_z), _serving(q, sorted([*drawn_z, corrected]))
        expected += 2 if before[1] != after[1] else len(after[0] - before[0])
        changed += before != after
    assert counter.passes == expected < 2 * changed  # both passes of every changed slice: nothing kept


def test_the_next_patient_is_registered_and_carried_once(patient, tiny_backbone, tmp_path, monkeypatch):
    """The next patient: another patient's complete drawing serves this one, then a correction
    drawn in this one. The re-run neither registers the other patient again nor carries its
    drawing into this one again (each a second on a 512 x 512 x 180 CT), and gives a full
    recompute's result."""
    volume, truth = patient
    image, other_truth, affine = make_volume(6, shape=(52, 44, 40))  # another body, another grid
    other = load_volume(write_nifti(tmp_path / "other.nii.gz", image, affine))
    other_label = load_volume(write_nifti(tmp_path / "other_truth.nii.gz", other_truth, affine), label=True)
    atlas = SupportVolume(other, _drawn(other_label, (1,), list(_span(other_label, 1))), name="other")
    calls = {"register_volumes": 0, "carried_drawing": 0}
    for name in calls:
        function = getattr(placement, name)

        def counted(*args, function=function, name=name):
            calls[name] += 1
            return function(*args)

        monkeypatch.setattr(placement, name, counted)
    cached, full = _predictors(tiny_backbone, "dpl")
    first = cached.segment([atlas], volume, progress=False)
    assert calls == {"register_volumes": 1, "carried_drawing": 1}
    assert first.reports[1].served_by[0].placement.rule == "registration"  # registered, not the fallback
    z = int(np.median(_span(truth, 1)))
    corrected = [atlas, SupportVolume(volume, _drawn(truth, (1,), [z]))]
    again = cached.segment(corrected, volume, progress=False)
    assert calls == {"register_volumes": 1, "carried_drawing": 1}  # kept from the first run
    _same(again, full.segment(corrected, volume, progress=False))


@pytest.mark.parametrize("method", ["dpl"])
def test_a_second_label_and_a_removed_support(patient, tiny_backbone, method):
    volume, truth = patient
    liver, spleen = _span(truth, 1), _span(truth, 4)
    liver_z = [int(z) for z in liver[:: max(1, len(liver) // 3)]][:3]
    spleen_z = [int(z) for z in spleen[:: max(1, len(spleen) // 3)]][:3]
    cached, full = _predictors(tiny_backbone, method)
    counter = CountingModel(cached.model)
    one = SupportVolume(volume, _drawn(truth, (1, 4), sorted({*liver_z, *spleen_z})))
    first = cached.segment([one], volume, [1], progress=False)
    k = min(cached.settings.inference.supports_per_query, len(spleen_z))  # serving supports per query slice
    counter.passes = 0

    both = cached.segment([one], volume, [1, 4], progress=False)  # the spleen too: the liver is known
    _same(both, full.segment([one], volume, [1, 4], progress=False))
    spleen_drawn = [z for z in {*liver_z, *spleen_z} if (truth.data[..., z] == 4).any()]  # kept as drawn
    assert counter.passes == k * (len(both.reports[4].query_slices) - len(spleen_drawn))
    np.testing.assert_array_equal(both.labels == 1, first.labels == 1)  # unless the spleen overlaps it

    counter.passes = 0
    fewer = SupportVolume(volume, _drawn(truth, (1, 4), sorted({*liver_z[:-1], *spleen_z})))  # one drawing undone
    removed = cached.segment([fewer], volume, [1, 4], progress=False)
    _same(removed, full.segment([fewer], volume, [1, 4], progress=False))
    assert 0 < counter.passes < k * (len(removed.reports[1].query_slices) + len(removed.reports[4].query_slices))


def test_a_request_without_the_doubt_map_answers_the_same_and_keeps_less(patient, tiny_backbone):
    """The app asks for no doubt map (a viewer shows the review segment and the slices' confidence):
    the same labels, confidence and review voxels, no voxel map of the doubt, and less kept."""
    volume, truth = patient
    drawn = [int(z) for z in _span(truth, 1)[::4]]
    support = [SupportVolume(volume, _drawn(truth, (1, 4), drawn))]
    shown, served = _predictors(tiny_backbone, "dpl")[0], _predictors(tiny_backbone, "dpl")[0]
    with_map = shown.segment(support, volume, [1, 4], progress=False)
    without = served.segment(support, volume, [1, 4], progress=False, doubt_map=False)
    np.testing.assert_array_equal(without.labels, with_map.labels)
    for label_id, report in with_map.reports.items():
        assert report.confidence is not None and without.reports[label_id].confidence == report.confidence
        np.testing.assert_array_equal(without.review(label_id), with_map.review(label_id))
    assert with_map.uncertainty is not None and with_map.uncertainty.max() > 0
    assert without.uncertainty is None
    assert served.cache.bytes < shown.cache.bytes
    # asked for later, the map is made and kept
    again = served.segment(support, volume, [1, 4], progress=False)
    np.testing.assert_array_equal(again.uncertainty, with_map.uncertainty)


def test_a_digest_takes_an_array_in_any_memory_layout():
    """A reoriented image can be a view with its axes permuted, in neither C nor Fortran order: it is
    digested as its C-ordered copy is (the registration's key digests whole images)."""
    volume = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    permuted = volume.transpose(1, 2, 0)
    assert not (permuted.flags.c_contiguous or permuted.flags.f_contiguous)
    assert digest(permuted) == digest(np.ascontiguousarray(permuted))
    flipped = permuted[:, ::-1]
    assert digest(flipped) == digest(np.ascontiguousarray(flipped)) != digest(permuted)


def test_the_cache_keeps_its_bound_and_evicts_the_oldest():
    entry = 4000 + ENTRY_BYTES
    cache = ComputeCache(max_bytes=3 * entry)
    for i in range(5):
        cache.put(bytes([i]), torch.zeros(1000))  # 4000 bytes each
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 3 and cache.get(bytes([0])) is None and cache.get(bytes([1])) is None
    assert cache.get(bytes([2])) is not None  # now the most recently used
    cache.put(bytes([5]), torch.zeros(1000))
    assert cache.get(bytes([3])) is None and cache.get(bytes([2])) is not None
    cache.put(bytes([6]), torch.zeros(4000))  # larger than the bound: not kept, nothing evicted for it
    assert cache.get(bytes([6])) is None and len(cache) == 3 and cache.bytes == 3 * entry
    for i in range(1000):  # values without array bytes count too: their number is bounded
        cache.put(i.to_bytes(2, "little"), np.zeros((0, 2)))
    assert len(cache) == cache.max_bytes // ENTRY_BYTES


def test_a_bounded_predictor_stays_within_its_bound_and_forgets_old_weights(patient, tiny_backbone, tmp_path):
    volume, truth = patient
    span = _span(truth, 1)
    bound = 600_000  # less than one run's worth: it evicts while it runs
    cached, full = _predictors(tiny_backbone, "dpl", cache_bytes=bound)
    support = SupportVolume(volume, _drawn(truth, (1,), [int(z) for z in span[::6]]))
    result = cached.segment([support], volume, progress=False)
    assert 0 < cached.cache.bytes <= bound
    _same(result, full.segment([support], volume, progress=False))

    save_weights(full.model, tmp_path / "dpl.safetensors")
    cached.load_weights(tmp_path / "dpl.safetensors")
    assert len(cached.cache) == 0  # what the old weights computed is gone


def test_the_kept_3d_steps_follow_a_changed_neighbour():
    """The 3-D components join neighbouring slices through overlaps kept from the last request: a
    batch that changes must not leave its unchanged neighbour joined to what it no longer touches."""
    segmenter = VolumeSegmenter(None, InferenceConfig(), cache=ComputeCache(2**20))
    blob = np.zeros((8, 8), bool)
    blob[1:3, 1:3] = True
    moved = np.roll(blob, 4, axis=(0, 1))  # the same blob where the slice before does not reach

    def maps(third_slice: np.ndarray, key: bytes) -> LabelMaps:  # two batches: the blob twice, the third slice twice
        batches = [np.stack([blob, blob], axis=-1), np.stack([third_slice, third_slice], axis=-1)]
        parts = [FusedSlices.of(m.astype(np.float32), m) for m in map(np.asfortranarray, batches)]
        region, rows = (slice(0, 8), slice(0, 8), slice(0, 4)), [np.array([0, 1]), np.array([2, 3])]
        report = LabelReport([0], [0, 1, 2, 3])
        return LabelMaps(region, parts, rows, [b"first", key], None, np.zeros(4, bool), report)

    def consistent(label_maps: LabelMaps) -> np.ndarray:
        mask = np.zeros(label_maps.shape, dtype=bool)
        for z, kept in segmenter._consistent_slices(label_maps):
            mask[..., z] = kept
        return mask

    joined = consistent(maps(blob, b"joined"))
    assert joined.sum() == 16  # slice 2 reaches slice 1: all four slices are one structure
    apart = consistent(maps(moved, b"apart"))  # slice 2 changed: two structures of 8
    segmenter.cache = None
    np.testing.assert_array_equal(apart, consistent(maps(moved, b"apart")))
    assert apart[..., :2].all(axis=2).sum() == 4 and not apart[..., 2:].any()  # the first one, in z order
