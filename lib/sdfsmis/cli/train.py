"""``sdfsmis train`` and ``sdfsmis report-train``: episodic fine-tuning of a method on volumes."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sdfsmis.cli.common import device
from sdfsmis.io.backbone import DEFAULT_BACKBONE
from sdfsmis.io.manifest import write_manifest
from sdfsmis.methods import DEFAULT_METHOD, METHODS


def cmd_train(args: argparse.Namespace) -> None:
    from sdfsmis.evaluation.protocol import training_selection
    from sdfsmis.settings import load_config
    from sdfsmis.training.episodes import AUTO
    from sdfsmis.training.trainer import TrainingRun, train

    config = load_config(args.config, args.backbone)
    exclude = [int(k) for k in args.exclude.split(",")] if args.exclude else []
    images, exclude = training_selection(args.images, args.fold, args.folds, args.setting, exclude)
    if args.seed is not None:
        config.training.seed = args.seed
    if args.gradient_checkpointing:
        config.training.gradient_checkpointing = True
    for key in ("checkpoint_every", "validate_every", "min_foreground"):
        if getattr(args, key):
            setattr(config.training, key, getattr(args, key))
    if args.supervoxel_min_size:
        size = args.supervoxel_min_size
        config.training.supervoxel_min_size = size if size == AUTO else int(size)
    run = TrainingRun(
        backbone=args.backbone,
        images=images,
        output=Path(args.output),
        config=config,
        iterations=args.iterations or config.training.iterations,
        device=device(args.device),
        resume=args.resume,
        batch_size=args.batch_size,
        exclude_classes=exclude,
        exclusion_rule=args.exclusion_rule,
        workers=args.workers,
        method=args.method,
    )
    summary = train(run)
    if summary["world_size"] == 1 or os.environ.get("RANK") == "0":  # under torchrun: rank 0 reports
        if args.plot:
            from sdfsmis.figures.curves import plot_training_curves

            summary["training_curves"] = str(plot_training_curves(run.output))
        summary["manifest"] = str(write_manifest(run.output, f"sdfsmis train --method {args.method}"))
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))


def cmd_report_train(args: argparse.Namespace) -> None:
    from sdfsmis.figures.curves import plot_training_curves

    print(f"training curves written to {plot_training_curves(args.dir, args.output)}")


def register(commands: argparse._SubParsersAction) -> None:
    training = commands.add_parser("train", help="self-supervised episodic fine-tuning on supervoxels")
    training.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), help="the one-shot method")
    training.add_argument("--backbone", default=DEFAULT_BACKBONE)
    training.add_argument("--config", default=None, help="preset name in configs/ or a YAML path")
    training.add_argument("--images", required=True, help="a folder of NIfTI volumes or a glob")
    training.add_argument("--output", required=True, help="checkpoint folder")
    training.add_argument("--iterations", type=int, default=None, help="default: the preset's")
    training.add_argument("--batch-size", type=int, default=1)
    training.add_argument("--checkpoint-every", type=int, default=None)
    training.add_argument("--validate-every", type=int, default=None)
    training.add_argument("--seed", type=int, default=None, help="default: the preset's (42)")
    training.add_argument("--exclude", default=None, help="Setting 2: test class ids whose slices are dropped")
    training.add_argument("--exclusion-rule", default="any", choices=["any", "all"])
    training.add_argument("--fold", type=int, default=None, help="train fold K's model: --images is a prepared set")
    training.add_argument("--folds", type=int, default=5)
    training.add_argument("--setting", type=int, default=None, choices=[1, 2], help="2: drop test-class slices")
    training.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    training.add_argument("--resume", action="store_true", help="continue from OUTPUT/last")
    training.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    training.add_argument("--workers", type=int, default=0, help="processes preparing episodes ahead of the step")
    training.add_argument("--min-foreground", type=int, default=None, help="episode mask pixels at model resolution")
    training.add_argument(
        "--supervoxel-min-size", default=None, help="voxels, or 'auto' (default): from voxel size and min-foreground"
    )
    training.add_argument("--plot", action="store_true", help="then draw OUTPUT/training_curves.png from the log")
    training.set_defaults(run=cmd_train)

    curves = commands.add_parser("report-train", help="training curves (PNG) from a training folder's train_log.jsonl")
    curves.add_argument("dir", type=Path, help="a training output folder")
    curves.add_argument("--output", type=Path, default=None, help="default: DIR/training_curves.png")
    curves.set_defaults(run=cmd_report_train)
