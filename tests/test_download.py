"""`sdfsmis download` through the real `huggingface_hub` client against a hub endpoint on loopback
(tests/fake_hub.py) that holds the two repositories the code names, in their real file layout, with
the suite's tiny weights: what lands, what was asked for, and what happens when the network cuts
or changes a file. No internet; `HF_ENDPOINT` points the client at the loopback server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from fake_hub import FakeHub, serve
from safetensors.torch import load_file, save_file

from sdfsmis.cli import main
from sdfsmis.io.backbone import DINOV2_HUB_ID, SD15_HUB_ID, resolve_backbone
from sdfsmis.methods import load_model
from sdfsmis.samples.synthetic import make_volume, write_nifti
from sdfsmis.settings import load_config

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_FP16 = "diffusion_pytorch_model.fp16.safetensors"
SD_WANTED = {"vae/config.json", "unet/config.json", f"vae/{WEIGHTS}", f"unet/{WEIGHTS}"}
SD_WANTED_FP16 = {"vae/config.json", "unet/config.json", f"vae/{WEIGHTS_FP16}", f"unet/{WEIGHTS_FP16}"}
DINO_WANTED = {"config.json", "model.safetensors"}
# Files of the real repositories that a backbone does not need (their listings on the hub: the
# diffusers layout of stable-diffusion-v1-5 with its fp16 and non_ema variants, .bin twins and
# single-file checkpoints; dinov2-small's processor config and .bin twin).
SD_OTHERS = (
    ".gitattributes", "README.md", "model_index.json", "v1-inference.yaml", "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
    "safety_checker/config.json", "safety_checker/model.safetensors", "safety_checker/model.fp16.safetensors",
    "safety_checker/pytorch_model.bin", "safety_checker/pytorch_model.fp16.bin",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin", "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.non_ema.bin", "unet/diffusion_pytorch_model.non_ema.safetensors",
    "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
)  # fmt: skip
DINO_OTHERS = (".gitattributes", "README.md", "preprocessor_config.json", "pytorch_model.bin")


def _fp16(data: bytes) -> bytes:
    """The fp16 variant of a safetensors file, as diffusers' ``variant="fp16"`` files are."""
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "in.safetensors", Path(folder) / "out.safetensors"
        source.write_bytes(data)
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(source).items()}
        save_file(tensors, target, metadata={"format": "pt"})
        return target.read_bytes()


def _padded(data: bytes, size: int) -> bytes:
    """The same safetensors file grown to ``size`` bytes by padding its JSON header with spaces
    (the format allows it): big enough that the client has written a whole download chunk (10 MiB)
    before a connection drops, so that it resumes with a Range request."""
    length = int.from_bytes(data[:8], "little")
    pad = size - len(data)
    pad += -(length + pad) % 8  # keep the data 8-byte aligned
    return (length + pad).to_bytes(8, "little") + data[8 : 8 + length] + b" " * pad + data[8 + length :]


@pytest.fixture(scope="module")
def repos(tiny_backbone: Path) -> dict[str, dict[str, bytes]]:
    """Both repositories, file by file: the tiny weights where a backbone needs them, stand-ins
    elsewhere (never to be fetched)."""
    sd: dict[str, bytes] = {name: f"stand-in {name}\n".encode() for name in SD_OTHERS}
    for part in ("vae", "unet"):
        weights = (tiny_backbone / part / WEIGHTS).read_bytes()
        sd[f"{part}/config.json"] = (tiny_backbone / part / "config.json").read_bytes()
        sd[f"{part}/{WEIGHTS}"] = weights
        sd[f"{part}/{WEIGHTS_FP16}"] = _fp16(weights)
    dino = {name: f"stand-in {name}\n".encode() for name in DINO_OTHERS}
    dino |= {name: (tiny_backbone / "dinov2" / name).read_bytes() for name in DINO_WANTED}
    return {SD15_HUB_ID: sd, DINOV2_HUB_ID: dino}


