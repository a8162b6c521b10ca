"""Training curves from ``train_log.jsonl``, as one PNG, for people without TensorBoard: every
loss term the method logs, validation Dice, and speed."""

from __future__ import annotations

import json
from pathlib import Path

from sdfsmis.figures.canvas import new_figure, save_png

CURVES_NAME = "training_curves.png"
CURVES_PX = (1000, 800)
#: What a step record of the training log holds besides its loss terms.
NOT_LOSSES = ("iteration", "it_per_s")
FEW = 30
VALIDATION = {"val_dice": "validation Dice (pseudo-labels)", "val_dice_gt": "validation Dice (ground truth)"}


def _latest_per_iteration(records: list[dict], key: str) -> dict[int, dict]:
    """The records carrying ``key``, the last one per iteration (a resumed run logs again from
    its checkpoint)."""
    return {r["iteration"]: r for r in records if key in r}


def plot_training_curves(folder: str | Path, output: str | Path | None = None) -> Path:
    """``folder/train_log.jsonl`` -> ``output`` (default ``folder/training_curves.png``)."""
    folder = Path(folder)
    log = folder / "train_log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{log} not found: is {folder} a training output folder?")
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps = _latest_per_iteration(records, "loss")
    validation = _latest_per_iteration(records, "val_dice")
    if not steps:
        raise ValueError(f"{log} holds no training step yet")
    figure = new_figure(*CURVES_PX)
    iterations = sorted(steps)
    marker = "." if len(iterations) < FEW else None  # a short run's few points stay visible
    terms = [k for k in steps[iterations[-1]] if k not in NOT_LOSSES]
    grid = figure.add_gridspec(3, len(terms), height_ratios=(2, 2, 1))
    # one panel per loss term: each has its own scale (DPL's threshold term is ~-10, its others ~1)
    panels = [figure.add_subplot(grid[0, i]) for i in range(len(terms))]
    for axes, term in zip(panels, terms):
        axes.plot(
            iterations, [steps[i].get(term) for i in iterations], marker=marker, linewidth=1.5 if term == "loss" else 1
        )
        axes.set_title(term, fontsize=9)
        axes.tick_params(labelsize=7)
    panels[0].set_ylabel("loss")
    figure.suptitle(f"{folder.name}: {iterations[-1]} iterations", fontsize=10)
    dice = figure.add_subplot(grid[1, :])
    checked = sorted(validation)
    for key, label in VALIDATION.items():
        shown = [i for i in checked if key in validation[i]]
        if shown:
            dice.plot(shown, [validation[i][key] for i in shown], marker="o", label=label)
    dice.set_ylim(0, 1)
    dice.set_ylabel("Dice")
    if checked:
        dice.legend(loc="lower right", fontsize=8)
    speed = figure.add_subplot(grid[2, :], sharex=dice)
    speed.plot(iterations, [steps[i]["it_per_s"] for i in iterations], color="grey", marker=marker)
    speed.set_ylabel("it / s")
    speed.set_xlabel("iteration")
    for axes in (*panels, dice, speed):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return save_png(figure, Path(output) if output else folder / CURVES_NAME)
