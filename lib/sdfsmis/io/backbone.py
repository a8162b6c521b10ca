"""Loading the frozen/pretrained parts: SD v1.5 VAE + UNet (diffusers layout) and DINOv2
(transformers layout), from one local directory or from the hub, through ONE code path.

A backbone directory looks like::

    DIR/vae/{config.json, diffusion_pytorch_model.safetensors}
    DIR/unet/{config.json, diffusion_pytorch_model[.fp16].safetensors}
    DIR/dinov2/{config.json, model.safetensors}
    DIR/sdfsmis.yaml        (optional: the settings this backbone is meant to run with)
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import Dinov2Model

from sdfsmis.io.manifest import write_manifest

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DINOV2_HUB_ID = "facebook/dinov2-small"
DEFAULT_BACKBONE = "default"
BACKBONE_PRESET_FILE = "sdfsmis.yaml"  # the settings a backbone directory is run with

REQUIRED_FILES = {
    "vae": ("config.json", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")),
    "unet": ("config.json", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")),
    "dinov2": ("config.json", ("model.safetensors",)),
}
HOW_TO_GET = (
    "Fix: run `sdfsmis download DIR` on a machine with internet access (Stable Diffusion v1.5 and "
    "DINOv2, ~2.5 GB) and pass `--backbone DIR` (MONAI Label: `--conf backbone DIR`); "
    "for a test run without real weights, `sdfsmis make-tiny DIR` builds a tiny random backbone."
)


class BackboneNotFoundError(FileNotFoundError):
    """The backbone weights are not where they were asked for; the message names the fix."""


class BackboneDownloadError(BackboneNotFoundError):
    """A download did not bring every file whole: the message names the files (the hub client
    alone names at most the last 40 characters of one URL, and lets a corrupted file through)."""


@dataclass(frozen=True)
class BackboneSource:
    """Where each part comes from: a local folder or a hub repository (+ subfolder)."""

    vae: tuple[str, str | None]
    unet: tuple[str, str | None]
    dinov2: tuple[str, str | None]
    local: bool
    variant: str | None = None  # "fp16" where only the fp16 weight files are present

    @property
    def description(self) -> str:
        return self.vae[0] if self.local else f"hub: {self.unet[0]} + {self.dinov2[0]}"


def missing_files(directory: Path, parts: tuple[str, ...] = tuple(REQUIRED_FILES)) -> list[str]:
    """Every required folder/file of ``parts`` absent from a backbone directory, as relative paths."""
    missing = []
    for part in parts:
        config_name, weight_names = REQUIRED_FILES[part]
        folder = directory / part
        if not folder.is_dir():
            missing.append(f"{part}/ (folder)")
            continue
        if not (folder / config_name).is_file():
            missing.append(f"{part}/{config_name}")
        if not any((folder / name).is_file() for name in weight_names):
            missing.append(f"{part}/{' or '.join(weight_names)}")
    return missing


def resolve_backbone(spec: str | Path | None, parts: tuple[str, ...] = tuple(REQUIRED_FILES)) -> BackboneSource:
    """``None``/``"default"``: hub ids (SD v1.5 + DINOv2-small); an existing directory: local,
    checked file by file for the ``parts`` a method needs (DPL needs only ``dinov2``); anything
    else is an error that says what is missing and how to get it."""
    if spec is None or str(spec) == DEFAULT_BACKBONE:
        return BackboneSource((SD15_HUB_ID, "vae"), (SD15_HUB_ID, "unet"), (DINOV2_HUB_ID, None), local=False)
    directory = Path(spec).expanduser()
    if not directory.is_dir():
        raise BackboneNotFoundError(f"backbone directory {directory} does not exist. {HOW_TO_GET}")
    missing = missing_files(directory, parts)
    if missing:
        raise BackboneNotFoundError(
            f"backbone directory {directory} is incomplete, missing: {', '.join(missing)}. {HOW_TO_GET}"
        )
    fp16_only = "unet" in parts and not (directory / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    return BackboneSource(
        (str(directory / "vae"), None),
        (str(directory / "unet"), None),
        (str(directory / "dinov2"), None),
        local=True,
        variant="fp16" if fp16_only else None,
    )


def _hub_kwargs(source: BackboneSource, subfolder: str | None) -> dict:
    kwargs: dict = {"local_files_only": source.local or os.environ.get("HF_HUB_OFFLINE") == "1"}
    if subfolder:
        kwargs["subfolder"] = subfolder
    return kwargs


def load_backbone(
    source: BackboneSource, dtype: torch.dtype = torch.float32
) -> tuple[AutoencoderKL, UNet2DConditionModel, Dinov2Model]:
    """Load VAE, UNet and DINOv2 (safetensors only). Hub failures are turned into one message
    that names the fix, because offline machines are the norm for hospital servers."""
    try:
        vae = AutoencoderKL.from_pretrained(
            source.vae[0],
            torch_dtype=dtype,
            use_safetensors=True,
            variant=source.variant,
            **_hub_kwargs(source, source.vae[1]),
        )
        unet = UNet2DConditionModel.from_pretrained(
            source.unet[0],
            torch_dtype=dtype,
            use_safetensors=True,
            variant=source.variant,
            **_hub_kwargs(source, source.unet[1]),
        )
    except (OSError, ValueError) as error:
        raise BackboneNotFoundError(
            f"could not load the backbone ({source.description}): {error}. {HOW_TO_GET}"
        ) from error
    return vae, unet, load_dinov2(source, dtype)


def load_dinov2(source: BackboneSource, dtype: torch.dtype = torch.float32) -> Dinov2Model:
    """DINOv2 alone (all that DPL needs), through the same checks and messages."""
    try:
        return Dinov2Model.from_pretrained(
            source.dinov2[0], dtype=dtype, use_safetensors=True, **_hub_kwargs(source, source.dinov2[1])
        )
    except (OSError, ValueError) as error:
        raise BackboneNotFoundError(
            f"could not load DINOv2 of the backbone ({source.description}): {error}. {HOW_TO_GET}"
        ) from error


def _fetch(repo_id: str, local_dir: Path, files: list[str]) -> str:
    """Download ``files`` of ``repo_id`` into ``local_dir``, then check each against the hub's own
    checksum (sha256 for LFS weights, git sha1 otherwise): the client checks only sizes, so a file
    changed in transit would otherwise land silently and go into the manifest as if it were right.
    A changed file is deleted, so that running the download again fetches it anew. The files are
    taken at one commit, resolved first and returned, so that the manifest names what arrived."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        commit = HfApi().model_info(repo_id, revision="main").sha
        snapshot_download(repo_id, revision=commit, local_dir=local_dir, allow_patterns=files)
        check = HfApi().verify_repo_checksums(repo_id, revision=commit, local_dir=local_dir)
    except OSError as error:
        absent = [name for name in files if not (local_dir / name).is_file()]
        raise BackboneDownloadError(
            f"downloading {repo_id} into {local_dir} failed ({', '.join(absent) or 'a file'} not received "
            f"whole): {str(error).rstrip('.')}. Run `sdfsmis download` again; the files already received are kept."
        ) from error
    changed = sorted(mismatch["path"] for mismatch in check.mismatches if mismatch["path"] in files)
    for name in changed:
        (local_dir / name).unlink()
    if changed:
        raise BackboneDownloadError(
            f"downloaded {repo_id} file(s) {', '.join(changed)} in {local_dir} differ from the hub's checksum "
            "(corrupted in transit) and were deleted. Run `sdfsmis download` again."
        )
    return commit


def download_backbone(directory: Path, preset: Path, fp16: bool = False) -> Path:
    """Fetch SD v1.5 (vae, unet) and DINOv2-small into the backbone layout (needs internet), with
    the settings ``preset`` it is run with."""
    directory = Path(directory)
    variant = "fp16." if fp16 else ""
    sd_commit = _fetch(
        SD15_HUB_ID,
        directory,
        [
            f"{part}/{name}"
            for part in ("vae", "unet")
            for name in ("config.json", f"diffusion_pytorch_model.{variant}safetensors")
        ],
    )
    dino_commit = _fetch(DINOV2_HUB_ID, directory / "dinov2", ["config.json", "model.safetensors"])
    shutil.copyfile(preset, directory / BACKBONE_PRESET_FILE)
    write_manifest(
        directory,
        f"{SD15_HUB_ID} (vae, unet{', fp16' if fp16 else ''}) + {DINOV2_HUB_ID}",
        f"{SD15_HUB_ID}@{sd_commit} {DINOV2_HUB_ID}@{dino_commit}",
    )
    return directory
