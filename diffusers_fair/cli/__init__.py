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

from . import compare, convert, demo, pull, push, train, version
from . import eval as eval_command


COMMANDS = [version, demo, train, eval_command, compare, convert, push, pull]


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with a usage error in one line (and exit code 2, as argparse's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    parser = _Parser(
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

    One rule for every command, so that a user never sees a traceback for a mistake of theirs:

    - a usage error found by argparse (an unknown option, a number out of range) is printed as one
      line and exits with code 2 (``SystemExit``, as argparse does);
    - a ``ValueError`` raised by a command (bad input, refused before anything is touched) is printed
      as one line and gives exit code 2;
    - an ``OSError`` (a file that cannot be read or written, the Hub out of reach) is printed as one
      line and gives exit code 1;
    - an interrupt (Ctrl-C, SIGINT) prints one line and gives exit code 130.

    Anything else is a defect and propagates with its traceback.
    """
    args = build_parser().parse_args(argv)
    prefix = f"diffusers-fair {args.command}"
    try:
        code = args.run(args)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except ValueError as error:
        print(f"{prefix}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{prefix}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    return 0 if code is None else int(code)
