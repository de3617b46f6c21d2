"""Reading the JSON and safetensors files users and the package provide, with errors that name the file,
and replacing a file atomically."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file


MAX_JSON_BYTES = 64 << 20  # config, prompt and cache files; adaptor metadata and the index pass smaller limits
MAX_JSON_DEPTH = 100


def read_json(path: str | Path, what: str, *, missing: str | None = None, max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH):
    """Parse the JSON file ``path``; any failure raises ``ValueError`` naming ``what`` and the path.

    Args:
        path: the file.
        what: what the file is, for the messages, e.g. ``"config file"``.
        missing: the message when the file does not exist (default: "{what} {path} does not exist").
        max_bytes: larger files are refused before they are read.
        max_depth: values nested deeper (lists and objects) are refused.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"{what} {path} is {size / (1 << 20):.1f} MiB; at most {max_bytes / (1 << 20):g} MiB "
                             "are read")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(missing or f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from None
    except RecursionError:
        raise ValueError(f"{what} {path} is nested more than {max_depth} levels deep") from None
    except ValueError as error:
        if str(error).startswith(f"{what} {path}"):
            raise
        if "integer string conversion" in str(error):  # more digits than Python converts
            raise ValueError(f"{what} {path} holds an integer too large to read") from None
        raise ValueError(f"{what} {path} cannot be read: {error}") from None
    except OSError as error:  # a folder, no permission, a name too long
        raise ValueError(f"{what} {path} cannot be read: {error.strerror or error}") from None
    if json_depth(data) > max_depth:
        raise ValueError(f"{what} {path} is nested more than {max_depth} levels deep")
    return data


def json_depth(value) -> int:
    """How deeply lists and dicts nest in ``value`` (0 for a plain value), without recursion."""
    depth, level = 0, [value]
    while True:
        containers = [item for item in level if isinstance(item, (list, dict))]
        if not containers:
            return depth
        depth += 1
        level = [child for item in containers for child in (item.values() if isinstance(item, dict) else item)]


def replace_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(temporary path)`` beside ``path`` and rename the result over ``path``.

    Readers see the old file or the new one, never a part. The temporary name is unique to the call,
    so concurrent writers do not collide, and the file gets the permissions a plain ``open`` gives
    (``0o666`` less the umask). Whatever ``write`` raises propagates, and no temporary file is left.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.saving")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_safetensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated or corrupt file, or a PyTorch pickle given in its
    place, raises ``ValueError`` naming ``what`` (pickles are recognised, never unpickled)."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise _unreadable(path, what, error) from None


def read_safetensors_header(path: str | Path, what: str) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file's header (``{}`` when it has none);
    an unreadable file raises ``ValueError`` as :func:`load_safetensors` does."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return dict(handle.metadata() or {})
    except SafetensorError as error:
        raise _unreadable(path, what, error) from None


def _unreadable(path, what: str, error: Exception) -> ValueError:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip archive, or a raw pickle
        return ValueError(f"{what} is a PyTorch pickle, not a safetensors file; pickles are never loaded "
                          "(save the tensors with safetensors.torch.save_file)")
    return ValueError(f"{what} is not a readable safetensors file (truncated or corrupt: {error})")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file: one per line; blank lines and lines starting with ``#`` are skipped.

    Raises:
        ValueError: naming the file: missing, a folder, unreadable, not UTF-8 text, or without prompts.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"prompt file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ValueError(f"prompt file {path} is not UTF-8 text") from None
    except OSError as error:
        raise ValueError(f"prompt file {path} cannot be read: {error.strerror or error}") from None
    lines = [line.strip() for line in text.splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts

