"""DPL, the prototype method beside SD-FSMIS: the properties docs/dpl.md fixes (lambda 0
is the plain head, t* = 0 gives the prototype, the fusion stays within delta, seeds make it
reproducible, K = 1 has no uncertainty), its weights, its loading of DINOv2 alone, the CLI, and a
learning test on generated patients."""

from __future__ import annotations

import dataclasses
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdfsmis.cli import main
from sdfsmis.io.backbone import BackboneNotFoundError
from sdfsmis.io.volume import load_volume
from sdfsmis.io.weights import CheckpointError, save_weights
from sdfsmis.methods import DPL, load_model
from sdfsmis.methods.dinov2 import masked_average
from sdfsmis.methods.dpl.model import prototype_probability
from sdfsmis.methods.dpl.prototype_diffusion import conservative_fusion
from sdfsmis.pipeline.segmenter import VolumeSegmenter
from sdfsmis.samples.synthetic import make_volume, write_nifti
from sdfsmis.settings import load_config
from sdfsmis.training.trainer import TrainingRun, train

ORGANS = (1, 2, 3, 4)


def _slices(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 1, 64, 64, generator=generator) * 2 - 1
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 16:40, 20:44] = 1
    mask[1, :, 24:50, 10:30] = 1
    query = torch.rand(3, 1, 64, 64, generator=generator) * 2 - 1
    return image, mask, query


def _dpl(tiny_backbone, **changes) -> DPL:
    config = load_config(backbone=tiny_backbone)
    config.dpl = dataclasses.replace(config.dpl, **changes)
    torch.manual_seed(0)
    return load_model("dpl", tiny_backbone, config).eval()


def _spread_denoiser(model: DPL) -> None:
    """A denoiser that moves the variants (an untrained one predicts no noise)."""
    with torch.no_grad():
        for denoiser in (model.denoiser, model.denoiser_ema):
            torch.nn.init.normal_(denoiser.output.weight, std=0.05)