def _download(hub: FakeHub, directory: Path, *flags: str) -> subprocess.CompletedProcess:
    """`sdfsmis download` as a user runs it, online (to the loopback hub), with a fresh HF_HOME."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env |= {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(directory.parent / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "sdfsmis.cli", "download", str(directory), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


def _landed(directory: Path) -> set[str]:
    """The folder's files, without the client's own `.cache/` bookkeeping."""
    return {
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(directory).parts
    }


def _same_bytes(directory: Path, repos: dict[str, dict[str, bytes]], sd: set[str]) -> None:
    for name in sd:
        assert (directory / name).read_bytes() == repos[SD15_HUB_ID][name], name
    for name in DINO_WANTED:
        assert (directory / "dinov2" / name).read_bytes() == repos[DINOV2_HUB_ID][name], name


def test_download_through_the_hub_then_verify_load_and_segment(repos, tmp_path):
    directory = tmp_path / "backbone"
    with serve(FakeHub(repos)) as hub:
        run = _download(hub, directory)
    assert run.returncode == 0, run.stderr
    # exactly the files a backbone needs were asked for, and nothing the filter leaves out
    assert hub.fetched(SD15_HUB_ID) == SD_WANTED
    assert hub.fetched(DINOV2_HUB_ID) == DINO_WANTED
    assert _landed(directory) == {*SD_WANTED, *(f"dinov2/{n}" for n in DINO_WANTED), "sdfsmis.yaml", "manifest.json"}
    _same_bytes(directory, repos, SD_WANTED)
    manifest = json.loads((directory / "manifest.json").read_text())
    unet = next(entry for entry in manifest["files"] if entry["path"] == f"unet/{WEIGHTS}")
    assert unet["sha256"] == hashlib.sha256(repos[SD15_HUB_ID][f"unet/{WEIGHTS}"]).hexdigest()
    assert SD15_HUB_ID in manifest["source"] and DINOV2_HUB_ID in manifest["source"]
    # the commit the files were taken at, not a branch name that moves
    commits = f"{SD15_HUB_ID}@{hub.commit(SD15_HUB_ID)} {DINOV2_HUB_ID}@{hub.commit(DINOV2_HUB_ID)}"
    assert manifest["revision"] == commits
    main(["verify", str(directory)])  # raises SystemExit(1) on any difference

    # the downloaded folder segments: DPL through `sdfsmis infer`, SD-FSMIS loaded with its weights
    image, label, affine = make_volume(3, shape=(40, 36, 10))
    support = write_nifti(tmp_path / "support.nii.gz", image, affine)
    support_label = write_nifti(tmp_path / "support_label.nii.gz", (label == 1).astype(np.uint8), affine)
    output = tmp_path / "out.nii.gz"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    infer = subprocess.run(
        [sys.executable, "-m", "sdfsmis.cli", "infer", "--method", "dpl", "--config", "tiny", "--backbone",
         str(directory), "--support-image", str(support), "--support-label", str(support_label),
         "--image", str(support), "--output", str(output)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert infer.returncode == 0, infer.stderr
    result = nib.load(output)
    assert result.shape == image.shape
    assert set(np.unique(np.asarray(result.dataobj)).tolist()) <= {0, 1}
    model = load_model("sdfsmis", directory, load_config("tiny"))
    served = load_file(directory / "unet" / WEIGHTS)
    for name, value in model.unet.state_dict().items():
        torch.testing.assert_close(value, served[name], rtol=0, atol=0)

    # and trains: SD-FSMIS fine-tunes the downloaded UNet (two steps) into a checkpoint with a manifest
    studies = tmp_path / "studies"
    studies.mkdir()
    write_nifti(studies / "case_000.nii.gz", image, affine)
    train = subprocess.run(
        [sys.executable, "-m", "sdfsmis.cli", "train", "--method", "sdfsmis", "--config", "tiny", "--backbone",
         str(directory), "--images", str(studies), "--output", str(tmp_path / "trained"), "--iterations", "2",
         "--batch-size", "1", "--validate-every", "1000"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    main(["verify", str(tmp_path / "trained")])


def test_fp16_takes_the_variant_files(repos, tmp_path):
    directory = tmp_path / "backbone"
    with serve(FakeHub(repos)) as hub:
        run = _download(hub, directory, "--fp16")
    assert run.returncode == 0, run.stderr
    assert hub.fetched(SD15_HUB_ID) == SD_WANTED_FP16  # no full-precision weight requested
    assert _landed(directory) & SD_WANTED == {"vae/config.json", "unet/config.json"}
    _same_bytes(directory, repos, SD_WANTED_FP16)
    assert "fp16" in json.loads((directory / "manifest.json").read_text())["source"]
    main(["verify", str(directory)])
    assert resolve_backbone(directory).variant == "fp16"
    model = load_model("sdfsmis", directory, load_config("tiny"))
    half = load_file(directory / "unet" / WEIGHTS_FP16)
    for name, value in model.unet.state_dict().items():
        torch.testing.assert_close(value, half[name].float(), rtol=0, atol=0)


def test_truncated_file_is_named_and_a_rerun_completes(repos, tmp_path):
    directory = tmp_path / "backbone"
    cut = f"unet/{WEIGHTS_FP16}"  # longer than the 40 characters of a URL the client names
    with serve(FakeHub(repos, faults={f"{SD15_HUB_ID}/{cut}": "truncate"})) as hub:
        run = _download(hub, directory, "--fp16")
    assert run.returncode == 1
    assert cut in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not (directory / cut).exists() and not (directory / "manifest.json").exists()
    with serve(FakeHub(repos)) as hub:
        rerun = _download(hub, directory, "--fp16")
    assert rerun.returncode == 0, rerun.stderr
    assert cut in hub.fetched(SD15_HUB_ID) and f"vae/{WEIGHTS_FP16}" not in hub.fetched(SD15_HUB_ID)
    _same_bytes(directory, repos, SD_WANTED_FP16)
    main(["verify", str(directory)])


def test_corrupted_file_is_named_and_never_kept(repos, tmp_path):
    directory = tmp_path / "backbone"
    changed = "model.safetensors"
    with serve(FakeHub(repos, faults={f"{DINOV2_HUB_ID}/{changed}": "corrupt"})) as hub:
        run = _download(hub, directory)
    assert run.returncode == 1
    assert f"{DINOV2_HUB_ID} file(s) {changed}" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not (directory / "dinov2" / changed).exists() and not (directory / "manifest.json").exists()
    with serve(FakeHub(repos)) as hub:
        rerun = _download(hub, directory)
    assert rerun.returncode == 0, rerun.stderr
    assert hub.fetched(DINOV2_HUB_ID) == {changed}
    _same_bytes(directory, repos, SD_WANTED)
    main(["verify", str(directory)])


def test_dropped_connection_resumes_with_a_range_request(repos, tmp_path):
    directory = tmp_path / "backbone"
    name = f"unet/{WEIGHTS}"
    big = {**repos, SD15_HUB_ID: {**repos[SD15_HUB_ID], name: _padded(repos[SD15_HUB_ID][name], 11 * 2**20)}}
    with serve(FakeHub(big, faults={f"{SD15_HUB_ID}/{name}": "drop_once"})) as hub:
        run = _download(hub, directory)
    assert run.returncode == 0, run.stderr
    path = f"/{SD15_HUB_ID}/resolve/{hub.commit(SD15_HUB_ID)}/{name}"
    gets = [request.range for request in hub.requests if request.method == "GET" and request.path == path]
    assert gets[0] is None and len(gets) == 2, gets
    start = int(gets[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start < len(big[SD15_HUB_ID][name])  # only the missing tail was asked for again
    _same_bytes(directory, big, SD_WANTED)
    main(["verify", str(directory)])
    model = load_model("sdfsmis", directory, load_config("tiny"))  # the padded file is valid safetensors
    assert model.unet is not None
