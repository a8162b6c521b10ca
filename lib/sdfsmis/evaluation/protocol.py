"""The evaluation protocol's mechanics (protocol.md "Evaluation", RPT "EP1"): folds over volumes,
the support volume of a fold, support slices at 1/6, 1/2, 5/6 of the organ, query chunks, and
the training set of a fold for Setting 1 / 2."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdfsmis.evaluation.dataset import PreparedDataset

SHOTS = 3  # EP1: three support slices, one per query chunk


@dataclass(frozen=True)
class Fold:
    index: int
    cases: list[str]  # the test volumes of this fold
    support: str  # the support volume, removed from the queries

    @property
    def queries(self) -> list[str]:
        return [c for c in self.cases if c != self.support]


def make_folds(cases: list[str], folds: int, support_index: int = 0, least: int = 2) -> list[Fold]:
    """Contiguous folds over the sorted case list (fold k: cases[k n / F : (k + 1) n / F]); the
    support volume is the ``support_index``-th case of each fold. A fold needs ``least`` volumes:
    2 (a support and a query), 1 where each volume is its own support (propagation)."""
    cases = sorted(cases)
    if folds < 1 or len(cases) < least * folds:
        what = "a support and a query" if least > 1 else "a volume"
        raise ValueError(f"{len(cases)} volumes cannot make {folds} folds of at least {least} ({what})")
    split = [cases[k * len(cases) // folds : (k + 1) * len(cases) // folds] for k in range(folds)]
    return [Fold(k, part, part[min(support_index, len(part) - 1)]) for k, part in enumerate(split)]


def organ_slices(label: np.ndarray, label_id: int) -> np.ndarray:
    """Axial slices ([X, Y, Z] array) that contain the organ, judged on ground truth."""
    return np.flatnonzero((label == label_id).any(axis=(0, 1)))


def support_slices(label: np.ndarray, label_id: int, shots: int = SHOTS) -> list[int]:
    """The support volume's organ slices at fractions 1/6, 1/2, 5/6 (``int(p * C)`` of the C
    organ slices, the lineage's ``get_support_index``). Unlike the product's
    :func:`sdfsmis.pipeline.segmenter.choose_support_slices`, repeats are kept when the organ spans few
    slices, so that there are always ``shots`` chunks, as in EP1."""
    organ = organ_slices(label, label_id)
    if organ.size == 0:
        return []
    fractions = np.array([(2 * i + 1) / (2 * shots) for i in range(shots)])
    return [int(z) for z in organ[(fractions * organ.size).astype(int)]]


def annotated_slices(label: np.ndarray, label_id: int, count: int = SHOTS) -> list[int]:
    """Same-volume propagation: the organ slices a user is taken to have drawn, spread like EP1's
    supports at (2i + 1) / (2 count) of the C organ slices (``int(p * C)``), without repeats. When
    the organ spans ``count`` slices or fewer, every one of them is annotated."""
    return sorted(set(support_slices(label, label_id, count)))


def chunk_index(count: int, parts: int) -> np.ndarray:
    """For ``count`` query organ slices, the support index (chunk) of each: the slices are split
    into ``parts`` equal chunks at ``linspace(0, count, parts + 1).astype(int)``, as EP1 does."""
    bounds = np.linspace(0, count, parts + 1).astype(int)
    index = np.zeros(count, dtype=np.int64)
    for part in range(parts):
        index[bounds[part] : bounds[part + 1]] = part
    return index


def fold_training_images(dataset: PreparedDataset, fold: int, folds: int) -> list[Path]:
    """The training volumes of fold ``fold``: every case that is not in its test set."""
    split = make_folds(dataset.cases, folds)
    if not 0 <= fold < folds:
        raise ValueError(f"--fold {fold} is outside 0..{folds - 1}")
    test = set(split[fold].cases)
    return [dataset.image(c) for c in dataset.cases if c not in test]


def training_selection(
    images: str | Path, fold: int | None, folds: int, setting: int | None, exclude: list[int]
) -> tuple[list[Path], list[int]]:
    """``sdfsmis train`` images and Setting-2 classes. Without ``fold``/``setting``: the images
    as given. With them, ``images`` is a prepared data set: fold K's training volumes (all cases
    outside its test set) and, for Setting 2, its test classes (unless ``exclude`` names them)."""
    from sdfsmis.training.trainer import find_images

    if fold is None and setting is None:
        return find_images(images), exclude
    if setting == 1 and exclude:
        raise ValueError("Setting 1 keeps every slice: drop --exclude, or use --setting 2")
    dataset = PreparedDataset.load(images)
    selected = (
        fold_training_images(dataset, fold, folds) if fold is not None else [dataset.image(c) for c in dataset.cases]
    )
    if setting == 2:
        exclude = exclude or list(dataset.test_labels)
    return selected, exclude
