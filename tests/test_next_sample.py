"""Slicer's "Next Sample" and OHIF's active-learning panel with the ``doubt`` strategy, through the
REAL server and the client class Slicer uses: the unlabelled studies never segmented first, then
the ones whose last one-shot result was least confident, with the slices to review; a study with a
final label is done. The expected orders come from how the studies are built and from the
confidences the infer answers returned, never from the strategy's code."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from monailabel.client.client import MONAILabelClient

from app_server import monailabel_server
from sdfsmis.samples.synthetic import ABDOMINAL_LABELS, make_volume, write_nifti

LIVER = [{"name": "liver", "idx": 1}]
#: Patient seeds; ``p1`` gets the support label. The ids sort p1 < p2 < p3.
SEEDS = {"p1": 20, "p2": 21, "p3": 22}
#: What every answer of the strategy carries besides MONAI Label's image info.
ANSWER = ("id", "method", "confidence", "label_confidence", "review_slices")


@pytest.fixture(scope="module")
def studies(tmp_path_factory, tiny_backbone, trained_dpl) -> tuple[Path, list[tuple[str, object]]]:
    """Three CT patients with their scanner affines; DPL trained, SD-FSMIS served untrained (demo
    mode) so that a result without confidence can be had too."""
    root = tmp_path_factory.mktemp("next_sample")
    for name, seed in SEEDS.items():
        image, _, affine = make_volume(seed)
        write_nifti(root / "studies" / f"{name}.nii.gz", np.clip(np.rint(image), -1024, 3071).astype(np.int16), affine)
    (root / "model").mkdir()
    conf = [
        ("backbone", tiny_backbone),
        ("model_dir", root / "model"),
        ("dpl_checkpoint", trained_dpl[1] / "dpl.safetensors"),
        ("allow_untrained", "true"),
        ("device", "cpu"),
    ]
    return root, conf


@pytest.fixture(scope="module")
def server(studies):
    root, conf = studies
    with monailabel_server(root / "studies", root / "server.log", *conf) as url:
        yield url


def _client(url: str, tmp_path: Path) -> MONAILabelClient:
    return MONAILabelClient(url, tmpdir=str(tmp_path))


def _submit(client: MONAILabelClient, image_id: str, tmp_path: Path) -> None:
    """The patient's liver as its final label, as Slicer's "Submit Label" sends it."""
    _, label, affine = make_volume(SEEDS[image_id])
    write_nifti(tmp_path / f"{image_id}_final.nii.gz", (label == 1).astype(np.uint8), affine)
    client.save_label(image_id, str(tmp_path / f"{image_id}_final.nii.gz"), tag="final", params={"label_info": LIVER})


def _drawn(client: MONAILabelClient, image_id: str, tmp_path: Path, method: str, disagree: bool) -> dict:
    """A drawing uploaded with the request (Slicer's path), all named liver: the liver on a slice a
    third into it, and with ``disagree`` on a slice two thirds into it the SPLEEN, so that the two
    supports serving the slices between them disagree."""
    _, label, affine = make_volume(SEEDS[image_id])
    z = np.flatnonzero((label == 1).any(axis=(0, 1)))
    first, second = z[len(z) // 3], z[2 * len(z) // 3]
    drawing = np.zeros_like(label)
    drawing[..., first] = label[..., first] == 1
    if disagree:
        drawing[..., second] = label[..., second] == ABDOMINAL_LABELS["spleen"]
        assert drawing[..., second].any(), "the spleen must be on that slice"
    path = write_nifti(tmp_path / f"{image_id}_drawn.nii.gz", drawing, affine)
    return client.infer(method, image_id, {"label_info": LIVER}, label_in=str(path))[1]


def _lowest(params: dict) -> float:
    """The lowest per-slice confidence over the labels of an infer answer: the figure the docs
    promise the strategy ranks by."""
    return min(c for slices in params["confidence"].values() for c in slices.values())


def _image_info(url: str, image_id: str) -> dict:
    """The image's info as MONAI Label's own datastore endpoint gives it."""
    with urllib.request.urlopen(url + "/datastore/?output=all", timeout=60) as response:
        return json.loads(response.read())["objects"][image_id]["image"]["info"]


def test_info_lists_doubt_beside_monai_labels_own_strategies(server, tmp_path):
    strategies = _client(server, tmp_path).info()["strategies"]
    assert {"random", "first", "doubt"} <= set(strategies)
    assert "confident" in strategies["doubt"]["description"]


def test_never_segmented_first_then_the_least_confident_last_result(server, tmp_path):
    client = _client(server, tmp_path)
    _submit(client, "p1", tmp_path)  # p1 is done: never offered, although never segmented

    answer = client.next_sample("doubt", {})
    assert {k: answer[k] for k in ANSWER} == {
        "id": "p2",
        "method": None,
        "confidence": None,
        "label_confidence": {},
        "review_slices": {},
    }

    # p3 gets a doubtful result: p2, never segmented, still comes first
    doubtful = _drawn(client, "p3", tmp_path, "dpl", disagree=True)
    assert client.next_sample("first", {})["id"] == "p2"  # MONAI Label's own strategy still works
    assert client.next_sample("doubt", {})["id"] == "p2"

    # p2 segmented from p1's full label: every unlabelled study has a result, the least confident wins
    _, confident = client.infer("dpl", "p2", {"support": "p1"})
    assert _lowest(doubtful) < _lowest(confident) - 0.05, "disagreeing supports must doubt more"
    answer = client.next_sample("doubt", {})
    assert answer["id"] == "p3" and answer["method"] == "dpl"
    assert answer["confidence"] == _lowest(doubtful)
    assert answer["review_slices"] == doubtful["review_slices"] and answer["review_slices"]["liver"]
    slices = list(doubtful["confidence"]["liver"].values())
    assert answer["label_confidence"]["liver"]["min"] == min(slices)
    assert answer["label_confidence"]["liver"]["mean"] == pytest.approx(sum(slices) / len(slices))

    # the LAST result counts: SD-FSMIS from one drawn slice (one support slice: no confidence) now
    # stands for p3, whose DPL result, still stored, stays the least confident ever recorded
    unmeasured = _drawn(client, "p3", tmp_path, "sdfsmis", disagree=False)
    assert "confidence" not in unmeasured and "review_slices" not in unmeasured
    assert client.next_sample("doubt", {})["id"] == "p2"
    # each method keeps its own record, and what MONAI Label keeps in the image info stays
    info = _image_info(server, "p3")
    assert set(info["one_shot_results"]) == {"dpl", "sdfsmis"}
    assert info["one_shot_results"]["dpl"]["review_slices"] == doubtful["review_slices"]
    assert "doubt" in info["strategy"] and info["name"] == "p3.nii.gz"


def test_the_order_survives_a_restart_and_a_finished_cohort_has_no_next_sample(server, studies, tmp_path):
    root, conf = studies
    client = _client(server, tmp_path)
    _submit(client, "p1", tmp_path)
    _, confident = client.infer("dpl", "p2", {"support": "p1"})
    doubtful = _drawn(client, "p3", tmp_path, "dpl", disagree=True)
    assert _lowest(doubtful) < _lowest(confident) - 0.05
    before = client.next_sample("doubt", {})
    assert before["id"] == "p3" and before["confidence"] == _lowest(doubtful)

    # a new server process on the files the first one left (a copy: the first keeps serving)
    shutil.copytree(root / "studies", root / "restarted")
    with monailabel_server(root / "restarted", root / "restarted.log", *conf) as url:
        restarted = _client(url, tmp_path)
        after = restarted.next_sample("doubt", {})
        assert {k: after[k] for k in ANSWER} == {k: before[k] for k in ANSWER}
        _submit(restarted, "p3", tmp_path)
        assert restarted.next_sample("doubt", {})["id"] == "p2"
        _submit(restarted, "p2", tmp_path)
        # every study done: what MONAI Label's own strategies answer, the viewers' "no sample"
        assert restarted.next_sample("doubt", {}) == {} == restarted.next_sample("first", {})
