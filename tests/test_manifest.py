"""Weights carried in by hand: ``sdfsmis make-tiny`` writes a manifest beside the weights,
``sdfsmis verify`` checks a folder against it as a hospital would after copying it onto an
air-gapped server, and the app's ``/info/`` says which weights it serves."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from monailabel.client import MONAILabelClient

from app_server import monailabel_server
from sdfsmis.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def sdfsmis(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sdfsmis.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("manifest") / "tiny"
    assert sdfsmis("make-tiny", str(folder)).returncode == 0
    return folder


def verify(folder: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """``sdfsmis verify FOLDER`` through the command's own entry point, in this process (the command
    reads files only): its exit status and what it wrote to stderr."""
    capsys.readouterr()
    try:
        main(["verify", str(folder)])
        status = 0
    except SystemExit as error:
        status = error.code if isinstance(error.code, int) else 1
    return status, capsys.readouterr().err


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(folder), str(target)], check=True)
    return target


def test_the_manifest_lists_every_weights_file_with_its_digest(made):
    manifest = json.loads((made / "manifest.json").read_text())
    listed = {entry["path"]: entry for entry in manifest["files"]}
    unet = made / "unet" / "diffusion_pytorch_model.safetensors"
    assert listed["unet/diffusion_pytorch_model.safetensors"]["sha256"] == hashlib.sha256(unet.read_bytes()).hexdigest()
    assert listed["unet/diffusion_pytorch_model.safetensors"]["size"] == unet.stat().st_size
    on_disk = {p.relative_to(made).as_posix() for p in made.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(listed) == on_disk
    assert "make-tiny" in manifest["source"]


def test_verify_passes_on_a_copy_and_names_the_file_one_changed_byte_breaks(made, tmp_path, capsys):
    copy = copy_of(made, tmp_path)
    status, errors = verify(copy, capsys)
    assert status == 0, errors
    weights = copy / "dinov2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size: only the digest can tell
    weights.write_bytes(bytes(data))
    status, errors = verify(copy, capsys)
    assert status == 1
    assert "dinov2/model.safetensors" in errors and "sha256" in errors
    assert "unet/" not in errors  # only the file that differs is named


def test_verify_names_missing_and_unlisted_files(made, tmp_path, capsys):
    copy = copy_of(made, tmp_path)
    (copy / "vae" / "config.json").unlink()
    (copy / "unet" / "extra.bin").write_bytes(b"x")
    status, errors = verify(copy, capsys)
    assert status == 1
    assert "vae/config.json: missing" in errors and "unet/extra.bin: not in the manifest" in errors


def test_verify_without_a_manifest_fails_and_says_so(made, tmp_path, capsys):
    copy = copy_of(made, tmp_path)
    (copy / "manifest.json").unlink()
    status, errors = verify(copy, capsys)
    assert status == 1 and "no manifest" in errors


def test_info_shows_the_served_weights_identity(made, tmp_path):
    (tmp_path / "studies").mkdir()
    conf = [("backbone", made), ("model_dir", tmp_path / "model"), ("allow_untrained", "true"), ("device", "cpu")]
    with monailabel_server(tmp_path / "studies", tmp_path / "server.log", *conf) as url:
        models = MONAILabelClient(url, tmpdir=str(tmp_path)).info()["models"]
    digest = hashlib.sha256((made / "manifest.json").read_bytes()).hexdigest()
    for method in ("sdfsmis", "dpl"):
        weights = models[method][method]["weights"]
        assert weights["manifest_sha256"] == digest and "make-tiny" in weights["source"]
