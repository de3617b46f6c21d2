"""Reading the JSON files users and the package provide, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path


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
