"""The ``diffusers-fair`` command line (also ``python -m diffusers_fair.cli``).

Every subcommand is one function taking the parsed arguments and returning an exit code, plus one
``register(...)`` line at the bottom of this file. A subcommand with options also passes an
``add_arguments(parser)`` function. Import heavy modules inside the subcommand's function so that
``diffusers-fair --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Subcommand:
    """One subcommand of the command line.

    Attributes:
        name: what the user types, e.g. ``"demo"``.
        run: called with the parsed arguments; returns the process exit code (``None`` means 0).
        help: one line shown by ``diffusers-fair --help``.
        add_arguments: adds the subcommand's options to its own parser, or ``None`` for none.
    """

    name: str
    run: Callable[[argparse.Namespace], int | None]
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(
    name: str,
    run: Callable[[argparse.Namespace], int | None],
    *,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """Add a subcommand. Names must be unique."""
    if name in SUBCOMMANDS:
        raise ValueError(f"subcommand {name!r} is already registered")
    SUBCOMMANDS[name] = Subcommand(name=name, run=run, help=help, add_arguments=add_arguments)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="diffusers-fair",
        description="Finetune text-to-image diffusion models for fairness, and use the results.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in SUBCOMMANDS.values():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        if command.add_arguments is not None:
            command.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit code.

    A ``ValueError`` raised by a subcommand (bad user input) is printed as one line and gives
    exit code 2, like argparse's own usage errors; anything else propagates with its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = SUBCOMMANDS[args.command].run(args)
    except ValueError as error:
        print(f"diffusers-fair {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0 if code is None else int(code)


# --------------------------------------------------------------------------- subcommands
def _version(args: argparse.Namespace) -> int:
    from . import __version__

    print(f"diffusers-fair {__version__}")
    return 0


register("version", _version, help="print the version of diffusers-fair")


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.iterations is not None:
        settings.iterations = args.iterations
    run_demo(args.out, settings)
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    parser.add_argument("--quick", action="store_true", help="a smaller run of a few minutes")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations (default: the toy preset's, quick: 12)")


register("demo", _demo, help="audit, debias and re-audit the toy world's model (CPU, minutes)", add_arguments=_demo_arguments)


def _eval(args: argparse.Namespace) -> int:
    from .report import eval_command

    return eval_command(args)


from .report import EVAL_HELP, add_eval_arguments  # noqa: E402  (light: matplotlib and diffusers load inside the command)

register("eval", _eval, help=EVAL_HELP, add_arguments=add_eval_arguments)


from . import convert, hub  # noqa: E402

convert.register_cli(register)
hub.register_cli(register)


if __name__ == "__main__":
    sys.exit(main())
