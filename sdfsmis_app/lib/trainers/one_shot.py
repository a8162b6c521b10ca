"""The train task of each method (``sdfsmis``, ``dpl``): self-supervised episodic fine-tuning of that method on
the datastore's images (unlabeled are fine; submitted final labels can be mixed in), checkpoints
in the app's model folder, the result published atomically where its infer task picks it up."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from lib.configs import ModelRuntime
from sdfsmis.methods import DEFAULT_METHOD, method_class
from sdfsmis.training.checkpoints import publish
from sdfsmis.training.trainer import TrainingRun, train

TRUE = ("1", "true", "yes")


def _param(request: dict, key: str, default):
    """A request value coerced to the type of its default (requests may carry strings)."""
    value = request.get(key, default)
    return str(value).lower() in TRUE if isinstance(default, bool) else type(default)(value)


def _alive(pid: int | None, started: float | None) -> bool:
    """Whether the process that wrote the stats still runs (its start time guards against pid reuse)."""
    try:
        return pid is not None and psutil.Process(pid).create_time() == started
    except psutil.Error:
        return False


class OneShotTrain(TrainTask):
    def __init__(self, runtime: ModelRuntime):
        super().__init__(
            f"Self-supervised {runtime.title} fine-tuning on 3-D supervoxel pseudo-labels of the datastore images"
        )
        self.runtime = runtime
        # the default method keeps the names it had before there were two, so running servers resume as they were
        self.suffix = "" if runtime.method == DEFAULT_METHOD else f"_{runtime.method}"

    @property
    def stats_file(self) -> Path:
        return self.runtime.settings.model_dir / f"train_stats{self.suffix}.json"

    @property
    def output(self) -> Path:
        return self.runtime.settings.model_dir / f"train{self.suffix}"

    def config(self) -> dict:
        training = self.runtime.config.training
        return {
            "iterations": training.iterations,
            "batch_size": 1,
            "checkpoint_every": training.checkpoint_every,
            "gt_rate": training.gt_rate,
            "resume": False,
        }

    def stats(self) -> dict:
        try:
            stats = json.loads(self.stats_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        if stats.get("status") == "RUNNING" and not _alive(stats.get("pid"), stats.get("started")):
            # the training process died without a word (killed, out of memory): say so, never "RUNNING"
            stats.update(
                status="FAILED",
                error=f"training process {stats.get('pid')} ended unexpectedly at iteration {stats.get('iteration')} "
                '(killed?); the served checkpoint is unchanged; continue with params {"resume": true}',
            )
        return stats

    def _write_stats(self, stats: dict) -> None:
        tmp = self.stats_file.with_name(self.stats_file.name + ".tmp")
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, self.stats_file)

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        settings = self.runtime.settings
        settings.model_dir.mkdir(parents=True, exist_ok=True)
        config = self.runtime.config
        params = {key: _param(request, key, default) for key, default in self.config().items()}
        config.training.checkpoint_every = params["checkpoint_every"]
        config.training.validate_every = params["checkpoint_every"]
        config.training.gt_rate = params["gt_rate"]
        images = [Path(datastore.get_image_uri(i)) for i in sorted(datastore.list_images())]
        me = psutil.Process()
        stats = {
            "status": "RUNNING",
            "total_iterations": params["iterations"],
            "iteration": 0,
            "pid": me.pid,
            "started": me.create_time(),
        }
        self._write_stats(stats)

        def on_step(record: dict) -> None:
            stats.update(record)
            self._write_stats(stats)

        run = TrainingRun(
            backbone=settings.backbone,
            images=images,
            output=self.output,
            config=config,
            iterations=params["iterations"],
            device=settings.device,
            resume=params["resume"],
            batch_size=params["batch_size"],
            use_labels=params["gt_rate"] > 0,
            progress=False,
            on_step=on_step,
            init_checkpoint=self.runtime.checkpoint if self.runtime.checkpoint.is_file() else None,
            method=self.runtime.method,
        )
        try:
            summary = train(run)
        except Exception as error:
            stats.update({"status": "FAILED", "error": str(error)})
            self._write_stats(stats)
            raise
        publish(run.output / method_class(self.runtime.method).weights_name, self.runtime.checkpoint)
        stats.update(
            {
                "status": "DONE",
                "checkpoint": str(self.runtime.checkpoint),
                "resumed_from": summary["resumed_from"],
                "skipped": summary["skipped"],  # volumes that yield no episode, with the reason
            },
            **summary["final"],
        )
        self._write_stats(stats)
        return {k: v for k, v in summary.items() if k != "losses"}
