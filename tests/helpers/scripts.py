"""Loading the project's scripts (examples/, benchmarks/, scripts/) as modules, to test their functions."""

import importlib.util
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]


def load_script(folder: str, name: str):
    """The module of ``REPO/folder/name.py``, executed once per call and registered in ``sys.modules``
    (dataclasses look their module up while the script runs)."""
    spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
