"""Spatial grounding: a result stays where the radiologist drew. The boxes and the outward stop
against hand-worked cases, then a trained DPL on a volume with a structure and its twin on the
other side: drawn on one side, nothing comes back on the other, and nothing beyond the region."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdfsmis.config import load_config
from sdfsmis.grounding import Box, box_around, where_it_ends
from sdfsmis.inference import VolumeSegmenter
from sdfsmis.models import load_model
from sdfsmis.synthetic import write_nifti
from sdfsmis.volume import load_volume


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
    mask = np.zeros((10, 10, 12), dtype=bool)
    areas = {1: 30, 2: 50, 3: 60, 4: 64, 5: 64, 6: 64, 7: 40, 8: 16, 9: 1, 10: 30, 11: 30}
    for z, area in areas.items():
        mask.reshape(100, 12)[:area, z] = True
    kept = where_it_ends(mask, np.array([4, 6]), continuity=0.3)
    # below 4: 60 >= 0.3 x 64, 50 >= 0.3 x 60, 30 >= 0.3 x 50, then slice 0 is empty: ends there
    # above 6: 40 >= 19.2, 16 >= 12, then 1 < 4.8 at slice 9 ends it; 10 and 11 are cleared with it
    assert np.flatnonzero(kept.any(axis=(0, 1))).tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert (kept[..., :9] == mask[..., :9]).all()  # what is kept is untouched


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


def _segment(backbone, checkpoint, twins, grounding: bool) -> tuple[np.ndarray, list[int]]:
    image_path, drawn_path, _, _ = twins
    config = load_config(backbone=backbone)
    config.inference.grounding = grounding
    torch.manual_seed(0)
    model = load_model("dpl", backbone, config, checkpoint).eval()
    image = load_volume(image_path)
    result = VolumeSegmenter(model, config.inference, progress=False).segment(
        image, load_volume(drawn_path, label=True), image, [1]
    )
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
