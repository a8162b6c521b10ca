"""MONAI Label app serving one-shot segmentation through one pipeline by every method of the
registry (``sdfsmis.methods``): SD-FSMIS (infer and train task ``sdfsmis``) and DPL (``dpl``, the one
a site without a GPU runs). Nothing here is specific to one method.

    monailabel start_server --app sdfsmis_app --studies STUDIES --host 127.0.0.1 \
        --conf backbone models/sd15 [--conf device cuda] [--conf checkpoint PATH] [--conf dpl_checkpoint PATH]
"""

from __future__ import annotations

import logging
import os
import sys

import torch
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.first import First

import lib.activelearning
import lib.configs
import lib.infers
import lib.server.auth
import lib.server.dicomweb
import lib.server.endpoints
import lib.trainers
from lib.infers.guard import http_errors
from lib.infers.support import FINAL, is_review_name, label_names_from_info
from lib.server.concurrency import InferenceGate
from lib.server.datastore import ValidatingDatastore
from lib.server.sessions import SafeSessions
from sdfsmis import __version__
from sdfsmis.io.volume import VolumeError, load_volume, present_label_ids
from sdfsmis.methods import METHODS

logger = logging.getLogger(__name__)
#: The app's key in the answer to a saved label (what Slicer and the tests read), not a method's name.
NOTICE = "sdfsmis"


class SDFSMISApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.settings = lib.configs.AppSettings.from_conf(conf, app_dir)
        self.gate = InferenceGate(
            self.settings.max_concurrent_infers, self.settings.max_queued_infers, self.settings.infer_queue_timeout_s
        )
        self.runtimes = {method: lib.configs.ModelRuntime(self.settings, self.gate, method) for method in METHODS}
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SD-FSMIS",
            description="One-shot segmentation with Stable Diffusion v1.5 adapted for few-shot medical image "
            "segmentation. Research annotation assistant; not for clinical use (CreativeML OpenRAIL-M).",
            version=__version__,
        )
        for method, runtime in self.runtimes.items():
            logger.info(f"{method} model status: {runtime.status()}")

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):  # a DICOMweb PACS (OHIF's path)
            self.studies = self.studies.rstrip("/")
            return lib.server.dicomweb.connect(self.studies, self.settings.modalities, self.settings.result_format)
        return ValidatingDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            max_voxels=self.settings.max_voxels,
        )

    def _load_sessions(self, load=False):
        return SafeSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY) if load else None

    def on_init_complete(self):
        super().on_init_complete()
        server = sys.modules.get("monailabel.app")  # loaded when this runs inside the REST server
        if server is not None:
            lib.server.endpoints.install(server.app, self.settings.max_upload_mb)
            lib.server.auth.install(server.app)

    def info(self):
        info = super().info()
        # the structures only: Slicer opens an empty segment per app-level label when a sample loads;
        # the review segments stay in each model's labels, where OHIF builds its segment list from
        info["labels"] = [name for name in info.get("labels") or [] if not is_review_name(str(name))]
        for method in self.runtimes:
            if method in info["models"]:
                info["models"][method][method]["inferences"] = self.gate.status()
        # Slicer and OHIF draw their training bar from the first trainer's stats: the running one,
        # else the one started last
        stats = info.get("train_stats") or {}
        order = sorted(stats, key=lambda name: (stats[name].get("status") == "RUNNING", stats[name].get("start_ts", 0)))
        info["train_stats"] = {name: stats[name] for name in reversed(order)}
        return info

    def infer(self, request, datastore=None):
        """A bounded number at once (a bounded queue, then 503 busy), never building autograd graphs."""
        # MONAI Label replaces the image id by a local path: keep the id (a support is looked up by it)
        if isinstance(request.get("image"), str) and not os.path.exists(request["image"]):
            request = {**request, "image_id": request["image"]}
        with http_errors(request.get("model")), self.gate.admit(), torch.no_grad():
            return super().infer(request, datastore)

    def init_infers(self) -> dict:
        return {method: lib.infers.OneShotInfer(runtime, self.datastore()) for method, runtime in self.runtimes.items()}

    def init_trainers(self) -> dict:
        return {method: lib.trainers.OneShotTrain(runtime) for method, runtime in self.runtimes.items()}

    def init_strategies(self) -> dict[str, Strategy]:
        """MONAI Label's own (``random``, and ``first`` that Slicer's users know) and ``doubt``: the
        studies never segmented, then the least confident last results (``lib.activelearning.doubt``)."""
        return {**super().init_strategies(), "first": First(), "doubt": lib.activelearning.Doubt()}

    def batch_infer(self, request, datastore=None):
        # MONAI Label spreads batch requests over all GPUs by default: none on a CPU server
        request.setdefault("multi_gpu", torch.cuda.is_available())
        return super().batch_infer(request, datastore)

    def on_save_label(self, image_id: str, label_id: str) -> dict:
        """Tell the annotator that the submitted label now serves as a support."""
        datastore = self.datastore()
        try:
            label = load_volume(datastore.get_label_uri(label_id, FINAL), label=True)
        except (VolumeError, FileNotFoundError) as error:
            return {NOTICE: {"support_available": False, "message": f"label cannot serve as a support: {error}"}}
        ids = present_label_ids(label.data)  # slice by slice: a list of every voxel would take GiBs
        info = datastore.get_label_info(label_id, FINAL) or {}
        names = label_names_from_info(info.get("label_info"))
        listed = [name for name in (names.get(k, f"label_{k}") for k in ids) if not is_review_name(name)]
        if not listed:
            return {
                NOTICE: {
                    "support_available": False,
                    "message": "the submitted label holds no structure (empty, or review segments only)",
                }
            }
        return {
            NOTICE: {
                "support_available": True,
                "labels": listed,
                "message": f"label of '{image_id}' is now available as a support for: {', '.join(listed)}",
            }
        }
