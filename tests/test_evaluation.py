"""The evaluation protocol against hand-computed expectations (support slices, chunks, folds,
Setting-2 exclusion on ground truth, per-volume Dice), and ``sdfsmis evaluate`` end to end on a
prepared look-alike CHAOS set with the tiny model and both training-free baselines, and with a
briefly trained DPL, its ablations and the uncertainty check; same-volume propagation against the
nearest-slice copy on a thin-sliced set."""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch

from sdfsmis.cli import main
from sdfsmis.config import InferenceConfig
from sdfsmis.evaluation.dataset import PreparedDataset
from sdfsmis.evaluation.harness import Evaluator, slice_dice
from sdfsmis.evaluation.lookalike import write_chaos
from sdfsmis.evaluation.methods import METHODS, MODEL_KEYS, Method, MethodFactory
from sdfsmis.evaluation.metrics import score_volume, summarise, uncertainty_correlation
from sdfsmis.evaluation.prepare import prepare
from sdfsmis.evaluation.protocol import chunk_index, make_folds, support_slices, training_selection
from sdfsmis.io.volume import load_volume
from sdfsmis.methods import DPL
from sdfsmis.methods.base import Prediction
from sdfsmis.pipeline.segmenter import VolumeSegmenter
from sdfsmis.training.episodes import TrainingVolume

DPL_VARIANTS = {DPL.method: DPL.title, **DPL.ablations}  # DPL and its ablations: the harness's rows


@pytest.fixture(scope="module")
def chaos(tmp_path_factory) -> PreparedDataset:
    """Four look-alike CHAOS patients, prepared (256 x 256 x 10 each)."""
    root = tmp_path_factory.mktemp("chaos")
    write_chaos(root / "raw", 4, shape=(64, 64, 10), spacing=(5.0, 5.0, 8.0))
    return prepare("chaos", root / "raw", root / "prepared", supervoxel_min_size=2000, log=lambda _: None)


def test_support_slices_at_one_sixth_half_five_sixths():
    label = np.zeros((4, 4, 30), dtype=np.int32)
    label[1, 1, 4:22] = 3  # 18 organ slices: int(18/6) = 3, int(18/2) = 9, int(18*5/6) = 15
    assert support_slices(label, 3) == [4 + 3, 4 + 9, 4 + 15]
    sparse = np.zeros((4, 4, 12), dtype=np.int32)
    sparse[0, 0, [2, 3, 5, 8, 9, 10]] = 1  # C = 6 -> positions 1, 3, 5 of the organ slices
    assert support_slices(sparse, 1) == [3, 8, 10]
    assert support_slices(sparse, 2) == []


def test_query_chunks_split_at_linspace():
    assert chunk_index(10, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]  # bounds 0, 3, 6, 10
    assert chunk_index(7, 3).tolist() == [0, 0, 1, 1, 2, 2, 2]  # bounds 0, 2, 4, 7
    assert chunk_index(2, 3).tolist() == [1, 2]  # bounds 0, 0, 1, 2: chunk 0 is empty


def test_folds_are_contiguous_with_the_first_case_as_support():
    cases = [f"case_{i:02d}" for i in range(31)]
    folds = make_folds(cases[::-1], 5)
    assert [len(f.cases) for f in folds] == [6, 6, 6, 6, 7]
    assert folds[1].cases == cases[6:12] and folds[1].support == "case_06"
    assert folds[1].queries == cases[7:12]
    assert sorted(c for f in folds for c in f.cases) == cases
    with pytest.raises(ValueError, match="cannot make"):
        make_folds(cases[:9], 5)


