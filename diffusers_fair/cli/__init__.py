"""The ``diffusers-fair`` command line (also ``python -m diffusers_fair.cli``).

One module per command, each with ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args)``
(returning the exit code). The modules only parse arguments and call the library; heavy modules are
imported inside ``run`` so that ``diffusers-fair --help`` stays fast. A new command is a new module
added to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import convert, demo, pull, push, train, version
from . import eval as eval_command


COMMANDS = [version, demo, train, eval_command, convert, push, pull]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="diffusers-fair",
        description="Finetune text-to-image diffusion models for fairness, and use the results.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(command.NAME, help=command.HELP, description=command.HELP)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit code.

    A ``ValueError`` raised by a command (bad user input) is printed as one line and gives exit
    code 2, like argparse's own usage errors; anything else propagates with its traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
    except ValueError as error:
        print(f"diffusers-fair {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0 if code is None else int(code)
