"""``sdfsmis bench``: the arguments, and which suite of :mod:`sdfsmis.bench` runs for ``--method``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from sdfsmis.bench.dpl import format_dpl_table, run_dpl_bench
from sdfsmis.bench.loop import format_loop_table, run_loop_bench
from sdfsmis.bench.released import format_table, run_bench
from sdfsmis.cli.common import device
from sdfsmis.methods import DPL, SDFSMIS

#: ``--method`` -> (the suite, its table): SD-FSMIS against the released pipeline, DPL against SD-FSMIS.
SUITES: dict[str, tuple[Callable[[argparse.Namespace], dict], Callable[[dict], str]]] = {
    SDFSMIS.method: (run_bench, format_table),
    DPL.method: (run_dpl_bench, format_dpl_table),
}


def cmd_bench(args: argparse.Namespace) -> None:
    """Run the suite, print its table, and write the figures as JSON with ``--json``."""
    device(args.device)
    if args.loop and not (args.backbone and args.volume and args.truth):
        raise SystemExit("error: --loop needs --backbone, --volume and --truth (and --label-id)")
    run, format_result = (run_loop_bench, format_loop_table) if args.loop else SUITES[args.method]
    result = run(args)
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {args.json}", file=sys.stderr)


def _ints(text: str) -> list[int]:
    """A comma-separated list of integers (``--scaling-slices 1,8,32``)."""
    return [int(v) for v in text.split(",") if v]


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``sdfsmis bench`` to the command's subcommands."""
    bench = commands.add_parser(
        "bench", help="time our inference/training against the released pipeline, or DPL against SD-FSMIS"
    )
    bench.add_argument(
        "--method",
        default=SDFSMIS.method,
        choices=list(SUITES),
        help=(
            f"{SDFSMIS.method}: ours against the released pipeline; "
            f"{DPL.method}: DPL against SD-FSMIS on the same inputs"
        ),
    )
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--backbone", default=None, help="a backbone directory (default: a random --shape)")
    source.add_argument("--shape", default="tiny", choices=["tiny", "sd15"], help="random weights of this shape")
    bench.add_argument("--checkpoint", default=None, help="our weights, with --backbone")
    bench.add_argument(
        "--dpl-checkpoint", default=None, help="DPL weights, with --backbone (default: --checkpoint's folder's)"
    )
    bench.add_argument("--variants", type=int, default=None, help="DPL's K (default: the preset's)")
    bench.add_argument("--dpl-image-size", type=int, default=None, help="DPL's DINOv2 input (default: the preset's)")
    bench.add_argument("--config", default=None, help="preset name or YAML path, with --backbone")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--slices", type=int, default=90, help="query slices")
    bench.add_argument("--supports", type=int, default=3, help="support slices")
    bench.add_argument("--resolution", type=int, default=None, help="default: the preset's")
    bench.add_argument("--batch-size", type=int, default=None, help="our query batch (default: the preset's)")
    bench.add_argument(
        "--reference-slices", type=int, default=0, help="time the reference on this many of the slices (0: all)"
    )
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    bench.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"], help="auto: as measured")
    bench.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder")
    bench.add_argument(
        "--retain-memory",
        default="auto",
        choices=["auto", "on", "off"],
        help="glibc keeps freed buffers for reuse, both sides (auto: on CPU)",
    )
    bench.add_argument("--vae-batch", type=int, default=0, help="slices per VAE call (0: 1 on CPU, all on CUDA)")
    bench.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    bench.add_argument("--scaling", action="store_true", help="also time ours against slices and resolution")
    bench.add_argument("--scaling-slices", type=_ints, default=[1, 8, 32, 90])
    bench.add_argument("--scaling-resolutions", type=_ints, default=[256, 384, 512])
    bench.add_argument("--train", action="store_true", help="also time training steps")
    bench.add_argument("--train-steps", type=int, default=10)
    bench.add_argument("--warmup-steps", type=int, default=2)
    bench.add_argument(
        "--train-batch-size", type=int, default=1, help="episodes per training step (the released step takes one)"
    )
    bench.add_argument("--workers", type=int, default=2, help="episode-preparing processes for our training")
    bench.add_argument("--gradient-checkpointing", action="store_true", help="for our training")
    loop = bench.add_argument_group("the correction loop (--loop): first run, re-run after a correction")
    loop.add_argument("--loop", action="store_true", help="time the server's loop on a real volume instead")
    loop.add_argument("--volume", type=Path, default=None, help="the image (NIfTI/NRRD)")
    loop.add_argument("--truth", type=Path, default=None, help="its full label; one structure of it is drawn")
    loop.add_argument("--label-id", type=int, default=1, help="the structure's id in --truth")
    loop.add_argument("--every", type=int, default=8, help="draw every N-th slice of the structure")
    loop.add_argument("--cache-mb", type=float, default=1024.0, help="what the predictor keeps (the app's cache_mb)")
    loop.add_argument(
        "--atlas",
        type=Path,
        nargs=2,
        default=None,
        metavar=("IMAGE", "LABEL"),
        help="another patient's image and its label of the same id, drawn on every slice: a second support, "
        "registered onto the volume (the next patient's loop)",
    )
    bench.add_argument("--json", default=None, help="write the figures here")
    bench.set_defaults(run=cmd_bench)