def test_class_dice_is_the_mean_of_per_volume_dice_not_pooled():
    big = np.zeros((20, 20, 10), dtype=bool)
    big[:, :, :] = True  # 4000 voxels, predicted exactly: Dice 1
    small_truth = np.zeros((20, 20, 10), dtype=bool)
    small_truth[0:2, 0:2, 0:2] = True  # 8 voxels, missed: Dice 0
    scores = [score_volume(big, big, (1, 1, 1)), score_volume(np.zeros_like(small_truth), small_truth, (1, 1, 1))]
    assert scores[0]["dice"] == 1.0 and scores[1]["dice"] == 0.0
    assert np.isnan(scores[1]["hd95"])  # empty prediction: no surface distance
    records = [{"method": "m", "organ": "liver", "fold": 0, "seconds": 1.0, "slices": 10, **s} for s in scores]
    summary = summarise(records)["m"]
    pooled = 2 * 4000 / (4000 + 4000 + 8)
    assert summary["classes"]["liver"]["dice"] == pytest.approx(0.5) and pooled > 0.99
    assert summary["classes"]["liver"]["empty_predictions"] == 1
    assert summary["classes"]["liver"]["hd95"] == 0.0  # the NaN of the empty prediction is left out
    # Folds are averaged after volumes: fold 0 has Dice 1 and 0, fold 1 has 0.2 -> (0.5 + 0.2) / 2.
    records.append({**records[1], "fold": 1, "dice": 0.2})
    assert summarise(records)["m"]["classes"]["liver"]["dice"] == pytest.approx(0.35)


def test_volume_ratio_is_predicted_over_true_voxels_per_volume_then_averaged():
    truth = np.zeros((20, 20, 10), dtype=bool)
    truth[5:10, 5:10, 2:6] = True  # 100 voxels
    painted = truth.copy()
    painted[..., 6:] = painted[..., 2:6]  # the same shape copied onward: 100 more voxels
    scores = [score_volume(painted, truth, (1, 1, 1)), score_volume(truth, truth, (1, 1, 1))]
    assert scores[0]["volume_ratio"] == pytest.approx(2.0) and scores[1]["volume_ratio"] == pytest.approx(1.0)
    assert np.isnan(score_volume(truth, np.zeros_like(truth), (1, 1, 1))["volume_ratio"])  # nothing to compare to
    records = [{"method": "m", "organ": "liver", "fold": 0, "seconds": 1.0, "slices": 10, **s} for s in scores]
    summary = summarise(records)["m"]
    assert summary["classes"]["liver"]["volume_ratio"] == pytest.approx(1.5)
    assert summary["mean"]["volume_ratio"] == pytest.approx(1.5)


def test_surface_distances_are_in_millimetres():
    truth = np.zeros((30, 30, 12), dtype=bool)
    truth[5:25, 5:25, 2:10] = True
    moved = np.roll(truth, 2, axis=0)  # 2 voxels along x
    iso = score_volume(moved, truth, (1.0, 1.0, 1.0))
    coarse = score_volume(moved, truth, (3.0, 1.0, 1.0))
    assert iso["hd95"] == pytest.approx(2.0) and coarse["hd95"] == pytest.approx(6.0)


def test_setting2_fold_training_set_excludes_test_slices_on_ground_truth(chaos):
    images, exclude = training_selection(chaos.root, fold=0, folds=2, setting=2, exclude=[])
    assert [p.name for p in images] == ["chaos_03.nii.gz", "chaos_05.nii.gz"]  # fold 0 tests chaos_01, _02
    assert exclude == [1, 2, 3, 4]
    volume = TrainingVolume.load(images[0], 256, chaos.label("chaos_03"), supervoxel_min_size=2000)
    truth = load_volume(chaos.label("chaos_03"), label=True).data
    volume.exclude_classes(exclude, "any")
    assert volume.excluded.tolist() == np.isin(truth, exclude).any(axis=(0, 1)).tolist()
    assert volume.excluded.any() and not volume.excluded.all()
    same, none = training_selection(chaos.root, fold=1, folds=2, setting=1, exclude=[])
    assert [p.name for p in same] == ["chaos_01.nii.gz", "chaos_02.nii.gz"] and none == []
    with pytest.raises(ValueError, match="Setting 1"):
        training_selection(chaos.root, fold=1, folds=2, setting=1, exclude=[1])


class CopySupport:
    """A method that answers every query slice with the support mask it was given: what it
    returns shows which support slice the protocol paired with which query slice."""

    resolution = 256
    device = torch.device("cpu")

    def encode_support(self, image, mask):
        return mask

    def predict(self, support, query, index):
        return Prediction(support[index])


