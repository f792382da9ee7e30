"""The one guard both trainers share: never overwrite the weights shipped in the package by accident."""
from __future__ import annotations

import argparse
import os

import alignsam_ray

SHIPPED_WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(alignsam_ray.__file__)), "weights")


def writes_shipped(out: str) -> bool:
    """Whether weights written to ``out`` (and the .json beside it) would land in the package's
    shipped weights folder."""
    return os.path.realpath(os.path.dirname(os.path.abspath(out))) == os.path.realpath(SHIPPED_WEIGHTS_DIR)


def add_out_arguments(ap: argparse.ArgumentParser, default: str) -> None:
    ap.add_argument("--out", default=default,
                    help="weights file (a .json of the same name is written next to it); the shipped "
                         "alignsam_ray/weights/ files only with --overwrite-shipped")
    ap.add_argument("--overwrite-shipped", action="store_true",
                    help="allow --out to replace the weights shipped in the package")


def check_out(ap: argparse.ArgumentParser, args, what: str) -> None:
    """Stop (argparse error, exit 2) if ``args.out`` would replace the shipped ``what`` weights unasked."""
    if not args.overwrite_shipped and writes_shipped(args.out):
        ap.error(f"--out {args.out} would overwrite the {what} weights shipped in the package "
                 f"({SHIPPED_WEIGHTS_DIR}); pass --overwrite-shipped to replace them, or choose another --out")
