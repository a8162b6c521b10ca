"""The train task of each method (``sdfsmis``, ``dpl``): self-supervised episodic fine-tuning of that method on
the datastore's images (unlabeled are fine; submitted final labels can be mixed in), checkpoints
in the app's model folder, the result published atomically where its infer task picks it up.

Progress is reported the way MONAI Label's clients read it (MONAI Label 0.8.5 runs the task in a
subprocess whose output lines ``GET /train/`` returns as ``details``, the last 20 of them): every
10 iterations and at each validation the task logs one line such as
``dpl training: iteration 40/400 (10%), 38.2 it/s, loss 1.2345, val Dice 0.330 (best 0.330),
elapsed 0:00:02, ETA 0:00:09`` and rewrites the stats file that ``/info/`` shows as
``train_stats.<method>``. Slicer's MONAI Label module and OHIF's panel draw their training bar from
``epoch``/``total_epochs`` (none while ``total_time`` is set) and their accuracy bar from
``best_metric``, the keys MONAI Label's own trainers write. This training has no epochs (it draws
an endless stream of episodes), so ``epoch`` is the number of iterations done and ``total_epochs``
the number requested: the bar shows the true fraction, its tooltip calls iterations "epochs".
``best_metric`` is the best validation Dice so far (``best_dice``, on held-out pseudo-label
episodes), absent before the first validation. As MONAI Label's trainers do, ``current_time``
(H:MM:SS) is the time so far while running and ``total_time`` replaces it once done; ``start_ts``
is the start in Unix seconds and ``eta_s`` the seconds left at the mean rate so far (``it_per_s``).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from pathlib import Path

import psutil
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from lib.configs import ModelRuntime
from sdfsmis.methods import DEFAULT_METHOD, method_class
from sdfsmis.training.checkpoints import publish
from sdfsmis.training.trainer import TrainingRun, train

TRUE = ("1", "true", "yes")

logger = logging.getLogger(__name__)


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


def _clock(seconds: float) -> str:
    """H:MM:SS, the form of MONAI Label's ``current_time``/``total_time``."""
    return str(datetime.timedelta(seconds=int(seconds)))


def _progress(stats: dict, elapsed: float) -> dict:
    """The client-facing keys (module docstring) derived from the trainer's latest records."""
    done, total = stats["iteration"], stats["total_iterations"]
    fields = {"epoch": done, "total_epochs": total, "current_time": _clock(elapsed)}
    if stats.get("it_per_s"):
        fields["eta_s"] = round(max(total - done, 0) / stats["it_per_s"], 1)
    if stats.get("best_dice", -1.0) >= 0:  # -1 until the first validation
        fields["best_metric"] = stats["best_dice"]
    return fields


def _progress_line(method: str, stats: dict) -> str:
    """One human-readable line of ``GET /train/``'s ``details``; only what is known so far."""
    done, total = stats["iteration"], stats["total_iterations"]
    parts = [f"{method} training: iteration {done}/{total} ({100 * done // max(total, 1)}%)"]
    if "it_per_s" in stats:
        parts.append(f"{stats['it_per_s']:.1f} it/s")
    if "loss" in stats:
        parts.append(f"loss {stats['loss']:.4f}")
    if "val_dice" in stats:
        parts.append(f"val Dice {stats['val_dice']:.3f} (best {stats['best_dice']:.3f})")
    parts.append(f"elapsed {stats.get('total_time') or stats['current_time']}")
    if "eta_s" in stats:
        parts.append(f"ETA {_clock(stats['eta_s'])}")
    return ", ".join(parts)


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
        clock = time.monotonic()
        stats = {
            "status": "RUNNING",
            "total_iterations": params["iterations"],
            "iteration": 0,
            "pid": me.pid,
            "started": me.create_time(),
            "start_ts": int(time.time()),
        }
        stats.update(_progress(stats, 0.0))
        self._write_stats(stats)
        logger.info(_progress_line(self.runtime.method, stats))

        def on_step(record: dict) -> None:
            stats.update(record)
            stats.update(_progress(stats, time.monotonic() - clock))
            self._write_stats(stats)
            logger.info(_progress_line(self.runtime.method, stats))

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
        stats.update(_progress(stats, time.monotonic() - clock))
        stats["total_time"] = stats.pop("current_time")  # done: MONAI Label's clients read the bar as full
        self._write_stats(stats)
        logger.info(_progress_line(self.runtime.method, stats))
        return {k: v for k, v in summary.items() if k != "losses"}
