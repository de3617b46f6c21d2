"""``diffusers-fair demo``: audit, debias and re-audit the toy world's model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._outputs import check_output_folder, earlier_results, positive_int, staged_folder


NAME = "demo"
HELP = "audit, debias and re-audit the toy world's model (CPU, minutes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default: demo-out)")
    parser.add_argument("--quick", action="store_true", help="a smaller run of a few minutes")
    parser.add_argument("--iterations", type=positive_int, default=None,
                        help="training iterations (default: the toy preset's, quick: 12)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier demo in --out: the new run is written to a temporary "
                             "folder beside it and swapped in when complete")


# What a finished (or interrupted) demo leaves in its folder.
RESULT_NAMES = ("report.json", "report.md", "adaptor", "training")


def run(args: argparse.Namespace) -> int:
    from ..toy.demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.iterations is not None:
        settings.iterations = args.iterations
    check_output_folder(args.out, "--out")
    earlier = earlier_results(args.out, RESULT_NAMES)
    if earlier and not args.overwrite:
        raise ValueError(f"--out {args.out} holds the results of an earlier demo ({', '.join(earlier)}): pass "
                         "--overwrite to replace them, or choose another folder")
    with staged_folder(args.out) as staging:
        run_demo(staging, settings)
    print(f"the results are in {args.out}")
    return 0
