"""``diffusers-fair version``: print the version."""

from __future__ import annotations

import argparse


NAME = "version"
HELP = "print the version of diffusers-fair"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from ..version import __version__

    print(f"diffusers-fair {__version__}")
    return 0
