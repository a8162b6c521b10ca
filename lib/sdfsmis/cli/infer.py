"""``sdfsmis infer``: one-shot segmentation of a volume through the predictor. Images are NIfTI or NRRD
files or DICOM series folders; support labels are labelmaps, DICOM SEG or RTSTRUCT files (told by
content); a DICOM query's result can also be written as DICOM SEG and RTSTRUCT."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sdfsmis.cli.common import device
from sdfsmis.io.backbone import DEFAULT_BACKBONE
from sdfsmis.methods import DEFAULT_METHOD, METHODS


def _image(path: Path):
    """An image argument -> (volume, its DICOM series or None): a folder is a DICOM series."""
    from sdfsmis.dicom.volume import dicom_kind, load_series
    from sdfsmis.io.volume import VolumeError, load_volume

    if path.is_dir():
        return load_series(path)
    if dicom_kind(path) is not None:
        raise VolumeError(f"{path.name} is a DICOM file: give the folder that holds its series")
    return load_volume(path), None


def _support_label(path: Path, series_image, series, structures: list[str] | None):
    """A support label argument -> (label volume, [{"idx", "name", "color"}]): a DICOM SEG or
    RTSTRUCT (read onto its series, which must be the support image) or a labelmap (on a DICOM
    support, in any voxel order of the series' grid)."""
    from sdfsmis.dicom.volume import RTSTRUCT, SEG, dicom_kind, load_segmentation, onto_series_grid
    from sdfsmis.io.volume import VolumeError, load_volume

    kind = dicom_kind(path)
    if kind in (SEG, RTSTRUCT):
        if series is None:
            raise VolumeError(f"{path.name} is a DICOM {kind}: give the series it was drawn on as --support-image")
        return load_segmentation(path, series, structures)
    if kind is not None:
        raise VolumeError(f"{path.name} is a DICOM {kind} file, not a label: give a labelmap, a SEG or an RTSTRUCT")
    if structures:
        raise VolumeError(
            f"--structures picks ROIs or segments by name from a DICOM SEG or RTSTRUCT; {path.name} is a labelmap "
            "(pick its ids with --labels)"
        )
    label = load_volume(path, label=True)
    return (label if series is None else onto_series_grid(label, series_image)), []


def _write_dicom_results(args: argparse.Namespace, query, series, labels, label_info: list[dict]) -> dict:
    """The result as DICOM SEG and/or RTSTRUCT referencing the query series, with the support's
    label names and colours and this algorithm's name and version."""
    from importlib.metadata import version

    from sdfsmis.dicom.rtstruct import labels_to_rtstruct
    from sdfsmis.dicom.seg import labelmap_to_seg

    algorithm, release = f"sdfsmis {args.method}", version("sdfsmis")
    description = f"{algorithm} result"
    written = {}
    if args.output_seg:
        seg = labelmap_to_seg(args.output, series.datasets, label_info, description, algorithm, "AUTOMATIC", release)
        seg.save_as(str(args.output_seg), write_like_original=False)
        written["output_seg"] = str(args.output_seg)
    if args.output_rtstruct:
        rtstruct = labels_to_rtstruct(query.to_original(labels), series, label_info, description, algorithm, release)
        rtstruct.save_as(str(args.output_rtstruct), write_like_original=False)
        written["output_rtstruct"] = str(args.output_rtstruct)
    return written


def cmd_infer(args: argparse.Namespace) -> None:
    from sdfsmis.io.volume import check_same_geometry
    from sdfsmis.pipeline.acceleration import InferenceOptions
    from sdfsmis.pipeline.predictor import Predictor
    from sdfsmis.pipeline.segmenter import SupportVolume, select_supported_ids
    from sdfsmis.settings import load_config

    config = load_config(args.config, args.backbone)
    if args.resolution:
        config.model.resolution = args.resolution
    if len(args.support_image) != len(args.support_label):
        raise SystemExit("error: give one --support-label per --support-image (pairs, in the same order)")
    if (args.output_seg or args.output_rtstruct) and not args.image.is_dir():
        raise SystemExit(
            "error: --output-seg and --output-rtstruct reference the query's DICOM series: give --image as a "
            "DICOM series folder"
        )
    structures = [name.strip() for name in args.structures.split(",") if name.strip()] if args.structures else None
    query, query_series = _image(args.image)
    supports, label_info = [], {}
    for image_path, label_path in zip(args.support_image, args.support_label):
        same = image_path.resolve() == args.image.resolve()  # the query drawn on: read once, held once
        image, series = (query, query_series) if same else _image(image_path)
        label, entries = _support_label(label_path, image, series, structures)
        support = SupportVolume(image, label)
        check_same_geometry(support.image, support.label)
        supports.append(support)
        for entry in entries:  # names and colours for DICOM outputs: the first support that names an id
            label_info.setdefault(entry["idx"], entry)
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
    if args.output_seg or args.output_rtstruct:
        summary.update(_write_dicom_results(args, query, query_series, result.labels, list(label_info.values())))
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
    infer = commands.add_parser("infer", help="one-shot segmentation of a NIfTI/NRRD volume or a DICOM series")
    infer.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), help="the one-shot method")
    infer.add_argument("--backbone", default=DEFAULT_BACKBONE, help="backbone directory or 'default' (hub ids)")
    infer.add_argument("--checkpoint", default=None, help="our fine-tuned weights (file or directory)")
    infer.add_argument("--config", default=None, help="preset name in configs/ or a YAML path")
    infer.add_argument(
        "--support-image",
        required=True,
        type=Path,
        action="append",
        help="NIfTI/NRRD file or DICOM series folder; repeat with --support-label: several patients",
    )
    infer.add_argument(
        "--support-label",
        required=True,
        type=Path,
        action="append",
        help="labelmap (NIfTI/NRRD), DICOM SEG or RTSTRUCT of the support image (told by content)",
    )
    infer.add_argument("--image", required=True, type=Path, help="NIfTI/NRRD file or DICOM series folder")
    infer.add_argument("--output", required=True, type=Path)
    infer.add_argument(
        "--structures",
        default=None,
        help="NAME[,NAME]: the ROIs or segments of a SEG/RTSTRUCT support to use (default: all)",
    )
    infer.add_argument("--output-seg", type=Path, default=None, help="also write the result as DICOM SEG (DICOM query)")
    infer.add_argument(
        "--output-rtstruct", type=Path, default=None, help="also write the result as RTSTRUCT (DICOM query)"
    )
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
