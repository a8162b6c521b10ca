"""Overlay montages: rows of axial slices in a fixed pixel grid, each tile with its slice number,
masks drawn as contours (so the anatomy under them stays visible) and optionally a colour map
(an uncertainty). Used for training episodes, evaluated volumes and the ``infer`` preview."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from matplotlib.lines import Line2D

from sdfsmis.figures.canvas import new_figure, render
from sdfsmis.figures.display import radiological
from sdfsmis.io.volume import Volume, ras_spacing

#: Layout in pixels: a header (title, legend), then per row a title strip above square tiles.
TILE_PX = 160
TITLE_PX = 16
HEADER_PX = 40
#: A tile's title and the header: 8 pt at 100 dpi is ~11 px, legible at the tile size.
FONT_SIZE = 8
CONTOUR_WIDTH = 1.2
UNCERTAINTY_COLOURS = "inferno"


@dataclass
class Tile:
    """One axial slice [X, Y] in RAS voxel order (shown radiologically), float intensities kept
    until matplotlib maps them through ``window``."""

    image: np.ndarray
    window: tuple[float, float]
    title: str
    contours: list[tuple[np.ndarray, str]] = field(default_factory=list)  # (mask [X, Y], colour)
    heat: np.ndarray | None = None  # [X, Y] map over the image, 0 .. heat_max, e.g. an uncertainty
    heat_max: float = 1.0
    spacing: tuple[float, float] = (1.0, 1.0)  # mm along X, Y


def tile_box(row: int, column: int) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) of tile (row, column) in a rendered montage."""
    left, top = column * TILE_PX, HEADER_PX + row * (TITLE_PX + TILE_PX) + TITLE_PX
    return left, top, left + TILE_PX, top + TILE_PX


def _draw_tile(figure, tile: Tile, box: tuple[int, int, int, int], size: tuple[int, int]) -> None:
    width, height = size
    left, top, right, bottom = box
    axes = figure.add_axes((left / width, 1 - bottom / height, TILE_PX / width, TILE_PX / height))
    axes.set_axis_off()
    image = radiological(tile.image)
    rows, columns = image.shape
    axes.imshow(image, cmap="gray", vmin=tile.window[0], vmax=tile.window[1])
    if tile.heat is not None:
        heat = radiological(tile.heat)
        shown = np.ma.masked_less_equal(heat, 0.02 * tile.heat_max)
        axes.imshow(shown, cmap=UNCERTAINTY_COLOURS, vmin=0.0, vmax=tile.heat_max, alpha=0.85)
    for mask, colour in tile.contours:
        shown = radiological(mask).astype(np.float32)
        if shown.any():
            axes.contour(shown, levels=[0.5], colors=[colour], linewidths=CONTOUR_WIDTH)
    axes.set_xlim(-0.5, columns - 0.5)
    axes.set_ylim(rows - 0.5, -0.5)
    axes.set_aspect(tile.spacing[1] / tile.spacing[0])  # a row is a step in Y, a column one in X
    figure.text(
        (left + TILE_PX / 2) / width,
        1 - (top - TITLE_PX / 2) / height,
        tile.title,
        color="white",
        fontsize=FONT_SIZE,
        ha="center",
        va="center",
    )


def render_montage(rows: list[list[Tile | None]], title: str, legend: dict[str, str]) -> np.ndarray:
    """The rows of tiles (None: an empty cell, to align columns) under a header with ``title``
    and the ``legend`` ({label: colour}) -> RGB pixels [H, W, 3]."""
    columns = max(len(row) for row in rows)
    size = (columns * TILE_PX, HEADER_PX + len(rows) * (TITLE_PX + TILE_PX))
    figure = new_figure(*size, facecolor="black")
    figure.text(4 / size[0], 1 - 4 / size[1], title, color="white", fontsize=FONT_SIZE + 1, ha="left", va="top")
    if legend:
        handles = [Line2D([], [], color=colour, linewidth=2) for colour in legend.values()]
        figure.legend(
            handles,
            list(legend),
            loc="lower left",
            bbox_to_anchor=(0, 1 - (HEADER_PX - 2) / size[1]),
            ncols=len(legend),
            frameon=False,
            labelcolor="white",
            fontsize=FONT_SIZE,
            borderaxespad=0,
            borderpad=0.2,
            handlelength=1.5,
        )
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            if tile is not None:
                _draw_tile(figure, tile, tile_box(r, c), size)
    return render(figure)


def spread_slices(count: int, masks: list[np.ndarray], fallback: tuple[int, int]) -> list[int]:
    """``count`` evenly spaced axial slices, ends included, over the z-range where any of
    ``masks`` [X, Y, Z] is drawn, or over ``fallback`` (first, last) when none is."""
    drawn = np.flatnonzero(np.any([m.any(axis=(0, 1)) for m in masks], axis=0))
    first, last = (int(drawn.min()), int(drawn.max())) if drawn.size else fallback
    return sorted({int(round(z)) for z in np.linspace(first, last, count)})


def volume_tiles(
    volume: Volume,
    window: tuple[float, float],
    slices: list[int],
    contours: list[tuple[np.ndarray, str]],
    prefix: str = "",
    heat: np.ndarray | None = None,
) -> list[Tile]:
    """Tiles of a volume's axial slices ``slices`` (RAS working order), titled with the slice
    number of the volume's own file (what a viewer shows); ``contours``: (mask [X, Y, Z],
    colour); ``heat``: a [X, Y, Z] map scaled to its maximum over these slices."""
    spacing = ras_spacing(volume)[:2]
    heat_max = max(float(heat[..., slices].max()), 1e-6) if heat is not None else 1.0
    return [  # copies: a kept tile holds one slice, not its whole volume
        Tile(
            np.ascontiguousarray(volume.data[..., z]),
            window,
            f"{prefix}z {volume.original_slice(z)}",
            [(np.ascontiguousarray(mask[..., z]), colour) for mask, colour in contours],
            None if heat is None else np.ascontiguousarray(heat[..., z]),
            heat_max,
            spacing,
        )
        for z in slices
    ]
