"""Another patient's support placed in the query through the anatomy: on a look-alike pair whose
query scan lost its upper 40 %, the registration range holds the organ where the relative-position
rule misses it, and the placement is the same every run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk

from sdfsmis.config import InferenceConfig
from sdfsmis.io.volume import load_volume
from sdfsmis.pipeline import placement
from sdfsmis.samples.synthetic import make_volume, write_nifti

SPLEEN = 4


def _write(folder, name, seed, crop_top=0.0):
    """A look-alike patient, its upper ``crop_top`` of slices cut off (the affine follows)."""
    image, label, affine = make_volume(seed)
    keep = image.shape[2] - int(round(crop_top * image.shape[2]))
    image_path = write_nifti(folder / f"{name}.nii.gz", image[..., :keep], affine)
    label_path = write_nifti(folder / f"{name}_label.nii.gz", label[..., :keep], affine, np.uint8)
    return load_volume(image_path), load_volume(label_path, label=True)


@pytest.fixture(scope="module")
def cropped_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("placement")
    return _write(folder, "support", 1), _write(folder, "query", 2, crop_top=0.4)


def test_registration_range_covers_the_organ_where_the_relative_rule_misses_it(cropped_pair):
    (support, support_label), (query, query_label) = cropped_pair
    config = InferenceConfig()
    drawn = support_label.data == SPLEEN
    annotated = np.flatnonzero(drawn.any(axis=(0, 1)))
    truth = np.flatnonzero((query_label.data == SPLEEN).any(axis=(0, 1)))
    depth = query.data.shape[2]

    def covered(place: placement.Placement) -> float:
        return float(np.mean((truth >= place.first) & (truth <= place.last)))

    relative = placement.relative_position(annotated, support.data.shape[2], depth, config)
    intensities = support.intensity(config.clip_percentiles), query.intensity(config.clip_percentiles)
    registration = placement.register_volumes(support, intensities[0], query, intensities[1])
    assert registration.problem is None
    registered = placement.registered_position(registration, annotated, drawn, depth, config)
    print(f"spleen slices inside the range: registration {covered(registered):.2f}, relative {covered(relative):.2f}")
    assert registered.rule == "registration" and registered.last - registered.first + 1 < depth  # not all slices
    assert covered(registered) == 1.0
    assert covered(relative) < 0.5
    # the support slice that serves the query's middle spleen slice is near the support's own middle
    middle = truth[len(truth) // 2]
    assert abs(registered.position(middle) - annotated[len(annotated) // 2]) <= 3
    # the same placement every run
    again = placement.register_volumes(support, intensities[0], query, intensities[1])
    assert again.transform.GetParameters() == registration.transform.GetParameters()


def test_an_untrustworthy_registration_falls_back_to_every_slice(cropped_pair):
    (support, support_label), (query, _) = cropped_pair
    config = InferenceConfig()
    drawn = support_label.data == SPLEEN
    annotated = np.flatnonzero(drawn.any(axis=(0, 1)))
    noise = np.random.default_rng(0).standard_normal(query.data.shape).astype(np.float32)  # no anatomy to match
    noisy = dataclasses.replace(query, data=noise)
    registration = placement.register_volumes(
        support, support.intensity((0.5, 99.5)), noisy, noisy.intensity((0.5, 99.5))
    )
    assert registration.problem is not None and "too little" in registration.problem
    place = placement.registered_position(registration, annotated, drawn, query.data.shape[2], config)
    assert place.rule.startswith("all slices: ") and (place.first, place.last) == (0, query.data.shape[2] - 1)


def _itk_image(volume, data: np.ndarray):
    """The working array [X, Y, Z] as an ITK image with the volume's world geometry, built here from
    the affine alone (voxel (i, j, k) at affine @ (i, j, k, 1))."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    affine = placement._ras_affine(volume)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    image.SetDirection((affine[:3, :3] / spacing).flatten().tolist())
    return image


def test_the_registration_grid_is_itks_binshrink_of_the_normalised_volume(tmp_path):
    # odd sizes (the blocks do not divide them) and an oblique, LPS-stored scan; 1.5 mm voxels -> blocks of 4
    image, _, affine = make_volume(3, shape=(45, 38, 27), spacing=(1.5, 1.5, 2.0), oblique=True, orientation="LPS")
    volume = load_volume(write_nifti(tmp_path / "oblique.nii.gz", image, affine))
    intensity = volume.intensity((0.5, 99.5))
    binned = placement._binned_image(volume, intensity)
    expected = sitk.BinShrink(_itk_image(volume, intensity.apply(volume.data)), [4, 4, 3])
    assert binned.GetSize() == expected.GetSize() == (11, 9, 9)
    np.testing.assert_allclose(binned.GetOrigin(), expected.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(binned.GetSpacing(), expected.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(binned.GetDirection(), expected.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(binned), sitk.GetArrayViewFromImage(expected))


def test_a_drawing_is_carried_slab_by_slab_as_in_one_piece(cropped_pair):
    (support, support_label), (query, _) = cropped_pair
    registration = placement.register_volumes(
        support, support.intensity((0.5, 99.5)), query, query.intensity((0.5, 99.5))
    )
    drawn = support_label.data == SPLEEN
    carried = placement.carried_drawing(registration, support, drawn, query)
    assert query.data.shape[2] > placement.CARRY_SLAB  # more than one slab
    moving = _itk_image(support, drawn.astype(np.float32))
    fixed = _itk_image(query, np.zeros(query.data.shape, np.uint8))
    whole = sitk.Resample(moving, fixed, registration.transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    expected = sitk.GetArrayFromImage(whole).transpose(2, 1, 0) > 0.5
    assert expected.any()
    np.testing.assert_array_equal(carried, expected)
