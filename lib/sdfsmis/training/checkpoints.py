"""Training checkpoints that are never half-written.

Layout of a training output directory::

    OUT/checkpoints/iter_000050/{sdfsmis.safetensors, optimizer.pt, state.json}
    OUT/last -> checkpoints/iter_000050      (symlink, swapped atomically)
    OUT/best -> checkpoints/iter_000040      (best validation Dice)
    OUT/sdfsmis.safetensors                   (the final weights: `--checkpoint OUT` uses them;
                                               dpl.safetensors for DPL)

A checkpoint directory is complete before a link points to it, and a link is replaced with
``os.replace``, so a run killed at any moment leaves the previous checkpoint usable. Files and
folders are fsync'ed before and after each rename, so that a power cut cannot leave a link to a
checkpoint whose data never reached the disk.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from sdfsmis.io.weights import load_weights, save_weights


def _sync(path: Path) -> None:
    """Flush a file's data or a folder's entries to disk (a rename is durable only after both)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _point(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.relative_to(link.parent))
    os.replace(tmp, link)
    _sync(link.parent)


def write_checkpoint(
    output: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    best: bool = False,
    keep: int = 2,
) -> Path:
    """Write iteration ``state["iteration"]`` and point ``last`` (and ``best``) at it."""
    folder = output / "checkpoints" / f"iter_{state['iteration']:06d}"
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_weights(model, partial / model.weights_name, metadata={"iteration": state["iteration"]})
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    (partial / "state.json").write_text(json.dumps(state, indent=1))
    for file in partial.iterdir():
        _sync(file)
    _sync(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    _sync(folder.parent)
    _point(output / "last", folder)
    if best:
        _point(output / "best", folder)
    _prune(output, keep)
    return folder


def _prune(output: Path, keep: int) -> None:
    protected = {(output / link).resolve() for link in ("last", "best") if (output / link).exists()}
    folders = sorted(p for p in (output / "checkpoints").glob("iter_*") if not p.name.endswith(".partial"))
    for folder in folders[:-keep]:
        if folder.resolve() not in protected:
            shutil.rmtree(folder, ignore_errors=True)


def read_state(output: Path, which: str = "last") -> dict | None:
    state = output / which / "state.json"
    return json.loads(state.read_text()) if state.is_file() else None


def resume(output: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Load the ``last`` checkpoint into model and optimiser; ``None`` when there is none."""
    state = read_state(output)
    if state is None:
        return None
    load_weights(model, output / "last" / model.weights_name)
    optimizer.load_state_dict(torch.load(output / "last" / "optimizer.pt", map_location="cpu", weights_only=True))
    return state


def publish(source: Path, destination: Path) -> Path:
    """Copy a weights file into place atomically (readers see the old or the new file)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(destination.name + ".tmp")
    shutil.copyfile(source, tmp)
    _sync(tmp)
    os.replace(tmp, destination)
    _sync(destination.parent)
    return destination
