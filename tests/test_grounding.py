"""Spatial grounding: a result stays where the radiologist drew. The boxes, the outward stop and
the drawn shape against hand-worked cases, then a trained DPL on a volume with a structure and its
twin on the other side (drawn on one side, nothing comes back on the other, nothing beyond the
region) and on a 5 mm structure in a 512 x 512 slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdfsmis.io.volume import load_volume
from sdfsmis.methods import load_model
from sdfsmis.pipeline.grounding import Box, DrawnShape, box_around, where_it_ends, with_drawn_shape
from sdfsmis.pipeline.segmenter import VolumeSegmenter, serving_supports
from sdfsmis.samples.synthetic import make_volume, write_nifti
from sdfsmis.settings import load_config


def test_box_around_takes_the_larger_margin_and_stays_inside():
    drawn = np.zeros((100, 80, 5), dtype=bool)
    drawn[40:50, 10:14, 2] = True  # x 40..49 (10 voxels), y 10..13 (4 voxels)
    # 2 mm voxels: 10 mm = 5 voxels; half the extent: x 5, y 2 -> x 40-5 .. 49+5 (+1), y 10-5 .. 13+5 (+1)
    assert box_around(drawn, (2.0, 2.0, 5.0), 10.0, 0.5) == Box(35, 55, 5, 19)
    # 0.5 mm voxels: 10 mm = 20 voxels: clipped at the edge y = 0
    assert box_around(drawn, (0.5, 0.5, 5.0), 10.0, 0.5) == Box(20, 70, 0, 34)
    # a share larger than the millimetres: x 10 voxels x 1.0 = 10 each side
    assert box_around(drawn, (2.0, 2.0, 5.0), 2.0, 1.0) == Box(30, 60, 6, 18)


def test_where_it_ends_follows_the_structure_outwards_while_it_stays_continuous():
    area = np.array([0, 30, 50, 60, 64, 64, 64, 40, 16, 1, 30, 30])
    # below 4: 60 >= 0.3 x 64, 50 >= 0.3 x 60, 30 >= 0.3 x 50, then slice 0 is empty: ends there
    # above 6: 40 >= 19.2, 16 >= 12, then 1 < 4.8 at slice 9 ends it; 10 and 11 go with it
    assert where_it_ends(area, np.array([4, 6]), continuity=0.3) == (1, 8)
    assert where_it_ends(area, np.array([4, 6]), continuity=0.05) == (1, 11)  # 1 >= 0.8: on to the edge
    assert where_it_ends(area, np.array([0, 11]), continuity=0.3) == (0, 11)  # drawn at both edges
    assert where_it_ends(area, np.array([], dtype=int), continuity=0.3) == (0, 11)  # nothing drawn: all


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """A CT-like volume with the same bright structure on the patient's right and left, the body
    symmetric about the midline; drawn on the right (RAS x > centre) on three slices."""
    root = tmp_path_factory.mktemp("twins")
    shape, centre = (96, 96, 40), 47.5
    x, y, z = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    body = ((x - centre) / 44) ** 2 + ((y - centre) / 36) ** 2 < 1
    image = np.where(body, 40.0, -1000.0) + 10 * np.sin(0.3 * y)
    twin = [((x - centre - s * 22) / 8) ** 2 + ((y - 50) / 10) ** 2 < 1 for s in (1, -1)]
    truth = np.zeros(shape, dtype=np.uint8)
    for inside in twin:
        inside &= (z >= 12) & (z <= 27)
        image[inside] = 200.0
    truth[twin[0]] = 1  # the right one; its twin on the left is the same structure mirrored
    affine = np.diag([1.5, 1.5, 5.0, 1.0])
    drawn = np.zeros_like(truth)
    for slice_z in (15, 19, 24):
        drawn[..., slice_z] = truth[..., slice_z]
    return (
        write_nifti(root / "image.nii.gz", image.astype(np.int16), affine),
        write_nifti(root / "drawn.nii.gz", drawn, affine),
        truth,
        twin[1],
    )


def _dpl_result(backbone, checkpoint, support, drawn, query, grounding: bool = True):
    """Label 1 of ``query`` segmented by the trained DPL from the ``support`` image and its
    ``drawn`` label (paths; the query may be the support itself), with the preset's inference."""
    config = load_config(backbone=backbone)
    config.inference.grounding = grounding
    torch.manual_seed(0)
    model = load_model("dpl", backbone, config, checkpoint).eval()
    return VolumeSegmenter(model, config.inference, progress=False).segment(
        load_volume(support), load_volume(drawn, label=True), load_volume(query), [1]
    )


