"""The infer task of each method (``sdfsmis``, ``dpl``): one-shot segmentation of the requested image
with the support resolved from the request or the datastore, by every method through the same rules;
labels keep the support's ids and names. DPL's results also say how confident each slice is."""

from __future__ import annotations

import logging
import tempfile

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.activelearning.results import record_result
from lib.configs import ModelRuntime
from lib.infers.guard import http_errors, parse_label_ids
from lib.infers.support import resolve_supports, review_name, support_label_ids
from sdfsmis.io.volume import LABEL_FORMATS, Volume, VolumeError
from sdfsmis.pipeline.segmenter import LabelReport, review_ids
from sdfsmis.pipeline.stages import Stages

logger = logging.getLogger(__name__)


#: Slices listed for review per label (lowest confidence first).
REVIEW_SLICES = 5
#: The colour of every "<label> - review" segment (param ``review_segment``): yellow, unlike any organ.
REVIEW_COLOUR = [255, 255, 0]


class OneShotInfer(InferTask):
    def __init__(self, runtime: ModelRuntime, datastore: Datastore):
        super().__init__(
            type=InferType.SEGMENTATION,  # one of the types OHIF's MONAI Label panel lists
            labels=None,  # labels come from the support of each request
            dimension=3,
            description=runtime.description,
            config={"support": "", "labels": "", "review_segment": False},
        )
        self.runtime = runtime
        self.datastore = datastore

    def is_valid(self) -> bool:
        return True  # listed even when unavailable: info() says why

    def info(self) -> dict:
        # OHIF builds its segment list from the model's labels when it connects, review segments too
        status = self.runtime.status()
        return {
            **super().info(),
            "labels": labels_with_review(support_label_ids(self.datastore)),
            self.runtime.method: status,
        }

    def __call__(self, request: dict) -> tuple[str, dict]:
        with http_errors(self.runtime.method):
            return self._infer(request)

    def _infer(self, request: dict) -> tuple[str, dict]:
        clock = Stages(self.runtime.method)  # each stage is logged as it ends, and returned in "stages"
        segmenter, trained = self.runtime.segmenter()
        clock.lap("load model")
        supports = resolve_supports(request, self.datastore, request.get("image_id"))
        query = self.runtime.read_image(request["image"])
        volumes = [support.volume(query, self.runtime.settings.max_voxels) for support in supports]
        names = {k: v for support in reversed(supports) for k, v in support.label_names.items()}  # first one wins
        wanted = parse_label_ids(request.get("labels"), names)
        clock.lap("read")
        result = segmenter.segment_with(volumes, query, wanted, doubt_map=False)  # a viewer shows the review segment
        clock.absorb(result.stages)
        # OHIF asks for raw NRRD (result_extension ".nrrd"), Slicer and the CLI get NIfTI
        suffix = request.get("result_extension") or ".nii.gz"
        if suffix not in LABEL_FORMATS:
            raise VolumeError(f"result_extension {suffix!r} is not supported: use one of {', '.join(LABEL_FORMATS)}")
        names = {k: names.get(k, f"label_{k}") for k in result.reports}
        colours = {k: next((s.colour(k) for s in supports if k in s.label_names), supports[0].colour(k)) for k in names}
        labels, review = result.with_review() if is_true(request.get("review_segment")) else (result.labels, {})
        for label_id, review_id in review.items():
            names[review_id] = review_name(names[label_id])
            colours[review_id] = REVIEW_COLOUR
        output = tempfile.NamedTemporaryFile(suffix=suffix, delete=False).name
        query.save_label(labels, output)
        clock.lap("write")
        summary = result.summary()
        response = {
            "label_names": {name: k for k, name in names.items()},
            "label_colors": {names[k]: colours[k] for k in names},
            "support": supports[0].describe() if len(supports) == 1 else [s.describe() for s in supports],
            "voxels": {names[k]: int((labels == k).sum()) for k in names},
            "support_slices": summary["support_slices"],
            "served_by": {names[k]: served_by(r, query) for k, r in result.reports.items()},
            "method": self.runtime.method,
            "trained": trained,
            "seconds": round(clock.total, 3),
            "seconds_per_slice": summary["seconds_per_slice"],
            # the query slices the model segmented now; the others were kept from an earlier run
            "slices_computed": {names[k]: r.computed_slices for k, r in result.reports.items()},
            "passes_computed": {names[k]: r.computed_passes for k, r in result.reports.items()},
            "stages": {stage: round(seconds, 3) for stage, seconds in clock.seconds.items()},
        }
        if result.has_uncertainty:  # per label, slices numbered as in the returned image
            confidence = result.confidence(query)
            response["confidence"] = {names[k]: confidence[k] for k in confidence}
            review_slices = result.review_slices(query, REVIEW_SLICES)
            response["review_slices"] = {names[k]: review_slices[k] for k in review_slices}
        if not trained:
            response["warning"] = (
                f"untrained {self.runtime.title} head (allow_untrained): this result is not meaningful"
            )
        record_result(self.datastore, request.get("image_id"), self.runtime.method, response)
        logger.info(f"{self.runtime.method}: {response}")
        return output, response


def labels_with_review(labels: dict[str, int]) -> dict[str, int]:
    """{name: id} of the structures, each followed by its review segment with the id a result gives it."""
    reviews = review_ids(set(labels.values()))
    listed = {}
    for name, label_id in labels.items():
        listed[name] = label_id
        if label_id in reviews:  # none when every uint8 id is taken
            listed[review_name(name)] = reviews[label_id]
    return listed


def is_true(value: object) -> bool:
    """A boolean request param as Slicer (true/false) or a query string ("true", "1") sends it."""
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def served_by(report: LabelReport, query: Volume) -> list[dict]:
    """Per support image of a label: its support slices, and the query slices it served (first and
    last, numbered as in the returned image) with the rule that placed it."""
    served = []
    for part in report.served_by:
        ends = sorted(query.original_slice(z) for z in (part.placement.first, part.placement.last))
        served.append(
            {
                "image": part.name,
                "support_slices": part.support_slices,
                "query_slices": ends,
                "rule": part.placement.rule,
            }
        )
    return served
