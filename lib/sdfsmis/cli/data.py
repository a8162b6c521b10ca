"""``sdfsmis sample-data`` and ``sdfsmis supervoxels``: generated volumes and pseudo-labels."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_sample_data(args: argparse.Namespace) -> None:
    from sdfsmis.samples.synthetic import make_studies

    paths = make_studies(
        Path(args.dir), args.count, seed=args.seed, with_labels=args.with_labels, modality=args.modality
    )
    print(
        f"{len(paths)} generated {args.modality} volumes in {args.dir}"
        + (" (+ labels/final)" if args.with_labels else "")
    )


def cmd_supervoxels(args: argparse.Namespace) -> None:
    from sdfsmis.training.supervoxels import run_supervoxels_cli

    run_supervoxels_cli(args.image, args.output, min_size=args.min_size)


def register(commands: argparse._SubParsersAction) -> None:
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
