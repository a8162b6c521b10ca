"""Episode sampling and augmentation on generated volumes with real supervoxels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdfsmis.samples.synthetic import make_studies
from sdfsmis.training.augment import augment
from sdfsmis.training.episodes import EpisodeSampler, EpisodeZoom, TrainingVolume


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


@pytest.fixture(scope="module")
def zoomed(tmp_path_factory) -> TrainingVolume:
    folder = tmp_path_factory.mktemp("zoomed")
    image = make_studies(folder, 1, with_labels=True, shape=(80, 80, 24), spacing=(1.0, 1.0, 2.0))[0]
    return TrainingVolume.load(
        image, 64, folder / "labels" / "final" / image.name, supervoxel_min_size=800, zoom=EpisodeZoom(10.0, 0.5)
    )


def test_zoomed_episode_is_the_box_around_the_support_for_both_slices(zoomed):
    """A 6-voxel square (1 mm voxels) gets a 10 mm margin: a 26-voxel box, so it spans 6 / 26 of the
    model's 64 pixels (14.8) and covers about 219 of them; the query is cut from the same box, so a
    square moved by 3 voxels on the query slice moves by 3 x 64 / 26 = 7.4 model pixels."""
    assert zoomed.spacing == (1.0, 1.0, 2.0) and zoomed.images.shape[2:] == (80, 80)
    masks = torch.zeros((24, 80, 80), dtype=torch.bool)
    masks[10, 30:36, 40:46] = True
    masks[11, 33:39, 40:46] = True
    support_image, support_mask, query_image, query_mask = zoomed.pair(masks, 10, 11)
    assert support_image.shape == query_image.shape == (1, 1, 64, 64)
    assert float(support_mask.sum()) == pytest.approx((6 / 26 * 64) ** 2, rel=0.15)
    rows = lambda m: torch.nonzero(m[0, 0].any(dim=1)).flatten().float().mean()  # noqa: E731
    assert float(rows(support_mask)) == pytest.approx(31.5, abs=1.0)  # the box is centred on the support
    assert float(rows(query_mask) - rows(support_mask)) == pytest.approx(3 * 64 / 26, abs=1.0)


def test_zoomed_sampler_gives_episodes_of_the_least_foreground(zoomed):
    sampler = EpisodeSampler([zoomed], seed=5, min_foreground=100, augment_episodes=False)
    for i in range(6):
        episode = sampler.episode(i)
        assert episode.support_image.shape == (1, 1, 64, 64)
        assert min(episode.support_mask.sum(), episode.query_mask.sum()) >= 100
