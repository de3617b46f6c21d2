"""Resumable training checkpoints, written atomically.

A run must continue after a crash exactly as if it had not stopped: its losses and final weights
equal those of an uninterrupted run. The random choices of each iteration are seeded by the
iteration number (``config.draw_iteration``), so what has to be saved is the state that
accumulates: the trained weights, their EMA, the optimizer's moments, the counters, and (for
components that use them) the global random states.

A checkpoint is a folder ``checkpoint-NNNNNN`` (N = completed iterations) holding

* ``tensors.safetensors``: the trained weights (``param/<name>``), their EMA (``ema/<name>``), the
  optimizer's per-parameter state (``optimizer/<index>/<key>``) and the torch random states
  (``rng/...``);
* ``state.json``: everything else (iteration counters, running statistics, the optimizer's
  hyper-parameters, numpy and Python random states, the config).

Only safetensors and JSON are written or read: nothing is unpickled. A checkpoint is first written
to a hidden temporary folder next to its final place and renamed when complete, so a crash or a
full disk while saving never leaves a half-written ``checkpoint-*`` folder, and the previous
checkpoint survives.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from .._utils.io import load_safetensors


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
FORMAT_VERSION = 1


def checkpoint_name(iteration: int) -> str:
    return f"checkpoint-{iteration:06d}"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / STATE_FILE).is_file() and (child / TENSORS_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def save_checkpoint(folder: str | Path, iteration: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write ``folder/checkpoint-<iteration>`` atomically (temporary folder, then rename).

    Raises ``OSError`` naming the checkpoint when writing fails; the temporary folder is removed
    and earlier checkpoints are left untouched.
    """
    folder = Path(folder)
    final = folder / checkpoint_name(iteration)
    temporary = folder / f".{final.name}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(temporary / TENSORS_FILE))
        with open(temporary / STATE_FILE, "w", encoding="utf-8") as handle:
            json.dump({"format": FORMAT_VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():  # saving the same iteration again: keep the old one until the new one is in place
            replaced = folder / f".{final.name}.old"
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
            os.replace(temporary, final)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(temporary, final)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        previous = list_checkpoints(folder)
        kept = f"; the last complete checkpoint is {previous[-1]}" if previous else ""
        raise OSError(f"could not write checkpoint {final}: {error}{kept}") from error
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint folder: ``(tensors, state)``."""
    path = Path(path)
    if not (path / STATE_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (expected {TENSORS_FILE} and {STATE_FILE})")
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_safetensors(path / TENSORS_FILE, TENSORS_FILE)
    except Exception as error:  # JSON, OS and safetensors errors alike mean an unreadable checkpoint
        raise ValueError(f"checkpoint {path} is corrupt or unreadable: {error}") from error
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format {state.get('format')!r}, expected {FORMAT_VERSION}")
    return tensors, state


def resolve_resume(folder: str | Path, resume_from: str) -> Path | None:
    """``"latest"``: the newest checkpoint in ``folder`` (``None`` if there is none); else the given folder."""
    if resume_from == "latest":
        found = list_checkpoints(folder)
        return found[-1] if found else None
    path = Path(resume_from)
    if not path.is_dir():
        raise ValueError(f"resume_from {resume_from!r} is not a checkpoint folder")
    return path


def prune_checkpoints(folder: str | Path, keep: int | None) -> None:
    """Delete the oldest checkpoints so that at most ``keep`` remain (``None``: keep all)."""
    if keep is None:
        return
    checkpoints = list_checkpoints(folder)
    for path in checkpoints[: max(0, len(checkpoints) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- optimizer state
def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON values."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what :func:`optimizer_state` split."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---------------------------------------------------------------------------- random states
def random_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global random states of torch (CPU and CUDA), numpy and Python."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{index}"] = cuda_state
    kind, keys, position, has_gauss, cached = np.random.get_state()
    python_version, python_state, python_gauss = random.getstate()
    meta = {
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "python": [python_version, list(python_state), python_gauss],
    }
    return tensors, meta


def set_random_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what :func:`random_state` returned."""
    torch.set_rng_state(tensors["rng/torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    kind, keys, position, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    python_version, python_state, python_gauss = meta["python"]
    random.setstate((python_version, tuple(python_state), python_gauss))


# ---------------------------------------------------------------------------- a trainer's state
def pack_training_state(
    params: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, counters: dict
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON state of a run: trained weights, EMA, optimizer, random states, ``counters``."""
    tensors = {f"param/{n}": p for n, p in params.items()}
    tensors.update({f"ema/{n}": e for n, e in ema.items()})
    optimizer_tensors, optimizer_meta = optimizer_state(optimizer)
    rng_tensors, rng_meta = random_state()
    state = {"counters": counters, "optimizer": optimizer_meta, "rng": rng_meta, "trainable": list(params)}
    return {**tensors, **optimizer_tensors, **rng_tensors}, state


def restore_training_state(
    path: str | Path, params: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
) -> dict:
    """Load checkpoint ``path`` into ``params``, ``ema`` (in place), the optimizer and the random
    states; return the counters. Raises ``ValueError`` if the trained weights do not match."""
    tensors, state = load_checkpoint(path)
    if state["trainable"] != list(params):
        raise ValueError(f"checkpoint {path} holds trained weights {state['trainable'][:3]}..., this run trains "
                         f"{list(params)[:3]}... (different LoRA or soft-token settings)")
    with torch.no_grad():
        for name, param in params.items():
            saved = tensors[f"param/{name}"]
            if saved.shape != param.shape:
                raise ValueError(f"checkpoint {path}: {name} has shape {tuple(saved.shape)}, expected {tuple(param.shape)}")
            param.copy_(saved)
            ema[name].copy_(tensors[f"ema/{name}"])
    load_optimizer_state(optimizer, tensors, state["optimizer"])
    set_random_state(tensors, state["rng"])
    return state["counters"]


def truncate_log(log_file: str | Path, iteration: int) -> None:
    """Drop the records of iterations after ``iteration`` from a JSONL training log (after a resume).

    A last line that does not parse was torn by a crash while it was written: it is dropped.

    Raises:
        ValueError: another line is not a JSON record with an ``iteration`` (a corrupt log).
    """
    log_file = Path(log_file)
    if not log_file.exists():
        return
    lines = [(number, line) for number, line in enumerate(log_file.read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    kept = []
    for position, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
                raise ValueError("not a record with an iteration")
        except ValueError as error:
            if position == len(lines) - 1:
                break  # torn
            raise ValueError(f"{log_file} line {number} is not valid JSON ({error}): the log is corrupt; "
                             "remove or repair that line to resume") from None
        if record["iteration"] <= iteration:
            kept.append(line)
    log_file.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
