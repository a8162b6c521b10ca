"""Measurements of the annotation loop across patients (``sdfsmis evaluate-loop``), on a prepared
data set with ground truth:

- ``placement``: each query volume with another field of view (upper or lower end cropped, or the
  scan extended beyond the organs) against a full support patient; per rule (registration,
  relative position), the share of the true organ slices inside the range and the slices
  segmented needlessly;
- ``supports``: 3-D Dice of each query volume segmented from 1, 2 and 4 other patients at once
  (:meth:`~sdfsmis.pipeline.segmenter.VolumeSegmenter.segment_with`), and the rank correlation of the
  per-slice confidence with the per-slice Dice.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import stats

from sdfsmis.evaluation.dataset import PreparedDataset
from sdfsmis.io.volume import load_volume
from sdfsmis.metrics import dice
from sdfsmis.pipeline import placement
from sdfsmis.pipeline.segmenter import SupportVolume, VolumeSegmenter
from sdfsmis.settings import Settings

#: Fields of view of the query: (name, fraction cut from the upper end, from the lower end,
#: fraction of slices added below the lowest one).
FIELDS_OF_VIEW = (
    ("full", 0.0, 0.0, 0.0),
    ("upper 20 % cut", 0.2, 0.0, 0.0),
    ("upper 40 % cut", 0.4, 0.0, 0.0),
    ("lower 30 % cut", 0.0, 0.3, 0.0),
    ("extended 50 % below", 0.0, 0.0, 0.5),
)
SUPPORT_COUNTS = (1, 2, 4)


def field_of_view(image: Path, label: Path, folder: Path, cut_top: float, cut_bottom: float, extend: float):
    """The volume (and label) as another scan would cover it, with its affine following: ends cut
    off, or slices added below that repeat the lowest body slice (no organ) with fresh noise."""
    source, truth = nib.load(image), nib.load(label)
    data, labels, affine = np.asarray(source.dataobj, dtype=np.float32), np.asarray(truth.dataobj), source.affine
    depth = data.shape[2]
    low, high = int(round(cut_bottom * depth)), depth - int(round(cut_top * depth))
    data, labels = data[..., low:high], labels[..., low:high]
    added = int(round(extend * depth))
    if added:
        rng = np.random.default_rng(0)
        below = np.repeat(data[..., :1], added, axis=2) + rng.normal(
            0, data[..., 0].std() * 0.05, data.shape[:2] + (added,)
        )
        data = np.concatenate([below.astype(np.float32), data], axis=2)
        labels = np.concatenate([np.zeros(labels.shape[:2] + (added,), labels.dtype), labels], axis=2)
    shift = affine.copy()
    shift[:3, 3] = affine[:3, :3] @ [0, 0, low - added] + affine[:3, 3]
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, shift), folder / "image.nii.gz")
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), shift), folder / "label.nii.gz")
    return load_volume(folder / "image.nii.gz"), load_volume(folder / "label.nii.gz", label=True)


def _organs(dataset: PreparedDataset) -> dict[str, int]:
    """The classes the data set is tested on: organ name -> label id."""
    return {dataset.organ(k): k for k in dataset.test_labels}


def _range_figures(place: placement.Placement, truth: np.ndarray) -> dict:
    inside = (truth >= place.first) & (truth <= place.last)
    segmented = place.last - place.first + 1
    return {
        "covered": float(inside.mean()) if truth.size else None,
        "needless": int(segmented - inside.sum()),
        "segmented": int(segmented),
        "rule": place.rule,
    }


def placement_study(dataset: PreparedDataset, config: Settings, work: Path, pairs: int) -> list[dict]:
    """Per (support, query, field of view, organ): both rules' ranges against the true organ slices."""
    cases, records = dataset.cases, []
    clip = config.inference.clip_percentiles
    for i in range(min(pairs, len(cases))):
        support_case, query_case = cases[i], cases[(i + 1) % len(cases)]
        support, support_label = (
            load_volume(dataset.image(support_case)),
            load_volume(dataset.label(support_case), label=True),
        )
        support_intensity = support.intensity(clip)
        for name, top, bottom, extend in FIELDS_OF_VIEW:
            query, query_label = field_of_view(
                dataset.image(query_case),
                dataset.label(query_case),
                work / f"{query_case}-{i}-{name}",
                top,
                bottom,
                extend,
            )
            started = time.perf_counter()
            registration = placement.register_volumes(support, support_intensity, query, query.intensity(clip))
            seconds = time.perf_counter() - started
            depth = query.data.shape[2]
            for organ, label_id in _organs(dataset).items():
                drawn = support_label.data == label_id
                annotated = np.flatnonzero(drawn.any(axis=(0, 1)))
                if annotated.size == 0:
                    continue
                truth = np.flatnonzero((query_label.data == label_id).any(axis=(0, 1)))
                rules = {
                    "registration": placement.registered_position(
                        registration, annotated, drawn, depth, config.inference
                    ),
                    "relative": placement.relative_position(annotated, support.data.shape[2], depth, config.inference),
                }
                for rule, place in rules.items():
                    records.append(
                        {
                            "support": support_case, "query": query_case, "field_of_view": name, "organ": organ,
                            "method": rule, "organ_slices": int(truth.size), "registration_seconds": round(seconds, 3),
                            **_range_figures(place, truth),
                        }
                    )  # fmt: skip
    return records


