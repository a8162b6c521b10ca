"""Another patient's support placed in the query through the anatomy: on a look-alike pair whose
query scan lost its upper 40 %, the registration range holds the organ where the relative-position
rule misses it, and the placement is the same every run."""

from __future__ import annotations

import numpy as np
import pytest

from sdfsmis.config import InferenceConfig
from sdfsmis.io.volume import load_volume, normalise_intensity
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
    support_data = normalise_intensity(support.data, config.clip_percentiles)
    query_data = normalise_intensity(query.data, config.clip_percentiles)
    depth = query.data.shape[2]

    def covered(place: placement.Placement) -> float:
        return float(np.mean((truth >= place.first) & (truth <= place.last)))

    relative = placement.relative_position(annotated, support.data.shape[2], depth, config)
    registration = placement.register_volumes(support, support_data, query, query_data)
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
    again = placement.register_volumes(support, support_data, query, query_data)
    assert again.transform.GetParameters() == registration.transform.GetParameters()


def test_an_untrustworthy_registration_falls_back_to_every_slice(cropped_pair):
    (support, support_label), (query, _) = cropped_pair
    config = InferenceConfig()
    drawn = support_label.data == SPLEEN
    annotated = np.flatnonzero(drawn.any(axis=(0, 1)))
    noise = np.random.default_rng(0).standard_normal(query.data.shape).astype(np.float32)  # no anatomy to match
    registration = placement.register_volumes(support, normalise_intensity(support.data, (0.5, 99.5)), query, noise)
    assert registration.problem is not None and "too little" in registration.problem
    place = placement.registered_position(registration, annotated, drawn, query.data.shape[2], config)
    assert place.rule.startswith("all slices: ") and (place.first, place.last) == (0, query.data.shape[2] - 1)
