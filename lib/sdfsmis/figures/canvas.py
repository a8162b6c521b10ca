"""Figures on matplotlib's Agg canvas: sized in pixels, rendered to an RGB array (what goes to
TensorBoard) and written as PNG atomically (a reader, e.g. the app, never sees half a file)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

DPI = 100


def new_figure(width_px: int, height_px: int, facecolor: str = "white") -> Figure:
    """A figure of exactly ``width_px`` x ``height_px`` pixels once rendered."""
    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, facecolor=facecolor)
    FigureCanvasAgg(figure)
    return figure


def render(figure: Figure) -> np.ndarray:
    """The figure's pixels, [H, W, 3] uint8 RGB."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def save_png(image: np.ndarray | Figure, path: str | Path) -> Path:
    """Write an RGB array (or render a figure) as PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = render(image) if isinstance(image, Figure) else image
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels).save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)
    return path