def support_count_study(
    dataset: PreparedDataset, segmenters: dict[str, VolumeSegmenter], queries: list[str]
) -> list[dict]:
    """Per (method, query, support count, organ): 3-D Dice from that many other patients (the
    cases after the query, in order), with the per-slice confidence and Dice of the segmented
    slices."""
    cases, records, organs = dataset.cases, [], _organs(dataset)
    for query_case in queries:
        q = cases.index(query_case)
        query = load_volume(dataset.image(query_case))
        truth = load_volume(dataset.label(query_case), label=True).data
        others = [cases[(q + 1 + k) % len(cases)] for k in range(max(SUPPORT_COUNTS))]
        volumes = [
            SupportVolume(load_volume(dataset.image(c)), load_volume(dataset.label(c), label=True), c) for c in others
        ]
        for method, segmenter in segmenters.items():
            for count in SUPPORT_COUNTS:
                result = segmenter.segment_with(volumes[:count], query, list(organs.values()))
                for organ, label_id in organs.items():
                    report = result.reports[label_id]
                    target = truth == label_id
                    found = result.labels == label_id
                    slice_dice = [dice(found[..., z], target[..., z]) for z in report.query_slices]
                    records.append(
                        {
                            "method": method, "query": query_case, "supports": count, "organ": organ,
                            "dice": dice(found, target), "slice_dice": slice_dice,
                            "slice_confidence": report.confidence, "seconds": round(result.seconds, 3),
                        }
                    )  # fmt: skip
    return records


def summarise_placement(records: list[dict]) -> str:
    lines = [
        "| Field of view | Rule | Organ slices inside the range | Slices segmented needlessly (mean per organ) "
        "| Ranges that miss part of the organ |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, *_ in FIELDS_OF_VIEW:
        for rule in ("registration", "relative"):
            rows = [
                r for r in records if r["field_of_view"] == name and r["method"] == rule and r["covered"] is not None
            ]
            if rows:
                covered = np.mean([r["covered"] for r in rows])
                needless = np.mean([r["needless"] for r in rows])
                missing = sum(r["covered"] < 1.0 for r in rows)
                lines.append(f"| {name} | {rule} | {100 * covered:.1f} % | {needless:.1f} | {missing} of {len(rows)} |")
    fallbacks = sorted({r["rule"] for r in records if r["rule"].startswith("all slices")})
    seconds = [r["registration_seconds"] for r in records if r["method"] == "registration"]
    lines += [
        "",
        f"Registration: {np.mean(seconds):.2f} s per pair (mean). Fallbacks: {', '.join(fallbacks) or 'none'}.",
    ]
    return "\n".join(lines)


def summarise_supports(records: list[dict]) -> str:
    organs = sorted({r["organ"] for r in records})
    lines = [
        "| Method | Support patients | "
        + " | ".join(o.replace("_", " ") for o in organs)
        + " | Mean | Spearman (confidence, slice Dice) |",
        "| --- | ---: | " + " | ".join("---:" for _ in organs) + " | ---: | ---: |",
    ]
    for method in dict.fromkeys(r["method"] for r in records):
        for count in SUPPORT_COUNTS:
            rows = [r for r in records if r["method"] == method and r["supports"] == count]
            dice = [100 * np.mean([r["dice"] for r in rows if r["organ"] == o]) for o in organs]
            pairs = [
                (c, d) for r in rows if r["slice_confidence"] for c, d in zip(r["slice_confidence"], r["slice_dice"])
            ]
            rho = f"{stats.spearmanr(*zip(*pairs)).statistic:.2f} ({len(pairs)} slices)" if len(pairs) > 2 else "n/a"
            lines.append(
                f"| {method} | {count} | "
                + " | ".join(f"{d:.2f}" for d in dice)
                + f" | **{np.mean(dice):.2f}** | {rho} |"
            )
    return "\n".join(lines)


def run(
    dataset: PreparedDataset,
    segmenters: dict[str, VolumeSegmenter],
    config: Settings,
    output: Path,
    pairs: int,
    queries: list[str],
) -> str:
    """Both studies (``pairs`` 0 or no ``queries`` skips one); writes ``loop.json`` and ``loop.md``
    under ``output`` and returns the tables."""
    if queries and len(dataset.cases) <= max(SUPPORT_COUNTS):  # the cases after a query would wrap round to it
        raise ValueError(
            f"the support-count study segments each query from {max(SUPPORT_COUNTS)} other patients: it needs at "
            f"least {max(SUPPORT_COUNTS) + 1} volumes, {dataset.name} has {len(dataset.cases)} (--queries 0 skips it)"
        )
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    placements = placement_study(dataset, config, output / "fields_of_view", pairs)
    counts = support_count_study(dataset, segmenters, queries)
    seconds = time.perf_counter() - started
    title = f"{dataset.name} ({dataset.modality}, {len(dataset.cases)} volumes)"
    tables = ""
    if placements:
        tables += (
            f"### {title}: the organ's range in a query with another field of view ({pairs} support/query pairs)\n\n"
            f"{summarise_placement(placements)}\n\n"
        )
    if counts:
        tables += (
            f"### {title}: Dice (%) from 1, 2 and 4 support patients (query volumes {', '.join(queries)})\n\n"
            f"{summarise_supports(counts)}\n"
        )
    inference = dataclasses.asdict(config.inference)
    (output / "loop.json").write_text(
        json.dumps({"inference": inference, "seconds": seconds, "placement": placements, "supports": counts}, indent=1)
    )
    (output / "loop.md").write_text(tables)
    return tables
