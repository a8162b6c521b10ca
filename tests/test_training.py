"""`sdfsmis train` as a user runs it: loss falls, checkpoints appear and are used by `infer`,
a killed run resumes from its last complete checkpoint, and the model really learns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sdfsmis.io.weights import WEIGHTS_NAME, load_weights
from sdfsmis.samples.synthetic import make_studies
from sdfsmis.training.checkpoints import read_state

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdfsmis.cli", *args]


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    run = subprocess.run(_command(*args), capture_output=True, text=True, env=ENV, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train") / "studies"
    make_studies(folder, 3, with_labels=True, shape=(80, 80, 24))
    return folder


def _train(backbone: Path, studies: Path, output: Path, iterations: int, *extra: str) -> subprocess.CompletedProcess:
    return _run(
        "train",
        "--backbone",
        str(backbone),
        "--images",
        str(studies),
        "--output",
        str(output),
        "--iterations",
        str(iterations),
        "--checkpoint-every",
        "10",
        "--validate-every",
        "20",
        *extra,
    )


def test_train_loss_falls_checkpoints_appear_and_infer_uses_them(tiny_backbone, studies, tmp_path):
    output = tmp_path / "ckpt"
    _train(tiny_backbone, studies, output, 60, "--batch-size", "2")
    losses = [r["loss"] for r in map(json.loads, (output / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    fifth = max(1, len(losses) // 5)
    print(f"loss first 20%: {np.mean(losses[:fifth]):.4f}, last 20%: {np.mean(losses[-fifth:]):.4f}")
    assert np.mean(losses[-fifth:]) < np.mean(losses[:fifth])
    assert (output / WEIGHTS_NAME).is_file() and (output / "last" / "optimizer.pt").is_file()
    assert read_state(output)["iteration"] == 60 and "val_dice" in read_state(output)
    assert (output / "best" / WEIGHTS_NAME).is_file()
    assert (studies / ".supervoxels").is_dir()  # cached next to the data

    image, label = studies / "case_000.nii.gz", studies / "labels" / "final" / "case_000.nii.gz"
    common = ["infer", "--backbone", str(tiny_backbone), "--support-image", str(image), "--support-label", str(label)]
    query = studies / "case_001.nii.gz"
    trained = _run(*common, "--image", str(query), "--output", str(tmp_path / "a.nii.gz"), "--checkpoint", str(output))
    assert "untrained" not in trained.stderr
    _run(*common, "--image", str(query), "--output", str(tmp_path / "b.nii.gz"))
    a, b = (np.asarray(nib.load(tmp_path / n).dataobj) for n in ("a.nii.gz", "b.nii.gz"))
    assert not np.array_equal(a, b)


def test_killed_training_resumes_from_last_complete_checkpoint(tiny_backbone, studies, tmp_path):
    output = tmp_path / "ckpt"
    args = ["--backbone", str(tiny_backbone), "--images", str(studies), "--output", str(output)]
    process = subprocess.Popen(
        _command("train", *args, "--iterations", "400", "--checkpoint-every", "5", "--validate-every", "1000"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and (read_state(output) or {}).get("iteration", 0) < 15:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = read_state(output)["iteration"]
    assert 15 <= killed_at < 400
    # whatever moment the kill hit, `last` is a complete, loadable checkpoint
    from sdfsmis.methods.sdfsmis.model import SDFSMIS
    from sdfsmis.settings import load_config

    model = SDFSMIS.from_backbone(tiny_backbone, load_config(backbone=tiny_backbone))
    assert load_weights(model, output / "last" / WEIGHTS_NAME)["iteration"] == killed_at

    target = killed_at + 10
    resumed = _run(
        "train", *args, "--iterations", str(target), "--checkpoint-every", "5", "--validate-every", "1000", "--resume"
    )
    assert f"resumed from iteration {killed_at}" in resumed.stdout
    assert read_state(output)["iteration"] == target

    # the data order and optimiser state continue: same weights as an uninterrupted run
    straight = tmp_path / "straight"
    _run(
        "train",
        "--backbone",
        str(tiny_backbone),
        "--images",
        str(studies),
        "--output",
        str(straight),
        "--iterations",
        str(target),
        "--checkpoint-every",
        "5",
        "--validate-every",
        "1000",
    )
    from safetensors.torch import load_file

    x, y = load_file(output / WEIGHTS_NAME), load_file(straight / WEIGHTS_NAME)
    assert max((x[k] - y[k]).abs().max().item() for k in x) < 1e-4
