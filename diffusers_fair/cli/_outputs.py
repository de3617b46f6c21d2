"""Argument types and output folders shared by the commands.

Numbers are checked by argparse (a bad one is a usage error, exit code 2). An output folder that
holds an earlier run's results is refused unless ``--overwrite`` is given; with it, the new
results are written to a temporary sibling folder and swapped in when complete, so that the old
results are replaced whole at the end and an interrupted run leaves them untouched.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


# --------------------------------------------------------------------------- argument types
def _integer(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text[:20]}... is too large")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def guidance_scale(text: str) -> float:
    """A finite number >= 1 (1 turns classifier-free guidance off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 1.0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 1 (1 turns guidance off), got {text}")
    return value


# --------------------------------------------------------------------------- output folders
def check_output_folder(folder: Path, option: str) -> None:
    """Raise ``ValueError`` unless ``folder`` is a folder, or can be created, and is writable."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder} is a file, not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {folder} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {folder} is not writable (no permission to write in {existing})")


def earlier_results(folder: Path, names: Sequence[str]) -> list[str]:
    """The ``names`` (files or folders) that exist in ``folder``: the results of an earlier run."""
    return [name for name in names if (folder / name).exists()]


@contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """A new temporary sibling of ``folder`` to write the results into; swapped in for ``folder`` on success.

    On success ``folder`` (if it exists) is renamed away, the new folder renamed into its place and
    the old one deleted. On any failure, an interrupt included, the new folder is deleted and
    ``folder`` is left as it was.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.new-", dir=folder.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, old)  # onto the empty folder just made
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, folder)


@contextmanager
def replaced_on_success(folder: Path) -> Iterator[None]:
    """Move ``folder`` aside while a new run writes a fresh one in its place; delete it once the run succeeds.

    If the run fails or is interrupted, its partial folder is deleted and ``folder`` is moved back.
    (Killed outright, the old folder stays in the hidden sibling ``.<name>.old-*``.)
    """
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    os.replace(folder, old)
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)
