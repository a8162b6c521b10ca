"""A learning test that can fail: trained on supervoxels alone (no label seen), the tiny model
segments a real structure -- the liver of an unseen generated patient -- one-shot from the
neighbouring slice far better than the untrained model."""

from __future__ import annotations

import numpy as np
import torch

from sdfsmis.methods.sdfsmis.model import SDFSMIS
from sdfsmis.metrics import dice
from sdfsmis.samples.synthetic import make_volume, write_nifti
from sdfsmis.settings import load_config
from sdfsmis.training.episodes import TrainingVolume
from sdfsmis.training.trainer import episode_zoom

LIVER = 1


def _one_shot_dice(backbone, checkpoint, volume: TrainingVolume, organ: int) -> float:
    """Mean Dice over the organ's slices, each segmented with the previous slice as support, both
    framed as training and grounded inference frame them (the volume's episode zoom)."""
    config = load_config(backbone=backbone)
    torch.manual_seed(0)  # the untrained head's random part: the same whatever ran before in this process
    model = SDFSMIS.from_backbone(backbone, config, checkpoint).eval()
    masks = volume.labels == organ
    pairs = [z for z in range(len(masks) - 1) if masks[z].sum() >= 20 and masks[z + 1].sum() >= 20]
    scores = []
    for z in pairs:
        support_image, support_mask, query_image, query_mask = volume.pair(masks, z, z + 1)
        probability = model.segment(model.encode_support(support_image, support_mask), query_image)
        scores.append(dice((probability >= config.inference.threshold).float(), query_mask))
    return float(np.mean(scores))


def test_supervoxel_training_learns_the_liver(fitted_backbone, trained_checkpoint, tmp_path):
    image, truth, affine = make_volume(102)  # a patient the training never saw
    volume = TrainingVolume.load(
        write_nifti(tmp_path / "image.nii.gz", image, affine),
        load_config(backbone=fitted_backbone).model.resolution,
        write_nifti(tmp_path / "label.nii.gz", truth, affine),
        supervoxel_min_size=2000,
        zoom=episode_zoom(load_config(backbone=fitted_backbone)),
    )
    untrained = _one_shot_dice(fitted_backbone, None, volume, LIVER)
    trained = _one_shot_dice(fitted_backbone, trained_checkpoint, volume, LIVER)
    print(f"\none-shot liver Dice on an unseen patient: untrained {untrained:.3f}, trained {trained:.3f}")
    assert trained > untrained + 0.15