def test_paper_protocol_pairs_chunk_k_with_support_k(chaos):
    evaluator = Evaluator(chaos, InferenceConfig(), "paper")
    records, folds = evaluator.run(
        ["copy"], lambda key, fold: Method(key, "copy", CopySupport()), 2, log=lambda _: None
    )
    assert folds == [
        {"fold": 0, "cases": ["chaos_01", "chaos_02"], "support": "chaos_01"},
        {"fold": 1, "cases": ["chaos_03", "chaos_05"], "support": "chaos_03"},
    ]
    assert len(records) == 2 * 4
    for record in records:
        support = load_volume(chaos.label(record["support"]), label=True).data == record["label"]
        truth = load_volume(chaos.label(record["case"]), label=True).data == record["label"]
        organ = np.flatnonzero(support.any(axis=(0, 1)))
        expected_support = [int(organ[int(p * len(organ))]) for p in (1 / 6, 1 / 2, 5 / 6)]
        assert record["support_slices"] == expected_support
        z = np.flatnonzero(truth.any(axis=(0, 1)))
        bounds = np.linspace(0, len(z), 4).astype(int)
        predicted = np.concatenate(
            [np.repeat(support[..., [expected_support[k]]], bounds[k + 1] - bounds[k], axis=2) for k in range(3)], 2
        )
        dice = 2 * (predicted & truth[..., z]).sum() / (predicted.sum() + truth[..., z].sum())
        assert record["dice"] == pytest.approx(dice, abs=1e-5)
        assert record["slices"] == len(z) and record["query_slices"] == [int(z.min()), int(z.max())]


def test_evaluate_end_to_end(chaos, tiny_backbone, tmp_path):
    out = tmp_path / "paper"
    args = ["evaluate", "--data", str(chaos.root), "--backbone", str(tiny_backbone), "--folds", "2"]
    main([*args, "--method", "sdfsmis,prototype,registration", "--registration-resolution", "64", "--output", str(out)])
    results = json.loads((out / "results.json").read_text())
    volumes = results["volumes"]
    assert len(volumes) == 3 * 2 * 1 * 4  # methods x folds x query volumes x classes
    with open(out / "per_volume.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["case"], r["organ"], float(r["dice"])) for r in rows] == [
        (v["method"], v["case"], v["organ"], pytest.approx(v["dice"])) for v in volumes
    ]
    table = (out / "table.md").read_text()
    assert "Setting 1, paper protocol, 2-fold" in table
    assert "| Method | Left kidney | Right kidney | Spleen | Liver | Mean |" in table
    for title in ("SD-FSMIS, backbone tiny (untrained)", "prototype matcher (PANet-style", "SimpleITK B-spline"):
        assert title in table
    summary = results["summary"]
    mean = float(np.mean([v["dice"] for v in volumes if v["method"] == "registration" and v["organ"] == "liver"]))
    assert summary["registration"]["classes"]["liver"]["dice"] == pytest.approx(mean)
    # The classical competitor works on look-alike anatomy; the untrained model does not.
    assert summary["registration"]["mean"]["dice"] > 0.6
    assert summary["registration"]["mean"]["dice"] > summary["sdfsmis"]["mean"]["dice"] + 0.3
    assert all(v["seconds"] > 0 for v in volumes)

    realistic = tmp_path / "realistic"
    one = ["--supports-per-query", "1"]  # the presets blend two supports: their disagreement is a confidence
    main([*args, *one, "--method", "prototype", "--protocol", "realistic", "--output", str(realistic)])
    results = json.loads((realistic / "results.json").read_text())
    volumes = results["volumes"]
    assert len(volumes) == 2 * 4 and all(v["slices"] == 10 for v in volumes)  # every query slice
    assert "uncertainty" not in results["summary"]["prototype"]  # no per-slice confidence, no Spearman
    assert "realistic protocol" in (realistic / "table.md").read_text()


def test_registration_falls_back_when_itk_cannot_register():
    """A blank moving slice (outside the field of view) makes ITK's affine stage raise; the
    baseline keeps the centred start instead of ending the evaluation."""
    import SimpleITK as sitk

    from sdfsmis.evaluation.baselines import RegistrationPropagation

    registration = RegistrationPropagation(64)
    fixed = sitk.GetImageFromArray(np.random.default_rng(0).random((64, 64)).astype(np.float32))
    blank = sitk.GetImageFromArray(np.zeros((64, 64), np.float32))
    transform = registration.register(fixed, blank)
    assert isinstance(transform, sitk.AffineTransform)
    assert np.allclose(transform.GetMatrix(), np.eye(2).ravel())  # the centred start: same-size slices
    assert registration.fallbacks and registration.fallbacks[0].startswith("affine failed, centred start kept")


