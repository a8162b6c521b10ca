"""The infer tasks ``sdfsmis`` and ``dpl``: one-shot segmentation of the requested image with the
support resolved from the request or the datastore, by either method through the same rules;
labels keep the support's ids and names. DPL's results also say how confident each slice is."""

from __future__ import annotations

import logging
import tempfile
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from sdfsmis.volume import LABEL_FORMATS, VolumeError, load_volume

from ..configs import ModelRuntime
from .guard import http_errors, parse_label_ids
from .support import resolve_support, support_label_ids

logger = logging.getLogger(__name__)


DESCRIPTIONS = {
    "sdfsmis": "One-shot segmentation (SD-FSMIS, Stable Diffusion v1.5): the structures of a submitted or uploaded "
    "label are segmented in the rest of the volume or in another patient's volume",
    "dpl": "One-shot segmentation (DPL, diffusion-enhanced prototypes on DINOv2; fast on CPU): the structures of a "
    "submitted or uploaded label are segmented in the rest of the volume or in another patient's volume, with a "
    "per-slice confidence and the slices most worth reviewing",
}
#: Slices listed for review per label (lowest confidence first).
REVIEW_SLICES = 5


class OneShotInfer(InferTask):
    def __init__(self, runtime: ModelRuntime, datastore: Datastore):
        super().__init__(
            type=InferType.SEGMENTATION,  # one of the types OHIF's MONAI Label panel lists
            labels=None,  # labels come from the support of each request
            dimension=3,
            description=DESCRIPTIONS[runtime.method],
            config={"support": "", "labels": ""},
        )
        self.runtime = runtime
        self.datastore = datastore

    def is_valid(self) -> bool:
        return True  # listed even when unavailable: info() says why

    def info(self) -> dict:
        # OHIF builds its segment list from the model's labels when it connects
        status = self.runtime.status()
        return {**super().info(), "labels": support_label_ids(self.datastore), self.runtime.method: status}

    def __call__(self, request: dict) -> tuple[str, dict]:
        with http_errors():
            return self._infer(request)

    def _infer(self, request: dict) -> tuple[str, dict]:
        started = time.perf_counter()
        segmenter, trained = self.runtime.segmenter()
        support = resolve_support(request, self.datastore, request.get("image_id"))
        query = load_volume(request["image"], max_voxels=self.runtime.settings.max_voxels)
        support_image, support_label = support.load(query, self.runtime.settings.max_voxels)
        wanted = parse_label_ids(request.get("labels"), support.label_names)
        result = segmenter.segment(support_image, support_label, query, wanted)
        # OHIF asks for raw NRRD (result_extension ".nrrd"), Slicer and the CLI get NIfTI
        suffix = request.get("result_extension") or ".nii.gz"
        if suffix not in LABEL_FORMATS:
            raise VolumeError(f"result_extension {suffix!r} is not supported: use one of {', '.join(LABEL_FORMATS)}")
        output = tempfile.NamedTemporaryFile(suffix=suffix, delete=False).name
        query.save_label(result.labels, output)
        names = {k: support.name(k) for k in result.reports}
        summary = result.summary()
        response = {
            "label_names": {name: k for k, name in names.items()},
            "label_colors": {names[k]: support.colour(k) for k in result.reports},
            "support": support.describe(),
            "voxels": {names[k]: r.voxels for k, r in result.reports.items()},
            "support_slices": summary["support_slices"],
            "method": self.runtime.method,
            "trained": trained,
            "seconds": round(time.perf_counter() - started, 3),
            "seconds_per_slice": summary["seconds_per_slice"],
        }
        if result.uncertainty is not None:  # per label, slices numbered as in the returned image
            confidence = result.confidence(query)
            response["confidence"] = {names[k]: confidence[k] for k in confidence}
            review = result.review_slices(query, REVIEW_SLICES)
            response["review_slices"] = {names[k]: review[k] for k in review}
        if not trained:
            response["warning"] = (
                f"untrained {self.runtime.title} head (allow_untrained): this result is not meaningful"
            )
        logger.info(f"{self.runtime.method}: {response}")
        return output, response
