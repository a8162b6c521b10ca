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
    from sdfsmis.model import SDFSMIS

    torch.manual_seed(0)
    return SDFSMIS.from_backbone(tiny_backbone, tiny_config.model).eval()
