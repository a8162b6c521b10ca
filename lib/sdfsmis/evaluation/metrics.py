"""Per-volume scores (MONAI metrics, distances in mm) and their aggregation the way the protocol
reports them: class Dice = mean of per-volume Dice over the query volumes of a fold (never Dice
pooled over the voxels of all volumes, the released code's defect), then the mean over folds.
For a method with a per-slice confidence: how well its uncertainty ranks the slices' errors."""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import torch
from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric
from scipy.stats import spearmanr

from sdfsmis.metrics import dice

_HD95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
_ASSD = SurfaceDistanceMetric(include_background=True, symmetric=True, reduction="none")


def score_volume(prediction: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, float]:
    """3-D Dice, HD95 and ASSD (mm) of one binary prediction, and its volume over the true one
    (a method that paints far beyond the structure shows there first). A distance is NaN when the
    prediction is empty (it has no surface); the ratio is NaN when the truth is."""
    p = torch.from_numpy(np.ascontiguousarray(prediction, dtype=np.float32))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(truth, dtype=np.float32))[None, None]
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "prediction is all 0" -> NaN, recorded as such
        hd95 = float(_HD95(p, t, spacing=spacing)) if prediction.any() else float("nan")
        assd = float(_ASSD(p, t, spacing=spacing)) if prediction.any() else float("nan")
    true_voxels = int(np.count_nonzero(truth))
    ratio = np.count_nonzero(prediction) / true_voxels if true_voxels else float("nan")
    return {"dice": dice(prediction, truth), "hd95": hd95, "assd": assd, "volume_ratio": float(ratio)}


def _finite_mean(values: list[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _spearman(uncertainty: list[float], error: list[float]) -> dict:
    """Spearman's rank correlation (scipy), None where it is undefined (under 3 slices, or a
    constant side)."""
    rho, p_value = None, None
    if len(error) >= 3 and np.ptp(uncertainty) > 0 and np.ptp(error) > 0:
        result = spearmanr(uncertainty, error)
        rho, p_value = float(result.statistic), float(result.pvalue)
    return {"spearman": rho, "p_value": p_value, "slices": len(error)}


def uncertainty_correlation(records: list[dict]) -> dict | None:
    """Per class and over all classes: Spearman's rho between a slice's uncertainty (1 - its
    confidence) and its error (1 - its 2-D Dice), over the slices each record lists (realistic
    protocol: the segmented query slices; propagation: the non-annotated organ slices) of every
    query volume and fold; the same rho as between confidence and Dice. Slices where both the
    prediction and the truth are empty are left out (no Dice). Positive: the less confident slices
    are the worse ones. None for records without per-slice confidence."""
    pairs: dict = defaultdict(lambda: ([], []))
    for r in records:
        if r.get("failed") or r.get("slice_confidence") is None:
            continue
        for score, confidence in zip(r["slice_dice"], r["slice_confidence"]):
            if score is not None:
                for key in (r["organ"], None):
                    pairs[key][0].append(1.0 - confidence)
                    pairs[key][1].append(1.0 - score)
    if not pairs:
        return None
    classes = {organ: _spearman(*pair) for organ, pair in pairs.items() if organ is not None}
    return {"classes": classes, "all": _spearman(*pairs[None])}


#: The per-volume scores that are averaged per class and over classes.
SCORES = ("dice", "hd95", "assd", "volume_ratio")


def summarise(records: list[dict]) -> dict:
    """``records``: one dict per (method, fold, query volume, class) with ``dice``, ``hd95``,
    ``assd``, ``seconds`` and ``slices``. Returns, per method and class, the mean over folds of
    the per-fold mean over volumes, the per-fold values, and the mean over classes. A record with
    ``failed`` (the method raised on that volume and class) is counted in ``failed``, never scored.
    Records with per-slice confidence add ``uncertainty`` (:func:`uncertainty_correlation`)."""
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
                key: [_finite_mean([r.get(key, np.nan) for r in rows]) for _, rows in sorted(folds.items())]
                for key in SCORES
            }
            classes[organ] = {
                **{key: _finite_mean([v for v in values if v is not None]) for key, values in per_fold.items()},
                "dice_per_fold": per_fold["dice"],
                "volumes": sum(len(rows) for rows in folds.values()),
                "empty_predictions": sum(not np.isfinite(r["hd95"]) for rows in folds.values() for r in rows),
                "failed": failed[method][organ],
            }
        mean = {key: _finite_mean([c[key] for c in classes.values() if c[key] is not None]) for key in SCORES}
        seconds, slices = timing[method]
        summary[method] = {"classes": classes, "mean": mean, "seconds_per_slice": seconds / max(slices, 1)}
        correlation = uncertainty_correlation([r for r in records if r["method"] == method])
        if correlation is not None:
            summary[method]["uncertainty"] = correlation
    return summary


def margins_over(summary: dict, records: list[dict], baseline: str) -> None:
    """Each other method of ``summary`` against ``baseline`` (propagation: the nearest-slice
    copy), per class: ``margin`` = its class Dice minus the baseline's (both means over volumes,
    then folds), ``better`` = the query volumes where its Dice is higher, of ``volumes`` scored by
    both. Added in place as ``summary[method]["vs_" + baseline]``; nothing without the baseline."""
    if baseline not in summary:
        return
    dice: dict = defaultdict(dict)
    for r in records:
        if not r.get("failed"):
            dice[r["method"]][(r["fold"], r["case"], r["organ"])] = r["dice"]
    floor = summary[baseline]["classes"]
    for method, result in summary.items():
        if method == baseline:
            continue
        classes = {}
        for organ, found in result["classes"].items():
            if found["dice"] is None or floor.get(organ, {}).get("dice") is None:
                continue
            pairs = [(d, dice[baseline][k]) for k, d in dice[method].items() if k[2] == organ and k in dice[baseline]]
            classes[organ] = {
                "margin": found["dice"] - floor[organ]["dice"],
                "better": sum(mine > theirs for mine, theirs in pairs),
                "volumes": len(pairs),
            }
        mean = [c["margin"] for c in classes.values()]
        result[f"vs_{baseline}"] = {"classes": classes, "mean": float(np.mean(mean)) if mean else None}
