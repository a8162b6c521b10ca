"""The record of the last one-shot result of each image, per method: how confident it was per label
and which slices to review, what the ``doubt`` strategy ranks the studies by.

It lives in the datastore's image info (key ``one_shot_results``), where MONAI Label's own scoring
keeps its figures: it survives a restart (the datastore file of a studies folder, or of the DICOMweb
cache), belongs to the studies whose image ids it names, and ``GET /datastore/`` shows it. Writing
replaces only this key, and in it only the method's own entry: every other method's record and
everything else in the image info stays."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from monailabel.interfaces.datastore import Datastore

logger = logging.getLogger(__name__)

#: The image-info key of the records: {method: record}.
RESULTS_KEY = "one_shot_results"
#: One read-merge-write at a time: two methods' results on one image must not drop each other.
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ResultRecord:
    """What one result said about its own doubt."""

    method: str
    recorded: float  # seconds since the epoch, to tell which method's result is the last one
    confidence: dict[str, dict[str, float]]  # {label name: {"min": ..., "mean": ...}} of its per-slice confidence
    review_slices: dict[str, list[int]]  # {label name: [slice, ...]}, lowest confidence first

    @property
    def lowest(self) -> float | None:
        """The lowest per-slice confidence over every label; None for a result without confidence
        (SD-FSMIS served by a single support slice per query slice: nothing could disagree)."""
        return min((c["min"] for c in self.confidence.values()), default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "recorded": self.recorded,
            "confidence": self.confidence,
            "review_slices": self.review_slices,
        }


def summarise(method: str, response: dict[str, Any], recorded: float) -> ResultRecord:
    """The record of an infer task's result JSON (``confidence``: {label: {slice: confidence}},
    ``review_slices``: {label: [slice, ...]}); a label with no slice has no confidence to give."""
    confidence = {
        label: {"min": min(values), "mean": sum(values) / len(values)}
        for label, slices in (response.get("confidence") or {}).items()
        if (values := [float(c) for c in slices.values()])
    }
    review = {label: [int(z) for z in slices] for label, slices in (response.get("review_slices") or {}).items()}
    return ResultRecord(method, recorded, confidence, review)


def record_result(datastore: Datastore, image_id: str | None, method: str, response: dict[str, Any]) -> None:
    """Keep ``response`` as the last result of ``method`` on ``image_id``. A request for a file
    rather than a datastore image has nothing to record. A failure is logged, never raised: the
    radiologist's result outranks the queue's bookkeeping."""
    if not image_id:
        return
    record = summarise(method, response, time.time())
    try:
        with _LOCK:
            stored = dict(datastore.get_image_info(image_id).get(RESULTS_KEY) or {})
            stored[method] = record.to_json()
            datastore.update_image_info(image_id, {RESULTS_KEY: stored})
    except Exception:  # any datastore's failure (read-only, unknown image, disk full) alike
        logger.warning(f"{method}: the result on '{image_id}' was not recorded for active learning", exc_info=True)


def last_result(info: dict[str, Any]) -> ResultRecord | None:
    """The most recent result recorded in an image's info, over every method (ties: by method name,
    so that the choice is the same on every call); None when none was."""
    records = [
        ResultRecord(method, float(entry["recorded"]), entry.get("confidence") or {}, entry.get("review_slices") or {})
        for method, entry in (info.get(RESULTS_KEY) or {}).items()
    ]
    return max(records, key=lambda r: (r.recorded, r.method), default=None)
