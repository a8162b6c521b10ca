"""``sdfsmis prepare``, ``sdfsmis evaluate`` and ``sdfsmis sample-raw``: argument parsing only."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sdfsmis.cli.common import add_weights_options, checkpoints
from sdfsmis.methods import DEFAULT_METHOD, DPL, weights_key, weights_option
from sdfsmis.methods import METHODS as MODELS


def _ids(text: str | None) -> list[int] | None:
    return [int(k) for k in text.split(",")] if text else None


RESAMPLE_HELP = (
    "resample every volume to this slice thickness in mm (default: the recipe's: CHAOS 7.70, Synapse and folder "
    "untouched); images low-pass filtered when slices get thicker, labels nearest"
)
THICKNESS_HELP = (
    "slice thickness in mm: the same patients over the same field of view, sliced thinner or thicker "
    "(default: chaos 8, synapse 6)"
)


def _fold_weights_help(method: str) -> str:
    if method == DEFAULT_METHOD:
        return (
            " of every fold: one path, or a pattern with {fold} (CKPT/fold{fold}/<method>.safetensors); a folder "
            "holds each method's own file"
        )
    return " of every fold (its ablations too), like --checkpoint; default: the folder --checkpoint names, if any"


def cmd_prepare(args: argparse.Namespace) -> None:
    from sdfsmis.evaluation.prepare import prepare

    started = time.perf_counter()
    dataset = prepare(
        args.kind, args.src, args.dst, _ids(args.labels), args.supervoxel_min_size, limit=args.limit,
        slice_spacing=args.slice_spacing,
    )  # fmt: skip
    print(
        f"{len(dataset.cases)} {dataset.modality} volumes prepared in {dataset.root} "
        f"(test labels {dataset.test_labels}) in {time.perf_counter() - started:.1f} s"
    )


def cmd_sample_raw(args: argparse.Namespace) -> None:
    from sdfsmis.evaluation.lookalike import write_chaos, write_synapse

    writer = write_chaos if args.kind == "chaos" else write_synapse
    options = {} if args.seed is None else {"seed": args.seed}
    path = writer(args.dir, args.patients, slice_spacing=args.slice_spacing, **options)
    print(f"{args.patients} generated look-alike {args.kind} patients in {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    import torch

    from sdfsmis.cli.common import device
    from sdfsmis.evaluation.dataset import PreparedDataset
    from sdfsmis.evaluation.harness import Evaluator, check_methods
    from sdfsmis.evaluation.methods import METHODS, MODEL_KEYS, MethodFactory
    from sdfsmis.evaluation.metrics import margins_over, summarise
    from sdfsmis.evaluation.report import organ_order, write_reports
    from sdfsmis.figures.evaluation import MontageCollector, write_evaluation_figures
    from sdfsmis.settings import load_config

    dataset = PreparedDataset.load(args.data)
    if args.method:
        methods = [m for text in args.method for m in text.split(",")]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"error: unknown method {', '.join(unknown)} (known: {', '.join(METHODS)})")
    else:
        weights = checkpoints(args)  # the default method always, the others where their weights are named
        methods = [m for m in MODELS if args.backbone and (m == DEFAULT_METHOD or weights[m])]
        methods += ["prototype", "registration"]
        methods = (["nearest-slice", "interpolation"] if args.protocol == "propagation" else []) + methods
    try:
        check_methods(args.protocol, methods)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    config = load_config(args.config, args.backbone if set(MODEL_KEYS) & set(methods) else None)
    if args.supports_per_query is not None:  # > 1: SD-FSMIS's supports disagree -> a per-slice confidence
        config.inference.supports_per_query = args.supports_per_query
    factory = MethodFactory(
        args.backbone, checkpoints(args), config, device(args.device), args.prototype_resolution,
        args.registration_resolution,
    )  # fmt: skip
    started = time.perf_counter()
    window = dataset.preprocessing.get("window") if dataset.modality == "CT" else None  # CT: the data set's HU window
    montages = MontageCollector(Path(args.output) / "montages", args.montages, window)
    evaluator = Evaluator(dataset, config.inference, args.protocol, args.annotated_slices, montages)
    shared = {k: str(getattr(args, k)) for k in ("backbone", "checkpoint", "config", "setting", "device")}
    shared.update(prototype=args.prototype_resolution, registration=args.registration_resolution)
    if args.supports_per_query is not None:
        shared.update(supports_per_query=args.supports_per_query)

    def run_key(key: str) -> dict:  # a method's own weights option (--dpl-checkpoint) defines only its rows
        option = weights_key(MODEL_KEYS[key][0]) if key in MODEL_KEYS else "checkpoint"
        return {**shared, option: str(getattr(args, option))} if option != "checkpoint" else shared

    done = Path(args.output) / "finished"  # a restarted run reuses the (fold, method) results kept here
    labels = _ids(args.labels)
    records, folds = evaluator.run(methods, factory, args.folds, labels, args.support_index, done=done, run_key=run_key)
    wall = time.perf_counter() - started
    summary = summarise(records)
    margins_over(summary, records, "nearest-slice")
    if args.protocol == "propagation":
        from sdfsmis.io.volume import load_volume, ras_spacing

        thickness = ras_spacing(load_volume(dataset.image(dataset.cases[0])))[2]
        protocol = f"propagation protocol ({args.annotated_slices} annotated slices per organ), {thickness:g} mm slices"
    else:
        protocol = f"{args.protocol} protocol"
    heading = (
        f"{dataset.name} ({dataset.modality}, {len(dataset.cases)} volumes), Setting {args.setting}, "
        f"{protocol}, {args.folds}-fold" + (", 1-shot" if args.protocol != "propagation" else "")
        + (f", trained on {args.trained_on}" if args.trained_on else "")
    )  # fmt: skip
    run = {
        **{k: v for k, v in vars(args).items() if k != "run"},
        "dataset": {"name": dataset.name, "modality": dataset.modality, "cases": dataset.cases},
        "wall_seconds": wall,
        "torch_threads": torch.get_num_threads(),
    }
    table = write_reports(Path(args.output), run, folds, summary, records, heading, args.protocol)
    montages.write()
    write_evaluation_figures(Path(args.output), records, organ_order(summary), heading, table)
    print(table)
    print(json.dumps({"output": str(args.output), "volumes": len(records), "wall_seconds": round(wall, 1)}))


def cmd_evaluate_loop(args: argparse.Namespace) -> None:
    from sdfsmis.evaluation.dataset import PreparedDataset
    from sdfsmis.evaluation.loop import run
    from sdfsmis.evaluation.methods import checkpoint_for_fold
    from sdfsmis.evaluation.protocol import make_folds
    from sdfsmis.pipeline.predictor import Predictor
    from sdfsmis.settings import load_config

    config = load_config(args.config, args.backbone)
    dataset = PreparedDataset.load(args.data)
    if args.fold is None:  # the first cases; the models must not have seen them (e.g. cross-domain)
        queries, fold = dataset.cases[: args.queries], 0
    else:  # fold K's test cases, each segmented by fold K's models (trained without them)
        queries, fold = make_folds(dataset.cases, args.folds)[args.fold].cases[: args.queries], args.fold
    weights = {method: checkpoint_for_fold(pattern, fold) for method, pattern in checkpoints(args).items()}
    segmenters = {}
    for method in args.method.split(","):
        if weights.get(method) is None:
            raise SystemExit(f"error: --method {method} needs its weights ({weights_option(method)})")
        predictor = Predictor.from_pretrained(method, args.backbone, config, weights[method])
        segmenters[method] = predictor.segmenter(progress=False)
    print(run(dataset, segmenters, config, args.output, args.pairs, queries))


def register(commands: argparse._SubParsersAction) -> None:
    prepare = commands.add_parser("prepare", help="CHAOS / Synapse / Decathlon-style raw data -> prepared volumes")
    prepare.add_argument("kind", choices=["chaos", "synapse", "folder"])
    prepare.add_argument("src", type=Path, help="the data set's raw folder")
    prepare.add_argument("dst", type=Path, help="output folder (images, labels/final, .supervoxels, dataset.json)")
    prepare.add_argument("--labels", default=None, help="class ids to test (folder: required; default: protocol's)")
    prepare.add_argument("--supervoxel-min-size", type=int, default=5000, help="voxels (protocol: 5000)")
    prepare.add_argument("--limit", type=int, default=None, help="prepare only the first N cases")
    prepare.add_argument("--slice-spacing", type=float, default=None, help=RESAMPLE_HELP)
    prepare.set_defaults(run=cmd_prepare)

    raw = commands.add_parser("sample-raw", help="generated look-alike raw data in the CHAOS / Synapse layouts")
    raw.add_argument("kind", choices=["chaos", "synapse"])
    raw.add_argument("dir", type=Path)
    raw.add_argument("--patients", type=int, default=10)
    raw.add_argument("--seed", type=int, default=None, help="first patient's seed (default: chaos 100, synapse 200)")
    raw.add_argument("--slice-spacing", type=float, default=None, help=THICKNESS_HELP)
    raw.set_defaults(run=cmd_sample_raw)

    loop = commands.add_parser(
        "evaluate-loop",
        help="across patients: the organ's range in queries with other fields of view (registration vs relative), "
        "and Dice from 1, 2 and 4 support patients",
    )
    loop.add_argument("--data", required=True, type=Path, help="a prepared data set (sdfsmis prepare)")
    loop.add_argument("--backbone", required=True)
    loop.add_argument("--config", default=None)
    loop.add_argument("--method", default=DPL.method, help=f"comma-separated: {', '.join(MODELS)}")
    add_weights_options(loop, lambda method: "")
    loop.add_argument("--pairs", type=int, default=10, help="support/query pairs of the placement study")
    loop.add_argument("--queries", type=int, default=10, help="query volumes of the support-count study")
    loop.add_argument("--fold", type=int, default=None, help="queries: fold K's test cases, checkpoints '{fold}'")
    loop.add_argument("--folds", type=int, default=5)
    loop.add_argument("--output", required=True, type=Path)
    loop.set_defaults(run=cmd_evaluate_loop)

    evaluate = commands.add_parser(
        "evaluate", help="few-shot evaluation over folds (paper, realistic or same-volume propagation protocol)"
    )
    evaluate.add_argument("--data", required=True, type=Path, help="a prepared data set (sdfsmis prepare)")
    evaluate.add_argument(
        "--method",
        action="append",
        default=None,
        help="comma-separated, of sdfsmis, dpl, dpl-lambda0, dpl-untrained-denoiser, dpl-no-condition, prototype, "
        "registration, nearest-slice and interpolation (propagation only) (default: all that can run)",
    )
    evaluate.add_argument("--backbone", default=None, help="backbone directory or 'default' (sdfsmis, dpl*)")
    add_weights_options(evaluate, _fold_weights_help)
    evaluate.add_argument("--config", default=None, help="preset name in configs/ or a YAML path")
    evaluate.add_argument("--setting", type=int, default=1, choices=[1, 2], help="the setting the checkpoints used")
    evaluate.add_argument("--protocol", default="paper", choices=["paper", "realistic", "propagation"])
    evaluate.add_argument(
        "--annotated-slices",
        type=int,
        default=3,
        help="propagation: organ slices annotated from ground truth in each volume, spread at (2i+1)/(2N) (default 3)",
    )
    evaluate.add_argument(
        "--supports-per-query",
        type=int,
        default=None,
        help="inference.supports_per_query for the product path (default: the preset's); >= 2 gives SD-FSMIS a "
        "per-slice confidence",
    )
    evaluate.add_argument("--folds", type=int, default=5)
    evaluate.add_argument("--support-index", type=int, default=0, help="which volume of a fold is the support")
    evaluate.add_argument("--labels", default=None, help="class ids to test (default: the data set's)")
    evaluate.add_argument("--trained-on", default=None, help="noted in the table, e.g. 'Abd-CT' for cross-domain")
    evaluate.add_argument("--prototype-resolution", type=int, default=256)
    evaluate.add_argument("--registration-resolution", type=int, default=128)
    evaluate.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    evaluate.add_argument("--output", required=True, type=Path)
    evaluate.add_argument(
        "--montages", type=int, default=2, help="query volumes of the first fold drawn as montages (0: none)"
    )
    evaluate.set_defaults(run=cmd_evaluate)
