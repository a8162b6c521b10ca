"""``sdfsmis evaluate``: run methods over the folds of a prepared data set under the paper's
protocol (RPT EP1) or the realistic one, and score every query volume.

- paper: the support volume's organ slices at 1/6, 1/2, 5/6 are the supports; the query volume's
  ground-truth organ slices are split into 3 chunks, chunk k segmented with support k; 3-D
  scores over those slices only. This gives the method the organ's z-range for free.
- realistic: the product path (:class:`sdfsmis.pipeline.segmenter.VolumeSegmenter`): the same supports,
  the whole query volume handed over, the method finds the organ's extent itself (z-range mapped
  from the support, absolute threshold, 3-D consistency); 3-D scores over the whole volume. For
  a method with a per-slice confidence (DPL), each segmented slice's Dice and confidence are
  kept too (``slice_dice``, ``slice_confidence``), for the uncertainty check.
- propagation: same-volume propagation, the annotation loop's first step. In every test volume of
  a fold, a few of each organ's slices are annotated from ground truth (``annotated_slices``, 3 by
  default, spread like EP1's supports at 1/6, 1/2, 5/6 of the organ slices) and the rest of THE
  SAME volume is segmented through the product path (``VolumeSegmenter.segment`` with the volume
  as its own support: every annotated slice a support, kept as drawn, nearest supports in z).
  3-D scores over the volume without the annotated slices (false positives anywhere count), and
  the 2-D Dice (and confidence, where the method gives one) of each non-annotated organ slice.
  The floor is the nearest-slice copy (:mod:`.nearest_slice`), which only this protocol runs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from sdfsmis.config import InferenceConfig
from sdfsmis.evaluation.dataset import PreparedDataset
from sdfsmis.evaluation.interpolation import SliceInterpolation
from sdfsmis.evaluation.methods import PROPAGATION_ONLY, Method
from sdfsmis.evaluation.metrics import score_volume
from sdfsmis.evaluation.nearest_slice import NearestSliceCopy
from sdfsmis.evaluation.protocol import SHOTS, annotated_slices, chunk_index, make_folds, organ_slices, support_slices
from sdfsmis.io.volume import SliceGrid, Volume, axial_slices, load_volume, normalise_intensity, ras_spacing
from sdfsmis.metrics import dice
from sdfsmis.pipeline.segmenter import VolumeSegmenter

PROTOCOLS = ("paper", "realistic", "propagation")


def check_methods(protocol: str, methods: list[str]) -> None:
    """A method that copies the volume's own annotation (nearest-slice) cannot run a protocol
    that segments another patient's volume: say so before any work."""
    only = [m for m in methods if m in PROPAGATION_ONLY]
    if only and protocol != "propagation":
        raise ValueError(
            f"method {', '.join(only)} runs only under --protocol propagation: it copies the query volume's own "
            f"annotated slices, and the {protocol} protocol segments a volume that has none"
        )


def largest_component_per_slice(mask: np.ndarray) -> np.ndarray:
    out = np.zeros_like(mask)
    for z in range(mask.shape[2]):
        components, count = ndimage.label(mask[..., z])
        if count:
            sizes = np.bincount(components.ravel())[1:]
            out[..., z] = components == sizes.argmax() + 1
    return out


def paper_decision(probability: np.ndarray, index: np.ndarray, method: Method) -> np.ndarray:
    """Binary prediction of the chunks [X, Y, Q] by the method's paper-protocol rule."""
    prediction = np.zeros(probability.shape, dtype=bool)
    for part in np.unique(index):
        chunk = probability[..., index == part]
        if method.relative_threshold is not None:
            peak = float(chunk.max(initial=0.0))
            prediction[..., index == part] = (chunk >= method.relative_threshold * peak) & (peak > 0)
        else:
            prediction[..., index == part] = chunk >= method.threshold
    return largest_component_per_slice(prediction) if method.largest_per_slice else prediction


