"""The ``sdfsmis`` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import dicom_cli
from .backbone import DEFAULT_BACKBONE, BackboneNotFoundError
from .bench import add_bench_parser
from .evaluation.cli import add_evaluation_commands
from .models import METHODS


def _device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA device is available")
    return name


def cmd_make_tiny(args: argparse.Namespace) -> None:
    from .backbone import make_tiny_backbone

    directory = make_tiny_backbone(Path(args.dir), seed=args.seed)
    if args.fit_vae:
        from .tiny_vae import fit_tiny_vae

        error = fit_tiny_vae(directory, steps=args.fit_vae)
        print(f"tiny VAE fitted on generated slices for {args.fit_vae} steps (reconstruction MSE {error:.4f})")
    print(f"tiny backbone written to {directory}")


def cmd_sample_data(args: argparse.Namespace) -> None:
    from .synthetic import make_studies

    paths = make_studies(
        Path(args.dir), args.count, seed=args.seed, with_labels=args.with_labels, modality=args.modality
    )
    print(
        f"{len(paths)} generated {args.modality} volumes in {args.dir}"
        + (" (+ labels/final)" if args.with_labels else "")
    )


def cmd_supervoxels(args: argparse.Namespace) -> None:
    from .supervoxels import run_supervoxels_cli

    run_supervoxels_cli(args.image, args.output, min_size=args.min_size)


def cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .episodes import AUTO
    from .evaluation.protocol import training_selection
    from .trainer import TrainingRun, train

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
        device=_device(args.device),
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
            from .figures.curves import plot_training_curves

            summary["training_curves"] = str(plot_training_curves(run.output))
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))


def cmd_report_train(args: argparse.Namespace) -> None:
    from .figures.curves import plot_training_curves

    print(f"training curves written to {plot_training_curves(args.dir, args.output)}")


def cmd_download(args: argparse.Namespace) -> None:
    from .backbone import download_backbone

    print(f"backbone downloaded to {download_backbone(Path(args.dir), fp16=args.fp16)}")


def cmd_infer(args: argparse.Namespace) -> None:
    from .acceleration import InferenceOptions, accelerate
    from .config import load_config
    from .inference import SupportVolume, VolumeSegmenter, select_supported_ids
    from .models import load_model
    from .volume import check_same_geometry, load_volume

    config = load_config(args.config, args.backbone)
    if args.resolution:
        config.model.resolution = args.resolution
    if len(args.support_image) != len(args.support_label):
        raise SystemExit("error: give one --support-label per --support-image (pairs, in the same order)")
    supports = []
    for image_path, label_path in zip(args.support_image, args.support_label):
        support = SupportVolume(load_volume(image_path), load_volume(label_path, label=True))
        check_same_geometry(support.image, support.label)
        supports.append(support)
    query = load_volume(args.image)
    labels = select_supported_ids(supports, [int(k) for k in args.labels.split(",")] if args.labels else None)
    if args.checkpoint is None:
        trained_parts = "widened convs, VTCT MLP" if args.method == "sdfsmis" else "adapter, denoiser, threshold"
        print(
            f"WARNING: no --checkpoint: the {args.method} head ({trained_parts}) is untrained, "
            f"so this prediction is not meaningful. Train with `sdfsmis train --method {args.method}` first.",
            file=sys.stderr,
        )
    started = time.perf_counter()
    model = load_model(args.method, args.backbone, config, args.checkpoint, device=_device(args.device)).eval()
    options = InferenceOptions(precision=args.precision, compile=args.compile)
    accelerate(model, options)
    loaded = time.perf_counter() - started
    result = VolumeSegmenter(model, config.inference, options=options).segment_with(supports, query, labels)
    query.save_label(result.labels, args.output)
    summary = {"output": str(args.output), "method": args.method, "model_load_seconds": round(loaded, 3)}
    summary.update(result.summary())
    if result.uncertainty is not None:
        summary["confidence"] = {str(k): v for k, v in result.confidence(query).items()}
        summary["review_slices"] = {str(k): v for k, v in result.review_slices(query).items()}
    if args.uncertainty:
        if result.uncertainty is None:
            raise SystemExit(
                "error: --uncertainty: no members disagree here (dpl has variants; sdfsmis needs several supports "
                "per slice: inference.supports_per_query >= 2 and more than one support slice)"
            )
        summary["uncertainty"] = str(query.save_map(result.uncertainty, args.uncertainty))
    if args.preview:
        from .figures.preview import write_preview

        title = f"{args.image.name}: {args.method}, support {supports[0].name}"
        summary["preview"] = str(
            write_preview(args.preview, supports[0].image, supports[0].label, query, result, title)
        )
    print(json.dumps(summary, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdfsmis", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("make-tiny", help="write a tiny random backbone (tests, demos)")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=None)
    tiny.add_argument(
        "--fit-vae", type=int, default=0, metavar="STEPS", help="fit the tiny VAE on generated slices (learning demos)"
    )
    tiny.set_defaults(run=cmd_make_tiny)

    sample = commands.add_parser("sample-data", help="generated abdominal NIfTI volumes for a quick start")
    sample.add_argument("dir")
    sample.add_argument("--count", type=int, default=4)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--modality", default="CT", choices=["CT", "MR"])
    sample.add_argument("--with-labels", action="store_true", help="also write ground truth to DIR/labels/final")
    sample.set_defaults(run=cmd_sample_data)

    supervoxels = commands.add_parser("supervoxels", help="3-D supervoxel pseudo-labels of a volume")
    supervoxels.add_argument("--image", required=True, type=Path)
    supervoxels.add_argument("--output", required=True, type=Path)
    supervoxels.add_argument("--min-size", type=int, default=5000, help="minimum supervoxel size in voxels")
    supervoxels.set_defaults(run=cmd_supervoxels)

    training = commands.add_parser("train", help="self-supervised episodic fine-tuning on supervoxels")
    training.add_argument("--method", default="sdfsmis", choices=list(METHODS), help="the one-shot method")
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

    download = commands.add_parser("download", help="fetch SD v1.5 (vae, unet) + DINOv2-small")
    download.add_argument("dir")
    download.add_argument("--fp16", action="store_true", help="the fp16 weight variant (half the size)")
    download.set_defaults(run=cmd_download)

    infer = commands.add_parser("infer", help="one-shot segmentation of a NIfTI volume")
    infer.add_argument("--method", default="sdfsmis", choices=list(METHODS), help="the one-shot method")
    infer.add_argument("--backbone", default=DEFAULT_BACKBONE, help="backbone directory or 'default' (hub ids)")
    infer.add_argument("--checkpoint", default=None, help="our fine-tuned weights (file or directory)")
    infer.add_argument("--config", default=None, help="preset name in configs/ or a YAML path")
    infer.add_argument(
        "--support-image",
        required=True,
        type=Path,
        action="append",
        help="repeat with --support-label: several patients",
    )
    infer.add_argument("--support-label", required=True, type=Path, action="append")
    infer.add_argument("--image", required=True, type=Path)
    infer.add_argument("--output", required=True, type=Path)
    infer.add_argument("--labels", default=None, help="comma-separated label ids (default: all in the support)")
    infer.add_argument("--resolution", type=int, default=None, help="model slice size (default: the preset's)")
    infer.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    infer.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on CUDA"
    )
    infer.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder (GPU)")
    infer.add_argument(
        "--uncertainty",
        type=Path,
        default=None,
        help="dpl: write the voxel uncertainty map (NIfTI) in the query's geometry",
    )
    infer.add_argument(
        "--preview",
        type=Path,
        default=None,
        help="write a PNG montage: support slices with their mask, query slices with the prediction (and uncertainty)",
    )
    infer.set_defaults(run=cmd_infer)

    dicom_cli.register(commands)
    add_evaluation_commands(commands)
    add_bench_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (BackboneNotFoundError, ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main()
