"""``sdfsmis infer --preview``: what was segmented, at a glance, without opening a viewer: per
label the support slices with their mask, then evenly spaced query slices with the prediction,
and where the method gives one (DPL) a row of its uncertainty on the same slices."""

from __future__ import annotations

from pathlib import Path

from sdfsmis.figures.canvas import save_png
from sdfsmis.figures.display import PREDICTION, REFERENCE, display_window
from sdfsmis.figures.montage import Tile, render_montage, spread_slices, volume_tiles
from sdfsmis.io.volume import Volume
from sdfsmis.pipeline.segmenter import SegmentationResult

PREVIEW_SLICES = 6


def write_preview(
    path: str | Path,
    support_image: Volume,
    support_label: Volume,
    query: Volume,
    result: SegmentationResult,
    title: str,
) -> Path:
    """The preview montage of ``result`` (``query`` segmented from the support) as PNG."""
    support_window, query_window = display_window(support_image.data), display_window(query.data)
    rows: list[list[Tile | None]] = []
    uncertainty = result.uncertainty  # built once: every label's rows show it
    for label_id, report in result.reports.items():
        predicted = result.labels == label_id
        slices = spread_slices(PREVIEW_SLICES, [predicted], (min(report.query_slices), max(report.query_slices)))
        support = volume_tiles(
            support_image,
            support_window,
            report.support_slices,
            [(support_label.data == label_id, REFERENCE)],
            f"label {label_id}: support ",
        )
        rows.append(support + volume_tiles(query, query_window, slices, [(predicted, PREDICTION)]))
        if uncertainty is not None:
            uncertain = volume_tiles(query, query_window, slices, [(predicted, PREDICTION)], heat=uncertainty)
            uncertain[0].title = f"uncertainty (max {uncertain[0].heat_max:.3f}) {uncertain[0].title}"
            rows.append([None] * len(support) + uncertain)
    legend = {"support mask": REFERENCE, "prediction": PREDICTION}
    return save_png(render_montage(rows, title, legend), path)
