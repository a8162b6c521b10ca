"""The pictures of ``sdfsmis evaluate``, beside its numbers: per query volume a montage (each
class a row: the support slices with their mask, then evenly spaced query slices with ground
truth and prediction), a Dice box plot per class and method, and ``report.html`` with the table
and every figure. Montages are kept for a bounded number of query volumes of the first fold."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdfsmis.figures.boxplot import dice_boxplot
from sdfsmis.figures.canvas import save_png
from sdfsmis.figures.display import PREDICTION, REFERENCE, display_window
from sdfsmis.figures.montage import Tile, render_montage, spread_slices, volume_tiles
from sdfsmis.figures.report import write_html_report

MONTAGES = "montages"
BOXPLOT_NAME = "boxplot.png"
MONTAGE_SLICES = 6
LEGEND = {"ground truth / support mask": REFERENCE, "prediction": PREDICTION}


class MontageCollector:
    """The evaluator's ``on_prediction`` hook: keeps, for the first fold it sees and its first
    ``limit`` query volumes, one row of tiles per (method, volume, class), 2-D copies only; then
    :meth:`write` draws one montage per (method, volume) in ``folder/METHOD/CASE.png``."""

    def __init__(self, folder: Path, limit: int, window: tuple[float, float] | None = None):
        self.folder, self.limit, self.window = folder, limit, window  # window: CT's, in HU
        self.fold: int | None = None
        self.cases: list[str] = []
        self.rows: dict[tuple[str, str], list[list[Tile]]] = {}
        self.titles: dict[tuple[str, str], str] = {}

    def __call__(self, record: dict, support, query, prediction: np.ndarray) -> None:
        """``support``/``query``: the evaluation's cases (image and label volumes); ``support``
        None under the propagation protocol, whose supports are the query's own annotated slices."""
        self.fold = record["fold"] if self.fold is None else self.fold
        if record["fold"] != self.fold or (query.name not in self.cases and len(self.cases) >= self.limit):
            return
        if query.name not in self.cases:
            self.cases.append(query.name)
        support = support or query
        label = record["label"]
        truth = query.label.data == label
        support_z = sorted(set(record.get("support_slices") or record.get("annotated_slices") or []))
        slices = spread_slices(MONTAGE_SLICES, [truth, prediction], (0, truth.shape[2] - 1))
        row = volume_tiles(
            support.image,
            display_window(support.image.data, self.window),
            support_z,
            [(support.label.data == label, REFERENCE)],
            f"{record['organ'].replace('_', ' ')}: support ",
        )
        shown = volume_tiles(
            query.image,
            display_window(query.image.data, self.window),
            slices,
            [(truth, REFERENCE), (prediction, PREDICTION)],
        )
        shown[0].title = f"Dice {record['dice']:.2f}, {shown[0].title}"
        key = (record["method"], query.name)
        self.rows.setdefault(key, []).append(row + shown)
        self.titles[key] = f"{query.name}: {record['title']}, fold {record['fold']}, support {record['support']}"

    def write(self) -> list[Path]:
        return [
            save_png(render_montage(rows, self.titles[key], LEGEND), self.folder / key[0] / f"{key[1]}.png")
            for key, rows in self.rows.items()
        ]


def write_evaluation_figures(
    output: Path, records: list[dict], organs: list[str], heading: str, table: str
) -> tuple[Path, Path]:
    """``output/boxplot.png`` and ``output/report.html`` (the table, the box plot, every montage
    under ``output/montages``, also those of an earlier run of the same output that this one
    reused); returns their paths."""
    boxplot = dice_boxplot(records, organs, output / BOXPLOT_NAME)
    titles = {r["method"]: r["title"] for r in records}
    sections = [("Dice per query volume", [boxplot])] + [
        (f"{title}: ground truth and prediction", sorted((output / MONTAGES / method).glob("*.png")))
        for method, title in titles.items()
    ]
    files = [output / name for name in ("table.md", "results.json", "per_volume.csv")]
    return boxplot, write_html_report(output, heading, table, sections, files)