def test_lambda_zero_is_the_plain_prototype_head(tiny_backbone):
    model = _dpl(tiny_backbone, fusion_lambda=0.0)
    _spread_denoiser(model)
    image, mask, query = _slices()
    index = torch.tensor([0, 1, 1])
    with torch.no_grad():
        support = model.encode_support(image, mask)
        probability = model.predict(support, query, index).probability
        plain = prototype_probability(
            model.features(query), masked_average(model.features(image), mask)[index], 20.0, model.threshold
        )
    plain = F.interpolate(plain, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(probability, plain, rtol=0, atol=1e-5)
    enhanced = _dpl(tiny_backbone, fusion_lambda=0.3)
    _spread_denoiser(enhanced)
    with torch.no_grad():
        moved = enhanced.predict(enhanced.encode_support(image, mask), query, index).probability
    assert (moved - plain).abs().max() > 1e-3  # with lambda > 0 the variants do change the head


def test_t_star_zero_gives_variants_equal_to_the_prototype(tiny_backbone):
    model = _dpl(tiny_backbone, t_star=0)
    _spread_denoiser(model)
    image, mask, _ = _slices()
    with torch.no_grad():
        support = model.encode_support(image, mask)
    assert torch.equal(support.variants, support.prototype[:, None].expand_as(support.variants))
    assert torch.allclose(support.enhanced, support.prototype)
    noisy = _dpl(tiny_backbone, t_star=30)
    with torch.no_grad():
        varied = noisy.encode_support(image, mask)
    assert not torch.allclose(varied.variants, varied.prototype[:, None].expand_as(varied.variants))


def test_same_seed_same_masks_other_seed_other_variants(tiny_backbone):
    image, mask, query = _slices()
    index = torch.zeros(3, dtype=torch.long)
    runs = []
    for seed in (0, 0, 1):
        model = _dpl(tiny_backbone, seed=seed)
        with torch.no_grad():
            support = model.encode_support(image, mask)
            runs.append((support.variants, model.predict(support, query, index).probability >= 0.5))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.allclose(runs[0][0], runs[2][0])


def test_fusion_stays_within_delta_of_the_prototype(tiny_backbone):
    model = _dpl(tiny_backbone, t_star=100, delta=0.8, fusion_lambda=1.0)
    image, mask, _ = _slices()
    with torch.no_grad():
        support = model.encode_support(image, mask)
    cos = F.cosine_similarity(support.variants, support.prototype[:, None], dim=-1)
    assert (cos < 0.8).any(), "a full forward diffusion must leave some variants outside delta"
    assert (F.cosine_similarity(support.enhanced, support.prototype, dim=-1) >= 0.8 - 1e-5).all()
    # the bound holds for any variants, also far ones, and a fusion without the drop rule breaks it
    x0 = torch.randn(64, 32)
    variants = x0[:, None] + 2.0 * torch.randn(64, 8, 32)
    fused = conservative_fusion(x0, variants, tau=10.0, delta=0.8, lam=1.0)
    assert (F.cosine_similarity(fused, x0, dim=-1) >= 0.8 - 1e-5).all()
    naive = conservative_fusion(x0, variants, tau=10.0, delta=-1.0, lam=1.0)
    assert (F.cosine_similarity(naive, x0, dim=-1) < 0.8).any()


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    """A support patient with its labels and an unseen query patient, as NIfTI files; the query
    is stored LPS with its slices in descending z (voxel k is RAS slice depth - 1 - k)."""
    root = tmp_path_factory.mktemp("patients")
    image, label, affine = make_volume(100)
    support = write_nifti(root / "support.nii.gz", image, affine)
    support_label = write_nifti(root / "support_label.nii.gz", label.astype(np.uint8), affine)
    image, truth, affine = make_volume(101, orientation="LPS")
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, image.shape[2] - 1
    query = write_nifti(root / "query.nii.gz", image[..., ::-1], affine @ flip)
    return root, support, support_label, query, truth[..., ::-1]


def test_one_variant_has_zero_uncertainty(tiny_backbone, patients):
    _, support, support_label, query, _ = patients
    volumes = load_volume(support), load_volume(support_label, label=True), load_volume(query)
    config = load_config(backbone=tiny_backbone)
    config.inference.supports_per_query = 1  # one support per slice: the variants are the only members
    single = VolumeSegmenter(_dpl(tiny_backbone, variants=1), config.inference, progress=False)
    result = single.segment(*volumes, [1])
    assert result.uncertainty is not None and result.uncertainty.max() == 0.0
    assert set(result.reports[1].confidence) == {1.0} and result.review_slices(volumes[2]) == {1: []}
    several = VolumeSegmenter(_dpl(tiny_backbone, variants=8), config.inference, progress=False)
    assert several.segment(*volumes, [1]).uncertainty.max() > 0.0


def test_save_load_reproduces_masks_bit_for_bit(tiny_backbone, tmp_path):
    model = _dpl(tiny_backbone)
    _spread_denoiser(model)
    with torch.no_grad():
        model.threshold.fill_(-7.5)
        model.adapter.net[0].weight.mul_(1.7)
    path = save_weights(model, tmp_path)
    assert path.name == "dpl.safetensors"
    config = load_config(backbone=tiny_backbone)
    fresh = load_model("dpl", tiny_backbone, config).eval()
    image, mask, query = _slices()
    with torch.no_grad():
        before = model.segment(model.encode_support(image, mask), query)
        assert not torch.equal(fresh.segment(fresh.encode_support(image, mask), query), before)
        loaded = load_model("dpl", tiny_backbone, config, tmp_path).eval()
        assert torch.equal(loaded.segment(loaded.encode_support(image, mask), query), before)
    with pytest.raises(CheckpointError, match="holds dpl weights, not sdfsmis weights"):
        load_model("sdfsmis", tiny_backbone, config, path)


def test_dpl_needs_only_dinov2(tiny_backbone, tmp_path):
    only = tmp_path / "dinov2_only"
    shutil.copytree(tiny_backbone / "dinov2", only / "dinov2")
    config = load_config(backbone=tiny_backbone)
    assert isinstance(load_model("dpl", only, config), DPL)
    with pytest.raises(BackboneNotFoundError, match="missing: vae/"):
        load_model("sdfsmis", only, config)
    with pytest.raises(BackboneNotFoundError, match="missing: dinov2/"):
        load_model("dpl", tmp_path / "dinov2_only" / "dinov2", config)


def test_infer_cli_dpl_writes_uncertainty_in_the_query_geometry(tiny_backbone, patients, capsys):
    root, support, support_label, query, _ = patients
    output, uncertainty = root / "dpl.nii.gz", root / "uncertainty.nii.gz"
    main(
        [
            "infer",
            "--method",
            "dpl",
            "--backbone",
            str(tiny_backbone),
            "--support-image",
            str(support),
            "--support-label",
            str(support_label),
            "--image",
            str(query),
            "--output",
            str(output),
            "--labels",
            "1",
            "--uncertainty",
            str(uncertainty),
        ]
    )
    captured = capsys.readouterr()
    assert "WARNING: no --checkpoint: the dpl head" in captured.err
    summary = json.loads(captured.out[captured.out.index("{") :])
    reference = nib.load(str(query))
    written = nib.load(str(uncertainty))
    assert written.shape == reference.shape and np.allclose(written.affine, reference.affine)
    assert written.get_data_dtype() == np.float32 and float(written.get_fdata().max()) > 0
    depth = reference.shape[2]
    confidence = {int(z): c for z, c in summary["confidence"]["1"].items()}
    assert confidence and all(0 <= z < depth and 0.0 <= c <= 1.0 for z, c in confidence.items())
    review = summary["review_slices"]["1"]
    doubtful = [z for z, c in confidence.items() if c < 1.0]  # the 5 least confident of these, lowest first
    assert review and len(review) == min(5, len(doubtful)) and review == sorted(review, key=lambda z: confidence[z])
    assert max(confidence[z] for z in review) <= min([confidence[z] for z in doubtful if z not in review] or [1.0])
    # slices are numbered in the file's own (descending) voxel order: the reviewed slices are
    # those where the written map is uncertain, the segmented ones those with a label
    spread = written.get_fdata()
    assert all(spread[..., z].max() > 0 for z in review)
    labelled = np.flatnonzero(np.asarray(nib.load(str(output)).dataobj).any(axis=(0, 1)))
    assert set(labelled) <= set(confidence)


def _cross_patient_dice(model, config, patients) -> float:
    _, support, support_label, query, truth = patients
    segmenter = VolumeSegmenter(model, config.inference, progress=False)
    query_volume = load_volume(query)
    scores = []
    for organ in ORGANS:
        result = segmenter.segment(load_volume(support), load_volume(support_label, label=True), query_volume, [organ])
        predicted = query_volume.to_original(result.labels) == organ
        expected = truth == organ
        scores.append(2 * (predicted & expected).sum() / (predicted.sum() + expected.sum()))
    return float(np.mean(scores))


def test_training_logs_every_loss_and_publishes_dpl_weights(trained_dpl):
    summary, output = trained_dpl
    assert summary["method"] == "dpl" and (output / "dpl.safetensors").is_file()
    assert not (output / "sdfsmis.safetensors").exists()
    records = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "seg" in r]
    assert steps and all({"loss", "seg", "align", "diff", "threshold"} <= set(r) for r in steps)
    assert np.mean([r["loss"] for r in steps[-5:]]) < np.mean([r["loss"] for r in steps[:5]])


