"""Faults of the serving side against the REAL server: bad or missing weights are a clear 503
and the server recovers once they are fixed; a training process killed mid-way leaves the served
checkpoint intact, is reported as failed, and a resumed training continues where it stopped."""

from __future__ import annotations

import hashlib
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
import requests
from safetensors.torch import load_file, save_file

from app_server import monailabel_server
from rest import copy_backbone, infer, nifti, organ_label, put_label, random_head_checkpoint
from sdfsmis.io.weights import WEIGHTS_NAME, load_weights
from sdfsmis.methods.sdfsmis.model import SDFSMIS
from sdfsmis.samples.synthetic import make_studies
from sdfsmis.settings import load_config

SHAPE = (48, 48, 16)
DINOV2 = Path("dinov2") / "model.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_backbone):
    """Served with a backbone copy whose DINOv2 weights are TRUNCATED until a test repairs them."""
    root = tmp_path_factory.mktemp("faults")
    make_studies(root / "studies", 3, seed=50, shape=SHAPE)
    backbone = copy_backbone(tiny_backbone, root / "backbone")
    good = (backbone / DINOV2).read_bytes()
    (backbone / DINOV2).write_bytes(good[: len(good) // 2])
    random_head_checkpoint(tiny_backbone, root / "model" / WEIGHTS_NAME)
    conf = [("backbone", backbone), ("model_dir", root / "model"), ("device", "cpu")]
    with monailabel_server(root / "studies", root / "server.log", *conf) as url:
        label, affine = organ_label(50, SHAPE)
        assert put_label(url, "case_000", nifti(root / "support.nii.gz", label, affine)).status_code == 200
        yield url, root, lambda: (backbone / DINOV2).write_bytes(good)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _unavailable(url: str, message: str) -> None:
    response = infer(url, "case_001", {"support": "case_000"})
    assert response.status_code == 503 and message in response.json()["detail"], response.text
    assert requests.get(f"{url}/info/", timeout=5).status_code == 200


def test_bad_or_missing_weights_are_503_and_the_server_recovers(server, tmp_path):
    url, root, repair_backbone = server
    served = root / "model" / WEIGHTS_NAME
    good = tmp_path / "good.safetensors"
    shutil.copy(served, good)

    _unavailable(url, "cannot be loaded")  # corrupt DINOv2 weights in the backbone
    repair_backbone()
    served.unlink()
    _unavailable(url, "no fine-tuned SD-FSMIS checkpoint")
    served.write_bytes(good.read_bytes()[:1000])
    _unavailable(url, "is corrupt or not a safetensors file")
    tensors = load_file(good)
    name = next(k for k in tensors if k.startswith("vtct."))
    tensors[name] = tensors[name][..., :1].contiguous()  # the checkpoint of another model shape
    save_file(tensors, str(served))
    _unavailable(url, "does not fit this backbone")
    shutil.copy(good, served)
    response = infer(url, "case_001", {"support": "case_000"})
    assert response.status_code == 200, response.text


def _training_process() -> psutil.Process:
    for child in psutil.Process().children(recursive=True):
        if "monailabel.interfaces.utils.app" in " ".join(child.cmdline()) and "train" in child.cmdline():
            return child
    raise AssertionError("no training process")


def _wait_train_ended(url: str) -> dict:
    deadline = time.time() + 300
    while (status := requests.get(f"{url}/train/", timeout=5).json()).get("status") in ("SUBMITTED", "RUNNING"):
        assert time.time() < deadline, status
        time.sleep(0.5)
    return status


def _train_stats(url: str) -> dict:
    return requests.get(f"{url}/info/", timeout=5).json()["train_stats"]["sdfsmis"]


def test_killed_training_keeps_the_served_checkpoint_is_reported_and_resumes(server, tiny_backbone):
    url, root, repair_backbone = server
    repair_backbone()
    served = root / "model" / WEIGHTS_NAME
    before = _digest(served)
    params = {"iterations": 5000, "checkpoint_every": 5}
    assert requests.post(f"{url}/train/sdfsmis", json=params, timeout=30).status_code == 200
    deadline = time.time() + 300
    while _train_stats(url).get("iteration", 0) < 10:
        assert time.time() < deadline and _train_stats(url).get("status") != "FAILED", _train_stats(url)
        time.sleep(0.2)
    _training_process().send_signal(signal.SIGKILL)

    assert _wait_train_ended(url)["status"] == "ERROR"  # MONAI Label's own task status
    stats = _train_stats(url)
    assert stats["status"] == "FAILED" and "ended unexpectedly" in stats["error"], stats
    assert _digest(served) == before  # the served checkpoint is untouched...
    assert infer(url, "case_001", {"support": "case_000"}).status_code == 200  # ...and serves
    model = SDFSMIS.from_backbone(tiny_backbone, load_config(backbone=tiny_backbone))
    killed_at = load_weights(model, root / "model" / "train" / "last" / WEIGHTS_NAME)["iteration"]
    assert 5 <= killed_at <= stats["iteration"]  # the last complete checkpoint loads, whatever moment the kill hit

    params = {"iterations": killed_at + 5, "checkpoint_every": 5, "resume": True}
    assert requests.post(f"{url}/train/sdfsmis", json=params, timeout=30).status_code == 200
    assert _wait_train_ended(url)["status"] == "DONE"
    stats = _train_stats(url)
    assert stats["status"] == "DONE" and stats["resumed_from"] == killed_at and stats["iteration"] == killed_at + 5
    assert _digest(served) != before  # the resumed training published its result
    assert infer(url, "case_001", {"support": "case_000"}).status_code == 200
