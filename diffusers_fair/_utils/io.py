"""Reading the JSON and safetensors files users and the package provide, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def read_json(path: str | Path, what: str, *, missing: str | None = None):
    """Parse the JSON file ``path``; any failure raises ``ValueError`` naming ``what`` and the path.

    Args:
        path: the file.
        what: what the file is, for the messages, e.g. ``"config file"``.
        missing: the message when the file does not exist (default: "{what} {path} does not exist").
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(missing or f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from None
    except OSError as error:  # a folder, no permission
        raise ValueError(f"{what} {path} cannot be read: {error.strerror or error}") from None


def load_safetensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated or corrupt file, or a PyTorch pickle given in its
    place, raises ``ValueError`` naming ``what`` (pickles are recognised, never unpickled)."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except SafetensorError as error:
        with open(path, "rb") as handle:
            head = handle.read(4)
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip archive, or a raw pickle
            raise ValueError(f"{what} is a PyTorch pickle, not a safetensors file; pickles are never loaded "
                             "(save the tensors with safetensors.torch.save_file)") from None
        raise ValueError(f"{what} is not a readable safetensors file (truncated or corrupt: {error})") from None