class FailsOnOneCase(CopySupport):
    """CopySupport, except that it raises on the query volume whose slices are ``bad``."""

    def __init__(self, bad_slices: int):
        self.bad_slices, self.calls = bad_slices, 0

    def predict(self, support, query, index):
        self.calls += 1
        if query.shape[0] == self.bad_slices:
            raise RuntimeError("All samples map outside moving image buffer\nmore ITK text")
        return Prediction(support[index])


def test_a_method_failing_on_one_volume_is_recorded_and_the_run_goes_on(chaos, tmp_path):
    from sdfsmis.evaluation.report import write_reports

    truth = load_volume(chaos.label("chaos_02"), label=True).data == 1
    bad = int(truth.any(axis=(0, 1)).sum())  # the liver slices of one query volume
    made = []

    def factory(key, fold):
        made.append((key, fold))
        return Method(key, "fails once", FailsOnOneCase(bad))

    evaluator = Evaluator(chaos, InferenceConfig(), "paper")
    records, folds = evaluator.run(["flaky"], factory, 2, log=lambda _: None, done=tmp_path / "finished")
    failed = [r for r in records if r.get("failed")]
    assert failed and all(r["failed"] == "RuntimeError: All samples map outside moving image buffer" for r in failed)
    assert len(records) == 2 * 4 and len(records) - len(failed) > 0  # the others were scored
    summary = summarise(records)
    assert sum(c["failed"] for c in summary["flaky"]["classes"].values()) == len(failed)
    table = write_reports(tmp_path / "out", {}, folds, summary, records, "test")
    assert "fails once: FAILED on" in table
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_volume.csv")))
    assert sum(bool(r["failed"]) for r in rows) == len(failed)
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["volumes"]) == len(records)

    # a restart reuses the finished folds: nothing is recomputed, the same records come back
    made.clear()
    again, _ = evaluator.run(["flaky"], factory, 2, log=lambda _: None, done=tmp_path / "finished")
    assert made == [] and again == json.loads(json.dumps(records))
    # another run (other labels) is not confused with it
    evaluator.run(["flaky"], factory, 2, labels=[1], log=lambda _: None, done=tmp_path / "finished")
    assert made == [("flaky", 0), ("flaky", 1)]


@pytest.fixture(scope="module")
def dpl_weights(chaos, tiny_backbone, tiny_config, tmp_path_factory):
    """A folder with dpl.safetensors: DPL trained for a few dozen iterations on the prepared
    look-alike volumes (supervoxels only, as the fold models are)."""
    from sdfsmis.training.trainer import TrainingRun, train

    config = copy.deepcopy(tiny_config)
    config.training.supervoxel_min_size = 2000  # the prepared set's supervoxels
    output = tmp_path_factory.mktemp("dpl")
    images = [chaos.image(c) for c in chaos.cases]
    run = TrainingRun(
        tiny_backbone,
        images,
        output,
        config,
        iterations=40,
        batch_size=2,
        use_labels=False,
        progress=False,
        method="dpl",
    )
    train(run)
    return output