def _segment(backbone, checkpoint, twins, grounding: bool) -> tuple[np.ndarray, list[int]]:
    image_path, drawn_path, _, _ = twins
    result = _dpl_result(backbone, checkpoint, image_path, drawn_path, image_path, grounding)
    return result.labels, result.reports[1].query_slices


def test_drawn_on_one_side_nothing_on_the_other_and_nothing_beyond_the_region(tiny_backbone, trained_dpl, twins):
    checkpoint = trained_dpl[0]["checkpoint"]
    _, _, truth, other_side = twins
    labels, query_slices = _segment(tiny_backbone, checkpoint, twins, grounding=True)
    assert not labels[other_side].any()  # the twin is not returned
    assert not labels[: labels.shape[0] // 2].any()  # nor anything on that side
    # by hand: drawn 15..24, reach max(25 % of 10 slices, 10 mm = 2 slices) = 3: slices 12..27 at most
    assert query_slices == list(range(12, 28))
    assert not labels[..., :12].any() and not labels[..., 28:].any()
    found = labels == 1
    beyond_drawn = np.ones(found.shape[2], dtype=bool)
    beyond_drawn[[15, 19, 24]] = False
    assert (found & (truth == 1))[..., beyond_drawn].any()  # and the drawn structure is propagated


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    x, y = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    return (x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius**2


def _shape_at(drawn: np.ndarray, support_z: list[int], query_z: list[int], spacing) -> np.ndarray:
    serving = serving_supports(np.asarray(query_z), support_z, 2)
    return DrawnShape(drawn, support_z, spacing).on(np.asarray(query_z), serving.index, serving.weights)


def test_drawn_shape_morphs_between_drawings_and_closes_beyond_them():
    drawn = np.zeros((64, 64, 40), dtype=bool)
    drawn[..., 10] = _disc((64, 64), (32, 32), 10)
    drawn[..., 20] = _disc((64, 64), (32, 32), 4)
    shape = _shape_at(drawn, [10, 20], [15, 21, 22, 24], (1.0, 1.0, 1.0))
    # halfway, signed distances (10 - r) and (4 - r) blend to (7 - r): a disc of radius 7
    assert shape[32, 32, 0] == pytest.approx(7.0, abs=0.1)
    assert (shape[..., 0] > 0).sum() == pytest.approx(np.pi * 49, rel=0.1)
    # beyond z = 20: the span is 10 slices, so the drawing (4 mm deep) closes 3.75 slices further out,
    # shrinking 4 / 3.75 mm per slice: 2.93 mm left at z = 21, 1.87 at z = 22, nothing at z = 24
    assert shape[32, 32, 1] == pytest.approx(4 - 4 / 3.75, abs=0.1)
    assert shape[32, 32, 2] == pytest.approx(4 - 8 / 3.75, abs=0.1)
    assert not (shape[..., 3] > 0).any()


def test_drawn_shape_keeps_the_nearer_drawing_where_the_blend_would_vanish_and_rounds_a_single_one():
    drawn = np.zeros((80, 40, 20), dtype=bool)
    drawn[..., 4] = _disc((80, 40), (20, 20), 5)
    drawn[..., 12] = _disc((80, 40), (60, 20), 5)  # a piece that does not overlap the first
    shape = _shape_at(drawn, [4, 12], [6], (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(shape[..., 0] > 0, drawn[..., 4])  # z = 6 is nearer 4: that drawing
    # one drawn slice: a rounded end, one millimetre per millimetre; 2 slices of 2 mm: radius 5 - 4
    single = np.zeros((40, 40, 10), dtype=bool)
    single[..., 5] = _disc((40, 40), (20, 20), 5)
    shape = _shape_at(single, [5], [7, 8], (1.0, 1.0, 2.0))
    assert shape[20, 20, 0] == pytest.approx(1.0, abs=0.1)
    assert not (shape[..., 1] > 0).any()


def test_the_model_moves_the_drawn_contour_by_at_most_its_reach():
    shape_mm = np.array([-1.5, -1.5, 1.5, 1.5, -2.5, 2.5])
    probability = np.array([1.0, 0.5, 0.0, 0.5, 1.0, 0.0])
    fused = with_drawn_shape(probability, shape_mm, reach_mm=2.0, threshold=0.5)
    # 1.5 mm outside, a sure model pulls it in; undecided it stays out; and the mirror inside;
    # 2.5 mm is beyond a 2 mm reach either way
    assert (fused >= 0.5).tolist() == [True, False, False, True, False, True]
    assert ((fused >= 0) & (fused <= 1)).all()


@pytest.fixture(scope="module")
def small_structure(tmp_path_factory):
    """A 512 x 512 CT slice stack (0.7 mm pixels, 1 mm slices) with a 5 mm bright ellipsoid (7 px
    across, 9 slices long) off-centre in soft tissue; drawn on three of its slices."""
    root = tmp_path_factory.mktemp("small")
    shape = (512, 512, 24)
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    body = ((x - 256) / 230) ** 2 + ((y - 256) / 180) ** 2 < 1
    image = np.where(body, 40.0, -1000.0) + 15 * np.sin(0.2 * x) * np.cos(0.15 * y)
    truth = (((x - 300) * 0.7 / 2.5) ** 2 + ((y - 220) * 0.7 / 2.5) ** 2 + ((z - 12) / 4.5) ** 2) <= 1
    image[truth] = 180.0
    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    drawn = np.zeros(shape, dtype=np.uint8)
    for slice_z in (9, 12, 15):
        drawn[..., slice_z] = truth[..., slice_z]
    return (
        write_nifti(root / "image.nii.gz", image.astype(np.int16), affine),
        write_nifti(root / "drawn.nii.gz", drawn, affine),
        truth,
    )


def test_a_5mm_structure_in_a_512_slice_is_segmented(tiny_backbone, trained_dpl, small_structure):
    image_path, drawn_path, truth = small_structure
    result = _dpl_result(tiny_backbone, trained_dpl[0]["checkpoint"], image_path, drawn_path, image_path)
    found = result.labels == 1
    scored = np.ones(truth.shape[2], dtype=bool)
    scored[[9, 12, 15]] = False  # the drawn slices come back as drawn; the others are the result
    both = (found & truth)[..., scored].sum()
    dice = 2 * both / (found[..., scored].sum() + truth[..., scored].sum())
    assert dice > 0.5, dice
    assert not found[:200].any() and not found[..., :5].any() and not found[..., 20:].any()


def _shifted(array: np.ndarray, shift: tuple[int, int, int], fill) -> np.ndarray:
    """``array`` moved by ``shift`` voxels (positive: towards higher indices), ``fill`` coming in."""
    out = np.full_like(array, fill)
    source = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, array.shape))
    target = tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(shift, array.shape))
    out[target] = array[source]
    return out


def test_another_patients_drawing_is_carried_to_where_the_structure_is(tiny_backbone, trained_dpl, tmp_path):
    """The query is the support patient moved by (6, -4, 3) voxels inside the same grid: the
    registration carries the drawn liver there, and the result is the moved liver, on its slices
    only; without the carried drawing (a plant) the model paints its whole box."""
    image, label, affine = make_volume(21)
    label = np.where(label == 1, 1, 0).astype(np.uint8)
    shift = (6, -4, 3)
    truth = _shifted(label, shift, 0) == 1
    paths = {
        "support": write_nifti(tmp_path / "support.nii.gz", image.astype(np.int16), affine),
        "drawn": write_nifti(tmp_path / "drawn.nii.gz", label, affine),
        "query": write_nifti(tmp_path / "query.nii.gz", _shifted(image, shift, -1000).astype(np.int16), affine),
    }
    result = _dpl_result(tiny_backbone, trained_dpl[0]["checkpoint"], paths["support"], paths["drawn"], paths["query"])
    found = result.labels == 1
    dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
    assert dice > 0.8, dice
    assert 0.5 < found.sum() / truth.sum() < 2.0  # the bound for every structure
    first, last = np.flatnonzero(truth.any(axis=(0, 1)))[[0, -1]]
    assert not found[..., : first - 1].any() and not found[..., last + 2 :].any()


def test_drawn_shape_holds_a_few_distances_and_redoes_one_asked_for_again():
    # eight drawings of discs growing along z; the query slices asked for in batches along z, then
    # the first batch again (a re-run's corrected slice): at most KEPT_DISTANCES are held at a time,
    # and a distance dropped and made again gives the shape it gave the first time
    drawn = np.zeros((48, 48, 80), dtype=bool)
    support_z = list(range(4, 80, 10))
    for i, z in enumerate(support_z):
        drawn[..., z] = _disc((48, 48), (24, 24), 4 + 2 * i)
    query_z = np.arange(80)
    serving = serving_supports(query_z, support_z, 2)
    shape = DrawnShape(drawn, support_z, (1.0, 1.0, 1.0))
    batches = [query_z[i : i + 2] for i in range(0, 80, 2)] + [query_z[:2]]
    pieces = []
    for rows in batches:
        pieces.append(shape.on(query_z[rows], serving.index[rows], serving.weights[rows]))
        assert len(shape._distances) <= DrawnShape.KEPT_DISTANCES
    np.testing.assert_array_equal(pieces[-1], pieces[0])
    # each slice's shape is its nearest drawing's disc, blended: the radius grows along z
    radius = [np.sqrt((piece[..., 0] > 0).sum() / np.pi) for piece in pieces[:-1]]
    assert radius[0] < radius[20] < radius[-1]
