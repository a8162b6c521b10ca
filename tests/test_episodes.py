"""Episode sampling and augmentation on generated volumes with real supervoxels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdfsmis.augment import augment
from sdfsmis.episodes import EpisodeSampler, TrainingVolume
from sdfsmis.synthetic import make_studies


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> TrainingVolume:
    folder = tmp_path_factory.mktemp("episodes")
    image = make_studies(folder, 1, with_labels=True, shape=(80, 80, 24))[0]
    return TrainingVolume.load(image, 64, folder / "labels" / "final" / image.name, supervoxel_min_size=800)


def test_episode_is_reproducible_and_differs_between_iterations(volume):
    sampler = EpisodeSampler([volume], seed=42, min_foreground=40)
    a, b = sampler.episode(3), sampler.episode(3)
    assert torch.equal(a.query_image, b.query_image) and torch.equal(a.support_mask, b.support_mask)
    others = [sampler.episode(i) for i in range(4, 12)]
    assert any(not torch.equal(a.query_image, o.query_image) for o in others)


def test_episode_slices_are_adjacent_and_share_a_supervoxel(volume):
    sampler = EpisodeSampler([volume], seed=1, min_foreground=40, augment_episodes=False)
    for i in range(10):
        e = sampler.episode(i)
        assert e.support_mask.sum() >= 40 and e.query_mask.sum() >= 40
        s = _find_slice(volume.images, e.support_image)
        q = _find_slice(volume.images, e.query_image)
        assert abs(s - q) == 1
        ids = torch.unique(volume.supervoxels[s][e.support_mask[0, 0] > 0])
        assert ids.numel() == 1 and torch.equal(volume.supervoxels[q] == ids[0], e.query_mask[0, 0] > 0)


def _find_slice(images: torch.Tensor, image: torch.Tensor) -> int:
    return int(((images - image).abs().flatten(1).amax(dim=1) == 0).nonzero()[0])


def test_augmentation_draws_a_fresh_warp_every_time():
    image = torch.linspace(-1, 1, 64 * 64).view(1, 1, 64, 64)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 20:40, 20:40] = 1
    rng = np.random.default_rng(0)
    warped = [augment(image, mask, rng, p=1.0)[0] for _ in range(3)]
    assert not torch.allclose(warped[0], warped[1]) and not torch.allclose(warped[1], warped[2])
    again = augment(image, mask, np.random.default_rng(0), p=1.0)[0]
    assert torch.equal(again, warped[0])


def test_setting2_exclusion_is_judged_on_ground_truth(volume):
    labels = volume.labels
    has = {c: (labels == c).flatten(1).any(dim=1).numpy() for c in (1, 2)}
    volume.exclude_classes([1, 2], "any")
    assert np.array_equal(volume.excluded, has[1] | has[2])
    volume.exclude_classes([1, 2], "all")
    assert np.array_equal(volume.excluded, has[1] & has[2])
    assert volume.excluded.sum() < (has[1] | has[2]).sum()
    volume.exclude_classes([1, 2], "any")
    sampler = EpisodeSampler([volume], seed=3, min_foreground=40, augment_episodes=False)
    for i in range(8):
        e = sampler.episode(i)
        for image in (e.support_image, e.query_image):
            assert not volume.excluded[_find_slice(volume.images, image)]
    volume.excluded[:] = False


def test_setting2_leaving_no_usable_slices_says_so(volume):
    volume.excluded[1::2] = True  # as if every other slice held a test class: no adjacent pair left
    removed, total = int(volume.excluded.sum()), len(volume.excluded)
    sampler = EpisodeSampler([volume], seed=3, min_foreground=40, max_tries=20)
    with pytest.raises(RuntimeError, match=rf"Setting 2 removed {removed} of {total} slices.*exclusion-rule all"):
        sampler.episode(0)
    volume.excluded[:] = False
    assert sampler.episode(0).query_image.shape[-1] == 64