def test_slice_dice_and_spearman_leave_out_slices_where_both_are_empty():
    from scipy.stats import spearmanr

    truth = np.zeros((4, 4, 4), dtype=bool)
    truth[:2, :2, 1:] = True
    prediction = np.zeros_like(truth)
    prediction[:2, :2, 1] = True  # slice 1 exact, slice 2 missed, slice 3 half
    prediction[:2, 0, 3] = True  # slice 0: both empty
    assert slice_dice(prediction, truth, [0, 1, 2, 3]) == [None, 1.0, 0.0, pytest.approx(2 * 2 / 6)]
    base = {"method": "m", "fold": 0, "dice": 0.5, "hd95": 1.0, "assd": 1.0, "seconds": 1.0, "slices": 4}
    records = [
        # uncertainty 1 - c: 0.1, 0.4, 0.8 against error 0, 0.5, 1 -> rho 1; the None slice is left out
        {**base, "organ": "liver", "slice_dice": [None, 1.0, 0.5, 0.0], "slice_confidence": [0.0, 0.9, 0.6, 0.2]},
        {**base, "organ": "spleen", "slice_dice": [1.0, 0.5, 0.0, None], "slice_confidence": [0.2, 0.6, 0.9, 1.0]},
        {**base, "organ": "spleen", "failed": "RuntimeError: x"},
    ]
    correlation = uncertainty_correlation(records)
    assert correlation["classes"]["liver"] == {
        "spearman": pytest.approx(1.0),
        "p_value": pytest.approx(0.0),
        "slices": 3,
    }
    assert correlation["classes"]["spleen"]["spearman"] == pytest.approx(-1.0)
    pooled = spearmanr([0.1, 0.4, 0.8, 0.8, 0.4, 0.1], [0, 0.5, 1, 0, 0.5, 1]).statistic
    assert correlation["all"]["slices"] == 6 and correlation["all"]["spearman"] == pytest.approx(pooled)
    assert summarise(records)["m"]["uncertainty"] == correlation
    assert uncertainty_correlation([{**base, "organ": "liver"}]) is None  # no per-slice confidence


def test_dpl_ablations_change_only_what_they_name(tiny_backbone, tiny_config, dpl_weights, tmp_path):
    factory = MethodFactory(tiny_backbone, {"dpl": str(dpl_weights)}, tiny_config)
    models = {key: factory(key, 0).model for key in DPL_VARIANTS}
    full = models["dpl"]
    assert full.config.fusion_lambda == tiny_config.dpl.fusion_lambda > 0 and full.config.use_condition
    assert models["dpl-lambda0"].config.fusion_lambda == 0.0
    assert models["dpl-no-condition"].config.use_condition is False
    assert tiny_config.dpl.use_condition and tiny_config.dpl.fusion_lambda > 0  # the shared config is untouched
    untrained = models["dpl-untrained-denoiser"].denoiser_ema.output.weight
    assert not untrained.any() and full.denoiser_ema.output.weight.any()  # the trained denoiser moved
    assert torch.equal(models["dpl-untrained-denoiser"].adapter.net[0].weight, full.adapter.net[0].weight)
    assert factory("dpl", 0) is factory("dpl", 0)  # not reloaded for the same method and checkpoint
    assert factory("dpl-lambda0", 0).model is not full and full.config.fusion_lambda > 0  # a changed copy
    # --checkpoint naming a folder: each method takes its own weights file from it
    folder = MethodFactory(tiny_backbone, {"sdfsmis": str(tmp_path / "{fold}")}, tiny_config)
    (tmp_path / "0").symlink_to(dpl_weights, target_is_directory=True)
    assert folder._checkpoint(MODEL_KEYS["dpl-no-condition"][0], 0) == tmp_path / "0" / "dpl.safetensors"
    assert folder._checkpoint("sdfsmis", 0) == tmp_path / "0" / "sdfsmis.safetensors"
    assert folder._checkpoint("dpl", 1) is None  # no folder for fold 1: untrained


