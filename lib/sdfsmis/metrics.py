"""The overlap measure every part scores with (training validation, the evaluation harness, the
scripts), so that all of them agree, also where nothing was there to find."""

from __future__ import annotations

from typing import Any


def dice(prediction: Any, truth: Any, empty: float | None = 1.0) -> float | None:
    """Dice of two binary masks of the same shape (numpy arrays or torch tensors). Where both are
    empty the two agree perfectly: ``empty`` (1.0), or None to leave such a case out of a mean."""
    prediction, truth = prediction != 0, truth != 0
    total = float(prediction.sum()) + float(truth.sum())
    if total == 0:
        return empty
    return 2.0 * float((prediction & truth).sum()) / total
