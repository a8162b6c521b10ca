"""The app's models, one runtime per method of the registry (``sdfsmis.methods``): settings from ``--conf``, a
status that needs no loading, lazy loading on first use, and pick-up of a newly published
checkpoint without a restart that never swaps weights under an inference in flight."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lib.server.concurrency import InferenceGate
from sdfsmis.io.backbone import DEFAULT_BACKBONE, DINOV2_HUB_ID, HOW_TO_GET, SD15_HUB_ID, resolve_backbone
from sdfsmis.io.manifest import manifest_identity
from sdfsmis.io.volume import Volume
from sdfsmis.methods import DEFAULT_METHOD, METHODS, method_class, weights_key
from sdfsmis.pipeline.predictor import Predictor
from sdfsmis.pipeline.segmenter import VolumeSegmenter
from sdfsmis.settings import Settings, load_config

logger = logging.getLogger(__name__)
TRUE = {"1", "true", "yes", "on"}
#: how a saved final label goes back to a DICOMweb PACS (``--conf result_format``): DICOM SEG or RTSTRUCT
RESULT_FORMATS = ("seg", "rtstruct")


class ModelUnavailable(RuntimeError):
    """The model cannot serve; the message says why and how to fix it."""


@dataclass
class AppSettings:
    backbone: str
    device: str
    model_dir: Path
    checkpoints: dict[str, Path]  # each method's served weights
    allow_untrained: bool
    preset: str | None
    modalities: list[str]  # DICOMweb mode: the modalities of the image series served
    max_voxels: int = 512 * 512 * 1024  # per volume; bigger ones are refused before their data is read
    max_upload_mb: float = 1024.0  # per request body
    max_concurrent_infers: int = 1  # inferences running at once (GPU memory is bounded by this)
    max_queued_infers: int = 4  # inferences waiting for a slot; beyond that: 503 busy
    infer_queue_timeout_s: float = 600.0  # a queued inference gives up (503) after this
    cache_mb: float = 1024.0  # per method: what earlier requests computed, for the next run on the same image
    result_format: str = "seg"  # DICOMweb mode: a saved final label goes to the PACS as a DICOM SEG or an RTSTRUCT

    @classmethod
    def from_conf(cls, conf: dict[str, str], app_dir: str) -> AppSettings:
        model_dir = Path(conf.get("model_dir") or Path(app_dir) / "model")
        device = conf.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(
            backbone=conf.get("backbone", DEFAULT_BACKBONE),
            device=device,
            model_dir=model_dir,
            checkpoints={
                name: Path(conf.get(weights_key(name)) or model_dir / method.weights_name)
                for name, method in METHODS.items()
            },
            allow_untrained=str(conf.get("allow_untrained", "false")).lower() in TRUE,
            preset=conf.get("preset"),
            modalities=str(conf.get("modalities", "CT,MR")).split(","),
            result_format=_result_format(conf),
            **{key: kind(conf[key]) for key, kind in _LIMITS.items() if conf.get(key) not in (None, "")},
        )


def _result_format(conf: dict[str, str]) -> str:
    """``--conf result_format``, checked at start whatever the datastore: with a studies folder a
    typo was taken silently, to surface only once the same conf served a PACS."""
    value = str(conf.get("result_format") or "seg").strip().lower()
    if value not in RESULT_FORMATS:
        raise ValueError(f"--conf result_format {value!r} is not one of: {', '.join(RESULT_FORMATS)}")
    return value


_LIMITS = {
    "max_voxels": int,
    "max_upload_mb": float,
    "max_concurrent_infers": int,
    "max_queued_infers": int,
    "infer_queue_timeout_s": float,
    "cache_mb": float,
}


def _hub_cached() -> bool:
    from huggingface_hub import try_to_load_from_cache

    files = [(SD15_HUB_ID, "unet/config.json"), (SD15_HUB_ID, "vae/config.json"), (DINOV2_HUB_ID, "config.json")]
    return all(isinstance(try_to_load_from_cache(repo, name), str) for repo, name in files)


class ModelRuntime:
    def __init__(self, settings: AppSettings, gate: InferenceGate, method: str = DEFAULT_METHOD):
        self.settings = settings
        self.method = method
        self.title = method_class(method).title
        self.description = method_class(method).description
        self.checkpoint = settings.checkpoints[method]
        self.gate = gate  # admits every inference (all methods): its count of running ones guards weight swaps
        self._lock = threading.Lock()
        self._predictor: Predictor | None = None
        self._loaded_checkpoint: tuple[int, int] | None = None  # (mtime_ns, size)

    @property
    def config(self) -> Settings:
        spec = self.settings.backbone
        return load_config(self.settings.preset, None if spec == DEFAULT_BACKBONE else spec)

    def _checkpoint_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.checkpoint.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def check(self) -> None:
        """Raise :class:`ModelUnavailable` unless the model can serve (no weights are loaded)."""
        spec = self.settings.backbone
        try:
            resolve_backbone(spec, method_class(self.method).backbone_parts)
        except FileNotFoundError as error:
            raise ModelUnavailable(str(error)) from error
        if spec == DEFAULT_BACKBONE and os.environ.get("HF_HUB_OFFLINE") == "1" and not _hub_cached():
            raise ModelUnavailable(
                f"backbone 'default' (hub ids) is not in the local cache and HF_HUB_OFFLINE=1. {HOW_TO_GET}"
            )
        if self._checkpoint_stamp() is None and not self.settings.allow_untrained:
            conf_key = weights_key(self.method)
            raise ModelUnavailable(
                f"no fine-tuned {self.title} checkpoint at {self.checkpoint}: the {self.title} head is untrained "
                f"and is not served. Fix: run the train task (POST /train/{self.method}, or 'Train' in Slicer), or "
                f"put a checkpoint from `sdfsmis train --method {self.method}` there (`--conf {conf_key} PATH`); "
                "`--conf allow_untrained true` serves the untrained head for demos, every result flagged untrained."
            )

    def status(self) -> dict:
        try:
            self.check()
            available, reason = True, ""
        except ModelUnavailable as error:
            available, reason = False, str(error)
        return {
            "available": available,
            "reason": reason,
            "backbone": str(self.settings.backbone),
            "method": self.method,
            "checkpoint": str(self.checkpoint),
            "trained": self._checkpoint_stamp() is not None,
            "device": self.settings.device,
            "loaded": self._predictor is not None,
            "weights": self.weights_identity(),
            "cache": self.cache_stats(),
        }

    def read_image(self, path: str) -> Volume:
        """The request's image, within the volume limit; kept with what the model computed, so that
        a re-run on the same image does not read it again (call after :meth:`segmenter`)."""
        return self._predictor.read_image(path, self.settings.max_voxels)

    def cache_stats(self) -> dict | None:
        """What the loaded model keeps of earlier requests (entries, bytes, hits, misses)."""
        predictor = self._predictor
        return None if predictor is None or predictor.cache is None else predictor.cache.stats()

    def weights_identity(self) -> dict | None:
        """The backbone folder's manifest (source, revision, its digest); None for hub ids or a
        folder without one (weights copied in by hand should come with it: ``sdfsmis verify``)."""
        spec = self.settings.backbone
        return None if spec == DEFAULT_BACKBONE else manifest_identity(spec)

    def segmenter(self) -> tuple[VolumeSegmenter, bool]:
        """The loaded model (loaded once; a newer checkpoint is picked up) and whether it is trained."""
        self.check()
        with self._lock:
            config = self.config
            if self._predictor is None:
                try:  # the measured acceleration defaults of the device
                    self._predictor = Predictor.from_pretrained(
                        self.method,
                        self.settings.backbone,
                        config,
                        device=self.settings.device,
                        cache_bytes=int(self.settings.cache_mb * 2**20),
                    )
                    logger.info(f"{self.title}: backbone {self.settings.backbone}, weights {self.weights_identity()}")
                except Exception as error:  # noqa: BLE001 - corrupt files raise many types; none can serve
                    raise ModelUnavailable(
                        f"{self.title}: backbone {self.settings.backbone} cannot be loaded: {error}"
                    ) from error
            stamp = self._checkpoint_stamp()
            # safe to swap: no other inference uses the model, or none can have (untrained is never served)
            safe = self.gate.running <= 1 or (self._loaded_checkpoint is None and not self.settings.allow_untrained)
            if stamp is not None and stamp != self._loaded_checkpoint and safe:
                self._predictor.load_weights(self.checkpoint)
                self._loaded_checkpoint = stamp
            self._predictor.settings = config  # inference settings as configured now
            return self._predictor.segmenter(progress=False), self._loaded_checkpoint is not None
