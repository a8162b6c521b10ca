"""What several commands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from sdfsmis.methods import METHODS, weights_key, weights_option


def device(name: str) -> str:
    """``--device``: refuse cuda up front where there is none, rather than deep inside torch."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA device is available")
    return name


def add_weights_options(parser: argparse.ArgumentParser, more_help: Callable[[str], str]) -> None:
    """One weights option per method of the registry (``--checkpoint``, ``--dpl-checkpoint``, ...)."""
    for name, method in METHODS.items():
        parser.add_argument(weights_option(name), default=None, help=f"{method.title} weights{more_help(name)}")


def checkpoints(args: argparse.Namespace) -> dict[str, str | None]:
    """Method -> the weights its option names (None where not given)."""
    return {name: getattr(args, weights_key(name)) for name in METHODS}
