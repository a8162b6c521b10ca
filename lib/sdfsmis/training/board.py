"""Training you can watch: TensorBoard events beside ``train_log.jsonl`` (``tensorboard --logdir
OUTPUT``), and the validation montage of a few episodes, also kept as a PNG for the app."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdfsmis.figures.canvas import save_png
from sdfsmis.figures.display import PREDICTION, REFERENCE
from sdfsmis.figures.montage import Tile, render_montage
from sdfsmis.training.episodes import Episode

VALIDATION_MONTAGE = "validation_montage.png"
#: Episodes shown per validation round: enough to see a pattern, few enough to stay legible.
MONTAGE_EPISODES = 4
#: Model slices are normalised to [-1, 1] before they reach the model.
MODEL_WINDOW = (-1.0, 1.0)
SOURCES = {"supervoxel": "pseudo-label", "ground_truth": "ground truth"}


def episode_montage(shown: list[tuple[Episode, torch.Tensor, float]], title: str) -> np.ndarray:
    """One row per (episode, predicted mask [1, 1, R, R], Dice): support with its mask, the
    query, the query with its pseudo-label, the query with the prediction."""
    rows = []
    for number, (episode, predicted, score) in enumerate(shown):
        support, support_mask = episode.support_image[0, 0].numpy(), episode.support_mask[0, 0].numpy() > 0.5
        query, label = episode.query_image[0, 0].numpy(), episode.query_mask[0, 0].numpy() > 0.5
        mask = predicted[0, 0].numpy() > 0.5
        rows.append(
            [
                Tile(support, MODEL_WINDOW, f"episode {number}: support", [(support_mask, REFERENCE)]),
                Tile(query, MODEL_WINDOW, "query"),
                Tile(query, MODEL_WINDOW, SOURCES.get(episode.source, episode.source), [(label, REFERENCE)]),
                Tile(query, MODEL_WINDOW, f"prediction (Dice {score:.2f})", [(mask, PREDICTION)]),
            ]
        )
    return render_montage(rows, title, {"support mask / pseudo-label": REFERENCE, "prediction": PREDICTION})


class TrainingBoard:
    """TensorBoard events of one training run (rank 0 only): loss terms, speed and learning
    rates per logging step; validation Dice and the episode montage per validation round."""

    def __init__(self, output: Path, method: str, purge_from: int | None = None):
        """``purge_from``: on resume, the first step after the checkpoint; the events a killed
        run wrote from there on are hidden, as its steps are redone."""
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.output, self.method = output, method
        self.writer = SummaryWriter(log_dir=str(output), purge_step=purge_from)

    def step(self, iteration: int, terms: dict[str, float], rate: float, optimizer: torch.optim.Optimizer) -> None:
        for name, value in terms.items():
            self.writer.add_scalar(f"loss/{name}", value, iteration)
        self.writer.add_scalar("train/it_per_s", rate, iteration)
        for index, group in enumerate(optimizer.param_groups):
            self.writer.add_scalar(f"lr/group{index}", group["lr"], iteration)

    def validation(self, iteration: int, scores: dict[str, float], shown: list) -> Path:
        """Scores ({val_dice, val_dice_gt, best_dice}) and the montage of the ``shown`` episodes
        (see :func:`episode_montage`); returns the path of the montage's PNG."""
        for name, value in scores.items():
            self.writer.add_scalar(f"validation/{name}", value, iteration)
        montage = episode_montage(shown, f"{self.method} validation episodes, iteration {iteration}")
        self.writer.add_image("validation/episodes", montage, iteration, dataformats="HWC")
        self.writer.flush()
        return save_png(montage, self.output / VALIDATION_MONTAGE)

    def close(self) -> None:
        self.writer.close()
