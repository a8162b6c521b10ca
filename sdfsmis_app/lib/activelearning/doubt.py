"""The ``doubt`` strategy: the next study to annotate is the one whose segmentation most needs a
radiologist. In this order:

1. unlabelled studies never segmented (no final label, no recorded result), by image id: nothing
   has been done for them yet, and a one-shot result there is cheap to get;
2. unlabelled studies by the confidence of their LAST one-shot result (``lib.activelearning.results``),
   lowest first, ties by image id;
3. unlabelled studies whose last result carries no confidence (SD-FSMIS with a single support
   slice per query slice), by image id: no figure says they are doubtful.

The figure is the lowest per-slice confidence over the result's labels, not the mean: the work
left on a study is the slices that are wrong, and one wrong slice needs the radiologist however
many good ones surround it. The mean also counts the slices where no member saw the structure
(confidence 1 by definition), so it rises with how many slices a structure spans. The lowest is
also the first slice the answer's ``review_slices`` lists.

Studies with a final label are left out, as MONAI Label's ``first`` and ``random`` leave them
out: the radiologist submitted them, they are done. When none is left the answer is None, which
MONAI Label answers as ``{}``: the clients' "no sample". The order is a function of the datastore
alone (no randomness, no clock), so every client asking gets the same study until it changes.
"""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.activelearning.results import ResultRecord, last_result

logger = logging.getLogger(__name__)


def rank_key(image_id: str, record: ResultRecord | None) -> tuple[int, float, str]:
    """Sorts the studies in the order of the module's docstring."""
    if record is None:
        return 0, 0.0, image_id
    lowest = record.lowest
    return (1, lowest, image_id) if lowest is not None else (2, 0.0, image_id)


class Doubt(Strategy):
    def __init__(self) -> None:
        super().__init__("Unlabelled studies never segmented first, then the least confident last one-shot result")

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        records = {image_id: last_result(datastore.get_image_info(image_id)) for image_id in images}
        image_id = min(images, key=lambda i: rank_key(i, records[i]))
        record = records[image_id]
        logger.info(f"Doubt: {image_id} of {len(images)} unlabelled; last result: {record}")
        if record is None:
            return {"id": image_id, "method": None, "confidence": None, "label_confidence": {}, "review_slices": {}}
        return {
            "id": image_id,
            "method": record.method,  # the method of the result the figures are from
            "confidence": record.lowest,
            "label_confidence": record.confidence,
            "review_slices": record.review_slices,
        }
