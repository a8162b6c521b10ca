"""Raw HTTP calls to the real server, as Slicer's client makes them, for tests that check status
codes and messages; and a fingerprint of what the datastore holds."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import requests
import torch

from sdfsmis.io.weights import save_weights
from sdfsmis.methods.sdfsmis.model import SDFSMIS
from sdfsmis.samples.synthetic import make_volume, write_nifti
from sdfsmis.settings import load_config

TIMEOUT = 120


def infer(url: str, image: str = "", params: dict | None = None, label=None, file=None, **kw) -> requests.Response:
    """``POST /infer/sdfsmis?image=ID&output=json`` with optional uploads (``(name, bytes)``)."""
    files = {k: v for k, v in (("label", label), ("file", file)) if v is not None}
    return requests.post(
        f"{url}/infer/sdfsmis",
        params={"image": image, "output": "json"},
        data={"params": json.dumps(params or {})},
        files=files or None,
        timeout=TIMEOUT,
        **kw,
    )


def put_label(url: str, image: str, label: tuple[str, bytes], tag: str = "final", params: dict | None = None):
    return requests.put(
        f"{url}/datastore/label",
        params={"image": image, "tag": tag},
        data={"params": json.dumps(params or {})},
        files={"label": label},
        timeout=TIMEOUT,
    )


def nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> tuple[str, bytes]:
    """An upload ``(file name, bytes)`` of a NIfTI written with ``affine``."""
    write_nifti(path, array, affine)
    return path.name, path.read_bytes()


def organ_label(seed: int, shape: tuple[int, int, int], ids: tuple[int, ...] = (1, 3)) -> tuple[np.ndarray, np.ndarray]:
    """The ground truth of patient ``seed`` restricted to ``ids``, and its affine."""
    _, label, affine = make_volume(seed, shape=shape)
    return np.where(np.isin(label, ids), label, 0).astype(np.uint8), affine


def stored(studies: Path) -> dict[str, str]:
    """Every stored image and label file with its digest (the datastore's content)."""
    return {
        str(p.relative_to(studies)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(studies.rglob("*"))
        if p.is_file() and p.name.endswith((".nii.gz", ".nii", ".nrrd"))
    }


def random_head_checkpoint(backbone: Path, path: Path, seed: int = 0) -> Path:
    """A checkpoint that fits ``backbone`` (a random head: for tests of serving, not of results);
    another ``seed`` gives other weights of the same shapes."""
    torch.manual_seed(seed)
    model = SDFSMIS.from_backbone(backbone, load_config(backbone=backbone))
    return save_weights(model, path)


def copy_backbone(backbone: Path, destination: Path) -> Path:
    shutil.copytree(backbone, destination)
    return destination
