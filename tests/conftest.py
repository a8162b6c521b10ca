"""Shared fixtures: a tiny backbone built from config and saved to disk, loaded through the
same code path as the real weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    from sdfsmis.backbone import make_tiny_backbone

    return make_tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny")


@pytest.fixture(scope="session")
def tiny_config(tiny_backbone):
    from sdfsmis.config import load_config

    return load_config(backbone=tiny_backbone)


@pytest.fixture()
def tiny_model(tiny_backbone, tiny_config):
    from sdfsmis.models.sdfsmis import SDFSMIS

    torch.manual_seed(0)
    return SDFSMIS.from_backbone(tiny_backbone, tiny_config.model).eval()


@pytest.fixture(scope="session")
def fitted_backbone(tmp_path_factory) -> Path:
    """A tiny backbone whose VAE is fitted as an autoencoder, as the real SD VAE is pretrained."""
    from sdfsmis.backbone import make_tiny_backbone
    from sdfsmis.tiny_vae import fit_tiny_vae

    backbone = make_tiny_backbone(tmp_path_factory.mktemp("fitted") / "tiny")
    fit_tiny_vae(backbone, steps=200)
    return backbone


@pytest.fixture(scope="session")
def trained_checkpoint(fitted_backbone, tmp_path_factory) -> Path:
    """A few minutes of self-supervised training on generated volumes (supervoxels only)."""
    from sdfsmis.config import load_config
    from sdfsmis.synthetic import make_studies
    from sdfsmis.trainer import TrainingRun, train

    root = tmp_path_factory.mktemp("trained")
    images = make_studies(root / "studies", 4, seed=10)
    run = TrainingRun(
        fitted_backbone,
        images,
        root / "ckpt",
        load_config(backbone=fitted_backbone),
        iterations=250,
        batch_size=4,
        use_labels=False,
        progress=False,
    )
    train(run)
    return root / "ckpt" / "sdfsmis.safetensors"


@pytest.fixture(scope="session")
def trained_dpl(tiny_backbone, tmp_path_factory) -> tuple[dict, Path]:
    """DPL trained for a CPU minute on supervoxels alone (no label seen): (summary, output folder).
    It needs only DINOv2, which every tiny backbone shares (same seed)."""
    from sdfsmis.config import load_config
    from sdfsmis.synthetic import make_studies
    from sdfsmis.trainer import TrainingRun, train

    root = tmp_path_factory.mktemp("dpl_trained")
    images = make_studies(root / "studies", 4, seed=10)
    run = TrainingRun(
        tiny_backbone,
        images,
        root / "ckpt",
        load_config(backbone=tiny_backbone),
        iterations=250,
        batch_size=4,
        use_labels=False,
        progress=False,
        method="dpl",
    )
    return train(run), root / "ckpt"
