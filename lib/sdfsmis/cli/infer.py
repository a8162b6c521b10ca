"""``sdfsmis infer``: one-shot segmentation of a NIfTI volume through the predictor."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sdfsmis.cli.common import device
from sdfsmis.io.backbone import DEFAULT_BACKBONE
from sdfsmis.methods import DEFAULT_METHOD, METHODS


def cmd_infer(args: argparse.Namespace) -> None:
    from sdfsmis.io.volume import check_same_geometry, load_volume
    from sdfsmis.pipeline.acceleration import InferenceOptions
    from sdfsmis.pipeline.predictor import Predictor
    from sdfsmis.pipeline.segmenter import SupportVolume, select_supported_ids
    from sdfsmis.settings import load_config

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
        print(
            f"WARNING: no --checkpoint: the {args.method} head ({METHODS[args.method].trained_parts}) is untrained, "
            f"so this prediction is not meaningful. Train with `sdfsmis train --method {args.method}` first.",
            file=sys.stderr,
        )
    started = time.perf_counter()
    options = InferenceOptions(precision=args.precision, compile=args.compile)
    predictor = Predictor.from_pretrained(
        args.method, args.backbone, config, args.checkpoint, device(args.device), options
    )
    loaded = time.perf_counter() - started
    result = predictor.segment(supports, query, labels)
    query.save_label(result.labels, args.output)
    summary = {"output": str(args.output), "method": args.method, "model_load_seconds": round(loaded, 3)}
    summary.update(result.summary())
    if result.has_uncertainty:
        summary["confidence"] = {str(k): v for k, v in result.confidence(query).items()}
        summary["review_slices"] = {str(k): v for k, v in result.review_slices(query).items()}
    if args.uncertainty:
        if not result.has_uncertainty:
            raise SystemExit(
                f"error: --uncertainty: no members disagree here ({args.method}: a method with variants always has "
                "them; otherwise it needs several supports per slice: inference.supports_per_query >= 2 and more "
                "than one support slice)"
            )
        summary["uncertainty"] = str(query.save_map(result.uncertainty, args.uncertainty))
    if args.preview:
        from sdfsmis.figures.preview import write_preview

        title = f"{args.image.name}: {args.method}, support {supports[0].name}"
        summary["preview"] = str(
            write_preview(args.preview, supports[0].image, supports[0].label, query, result, title)
        )
    print(json.dumps(summary, indent=2))


def register(commands: argparse._SubParsersAction) -> None:
    infer = commands.add_parser("infer", help="one-shot segmentation of a NIfTI volume")
    infer.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), help="the one-shot method")
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
