"""Training on volumes of any voxel size and field of view: the supervoxel size follows the
voxels and the model resolution, a volume that yields no episode is skipped (named, with the
reason), and only a folder where none yields one stops, naming the setting to change."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from sdfsmis.samples.synthetic import make_studies, write_nifti
from sdfsmis.settings import load_config
from sdfsmis.training.episodes import EpisodeZoom, NoEpisodes, TrainingVolume
from sdfsmis.training.trainer import TrainingRun, train


def _hopeless(path: Path) -> Path:
    """Air with tissue on one slice only: no supervoxel is on two adjacent slices, zoomed or not."""
    image = np.full((64, 64, 24), -1000, np.int16)
    image[30:36, 30:36, 9] = 40
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
    assert config.training.supervoxel_min_size == "auto" and config.training.zoom_episodes
    volume = TrainingVolume.load(images[0], config.model.resolution, None, "auto", (0.5, 99.5), 100)
    assert volume.why_no_episodes(100) is None
    # whole-slice episodes (zoom off): the supervoxel size in mm follows the model pixel
    # the rule in mm: a minimum supervoxel's cross-section is twice the episode minimum at model resolution
    pixel_mm2 = spacing[0] * spacing[1] * (88 / config.model.resolution) ** 2
    side_mm = np.sqrt(2 * 100 * pixel_mm2)
    assert volume.supervoxel_min_size == round(side_mm**3 / np.prod(spacing))
    summary = _run(tiny_backbone, images, tmp_path / "out")
    assert summary["iterations"] == 2 and summary["skipped"] == []


@pytest.mark.parametrize(("spacing", "expected"), [((1.0, 1.0, 1.0), 183), ((3.0, 3.0, 3.0), 7)], ids=["1mm", "3mm"])
def test_zoomed_episodes_take_supervoxels_as_small_as_a_zoomed_episode_shows(tmp_path, spacing, expected):
    """A 10 mm margin frames a cube of side s as s / (s + 20) of the model's side; 2 x 100 px of 64 x 64
    is a share 0.0488 of the area, sqrt 0.2210, so s = 20 x 0.2210 / 0.7790 = 5.67 mm: 182.6 voxels of
    1 mm; of 3 mm, two slices (6 mm) thick: 5.67 x 5.67 x 6 / 27 = 7.2 voxels."""
    images = make_studies(tmp_path / "studies", 1, seed=7, shape=(72, 88, 48), spacing=spacing, modality="MR")
    zoom = EpisodeZoom(margin_mm=10.0, margin_share=0.5)
    volume = TrainingVolume.load(images[0], 64, None, "auto", (0.5, 99.5), 100, zoom)
    assert volume.supervoxel_min_size == expected
    assert volume.why_no_episodes(100) is None
    assert volume.images.shape[2:] == (72, 88)  # kept at native resolution, cropped per episode


def test_a_hopeless_volume_is_skipped_and_named_the_others_train(tiny_backbone, tmp_path, caplog):
    good = make_studies(tmp_path / "studies", 1, seed=3, shape=(64, 64, 24))
    bad = _hopeless(tmp_path / "studies" / "tiny_body.nii.gz")
    with caplog.at_level(logging.WARNING, logger="sdfsmis.training.trainer"):
        summary = _run(tiny_backbone, [*good, bad], tmp_path / "out")
    assert summary["iterations"] == 2 and (tmp_path / "out" / "sdfsmis.safetensors").is_file()
    assert [s["image"] for s in summary["skipped"]] == ["tiny_body.nii.gz"]
    assert "two adjacent slices" in summary["skipped"][0]["reason"]
    assert "training.supervoxel_min_size" in summary["skipped"][0]["reason"]
    assert "skipping tiny_body.nii.gz" in caplog.text


def test_no_volume_with_episodes_names_the_setting_to_change(tiny_backbone, tmp_path):
    hopeless = _hopeless(tmp_path / "studies" / "tiny_body.nii.gz")
    corrupt = tmp_path / "studies" / "broken.nii.gz"
    corrupt.write_bytes(b"not a volume")
    with pytest.raises(NoEpisodes) as error:
        _run(tiny_backbone, [hopeless, corrupt], tmp_path / "out")
    message = str(error.value)
    assert "tiny_body.nii.gz: no supervoxel" in message
    assert "broken.nii.gz" in message and "not a readable NIfTI" in message
    assert "--min-foreground" in message and "training.supervoxel_min_size" in message
