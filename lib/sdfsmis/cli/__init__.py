"""The ``sdfsmis`` command: one thin module of argument parsing per area of the library."""

from __future__ import annotations

import argparse

from sdfsmis.cli import backbone, bench, data, dicom, evaluation, infer, train
from sdfsmis.io.backbone import BackboneNotFoundError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdfsmis", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for area in (backbone, data, train, infer, dicom, evaluation, bench):
        area.register(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (BackboneNotFoundError, ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