def test_supervoxel_training_beats_untrained_dpl_across_patients(tiny_backbone, trained_dpl, patients):
    from sdfsmis.evaluation.baselines import PrototypeMatcher

    config = load_config(backbone=tiny_backbone)
    config.inference.shape_reach_mm = 0  # the model alone: the carried drawing does not depend on the weights
    untrained = _cross_patient_dice(load_model("dpl", tiny_backbone, config).eval(), config, patients)
    trained_model = load_model("dpl", tiny_backbone, config, trained_dpl[1]).eval()
    trained = _cross_patient_dice(trained_model, config, patients)
    prototype = _cross_patient_dice(PrototypeMatcher(config.model.resolution), config, patients)
    print(
        f"\ncross-patient one-shot Dice (mean of {len(ORGANS)} organs): untrained DPL {untrained:.3f}, "
        f"trained DPL {trained:.3f}, training-free prototype baseline {prototype:.3f}"
    )
    assert trained > untrained + 0.05


def test_resumed_dpl_training_equals_an_uninterrupted_run(tiny_backbone, trained_dpl, tmp_path):
    """Stopped at 10 and resumed to 20: the denoiser's EMA, the optimiser and the data order
    continue, so the weights equal a straight 20-iteration run."""
    from safetensors.torch import load_file

    images = sorted((trained_dpl[1].parent / "studies").glob("*.nii.gz"))  # supervoxels already cached
    config = load_config(backbone=tiny_backbone)
    config.training.checkpoint_every = config.training.validate_every = 5

    def run(output, iterations, resume=False):
        return train(
            TrainingRun(tiny_backbone, images, output, config, iterations, resume=resume, progress=False, method="dpl")
        )

    run(tmp_path / "resumed", 10)
    assert run(tmp_path / "resumed", 20, resume=True)["resumed_from"] == 10
    run(tmp_path / "straight", 20)
    resumed, straight = (
        load_file(tmp_path / "resumed" / "dpl.safetensors"),
        load_file(tmp_path / "straight" / "dpl.safetensors"),
    )
    assert any(k.startswith("denoiser_ema.") for k in resumed)
    assert max((resumed[k] - straight[k]).abs().max().item() for k in resumed) < 1e-5
