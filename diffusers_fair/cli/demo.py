"""``diffusers-fair demo``: audit, debias and re-audit the toy world's model."""

from __future__ import annotations

import argparse


NAME = "demo"
HELP = "audit, debias and re-audit the toy world's model (CPU, minutes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    parser.add_argument("--quick", action="store_true", help="a smaller run of a few minutes")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations (default: the toy preset's, quick: 12)")


def run(args: argparse.Namespace) -> int:
    from ..toy.demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.iterations is not None:
        settings.iterations = args.iterations
    run_demo(args.out, settings)
    return 0
