"""``sdfsmis prepare``, ``sdfsmis evaluate`` and ``sdfsmis sample-raw``: argument parsing only."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _ids(text: str | None) -> list[int] | None:
    return [int(k) for k in text.split(",")] if text else None


def cmd_prepare(args: argparse.Namespace) -> None:
    from .prepare import prepare

    started = time.perf_counter()
    dataset = prepare(args.kind, args.src, args.dst, _ids(args.labels), args.supervoxel_min_size, limit=args.limit)
    print(
        f"{len(dataset.cases)} {dataset.modality} volumes prepared in {dataset.root} "
        f"(test labels {dataset.test_labels}) in {time.perf_counter() - started:.1f} s"
    )


def cmd_sample_raw(args: argparse.Namespace) -> None:
    from .lookalike import write_chaos, write_synapse

    writer = write_chaos if args.kind == "chaos" else write_synapse
    path = writer(args.dir, args.patients, **({} if args.seed is None else {"seed": args.seed}))
    print(f"{args.patients} generated look-alike {args.kind} patients in {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    import torch

    from ..cli import _device
    from ..config import load_config
    from .dataset import PreparedDataset
    from .harness import Evaluator
    from .methods import DPL_VARIANTS, METHODS, MethodFactory
    from .metrics import summarise
    from .report import write_reports

    dataset = PreparedDataset.load(args.data)
    if args.method:
        methods = [m for text in args.method for m in text.split(",")]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"error: unknown method {', '.join(unknown)} (known: {', '.join(METHODS)})")
    else:
        methods = (["sdfsmis"] if args.backbone else []) + (["dpl"] if args.backbone and args.dpl_checkpoint else [])
        methods += ["prototype", "registration"]
    models = {"sdfsmis", *DPL_VARIANTS}
    config = load_config(args.config, args.backbone if models & set(methods) else None)
    factory = MethodFactory(
        args.backbone, args.checkpoint, config, _device(args.device), args.prototype_resolution,
        args.registration_resolution, args.dpl_checkpoint,
    )  # fmt: skip
    started = time.perf_counter()
    evaluator = Evaluator(dataset, config.inference, args.protocol)
    shared = {k: str(getattr(args, k)) for k in ("backbone", "checkpoint", "config", "setting", "device")}
    shared.update(prototype=args.prototype_resolution, registration=args.registration_resolution)

    def run_key(key: str) -> dict:  # --dpl-checkpoint defines only the DPL rows
        return {**shared, "dpl_checkpoint": str(args.dpl_checkpoint)} if key in DPL_VARIANTS else shared

    done = Path(args.output) / "finished"  # a restarted run reuses the (fold, method) results kept here
    labels = _ids(args.labels)
    records, folds = evaluator.run(methods, factory, args.folds, labels, args.support_index, done=done, run_key=run_key)
    wall = time.perf_counter() - started
    summary = summarise(records)
    heading = (
        f"{dataset.name} ({dataset.modality}, {len(dataset.cases)} volumes), Setting {args.setting}, "
        f"{args.protocol} protocol, {args.folds}-fold, 1-shot"
        + (f", trained on {args.trained_on}" if args.trained_on else "")
    )
    run = {
        **{k: v for k, v in vars(args).items() if k != "run"},
        "dataset": {"name": dataset.name, "modality": dataset.modality, "cases": dataset.cases},
        "wall_seconds": wall,
        "torch_threads": torch.get_num_threads(),
    }
    table = write_reports(Path(args.output), run, folds, summary, records, heading)
    print(table)
    print(json.dumps({"output": str(args.output), "volumes": len(records), "wall_seconds": round(wall, 1)}))


def add_evaluation_commands(commands) -> None:
    prepare = commands.add_parser("prepare", help="CHAOS / Synapse / Decathlon-style raw data -> prepared volumes")
    prepare.add_argument("kind", choices=["chaos", "synapse", "folder"])
    prepare.add_argument("src", type=Path, help="the data set's raw folder")
    prepare.add_argument("dst", type=Path, help="output folder (images, labels/final, .supervoxels, dataset.json)")
    prepare.add_argument("--labels", default=None, help="class ids to test (folder: required; default: protocol's)")
    prepare.add_argument("--supervoxel-min-size", type=int, default=5000, help="voxels (protocol: 5000)")
    prepare.add_argument("--limit", type=int, default=None, help="prepare only the first N cases")
    prepare.set_defaults(run=cmd_prepare)

    raw = commands.add_parser("sample-raw", help="generated look-alike raw data in the CHAOS / Synapse layouts")
    raw.add_argument("kind", choices=["chaos", "synapse"])
    raw.add_argument("dir", type=Path)
    raw.add_argument("--patients", type=int, default=10)
    raw.add_argument("--seed", type=int, default=None, help="first patient's seed (default: chaos 100, synapse 200)")
    raw.set_defaults(run=cmd_sample_raw)

    evaluate = commands.add_parser("evaluate", help="few-shot evaluation over folds (paper or realistic protocol)")
    evaluate.add_argument("--data", required=True, type=Path, help="a prepared data set (sdfsmis prepare)")
    evaluate.add_argument(
        "--method",
        action="append",
        default=None,
        help="comma-separated, of sdfsmis, dpl, dpl-lambda0, dpl-untrained-denoiser, dpl-no-condition, prototype, "
        "registration (default: all that can run)",
    )
    evaluate.add_argument("--backbone", default=None, help="backbone directory or 'default' (sdfsmis, dpl*)")
    evaluate.add_argument(
        "--checkpoint",
        default=None,
        help="SD-FSMIS weights of every fold: one path, or a pattern with {fold} "
        "(CKPT/fold{fold}/sdfsmis.safetensors); a folder holds each method's own file (sdfsmis/dpl.safetensors)",
    )
    evaluate.add_argument(
        "--dpl-checkpoint",
        default=None,
        help="DPL weights of every fold (dpl and its ablations), like --checkpoint (CKPT/fold{fold}/dpl.safetensors "
        "or a folder); default: the folder --checkpoint names, if it names one",
    )
    evaluate.add_argument("--config", default=None, help="preset name in configs/ or a YAML path")
    evaluate.add_argument("--setting", type=int, default=1, choices=[1, 2], help="the setting the checkpoints used")
    evaluate.add_argument("--protocol", default="paper", choices=["paper", "realistic"])
    evaluate.add_argument("--folds", type=int, default=5)
    evaluate.add_argument("--support-index", type=int, default=0, help="which volume of a fold is the support")
    evaluate.add_argument("--labels", default=None, help="class ids to test (default: the data set's)")
    evaluate.add_argument("--trained-on", default=None, help="noted in the table, e.g. 'Abd-CT' for cross-domain")
    evaluate.add_argument("--prototype-resolution", type=int, default=256)
    evaluate.add_argument("--registration-resolution", type=int, default=128)
    evaluate.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    evaluate.add_argument("--output", required=True, type=Path)
    evaluate.set_defaults(run=cmd_evaluate)
