"""The three outputs of an evaluation: ``results.json`` (run settings, folds, summary and every
per-volume figure), ``per_volume.csv`` (the same figures, one row per query volume and class) and
``table.md`` (laid out like the paper's Table 1: methods x organs + mean, Dice %; under the
propagation protocol a second table gives each method's margin over the nearest-slice copy)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

#: Column order of the lineage's tables (ADNet / RPT / SD-FSMIS): kidneys, spleen, liver.
ORGAN_ORDER = ("left_kidney", "right_kidney", "spleen", "liver")
CSV_FIELDS = (
    "method", "fold", "support", "case", "label", "organ", "dice", "hd95", "assd", "volume_ratio", "slices",
    "seconds", "seconds_per_slice", "failed",
)  # fmt: skip


def organ_order(summary: dict) -> list[str]:
    """The classes of ``summary`` in the tables' column order."""
    present = {organ for m in summary.values() for organ in m["classes"]}
    return [o for o in ORGAN_ORDER if o in present] + sorted(present - set(ORGAN_ORDER))


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


#: Propagation: what the table scores, and the baseline every method is compared with.
PROPAGATION_SCOPE = (
    "Propagation: in each volume, a few slices of the organ are annotated from ground truth and the rest of the "
    "same volume is segmented; scores over the volume without the annotated slices."
)
FLOOR = "nearest-slice"
SLICES = {
    "propagation": "the non-annotated organ slices",
    None: "the segmented query slices (both empty left out)",
}


def markdown_table(summary: dict, titles: dict[str, str], heading: str, protocol: str | None = None) -> str:
    organs = organ_order(summary)
    names = [o.replace("_", " ").capitalize() for o in organs]
    lines = [
        f"### {heading}",
        "",
        *([PROPAGATION_SCOPE] if protocol == "propagation" else []),
        "Dice (%): mean over query volumes of the per-volume 3-D Dice, then mean over folds. "
        "HD95 / ASSD (mm): mean over organs. s / slice: method time per query slice.",
        "",
        "| Method | " + " | ".join(names) + " | Mean | HD95 (mm) | ASSD (mm) | s / slice |",
        "| --- | " + " | ".join("---:" for _ in range(len(names) + 4)) + " |",
    ]
    notes = []
    for key, result in summary.items():
        dice = [_fmt(result["classes"].get(o, {}).get("dice"), 100) for o in organs]
        mean = result["mean"]
        lines.append(
            f"| {titles[key]} | "
            + " | ".join(dice)
            + f" | **{_fmt(mean['dice'], 100)}** | {_fmt(mean['hd95'])} | {_fmt(mean['assd'])} | "
            + f"{result['seconds_per_slice']:.3f} |"
        )
        empty = sum(c["empty_predictions"] for c in result["classes"].values())
        if empty:
            total = sum(c["volumes"] for c in result["classes"].values())
            notes.append(f"{titles[key]}: {empty} of {total} predictions empty (no HD95/ASSD; Dice 0 counted).")
        failed = {organ: c["failed"] for organ, c in result["classes"].items() if c.get("failed")}
        if failed:
            where = ", ".join(f"{n} {organ}" for organ, n in failed.items())
            notes.append(f"{titles[key]}: FAILED on {where} (not scored; reasons in results.json / per_volume.csv).")
        if result.get("uncertainty"):
            notes.append(f"{titles[key]}: {uncertainty_line(result['uncertainty'], organs, SLICES.get(protocol))}")
        elif protocol == "propagation" and key != FLOOR:
            notes.append(f"{titles[key]}: no per-slice confidence, no rank check.")
    lines += [""] + [f"- {n}" for n in notes] if notes else []
    lines += ["", *volume_ratio_table(summary, titles, organs)]
    if any(f"vs_{FLOOR}" in r for r in summary.values()):
        lines += ["", *margin_table(summary, titles, organs)]
    return "\n".join(lines) + "\n"


def volume_ratio_table(summary: dict, titles: dict[str, str], organs: list[str]) -> list[str]:
    """Predicted volume over true volume per class (1: the right amount; 40: painted far beyond)."""
    names = [o.replace("_", " ").capitalize() for o in organs]
    lines = [
        "Predicted volume / true volume (mean over query volumes, then folds; 1 is the right amount).",
        "",
        "| Method | " + " | ".join(names) + " | Range |",
        "| --- | " + " | ".join("---:" for _ in range(len(names) + 1)) + " |",
    ]
    for key, result in summary.items():
        ratios = [result["classes"].get(o, {}).get("volume_ratio") for o in organs]
        known = [r for r in ratios if r is not None]
        span = f"{min(known):.2f}-{max(known):.2f}" if known else "n/a"
        lines.append(f"| {titles[key]} | " + " | ".join(_fmt(r) for r in ratios) + f" | {span} |")
    return lines


def margin_table(summary: dict, titles: dict[str, str], organs: list[str]) -> list[str]:
    """Each method's class Dice minus the nearest-slice copy's, in points, with the query volumes
    where it beats the copy."""
    names = [o.replace("_", " ").capitalize() for o in organs]
    lines = [
        f"Versus {titles.get(FLOOR, FLOOR)}: class Dice minus the copy's, in Dice points (negative: the copy is "
        "better); in brackets, the query volumes where the method's Dice is higher, of those both scored.",
        "",
        "| Method | " + " | ".join(names) + " | Mean |",
        "| --- | " + " | ".join("---:" for _ in range(len(names) + 1)) + " |",
    ]
    for key, result in summary.items():
        versus = result.get(f"vs_{FLOOR}")
        if versus is None:
            continue
        cells = []
        for organ in organs:
            c = versus["classes"].get(organ)
            cells.append("n/a" if c is None else f"{c['margin'] * 100:+.2f} ({c['better']}/{c['volumes']})")
        mean = "n/a" if versus["mean"] is None else f"**{versus['mean'] * 100:+.2f}**"
        lines.append(f"| {titles[key]} | " + " | ".join(cells) + f" | {mean} |")
    return lines


def uncertainty_line(correlation: dict, organs: list[str], slices: str | None = None) -> str:
    """The uncertainty check in words: Spearman's rho per class and over all classes."""
    parts = [
        f"{organ.replace('_', ' ')} {_fmt(correlation['classes'][organ]['spearman'])}"
        for organ in organs
        if organ in correlation["classes"]
    ]
    everything = correlation["all"]
    return (
        "uncertainty (1 - slice confidence) vs slice error (1 - 2-D Dice), Spearman rho over "
        f"{slices or SLICES[None]}: {', '.join(parts)}; all classes {_fmt(everything['spearman'])} "
        f"({everything['slices']} slices)."
    )


def write_reports(
    output: Path, run: dict, folds: list[dict], summary: dict, records: list[dict], heading: str, protocol=None
):
    output.mkdir(parents=True, exist_ok=True)
    titles = {r["method"]: r["title"] for r in records}
    (output / "results.json").write_text(
        json.dumps({"run": run, "folds": folds, "summary": summary, "volumes": records}, indent=2, default=str) + "\n"
    )
    with open(output / "per_volume.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    table = markdown_table(summary, titles, heading, protocol)
    (output / "table.md").write_text(table)
    return table
