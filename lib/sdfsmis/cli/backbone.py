"""``sdfsmis make-tiny`` and ``sdfsmis download``: the backbones the methods are built on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdfsmis.io.manifest import verify_manifest, write_manifest


def cmd_make_tiny(args: argparse.Namespace) -> None:
    from sdfsmis.samples.tiny_backbone import make_tiny_backbone

    directory = make_tiny_backbone(Path(args.dir), seed=args.seed, shape=args.shape)
    if args.fit_vae:
        from sdfsmis.samples.tiny_vae import fit_tiny_vae

        error = fit_tiny_vae(directory, steps=args.fit_vae)
        print(f"tiny VAE fitted on generated slices for {args.fit_vae} steps (reconstruction MSE {error:.4f})")
    fitted = f", VAE fitted {args.fit_vae} steps" if args.fit_vae else ""
    seed = "the preset's seed" if args.seed is None else f"seed {args.seed}"
    write_manifest(directory, f"sdfsmis make-tiny (random {args.shape} weights, {seed}{fitted})")
    print(f"tiny backbone written to {directory}")


def cmd_download(args: argparse.Namespace) -> None:
    from sdfsmis.io.backbone import download_backbone
    from sdfsmis.settings import PRESET_DIR

    directory = download_backbone(Path(args.dir), PRESET_DIR / "sd15.yaml", fp16=args.fp16)
    print(f"backbone downloaded to {directory}")


def cmd_verify(args: argparse.Namespace) -> None:
    problems = verify_manifest(args.dir)
    for problem in problems:
        print(f"{args.dir}/{problem}", file=sys.stderr)
    if problems:
        raise SystemExit(1)
    print(f"{args.dir}: every file matches its manifest")


def register(commands: argparse._SubParsersAction) -> None:
    tiny = commands.add_parser("make-tiny", help="write a tiny random backbone (tests, demos)")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=None)
    tiny.add_argument(
        "--shape", default="tiny", choices=["tiny", "sd15"], help="sd15: random weights at the real shapes (~3.8 GB)"
    )
    tiny.add_argument(
        "--fit-vae", type=int, default=0, metavar="STEPS", help="fit the tiny VAE on generated slices (learning demos)"
    )
    tiny.set_defaults(run=cmd_make_tiny)

    download = commands.add_parser("download", help="fetch SD v1.5 (vae, unet) + DINOv2-small")
    download.add_argument("dir")
    download.add_argument("--fp16", action="store_true", help="the fp16 weight variant (half the size)")
    download.set_defaults(run=cmd_download)

    verify = commands.add_parser(
        "verify",
        help="check a backbone or checkpoint folder against its manifest.json (exit 1 and the files that differ)",
    )
    verify.add_argument("dir", type=Path)
    verify.set_defaults(run=cmd_verify)
