"""Per-volume scores (MONAI metrics, distances in mm) and their aggregation the way the protocol
reports them: class Dice = mean of per-volume Dice over the query volumes of a fold (never Dice
pooled over the voxels of all volumes, the released code's defect), then the mean over folds."""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric

_DICE = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
_HD95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
_ASSD = SurfaceDistanceMetric(include_background=True, symmetric=True, reduction="none")


def score_volume(prediction: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, float]:
    """3-D Dice, HD95 and ASSD (mm) of one binary prediction. A distance is NaN when the
    prediction is empty (it has no surface)."""
    p = torch.from_numpy(np.ascontiguousarray(prediction, dtype=np.float32))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(truth, dtype=np.float32))[None, None]
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "prediction is all 0" -> NaN, recorded as such
        hd95 = float(_HD95(p, t, spacing=spacing)) if prediction.any() else float("nan")
        assd = float(_ASSD(p, t, spacing=spacing)) if prediction.any() else float("nan")
    return {"dice": float(_DICE(p, t)), "hd95": hd95, "assd": assd}


def _finite_mean(values: list[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def summarise(records: list[dict]) -> dict:
    """``records``: one dict per (method, fold, query volume, class) with ``dice``, ``hd95``,
    ``assd``, ``seconds`` and ``slices``. Returns, per method and class, the mean over folds of
    the per-fold mean over volumes, the per-fold values, and the mean over classes. A record with
    ``failed`` (the method raised on that volume and class) is counted in ``failed``, never scored."""
    grouped: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    timing: dict = defaultdict(lambda: [0.0, 0])
    failed: dict = defaultdict(lambda: defaultdict(int))
    for r in records:
        if r.get("failed"):
            failed[r["method"]][r["organ"]] += 1
            grouped[r["method"]][r["organ"]]  # the class is listed even when every volume failed
            continue
        grouped[r["method"]][r["organ"]][r["fold"]].append(r)
        timing[r["method"]][0] += r["seconds"]
        timing[r["method"]][1] += r["slices"]
    summary = {}
    for method, organs in grouped.items():
        classes = {}
        for organ, folds in organs.items():
            per_fold = {
                key: [_finite_mean([r[key] for r in rows]) for _, rows in sorted(folds.items())]
                for key in ("dice", "hd95", "assd")
            }
            classes[organ] = {
                **{key: _finite_mean([v for v in values if v is not None]) for key, values in per_fold.items()},
                "dice_per_fold": per_fold["dice"],
                "volumes": sum(len(rows) for rows in folds.values()),
                "empty_predictions": sum(not np.isfinite(r["hd95"]) for rows in folds.values() for r in rows),
                "failed": failed[method][organ],
            }
        mean = {
            key: _finite_mean([c[key] for c in classes.values() if c[key] is not None])
            for key in ("dice", "hd95", "assd")
        }
        seconds, slices = timing[method]
        summary[method] = {"classes": classes, "mean": mean, "seconds_per_slice": seconds / max(slices, 1)}
    return summary
