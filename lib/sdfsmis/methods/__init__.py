"""The one-shot methods and their registry. Each method is a subpackage holding everything that
is only its own (model, settings section, parts); all share one interface
(:class:`~sdfsmis.methods.base.OneShotModel`) that the pipeline, the trainer, the app, the
evaluation harness and the benchmark use alike. A third method is one new subpackage and one
line in ``METHODS``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdfsmis.methods.base import OneShotModel, Prediction
from sdfsmis.methods.dpl import DPL
from sdfsmis.methods.sdfsmis import SDFSMIS

METHODS: dict[str, type[OneShotModel]] = {method.method: method for method in (SDFSMIS, DPL)}
DEFAULT_METHOD = SDFSMIS.method  # the CLI's default and the app's first model

__all__ = [
    "DEFAULT_METHOD", "DPL", "METHODS", "SDFSMIS", "OneShotModel", "Prediction", "load_model", "method_class",
    "weights_key", "weights_option",
]  # fmt: skip


def method_class(method: str) -> type[OneShotModel]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    return METHODS[method]


def weights_key(method: str) -> str:
    """Where users name a method's weights: ``checkpoint`` for the default method (the name it had
    before there were two), ``<method>_checkpoint`` for the others; the app's ``--conf`` key, and
    the commands' option with dashes (``--checkpoint``, ``--dpl-checkpoint``)."""
    return "checkpoint" if method == DEFAULT_METHOD else f"{method}_checkpoint"


def weights_option(method: str) -> str:
    """The commands' option for a method's weights: :func:`weights_key` with dashes."""
    return "--" + weights_key(method).replace("_", "-")


def load_model(method: str, backbone: str | Path | None, settings: Any, *args: Any, **kwargs: Any) -> OneShotModel:
    """The method's model from a backbone (directory or hub default), with our weights if given:
    ``checkpoint``, ``device`` and ``dtype`` as :meth:`OneShotModel.from_backbone` takes them."""
    return method_class(method).from_backbone(backbone, settings, *args, **kwargs)
