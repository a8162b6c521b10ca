"""Shared fixtures: a tiny backbone built from config and saved to disk, loaded through the
same code path as the real weights, and the trained tiny models, each built once per test run
even when pytest-xdist runs the modules in several worker processes."""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from filelock import FileLock

from app_server import free_port
from sdfsmis.dicom.orthanc import OrthancServer, OrthancUnavailable
from sdfsmis.memory import retain_freed_memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch follows OMP_NUM_THREADS (apps/test.sh sets each xdist worker's share of the cores); without it, at most 2
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> tuple[Path, object]:
    """(folder, what ``build(folder)`` returned, JSON-able): built by the first worker that asks,
    under a file lock, and reused by the others; a plain pytest run builds it in its own temp."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        return folder, json.loads(json.dumps(build(folder), default=str))
    folder = tmp_path_factory.getbasetemp().parent / name  # shared by the workers of this run
    done = folder / ".built.json"
    with FileLock(f"{folder}.lock"):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_text(json.dumps(build(folder), default=str))
    return folder, json.loads(done.read_text())


@pytest.fixture()
def resident_mb() -> Callable[[], float]:
    """This process's resident memory in MB, read when called, with freed heap memory kept as a
    server keeps it on the CPU (``retain_freed_memory``); skipped where either is not known here
    (no ``/proc``, a C library other than glibc)."""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("no /proc/self/status: resident memory is not known here")
    if not retain_freed_memory():
        pytest.skip("not glibc: freed heap memory is not kept here")

    def read() -> float:
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    return read


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    from sdfsmis.samples.tiny_backbone import make_tiny_backbone

    return make_tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny")


@pytest.fixture(scope="session")
def tiny_config(tiny_backbone):
    from sdfsmis.settings import load_config

    return load_config(backbone=tiny_backbone)


@pytest.fixture()
def tiny_model(tiny_backbone, tiny_config):
    from sdfsmis.methods.sdfsmis.model import SDFSMIS

    torch.manual_seed(0)
    return SDFSMIS.from_backbone(tiny_backbone, tiny_config).eval()


@pytest.fixture(scope="session")
def fitted_backbone(tmp_path_factory) -> Path:
    """A tiny backbone whose VAE is fitted as an autoencoder, as the real SD VAE is pretrained."""
    from sdfsmis.samples.tiny_backbone import make_tiny_backbone
    from sdfsmis.samples.tiny_vae import fit_tiny_vae

    def build(folder: Path) -> None:
        fit_tiny_vae(make_tiny_backbone(folder / "tiny"), steps=200)

    return built_once(tmp_path_factory, "fitted", build)[0] / "tiny"


def _self_supervised(backbone: Path, root: Path, method: str) -> dict:
    """250 iterations on 4 generated volumes, supervoxel pseudo-labels only (no label seen)."""
    from sdfsmis.samples.synthetic import make_studies
    from sdfsmis.settings import load_config
    from sdfsmis.training.trainer import TrainingRun, train

    images = make_studies(root / "studies", 4, seed=10)
    config = load_config(backbone=backbone)
    return train(
        TrainingRun(
            backbone,
            images,
            root / "ckpt",
            config,
            iterations=250,
            batch_size=4,
            use_labels=False,
            progress=False,
            method=method,
        )
    )


@pytest.fixture(scope="session")
def trained_checkpoint(fitted_backbone, tmp_path_factory) -> Path:
    """A few minutes of self-supervised training on generated volumes (supervoxels only)."""
    folder, _ = built_once(tmp_path_factory, "trained", lambda root: _self_supervised(fitted_backbone, root, "sdfsmis"))
    return folder / "ckpt" / "sdfsmis.safetensors"


@pytest.fixture(scope="session")
def trained_dpl(tiny_backbone, tmp_path_factory) -> tuple[dict, Path]:
    """DPL trained for a CPU minute on supervoxels alone (no label seen): (summary, output folder).
    It needs only DINOv2, which every tiny backbone shares (same seed)."""
    root, summary = built_once(
        tmp_path_factory, "dpl_trained", lambda root: _self_supervised(tiny_backbone, root, "dpl")
    )
    return summary, root / "ckpt"


@pytest.fixture(scope="module")
def realm():
    """A realm endpoint answering as Keycloak's ``/realms/NAME`` does, and its signing key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    body = json.dumps({"realm": "sdfsmis", "public_key": base64.b64encode(public).decode()}).encode()

    class Realm(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/realms/sdfsmis" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Realm)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{http.server_address[1]}/realms/sdfsmis", key
    http.shutdown()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """An Orthanc DICOMweb server of the test module's own (skipped where Orthanc is not installed)."""
    server = OrthancServer(free_port(), free_port(), tmp_path_factory.mktemp("orthanc"))
    try:
        process = server.start()
    except OrthancUnavailable as error:
        pytest.skip(f"{error} (run: bash apps/system_packages.sh)")
    yield server
    process.terminate()
    process.wait(timeout=30)