def test_evaluate_dpl_rows_ablations_and_uncertainty(chaos, tiny_backbone, dpl_weights, tmp_path):
    from scipy.stats import spearmanr

    keys = list(DPL_VARIANTS)
    args = ["evaluate", "--data", str(chaos.root), "--backbone", str(tiny_backbone), "--folds", "2"]
    args += ["--dpl-checkpoint", str(dpl_weights), "--labels", "1,2"]  # liver, right kidney: half the time
    out = tmp_path / "realistic"
    main([*args, "--method", ",".join(keys), "--protocol", "realistic", "--output", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert list(results["summary"]) == keys
    rows = list(csv.DictReader(open(out / "per_volume.csv")))
    for key in keys:
        assert sum(r["method"] == key and not r["failed"] for r in rows) == 2 * 2  # folds x classes, none failed
    table = (out / "table.md").read_text()
    for title in (
        "| DPL, backbone tiny |",
        "| DPL, lambda 0",
        "| DPL, untrained denoiser",
        "| DPL, no spatial condition",
    ):
        assert title in table
    assert "(untrained)" not in table  # the weights were found in the folder
    volumes = results["volumes"]
    for key in keys:
        correlation = results["summary"][key]["uncertainty"]
        assert f"{DPL_VARIANTS[key]}, backbone tiny: uncertainty (1 - slice confidence)" in table
        assert set(correlation["classes"]) == {"liver", "right_kidney"}
        rho = correlation["all"]["spearman"]
        assert isinstance(rho, float) and -1.0 <= rho <= 1.0
        for organ, found in correlation["classes"].items():
            mine = [v for v in volumes if v["method"] == key and v["organ"] == organ]
            assert all(
                len(v["slice_dice"]) == len(v["slice_confidence"]) == v["query_slices"][1] - v["query_slices"][0] + 1
                for v in mine
            )
            pairs = [
                (1 - c, 1 - d) for v in mine for d, c in zip(v["slice_dice"], v["slice_confidence"]) if d is not None
            ]
            assert found["slices"] == len(pairs)
            if found["spearman"] is not None:
                assert found["spearman"] == pytest.approx(spearmanr(*zip(*pairs)).statistic)
                assert -1.0 <= found["spearman"] <= 1.0
    # The lambda-0 ablation is a different prediction from the full method (fusion moves the prototype).
    dice = {key: [v["dice"] for v in volumes if v["method"] == key] for key in keys}
    assert dice["dpl"] != dice["dpl-lambda0"]

    paper = tmp_path / "paper"
    main([*args, "--method", "dpl", "--output", str(paper)])
    results = json.loads((paper / "results.json").read_text())
    assert [v["method"] for v in results["volumes"]] == ["dpl"] * 2 * 2
    assert all(not v.get("failed") and "slice_confidence" not in v for v in results["volumes"])


def _dice_2d(prediction: np.ndarray, truth: np.ndarray) -> float | None:
    total = int(prediction.sum()) + int(truth.sum())
    return None if total == 0 else 2.0 * int((prediction & truth).sum()) / total


@pytest.mark.parametrize("protocol", ["realistic", "propagation"])
def test_each_slice_confidence_and_dice_is_paired_with_its_own_slice(
    protocol, chaos, tiny_backbone, tiny_config, dpl_weights
):
    # the records' per-slice scores against a segmentation run here directly with the same model
    # (DPL with weights: deterministic), slice by slice: a confidence or a Dice that moved to
    # another slice of the record fails, whatever it does to the Spearman rho
    factory = MethodFactory(tiny_backbone, {"dpl": str(dpl_weights)}, tiny_config)
    evaluator = Evaluator(chaos, tiny_config.inference, protocol)
    records, _ = evaluator.run(["dpl"], factory, 2, labels=[1, 2], log=lambda _: None)
    assert records and not any(r.get("failed") for r in records)
    segmenter = VolumeSegmenter(factory("dpl", 0).model, tiny_config.inference, progress=False)
    checked = 0
    for record in records:
        image = load_volume(chaos.image(record["case"]))
        truth = load_volume(chaos.label(record["case"]), label=True).data == record["label"]
        if protocol == "propagation":
            support_image = image
            support_label = load_volume(chaos.label(record["case"]), label=True)
            drawn = np.zeros_like(truth)
            drawn[..., record["annotated_slices"]] = truth[..., record["annotated_slices"]]
            support_label.data = np.where(drawn, record["label"], 0).astype(np.int32)
            slices = record["slice_z"]
        else:
            support_image = load_volume(chaos.image(record["support"]))
            support_label = load_volume(chaos.label(record["support"]), label=True)
            first, last = record["query_slices"]
            slices = list(range(first, last + 1))
        with torch.inference_mode():
            result = segmenter.segment(support_image, support_label, image, [record["label"]])
        report = result.reports[record["label"]]
        confidence = dict(zip(report.query_slices, report.confidence))
        predicted = result.labels == record["label"]
        assert len(record["slice_confidence"]) == len(record["slice_dice"]) == len(slices)
        for z, c, d in zip(slices, record["slice_confidence"], record["slice_dice"]):
            assert c == pytest.approx(confidence[z], abs=1e-6), (record["case"], z)
            expected = _dice_2d(predicted[..., z], truth[..., z])
            assert d == (None if expected is None else pytest.approx(expected, abs=1e-9)), (record["case"], z)
        checked += len(slices)
    # the confidences differ from slice to slice, so a pairing shifted or reversed changes them
    assert checked >= 4 and len({c for r in records for c in r["slice_confidence"]}) > 2


def test_nearest_slice_copy_takes_the_nearest_annotated_mask_within_its_reach():
    from sdfsmis.evaluation.nearest_slice import NearestSliceCopy

    drawn = np.zeros((6, 6, 20), dtype=bool)
    for n, z in enumerate((4, 8, 14)):  # a different pixel on each annotated slice
        drawn[n, n, z] = True
    drawn[5, 5, 0] = True  # not an annotated slice: ignored
    copy = NearestSliceCopy().propagate(drawn, [4, 8, 14])
    # gaps 4 and 6: median 5, half 2.5 -> reach 4 - 2.5 .. 14 + 2.5 = slices 2..16; ties go to the lower slice
    expected_source = {**dict.fromkeys(range(2, 7), 4), **dict.fromkeys(range(7, 12), 8)}
    expected_source.update(dict.fromkeys(range(12, 17), 14))
    for z in range(20):
        if z in expected_source:
            assert np.array_equal(copy[..., z], drawn[..., expected_source[z]]), z
        else:
            assert not copy[..., z].any(), z
    assert NearestSliceCopy.reach(np.array([4, 8, 14]), 15) == (2, 14)  # within the volume
    single = NearestSliceCopy().propagate(drawn, [8])  # one slice: no gap known, nothing beyond it
    assert np.flatnonzero(single.any(axis=(0, 1))).tolist() == [8]


def test_interpolation_morphs_one_drawing_into_the_next():
    from sdfsmis.evaluation.interpolation import SliceInterpolation

    drawn = np.zeros((20, 6, 9), dtype=bool)
    drawn[8:13, :, 2] = True  # a band x 8..12 (half-width 2 about x = 10)
    drawn[4:17, :, 6] = True  # a band x 4..16 (half-width 6)
    out = SliceInterpolation().propagate(drawn)
    # by hand, signed distances along x (inside: pixels to the nearest outside one; outside: minus
    # pixels to the nearest inside one), blended (1 - t) d2 + t d6 with t = (z - 2) / 4, > 0 inside:
    # z 3 (t 1/4): x 7 gives 0.75 x -1 + 0.25 x 4 > 0, x 6 gives -0.75 -> x 7..13
    # z 4 (t 1/2): x 6 gives 0.5 x -2 + 0.5 x 3 > 0, x 5 gives -0.5 -> x 6..14
    # z 5 (t 3/4): x 5 gives 0.25 x -3 + 0.75 x 2 > 0, x 4 gives -0.25 -> x 5..15
    # beyond: the outer drawing copied within half the gap (2 slices): z 0..1 and 7..8
    expected = {
        0: (8, 12),
        1: (8, 12),
        2: (8, 12),
        3: (7, 13),
        4: (6, 14),
        5: (5, 15),
        6: (4, 16),
        7: (4, 16),
        8: (4, 16),
    }
    for z, (low, high) in expected.items():
        row = np.flatnonzero(out[:, 0, z])
        assert (row.min(), row.max()) == (low, high) and len(row) == high - low + 1, z
        assert (out[..., z] == out[:, :1, z]).all()  # the same along y
    assert "interpolation" in METHODS  # a method of `sdfsmis evaluate --protocol propagation`


@pytest.fixture(scope="module")
def thin_chaos(tmp_path_factory) -> PreparedDataset:
    """Two look-alike CHAOS patients sliced at 4 mm (``sample-raw`` / ``prepare --slice-spacing``):
    20 slices each, so that every organ has slices left after 3 are annotated."""
    root = tmp_path_factory.mktemp("thin")
    write_chaos(root / "raw", 2, shape=(64, 64, 10), spacing=(5.0, 5.0, 8.0), slice_spacing=4.0)
    return prepare(
        "chaos", root / "raw", root / "prepared", supervoxel_min_size=2000, log=lambda _: None, slice_spacing=4.0
    )


def test_propagation_protocol_end_to_end_against_nearest_slice_copy(thin_chaos, tiny_backbone, tmp_path):
    from scipy.stats import spearmanr

    from sdfsmis.io.volume import ras_spacing

    first = load_volume(thin_chaos.image("chaos_01"))
    assert first.data.shape[2] == 20 and ras_spacing(first)[2] == pytest.approx(4.0)
    out = tmp_path / "propagation"
    main(
        [
            "evaluate", "--data", str(thin_chaos.root), "--backbone", str(tiny_backbone), "--folds", "1",
            "--protocol", "propagation", "--method", "nearest-slice,sdfsmis", "--supports-per-query", "2",
            "--labels", "2,4", "--output", str(out),
        ]
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    volumes = results["volumes"]
    assert len(volumes) == 2 * 2 * 2 and not any(v.get("failed") for v in volumes)  # methods x volumes x classes
    for v in volumes:
        truth = load_volume(thin_chaos.label(v["case"]), label=True).data == v["label"]
        organ = np.flatnonzero(truth.any(axis=(0, 1)))
        drawn_z = sorted({int(organ[int(p * len(organ))]) for p in (1 / 6, 1 / 2, 5 / 6)})
        assert v["support"] == v["case"] and v["annotated_slices"] == drawn_z
        assert v["slice_z"] == [int(z) for z in organ if z not in drawn_z] and v["scored_slices"] == 20 - 3
        if v["method"] == "nearest-slice":  # the copy by hand, Dice over the slices that were not annotated
            half = np.median(np.diff(drawn_z)) / 2
            copy = np.zeros_like(truth)
            for z in range(20):
                if drawn_z[0] - half <= z <= drawn_z[-1] + half:
                    copy[..., z] = truth[..., min(drawn_z, key=lambda a: (abs(a - z), a))]
            keep = np.ones(20, dtype=bool)
            keep[drawn_z] = False
            p, t = copy[..., keep], truth[..., keep]
            assert v["dice"] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()), abs=1e-5)
            assert "slice_confidence" not in v
        else:  # two supports per slice: SD-FSMIS's supports disagree -> a confidence per scored slice
            assert len(v["slice_confidence"]) == len(v["slice_dice"]) == len(v["slice_z"])
    summary = results["summary"]
    versus = summary["sdfsmis"]["vs_nearest-slice"]
    for organ, found in versus["classes"].items():
        assert found["margin"] == pytest.approx(
            summary["sdfsmis"]["classes"][organ]["dice"] - summary["nearest-slice"]["classes"][organ]["dice"]
        )
        assert found["volumes"] == 2
    assert "vs_nearest-slice" not in summary["nearest-slice"] and "uncertainty" not in summary["nearest-slice"]
    correlation = summary["sdfsmis"]["uncertainty"]
    pairs = [
        (1 - c, 1 - d)
        for v in volumes
        if v["method"] == "sdfsmis"
        for d, c in zip(v["slice_dice"], v["slice_confidence"])
    ]
    assert correlation["all"]["slices"] == len(pairs)
    if correlation["all"]["spearman"] is not None:
        assert correlation["all"]["spearman"] == pytest.approx(spearmanr(*zip(*pairs)).statistic)
    table = (out / "table.md").read_text()
    assert "propagation protocol (3 annotated slices per organ), 4 mm slices, 1-fold" in table
    assert "| nearest-slice copy (training-free) |" in table
    assert (
        "Versus nearest-slice copy (training-free)" in table
        and "Spearman rho over the non-annotated organ slices" in table
    )


def test_nearest_slice_copy_is_refused_outside_propagation(thin_chaos, tmp_path):
    args = ["evaluate", "--data", str(thin_chaos.root), "--folds", "1", "--output", str(tmp_path / "x")]
    for protocol in ("paper", "realistic"):
        with pytest.raises(SystemExit, match="nearest-slice runs only under --protocol propagation"):
            main([*args, "--protocol", protocol, "--method", "nearest-slice,prototype"])
    assert not (tmp_path / "x").exists()  # refused before any work
    evaluator = Evaluator(thin_chaos, InferenceConfig(), "realistic")
    with pytest.raises(ValueError, match="runs only under --protocol propagation"):
        evaluator.run(["nearest-slice"], MethodFactory(None, {}, None), 1, log=lambda _: None)
