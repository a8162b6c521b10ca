"""The spread behind a table's means: Dice per query volume, one box per class and method, with
the volumes themselves as dots (a fold of a few volumes makes a box alone misleading)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.patches import Patch

from sdfsmis.figures.canvas import new_figure, save_png

BOXPLOT_PX = (1000, 500)


def dice_boxplot(records: list[dict], organs: list[str], path: str | Path) -> Path:
    """``records``: the evaluation's per-volume records (``method``, ``title``, ``organ``,
    ``dice``; failed ones are left out, as in the table); ``organs``: the table's column order."""
    scored = [r for r in records if not r.get("failed")]
    methods = list(dict.fromkeys(r["method"] for r in scored))
    titles = {r["method"]: r["title"] for r in scored}
    colours = colormaps["tab10"]
    width = 0.8 / max(len(methods), 1)
    figure = new_figure(*BOXPLOT_PX)
    axes = figure.add_subplot()
    for m, method in enumerate(methods):
        offset = (m - (len(methods) - 1) / 2) * width
        for o, organ in enumerate(organs):
            dice = [100 * r["dice"] for r in scored if r["method"] == method and r["organ"] == organ]
            if not dice:
                continue
            boxes = axes.boxplot(
                [dice],
                positions=[o + offset],
                widths=0.85 * width,
                patch_artist=True,
                manage_ticks=False,
                showfliers=False,  # every volume is a dot below
                medianprops={"color": "black"},
            )
            boxes["boxes"][0].set_facecolor(colours(m % 10))
            spread = np.linspace(-0.25, 0.25, len(dice)) * width if len(dice) > 1 else np.zeros(1)
            axes.scatter(o + offset + spread, dice, s=8, color="black", alpha=0.6, zorder=3)
    axes.set_xticks(range(len(organs)), [o.replace("_", " ").capitalize() for o in organs])
    axes.set_xlim(-0.5, len(organs) - 0.5)
    axes.set_ylim(-2, 102)  # a Dice of 0 or 100 stays visible
    axes.set_ylabel("Dice (%) per query volume")
    axes.grid(axis="y", alpha=0.3)
    handles = [Patch(facecolor=colours(m % 10), label=titles[method]) for m, method in enumerate(methods)]
    axes.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=2, fontsize=8, frameon=False)
    figure.tight_layout()
    return save_png(figure, path)
