"""Our own weights as one safetensors file per method (SD-FSMIS: the fine-tuned UNet incl. both
input convs and the VTCT MLP; DPL: adapter, denoiser and threshold), checked key by key and
shape by shape on load. Frozen parts (VAE, DINOv2) come from the backbone, never from here."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FROZEN_PREFIXES = ("codec.", "dinov2.")
WEIGHTS_NAME = "sdfsmis.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message says how."""


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(FROZEN_PREFIXES)}


def weights_file(path: str | Path, name: str = WEIGHTS_NAME) -> Path:
    """A checkpoint may be named by its file or by the directory that holds it (file ``name``)."""
    path = Path(path)
    return path / name if path.is_dir() else path


def save_weights(model: torch.nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Write atomically (temp file, then rename): a reader never sees a half-written file."""
    path = weights_file(path, model.weights_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in trainable_state_dict(model).items()}
    info = {"format": "sdfsmis-1", "method": model.method, "model_config": json.dumps(vars(model.config))}
    info.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=info)
    tmp.replace(path)
    return path


def read_metadata(path: str | Path, name: str = WEIGHTS_NAME) -> dict:
    with safe_open(str(weights_file(path, name)), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items() if k not in ("format", "method")}


def read_method(path: str | Path) -> str | None:
    """The method a weights file belongs to; None for files written before the method was recorded
    (only SD-FSMIS existed then: any other model finds its keys missing)."""
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("method")


def load_weights(model: torch.nn.Module, path: str | Path) -> dict:
    """Load our weights into ``model``; any missing, unexpected or reshaped key is an error."""
    path = weights_file(path, model.weights_name)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises several types for a corrupt header
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {error}") from error
    method = read_method(path)
    if method is not None and method != model.method:
        raise CheckpointError(f"checkpoint {path} holds {method} weights, not {model.method} weights")
    expected = trainable_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    reshaped = [k for k in expected.keys() & tensors.keys() if expected[k].shape != tensors[k].shape]
    if missing or unexpected or reshaped:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if reshaped:
            k = reshaped[0]
            details.append(
                f"{len(reshaped)} of another shape (e.g. {k}: {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)})"
            )
        raise CheckpointError(
            f"checkpoint {path} does not fit this backbone: {'; '.join(details)}. "
            "Was it trained on another backbone (e.g. the tiny one)?"
        )
    model.load_state_dict(tensors, strict=False)
    return read_metadata(path, model.weights_name)
