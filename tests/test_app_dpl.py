"""The ``dpl`` infer and train tasks through the REAL server and the client class Slicer uses, on
a site that has only DINOv2 (no Stable Diffusion weights, no GPU): DPL serves, SD-FSMIS says why
it cannot, and each method keeps its own checkpoint."""

from __future__ import annotations

import shutil
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from monailabel.client.client import MONAILabelClient, MONAILabelClientException

from app_server import monailabel_server
from sdfsmis.cli import main as cli_main
from sdfsmis.samples.synthetic import make_studies, make_volume, write_nifti
from sdfsmis.settings import load_config
from sdfsmis.training.trainer import TrainingRun, train

LABEL_INFO = [{"name": "liver", "idx": 1}, {"name": "left kidney", "idx": 3}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("dpl_server")
    studies = make_studies(root / "studies", 3, seed=20)
    backbone = root / "dinov2_only"
    shutil.copytree(tiny_backbone / "dinov2", backbone / "dinov2")
    shutil.copy(tiny_backbone / "sdfsmis.yaml", backbone / "sdfsmis.yaml")
    config = load_config(backbone=backbone)
    run = TrainingRun(backbone, studies, root / "ckpt", config, iterations=100, progress=False, method="dpl")
    (root / "model").mkdir()
    shutil.copy(train(run)["checkpoint"], root / "model" / "dpl.safetensors")
    conf = [("backbone", backbone), ("model_dir", root / "model"), ("device", "cpu")]
    with monailabel_server(root / "studies", root / "server.log", *conf) as url:
        yield url, root


def _client(url: str, tmp_path) -> MONAILabelClient:
    return MONAILabelClient(url, tmpdir=str(tmp_path))


def test_info_lists_both_methods_with_their_status(server, tmp_path):
    info = _client(server[0], tmp_path).info()
    assert info["models"]["dpl"]["type"] == "segmentation"  # OHIF's Auto-Segmentation tab lists it
    assert info["models"]["dpl"]["dpl"]["available"] is True and info["models"]["dpl"]["dpl"]["trained"] is True
    assert info["models"]["dpl"]["dpl"]["inferences"]["max_concurrent_infers"] >= 1
    sdfsmis = info["models"]["sdfsmis"]["sdfsmis"]
    assert sdfsmis["available"] is False and "missing: vae/" in sdfsmis["reason"]
    assert {"sdfsmis", "dpl"} <= set(info["trainers"])


def assert_lowest_confidence_first(review: list[int], confidence: dict[int, float], count: int = 5) -> None:
    """The review slices are the ``count`` least confident ones below 1, lowest first; a DPL result
    on another patient always has some (its variants disagree somewhere)."""
    doubtful = [z for z, c in confidence.items() if c < 1.0]
    assert doubtful and len(review) == min(count, len(doubtful)) and set(review) <= set(doubtful)
    assert [confidence[z] for z in review] == sorted(confidence[z] for z in review)
    rest = [confidence[z] for z in doubtful if z not in review]
    assert not rest or max(confidence[z] for z in review) <= min(rest)


def dice(labels: np.ndarray, truth: np.ndarray, ids: dict[int, int]) -> float:
    """Mean Dice over {result id: truth id}."""
    scores = [
        2 * ((labels == a) & (truth == b)).sum() / ((labels == a).sum() + (truth == b).sum()) for a, b in ids.items()
    ]
    return float(np.mean(scores))


def _save_support(client: MONAILabelClient, tmp_path) -> None:
    _, label, affine = make_volume(20)  # case_000's anatomy
    label = np.where(np.isin(label, [1, 3]), label, 0).astype(np.uint8)
    write_nifti(tmp_path / "a.nii.gz", label, affine)
    client.save_label("case_000", str(tmp_path / "a.nii.gz"), tag="final", params={"label_info": LABEL_INFO})


def test_submit_then_infer_dpl_on_another_image_with_review_slices(server, tmp_path):
    url, root = server
    client = _client(url, tmp_path)
    _save_support(client, tmp_path)
    result, params = client.infer("dpl", "case_001", {"support": "case_000"})
    out, image = nib.load(result), nib.load(root / "studies" / "case_001.nii.gz")
    assert out.shape == image.shape
    np.testing.assert_allclose(out.affine, image.affine, atol=1e-5)
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= {0, 1, 3}
    assert params["method"] == "dpl" and params["trained"] is True
    assert params["support"]["source"] == "support_param" and params["label_names"] == {"liver": 1, "left kidney": 3}
    depth = image.shape[2]
    for name in ("liver", "left kidney"):
        confidence = {int(z): c for z, c in params["confidence"][name].items()}
        assert confidence and all(0 <= z < depth and 0.0 <= c <= 1.0 for z, c in confidence.items())
        assert_lowest_confidence_first(params["review_slices"][name], confidence)
    # where the time went, stage by stage (the server logs each as it ends)
    stages = {"load model", "read", "prepare", "placement", "crops", "model", "fusion", "post-processing", "write"}
    assert stages <= set(params["stages"])
    assert sum(params["stages"].values()) <= params["seconds"] + 0.01
    # the same request again: the server kept what it computed, and answers the same voxels
    again, repeated = client.infer("dpl", "case_001", {"support": "case_000"})
    np.testing.assert_array_equal(np.asarray(nib.load(again).dataobj), np.asarray(out.dataobj))
    assert min(params["slices_computed"].values()) > 0 and set(repeated["slices_computed"].values()) == {0}
    assert repeated["confidence"] == params["confidence"]
    # the same support rules as sdfsmis: a named support that cannot serve is refused, naming it
    with pytest.raises(MONAILabelClientException) as error:
        client.infer("dpl", "case_000", {"support": "case_002"})
    assert "400" in str(error.value.msg) and "support image 'case_002' (param 'support')" in str(error.value.msg)
    # SD-FSMIS cannot serve on this site, and says why
    with pytest.raises(MONAILabelClientException) as error:
        client.infer("sdfsmis", "case_001", {"support": "case_000"})
    assert "503" in str(error.value.msg) and "vae/" in str(error.value.msg)


def test_train_dpl_publishes_its_own_checkpoint_and_changes_next_inference(server, tmp_path):
    url, root = server
    client = _client(url, tmp_path)
    _save_support(client, tmp_path)
    before, _ = client.infer("dpl", "case_001", {"support": "case_000"})
    before = np.asarray(nib.load(before).dataobj).copy()
    served = (root / "model" / "dpl.safetensors").stat().st_mtime_ns
    client.train_start("dpl", {"iterations": 30, "checkpoint_every": 15})
    deadline = time.time() + 300
    while (status := client.train_status()).get("status") in ("SUBMITTED", "RUNNING", "QUEUED"):
        assert time.time() < deadline
        time.sleep(1)
    assert status["status"] == "DONE", status
    stats = client.info()["train_stats"]["dpl"]
    assert stats["status"] == "DONE" and stats["iteration"] == 30 and "seg" in stats and "diff" in stats
    assert (root / "model" / "dpl.safetensors").stat().st_mtime_ns != served
    assert (root / "model" / "train_dpl" / "dpl.safetensors").is_file()
    assert not (root / "model" / "sdfsmis.safetensors").exists()  # SD-FSMIS's weights are its own
    after, params = client.infer("dpl", "case_001", {"support": "case_000"})
    assert params["trained"] is True
    after = np.asarray(nib.load(after).dataobj)
    assert not np.array_equal(before, after)
    # the next inference is the published checkpoint's: the CLI with that file gives the same voxels
    output = tmp_path / "cli.nii.gz"
    cli_main(
        [
            "infer", "--method", "dpl", "--backbone", str(root / "dinov2_only"),
            "--checkpoint", str(root / "model" / "dpl.safetensors"),
            "--support-image", str(root / "studies" / "case_000.nii.gz"), "--support-label", str(tmp_path / "a.nii.gz"),
            "--image", str(root / "studies" / "case_001.nii.gz"), "--output", str(output),
        ]
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(nib.load(output).dataobj), after)
    # and what it learnt shows: better than the untrained head on the same request (same CLI path)
    torch.manual_seed(0)
    untrained = tmp_path / "untrained.nii.gz"
    cli_main(
        [
            "infer", "--method", "dpl", "--backbone", str(root / "dinov2_only"),
            "--support-image", str(root / "studies" / "case_000.nii.gz"), "--support-label", str(tmp_path / "a.nii.gz"),
            "--image", str(root / "studies" / "case_001.nii.gz"), "--output", str(untrained),
        ]
    )  # fmt: skip
    _, truth, _ = make_volume(21)  # case_001's anatomy
    scores = {name: dice(labels, truth, {1: 1, 3: 3}) for name, labels in (
        ("untrained", np.asarray(nib.load(untrained).dataobj)), ("before", before), ("after", after)
    )}  # fmt: skip
    print(f"\nDPL Dice on case_001: {scores}")
    assert scores["after"] > scores["untrained"]


def test_several_patients_as_supports_and_an_unusable_one_is_named(server, tmp_path):
    url, root = server
    client = _client(url, tmp_path)
    _save_support(client, tmp_path)
    _, label, affine = make_volume(21)  # case_001's anatomy
    write_nifti(tmp_path / "b.nii.gz", np.where(label == 1, 1, 0).astype(np.uint8), affine)
    client.save_label("case_001", str(tmp_path / "b.nii.gz"), tag="final", params={"label_info": LABEL_INFO[:1]})

    result, params = client.infer("dpl", "case_002", {"support": "case_000,case_001"})
    assert [s["image"] for s in params["support"]] == ["case_000", "case_001"]
    assert [s["source"] for s in params["support"]] == ["support_param", "support_param"]
    # the liver is drawn in both patients: both serve it; the kidney only in case_000
    assert [s["image"] for s in params["served_by"]["liver"]] == ["case_000", "case_001"]
    assert [s["image"] for s in params["served_by"]["left kidney"]] == ["case_000"]
    depth = nib.load(root / "studies" / "case_002.nii.gz").shape[2]
    for part in params["served_by"]["liver"]:
        first, last = part["query_slices"]
        assert 0 <= first <= last < depth and part["support_slices"] and part["rule"]
    _, as_list = client.infer("dpl", "case_002", {"support": ["case_000", "case_001"]})
    assert as_list["served_by"] == params["served_by"]

    for bad, why in (("case_000,case_002", "has no final label"), ("case_000,nobody", "is not in the datastore")):
        with pytest.raises(MONAILabelClientException) as error:
            client.infer("dpl", "case_001", {"support": bad})
        name = bad.split(",")[1]
        assert "400" in str(error.value.msg) and f"support image '{name}' (param 'support') {why}" in str(
            error.value.msg
        )


def test_review_segment_is_returned_as_a_named_segment(server, tmp_path):
    url, root = server
    client = _client(url, tmp_path)
    _save_support(client, tmp_path)
    plain_file, plain = client.infer("dpl", "case_002", {"support": "case_000"})
    result_file, params = client.infer("dpl", "case_002", {"support": "case_000", "review_segment": True})
    names = params["label_names"]
    assert {"liver", "left kidney"} <= set(names)
    review = {name: idx for name, idx in names.items() if name.endswith(" - review")}
    assert review and set(review) <= {"liver - review", "left kidney - review"}
    assert all(params["label_colors"][name] == [255, 255, 0] for name in review)
    # at the ids /info lists, so that OHIF shows them as its own segments
    listed = client.info()["models"]["dpl"]["labels"]
    assert all(listed[name] == idx == names[name.removesuffix(" - review")] + 100 for name, idx in review.items())
    labels = np.asarray(nib.load(result_file).dataobj)
    before = np.asarray(nib.load(plain_file).dataobj)
    for name, idx in review.items():
        organ = name.removesuffix(" - review")
        marked = labels == idx
        assert marked.sum() == params["voxels"][name] > 0
        assert plain["voxels"][organ] >= params["voxels"][organ]
    reviewed = np.isin(labels, list(review.values()))
    np.testing.assert_array_equal(labels[~reviewed], before[~reviewed])  # elsewhere the same result
    assert "confidence" in params and "review_slices" in params

    # submitted with the review voxels left in, as Slicer sends its segments: the review segments
    # are not structures, neither listed as ones nor segmented in the next patient
    label_info = [{"name": name, "idx": idx} for name, idx in names.items()]
    saved = client.save_label("case_002", result_file, tag="final", params={"label_info": label_info})
    assert sorted(saved["sdfsmis"]["labels"]) == ["left kidney", "liver"]
    info = client.info()
    assert set(info["models"]["dpl"]["labels"]) == {"liver", "liver - review", "left kidney", "left kidney - review"}
    assert not [name for name in info["labels"] if name.endswith(" - review")]  # Slicer's empty segments
    _, after = client.infer("dpl", "case_001", {"support": "case_002"})
    assert set(after["label_names"]) == {"liver", "left kidney"}
