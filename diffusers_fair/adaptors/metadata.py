"""The metadata of a fair adaptor (``fair_adaptor.json``): what it was trained for, on which model, with which files."""


from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .._utils.io import read_json
from ..method.targets import TargetDistribution


FORMAT_VERSION = 1
METADATA_NAME = "fair_adaptor.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SOFT_TOKENS_NAME = "learned_embeds.safetensors"
CARD_NAME = "README.md"
DEFAULT_SOFT_TOKEN = "<fair>"

KINDS = ("lora", "soft_tokens", "lora+soft_tokens")
LORA_COMPONENTS = ("text_encoder", "unet")

# Base model ids. The toy model ships inside the package and has no Hub id of its own.
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TOY_BASE_MODEL = "diffusers-fair/toy"
BASE_MODEL_MARKER = "fair_base_model.json"  # in a local pipeline folder: {"base_model": "<id>"}
BASE_MODEL_ALIASES = {"runwayml/stable-diffusion-v1-5": SD15}
# The Hub license of each known base model; an adaptor's weights fall under it unless it names its own.
# The diffusers-fair package declares no license of its own, so the toy model's is "unknown".
BASE_MODEL_LICENSES = {SD15: "creativeml-openrail-m", TOY_BASE_MODEL: "unknown"}

_TOKEN_PATTERN = re.compile(r"^\S+$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------- small helpers
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def looks_like_repo_id(text: str) -> bool:
    """``"owner/name"`` with the characters the Hub allows."""
    return bool(_REPO_ID.match(text))


def canonical_base_model(name: str) -> str:
    """The current Hub id of a base model (``runwayml/stable-diffusion-v1-5`` moved)."""
    return BASE_MODEL_ALIASES.get(name, name)


def default_license(base_model: str) -> str:
    """The Hub license id of a known base model (``creativeml-openrail-m`` for SD 1.5), else ``""``."""
    return BASE_MODEL_LICENSES.get(canonical_base_model(base_model), "")


def base_model_id(pipe) -> str | None:
    """The base model id of a loaded pipeline, or ``None`` where it cannot be told.

    A pipeline loaded from a Hub id knows it (``pipe.name_or_path``); a local pipeline folder can
    name its base model in a ``fair_base_model.json`` file (``{"base_model": "..."}``; the shipped toy
    model does); a pipeline built in memory or loaded from another local folder cannot be
    identified, and base-model checks are skipped for it.
    """
    name = getattr(pipe, "name_or_path", None)
    if not name:
        return None
    path = Path(name)
    if path.is_dir():
        marker = path / BASE_MODEL_MARKER
        if not marker.is_file():
            return None
        data = read_json(marker, "base-model marker")
        base_model = data.get("base_model") if isinstance(data, dict) else None
        return base_model if isinstance(base_model, str) else None
    return canonical_base_model(name) if looks_like_repo_id(name) else None


def target_to_dict(target: TargetDistribution) -> dict:
    """A target distribution as plain JSON data: ``{"classes": {...}, "probs": [...], "text": ...}``.

    ``probs`` lists the cell probabilities row-major (the last attribute varies fastest).
    ``text`` is the readable form; :func:`target_from_dict` ignores it.
    """
    return {
        "classes": {attr: list(names) for attr, names in target.classes.items()},
        "probs": [float(p) for p in target.probs],
        "text": str(target),
    }


def target_from_dict(data: Mapping) -> TargetDistribution:
    """Inverse of :func:`target_to_dict`; raises ``ValueError`` on malformed data."""
    if not isinstance(data, Mapping) or "classes" not in data or "probs" not in data:
        raise ValueError(f"a target must be a dict with 'classes' and 'probs', got {data!r}")
    classes = data["classes"]
    if not isinstance(classes, Mapping) or not classes:
        raise ValueError(f"target 'classes' must be a non-empty dict, got {classes!r}")
    shape = tuple(len(names) for names in classes.values())
    probs = torch.tensor([float(p) for p in data["probs"]], dtype=torch.float64)
    if probs.numel() != math.prod(shape):
        raise ValueError(f"target has {probs.numel()} probabilities for {math.prod(shape)} cells")
    return TargetDistribution.joint(classes, probs.reshape(shape))


def _check_json(value, what: str):
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be plain JSON data (str, number, bool, list, dict): {error}") from None
    return value


# --------------------------------------------------------------------------- metadata
@dataclass
class FairAdaptorMetadata:
    """The contents of ``fair_adaptor.json``.

    Fill the descriptive fields; :func:`save_fair_adaptor` fills the ones marked *(written on
    save)* from the weights it writes. :meth:`for_pipeline` fills the base model and shapes from a
    pipeline.

    Attributes:
        name: short name of the adaptor, e.g. ``"gender-race"``.
        base_model: Hub id of the pipeline it was trained on (``TOY_BASE_MODEL`` for the toy model).
        text_hidden_size: hidden size of the text encoder it expects (768 for SD 1.5).
        cross_attention_dim: cross-attention size of the U-Net it expects (768 for SD 1.5).
        base_revision: Hub revision (commit sha) of the base model, when known.
        description: one paragraph for people: what it debiases and how.
        targets: target distributions, as plain dicts (:func:`target_to_dict`);
            ``TargetDistribution`` objects given here are converted.
        training: summary of the training settings (plain JSON data: steps, lr, rank, prompts...).
        metrics_before: bias and quality metrics of the base model, e.g. ``{"bias_gender": 0.67}``.
        metrics_after: the same metrics with the adaptor.
        eval_prompts: what the metrics were measured on, e.g. ``"50 held-out occupations, 60 images each"``.
        license: license of the weights, a Hub license id; empty: the base model's
            (:func:`default_license`; ``creativeml-openrail-m`` for SD 1.5).
        format_version: version of this file format *(written on save)*.
        kind: ``"lora"``, ``"soft_tokens"`` or ``"lora+soft_tokens"`` *(written on save)*.
        soft_token: the token to start a prompt with, e.g. ``"<fair>"`` *(written on save)*.
        token_names: every vocabulary entry the soft tokens add *(written on save)*.
        lora: per component (``text_encoder`` / ``unet``): rank, alpha, target modules, number of
            adapted layers *(written on save)*.
        files: weight file name -> sha256 *(written on save)*.
        library_versions: package versions that wrote it *(written on save)*.
    """

    name: str
    base_model: str
    text_hidden_size: int
    cross_attention_dim: int
    base_revision: str | None = None
    description: str = ""
    targets: list = field(default_factory=list)
    training: dict = field(default_factory=dict)
    metrics_before: dict = field(default_factory=dict)
    metrics_after: dict = field(default_factory=dict)
    eval_prompts: str = ""
    license: str = ""
    format_version: int = FORMAT_VERSION
    kind: str | None = None
    soft_token: str | None = None
    token_names: list = field(default_factory=list)
    lora: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    library_versions: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("metadata name must be a non-empty string")
        if not isinstance(self.base_model, str) or not self.base_model.strip():
            raise ValueError("metadata base_model must be a non-empty string (a Hub id)")
        for what in ("text_hidden_size", "cross_attention_dim"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"metadata {what} must be a positive integer, got {value!r}")
        if not isinstance(self.format_version, int) or self.format_version < 1:
            raise ValueError(f"format_version must be a positive integer, got {self.format_version!r}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this adaptor uses format version {self.format_version}; this diffusers-fair reads up to "
                f"version {FORMAT_VERSION}: upgrade diffusers-fair"
            )
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.targets, (list, tuple)):
            raise ValueError(f"targets must be a list of target distributions, got {type(self.targets).__name__}")
        self.targets = [
            target_to_dict(t) if isinstance(t, TargetDistribution) else target_to_dict(target_from_dict(t))
            for t in self.targets
        ]
        for what in ("metrics_before", "metrics_after"):
            metrics = getattr(self, what)
            if not isinstance(metrics, Mapping):
                raise ValueError(f"{what} must be a dict of metric name -> number")
            for key, value in metrics.items():
                if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{what}[{key!r}] must map a name to a number, got {value!r}")
                if not math.isfinite(value):
                    raise ValueError(f"{what}[{key!r}] is not finite: {value!r}")
        _check_json(self.training, "training")
        _check_json(self.lora, "lora")
        if not isinstance(self.files, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in self.files.items()
        ):
            raise ValueError("files must map file names to hex sha256 digests")
        if not isinstance(self.token_names, list) or not all(isinstance(t, str) for t in self.token_names):
            raise ValueError("token_names must be a list of strings")

    @classmethod
    def for_pipeline(cls, pipe, *, name: str, base_model: str | None = None, **kwargs) -> FairAdaptorMetadata:
        """Metadata whose base model and shapes are read from ``pipe``.

        ``base_model`` defaults to :func:`base_model_id`; a pipeline built in memory or loaded
        from a local copy cannot be identified, so pass ``base_model`` for it.
        """
        base = base_model or base_model_id(pipe)
        if base is None:
            raise ValueError(
                "cannot tell the base model of this pipeline (built in memory or loaded from a local "
                "folder); pass base_model= with its Hub id"
            )
        return cls(
            name=name,
            base_model=canonical_base_model(base),
            text_hidden_size=int(pipe.text_encoder.config.hidden_size),
            cross_attention_dim=int(pipe.unet.config.cross_attention_dim),
            **kwargs,
        )

    def target_distributions(self) -> list[TargetDistribution]:
        """The targets as :class:`TargetDistribution` objects."""
        return [target_from_dict(t) for t in self.targets]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping) -> FairAdaptorMetadata:
        """Build from parsed JSON; unknown or missing fields raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{METADATA_NAME} must hold a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            version = data.get("format_version")
            hint = " (written by a newer diffusers-fair?)" if isinstance(version, int) and version > FORMAT_VERSION else ""
            raise ValueError(f"{METADATA_NAME} has unknown fields {unknown}{hint}")
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"{METADATA_NAME} is incomplete: {error}") from None
