"""Randomly initialised backbones built from architecture settings, without any download: the
tiny one every test and demo runs on, saved in exactly the real layout so that it is loaded
through the same code as real weights, and the SD1.5 shape the benchmark times."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import Dinov2Config, Dinov2Model

from sdfsmis.io.backbone import BACKBONE_PRESET_FILE
from sdfsmis.settings import PRESET_DIR, load_config

#: Backbone shape -> the preset section that holds its architecture (in the preset of that name).
SHAPES = {"tiny": "tiny_backbone", "sd15": "sd15_backbone"}


def build_backbone(shapes: dict, seed: int | None = None) -> tuple[AutoencoderKL, UNet2DConditionModel, Dinov2Model]:
    """A randomly initialised backbone from architecture settings (a ``*_backbone`` preset
    section: ``unet``, ``vae``, ``dinov2`` keyword arguments), without any download."""
    torch.manual_seed(shapes.get("seed", 0) if seed is None else seed)
    vae = AutoencoderKL(**shapes["vae"])
    unet = UNet2DConditionModel(**shapes["unet"])
    return vae, unet, Dinov2Model(Dinov2Config(**shapes["dinov2"]))


def make_tiny_backbone(directory: Path, seed: int | None = None, shape: str = "tiny") -> Path:
    """Write a randomly initialised backbone in exactly the real layout, saved with
    ``save_pretrained``: ``tiny`` from the ``tiny_backbone`` section of ``configs/tiny.yaml`` (tests,
    demos), ``sd15`` at the real shapes from ``sd15_backbone`` (every full-size code path on a
    machine without the real weights). The preset is copied beside it as the folder's settings."""
    if shape not in SHAPES:
        raise ValueError(f"unknown backbone shape {shape!r}: use one of {', '.join(SHAPES)}")
    preset = PRESET_DIR / f"{shape}.yaml"
    vae, unet, dinov2 = build_backbone(getattr(load_config(preset), SHAPES[shape]), seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(directory / "vae", safe_serialization=True)
    unet.save_pretrained(directory / "unet", safe_serialization=True)
    dinov2.save_pretrained(directory / "dinov2", safe_serialization=True)
    shutil.copyfile(preset, directory / BACKBONE_PRESET_FILE)
    return directory