def slice_dice(prediction: np.ndarray, truth: np.ndarray, slices: list[int]) -> list[float | None]:
    """2-D Dice of each axial slice [X, Y, Z] in ``slices``; None where both are empty."""
    return [dice(prediction[..., z], truth[..., z], empty=None) for z in slices]


@dataclass
class Case:
    name: str
    image: Volume
    label: Volume
    normalised: np.ndarray = field(repr=False, default=None)


def _load_case(dataset: PreparedDataset, name: str, clip: tuple[float, float]) -> Case:
    image = load_volume(dataset.image(name))
    return Case(name, image, load_volume(dataset.label(name), label=True), normalise_intensity(image.data, clip))


class Evaluator:
    def __init__(
        self,
        dataset: PreparedDataset,
        inference: InferenceConfig,
        protocol: str = "paper",
        annotated: int = SHOTS,
        on_prediction: Callable[[dict, Case | None, Case, np.ndarray], None] | None = None,
    ):
        """``on_prediction(record, support, query, prediction)``: called with each scored (query
        volume, class) and its binary prediction [X, Y, Z] (the montages of ``sdfsmis.figures``)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
        if annotated < 1:
            raise ValueError(f"annotated slices must be at least 1, got {annotated}")
        self.dataset, self.inference, self.protocol = dataset, inference, protocol
        self.annotated = annotated  # propagation: organ slices annotated from ground truth
        self.on_prediction = on_prediction

    def _slices(self, method: Method, data: np.ndarray, z, pad: float = -1.0) -> torch.Tensor:
        grid = SliceGrid(*data.shape[:2], method.model.resolution)
        return grid.to_model(axial_slices(data, z), pad_value=pad).to(method.model.device)

    def paper(self, method: Method, query: Case, label_id: int, encoded) -> dict | None:
        """One query volume under EP1; ``encoded`` = (support features, support slices, seconds)."""
        z = organ_slices(query.label.data, label_id)
        if z.size == 0:
            return None
        features, support_z, support_seconds = encoded
        index = chunk_index(len(z), len(support_z))
        grid = SliceGrid(*query.image.data.shape[:2], method.model.resolution)
        probability = np.zeros((*query.image.data.shape[:2], len(z)), dtype=np.float32)
        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(z), self.inference.batch_size):
                part = slice(start, start + self.inference.batch_size)
                index_part = torch.from_numpy(index[part]).to(method.model.device)
                queries = self._slices(method, query.normalised, z[part])
                prob = method.model.predict(features, queries, index_part).probability
                probability[..., part] = np.moveaxis(grid.from_model(prob.float()).cpu().numpy()[:, 0], 0, -1)
        seconds = time.perf_counter() - started
        prediction = paper_decision(probability, index, method)
        truth = query.label.data[..., z] == label_id
        whole = np.zeros(query.label.data.shape, dtype=bool)
        whole[..., z] = prediction
        return {
            "prediction": whole,
            **score_volume(prediction, truth, ras_spacing(query.image)),
            "slices": int(len(z)),
            "seconds": seconds,
            "support_seconds": support_seconds,
            "support_slices": [int(s) for s in support_z],
            "query_slices": [int(z.min()), int(z.max())],
        }

    def encode(self, method: Method, support: Case, label_id: int):
        """The support of one class for a fold, computed once and shared by its query volumes."""
        support_z = support_slices(support.label.data, label_id)
        if not support_z:
            return None
        mask = self._slices(method, (support.label.data == label_id).astype(np.float32), support_z, pad=0.0)
        binary = (mask > 0.5).float()
        if (binary.flatten(1).sum(dim=1) == 0).any():  # thinner than a model pixel: keep any overlap
            binary = (mask > 0).float()
        started = time.perf_counter()
        with torch.inference_mode():
            features = method.model.encode_support(self._slices(method, support.normalised, support_z), binary)
        return features, support_z, time.perf_counter() - started

    def realistic(self, method: Method, support: Case, query: Case, label_id: int) -> dict | None:
        if not (query.label.data == label_id).any():
            return None
        segmenter = VolumeSegmenter(method.model, self.inference, progress=False)
        with torch.inference_mode():
            result = segmenter.segment(support.image, support.label, query.image, [label_id])
        report = result.reports[label_id]
        prediction, truth = result.labels == label_id, query.label.data == label_id
        scores = {
            "prediction": prediction,
            **score_volume(prediction, truth, ras_spacing(query.image)),
            "slices": int(query.image.data.shape[2]),
            "seconds": result.seconds,
            "support_slices": report.support_slices,
            "query_slices": [min(report.query_slices), max(report.query_slices)],
        }
        if report.confidence is not None:  # one value per slice of query_slices (a contiguous range)
            scores["slice_dice"] = slice_dice(prediction, truth, report.query_slices)
            scores["slice_confidence"] = list(report.confidence)
        return scores

    def propagation(self, method: Method, query: Case, label_id: int) -> dict | None:
        """Same-volume propagation in one volume: the organ's annotated slices from ground truth,
        the rest segmented; None when the organ is absent or every organ slice is annotated."""
        truth = query.label.data == label_id
        drawn_z = annotated_slices(query.label.data, label_id, self.annotated)
        rest = [int(z) for z in organ_slices(query.label.data, label_id) if z not in drawn_z]
        if not rest:
            return None
        drawn = np.zeros_like(truth)
        drawn[..., drawn_z] = truth[..., drawn_z]
        confidence = None
        if isinstance(method.model, (NearestSliceCopy, SliceInterpolation)):  # training-free floors
            started = time.perf_counter()
            prediction = method.model.propagate(drawn, drawn_z)
            seconds = time.perf_counter() - started
            reach = method.model.reach(np.asarray(drawn_z), truth.shape[2])
        else:  # the product path: the volume is its own support (same file: same-volume mode)
            support = dataclasses.replace(query.label, data=np.where(drawn, label_id, 0).astype(query.label.data.dtype))
            segmenter = VolumeSegmenter(method.model, self.inference, progress=False)
            with torch.inference_mode():
                result = segmenter.segment(query.image, support, query.image, [label_id])
            prediction, seconds, report = result.labels == label_id, result.seconds, result.reports[label_id]
            reach = (min(report.query_slices), max(report.query_slices))
            if report.confidence is not None:
                confidence = dict(zip(report.query_slices, report.confidence))
        scored = np.ones(truth.shape[2], dtype=bool)
        scored[drawn_z] = False  # the annotated slices are the user's, not the method's
        scores = {
            "prediction": prediction,
            **score_volume(prediction & scored, truth & scored, ras_spacing(query.image)),
            "slices": int(truth.shape[2]),
            "seconds": seconds,
            "annotated_slices": drawn_z,
            "scored_slices": int(scored.sum()),
            "query_slices": [int(reach[0]), int(reach[1])],
            "slice_z": rest,  # the non-annotated organ slices, for the per-slice figures below
            "slice_dice": slice_dice(prediction, truth, rest),
        }
        if confidence is not None:
            scores["slice_confidence"] = [confidence[z] for z in rest]
        return scores

    def _fold_records(self, method: Method, key: str, fold, support: Case | None, queries: list[Case], labels, log):
        """One method's records on one fold; a failure on a (volume, class) is a record with the reason."""
        records = []
        for label_id in labels:
            if support is not None and not (support.label.data == label_id).any():
                log(f"fold {fold.index}: support {fold.support} has no label {label_id}: class skipped")
                continue
            base = {"method": key, "title": method.title, "fold": fold.index, "support": fold.support}
            base.update(label=label_id, organ=self.dataset.organ(label_id))
            try:
                encoded = self.encode(method, support, label_id) if self.protocol == "paper" else None
            except Exception as error:  # noqa: BLE001 - a failing method is recorded, the run goes on
                encoded = error
            for query in queries:
                if not (query.label.data == label_id).any():
                    continue
                where = {"case": query.name, **({"support": query.name} if support is None else {})}
                try:
                    if isinstance(encoded, Exception):
                        raise encoded
                    if self.protocol == "paper":
                        scores = self.paper(method, query, label_id, encoded)
                    elif self.protocol == "propagation":
                        scores = self.propagation(method, query, label_id)
                    else:
                        scores = self.realistic(method, support, query, label_id)
                except Exception as error:  # noqa: BLE001
                    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
                    records.append({**base, **where, "failed": reason})
                    log(f"fold {fold.index} {key:12s} {base['organ']:14s} {query.name}: FAILED ({reason})")
                    continue
                if scores is None:  # propagation: every organ slice annotated, nothing left to segment
                    log(f"fold {fold.index} {key:12s} {base['organ']:14s} {query.name}: no organ slice left to score")
                    continue
                prediction = scores.pop("prediction")  # [X, Y, Z] bool, for on_prediction only
                record = {
                    **base,
                    **where,
                    **scores,
                    "seconds_per_slice": scores["seconds"] / max(scores["slices"], 1),
                }
                records.append(record)
                if self.on_prediction:
                    self.on_prediction(record, support, query, prediction)
                log(
                    f"fold {fold.index} {key:12s} {record['organ']:14s} {query.name}: "
                    f"Dice {record['dice']:.3f} HD95 {record['hd95']:.1f} mm ({record['slices']} slices, "
                    f"{record['seconds_per_slice']:.3f} s/slice)"
                )
        return records

    def run(
        self,
        methods: list[str],
        factory,
        folds: int,
        labels: list[int] | None = None,
        support_index: int = 0,
        log=print,
        done: Path | None = None,
        run_key: dict | Callable[[str], dict] | None = None,
    ) -> tuple[list[dict], list[dict]]:
        """Every (fold, method, class, query volume) record, and the fold definitions. With ``done``
        (a folder), each finished (fold, method) is kept there and not recomputed on a restart of the
        same run (``run_key``: what else defines it, e.g. the checkpoint; or a function of the
        method's key giving that, so that an option one method uses does not redo the others)."""
        check_methods(self.protocol, methods)
        labels = labels or self.dataset.test_labels
        clip = self.inference.clip_percentiles
        same_volume = self.protocol == "propagation"  # every test volume is a query, no support volume
        records, fold_info = [], []
        for fold in make_folds(self.dataset.cases, folds, support_index, least=1 if same_volume else 2):
            fold_info.append({"fold": fold.index, "cases": fold.cases, "support": fold.support})
            support, queries = None, None
            for key in methods:
                extra = run_key(key) if callable(run_key) else run_key or {}
                identity = {"protocol": self.protocol, "labels": list(labels), **fold_info[-1], **extra}
                if same_volume:
                    identity["annotated_slices"] = self.annotated
                kept = done / f"fold{fold.index}_{key}.json" if done else None
                if kept and kept.is_file() and (saved := json.loads(kept.read_text()))["identity"] == identity:
                    log(f"fold {fold.index} {key}: finished in an earlier run ({kept})")
                    records += saved["records"]
                    continue
                if queries is None:
                    support = None if same_volume else _load_case(self.dataset, fold.support, clip)
                    queries = [_load_case(self.dataset, n, clip) for n in (fold.cases if same_volume else fold.queries)]
                method = factory(key, fold.index)
                found = self._fold_records(method, key, fold, support, queries, labels, log)
                records += found
                if kept:
                    kept.parent.mkdir(parents=True, exist_ok=True)
                    tmp = kept.with_suffix(".tmp")
                    tmp.write_text(json.dumps({"identity": identity, "records": found}, default=float))
                    tmp.replace(kept)
        return records, fold_info
