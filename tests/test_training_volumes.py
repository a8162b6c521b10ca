"""Training on volumes of any voxel size and field of view: the supervoxel size follows the
voxels and the model resolution, a volume that yields no episode is skipped (named, with the
reason), and only a folder where none yields one stops, naming the setting to change."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from sdfsmis.config import load_config
from sdfsmis.episodes import NoEpisodes, TrainingVolume
from sdfsmis.synthetic import make_studies, write_nifti
from sdfsmis.trainer import TrainingRun, train


def _hopeless(path: Path) -> Path:
    """Air with a 6-voxel cube of tissue: no supervoxel can cover an episode's foreground."""
    image = np.full((64, 64, 24), -1000, np.int16)
    image[30:36, 30:36, 9:15] = 40
    return write_nifti(path, image, np.diag([1.5, 1.5, 5.0, 1.0]))


def _run(backbone: Path, images: list[Path], output: Path) -> dict:
    config = load_config(backbone=backbone)
    config.training.checkpoint_every = config.training.validate_every = 2
    config.training.validation_episodes = 1
    return train(TrainingRun(backbone, images, output, config, iterations=2, progress=False))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 3.0, 3.0)], ids=["1mm", "3mm"])
def test_auto_supervoxels_yield_episodes_at_any_voxel_size(tiny_backbone, tmp_path, spacing):
    images = make_studies(tmp_path / "studies", 1, seed=7, shape=(72, 88, 48), spacing=spacing, modality="MR")
    config = load_config(backbone=tiny_backbone)
    assert config.training.supervoxel_min_size == "auto"
    volume = TrainingVolume.load(images[0], config.model.resolution, None, "auto", (0.5, 99.5), 100)
    assert volume.why_no_episodes(100) is None
    # the rule in mm: a minimum supervoxel's cross-section is twice the episode minimum at model resolution
    pixel_mm2 = spacing[0] * spacing[1] * (88 / config.model.resolution) ** 2
    side_mm = np.sqrt(2 * 100 * pixel_mm2)
    assert volume.supervoxel_min_size == round(side_mm**3 / np.prod(spacing))
    summary = _run(tiny_backbone, images, tmp_path / "out")
    assert summary["iterations"] == 2 and summary["skipped"] == []


def test_a_hopeless_volume_is_skipped_and_named_the_others_train(tiny_backbone, tmp_path, caplog):
    good = make_studies(tmp_path / "studies", 1, seed=3, shape=(64, 64, 24))
    bad = _hopeless(tmp_path / "studies" / "tiny_body.nii.gz")
    with caplog.at_level(logging.WARNING, logger="sdfsmis.trainer"):
        summary = _run(tiny_backbone, [*good, bad], tmp_path / "out")
    assert summary["iterations"] == 2 and (tmp_path / "out" / "sdfsmis.safetensors").is_file()
    assert [s["image"] for s in summary["skipped"]] == ["tiny_body.nii.gz"]
    assert "training.min_foreground" in summary["skipped"][0]["reason"]
    assert "skipping tiny_body.nii.gz" in caplog.text


def test_no_volume_with_episodes_names_the_setting_to_change(tiny_backbone, tmp_path):
    hopeless = _hopeless(tmp_path / "studies" / "tiny_body.nii.gz")
    corrupt = tmp_path / "studies" / "broken.nii.gz"
    corrupt.write_bytes(b"not a volume")
    with pytest.raises(NoEpisodes) as error:
        _run(tiny_backbone, [hopeless, corrupt], tmp_path / "out")
    message = str(error.value)
    assert "tiny_body.nii.gz: its largest supervoxel covers" in message
    assert "broken.nii.gz" in message and "not a readable NIfTI" in message
    assert "--min-foreground" in message and "training.supervoxel_min_size" in message
