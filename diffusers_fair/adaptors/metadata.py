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

from .._utils.io import json_depth, read_json
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
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
TOY_BASE_MODEL = "diffusers-fair/toy"
BASE_MODEL_MARKER = "fair_base_model.json"  # in a local pipeline folder: {"base_model": "<id>"}
BASE_MODEL_ALIASES = {"runwayml/stable-diffusion-v1-5": SD15}
# The Hub license of each known base model; an adaptor's weights fall under it unless it names its own.
# The diffusers-fair package declares no license of its own, so the toy model's is "unknown".
BASE_MODEL_LICENSES = {SD15: "creativeml-openrail-m", SDXL_BASE: "openrail++", TOY_BASE_MODEL: "unknown"}

_TOKEN_PATTERN = re.compile(r"^\S+$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# Bounds on what a fair_adaptor.json may hold; a file beyond them was not written by save_fair_adaptor.
MAX_METADATA_BYTES = 4 << 20
MAX_METADATA_DEPTH = 32
MAX_NAME_LENGTH = 200  # name, base_model, base_revision, license
MAX_TOKEN_LENGTH = 64  # soft_token
MAX_SIZE = 1 << 20  # text_hidden_size, cross_attention_dim


# --------------------------------------------------------------------------- small helpers
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def looks_like_repo_id(text: str) -> bool:
    """``"owner/name"`` with the characters the Hub allows (each part at most 96 characters)."""
    return bool(_REPO_ID.match(text)) and all(len(part) <= 96 for part in text.split("/"))


def is_finite_number(value) -> bool:
    """An ``int`` or ``float`` (not a ``bool``) that is finite as a float (huge integers are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def soft_token_names(soft_token: str, count: int) -> list[str]:
    """The vocabulary entries diffusers adds for ``count`` vectors stored under ``soft_token``:
    ``soft_token``, ``soft_token_1``, ..., ``soft_token_{count - 1}``."""
    return [soft_token] + [f"{soft_token}_{i}" for i in range(1, count)]


def check_soft_token(soft_token, what: str = "soft_token") -> str:
    """Raise ``ValueError`` unless ``soft_token`` is a string without whitespace of at most 64 characters."""
    if not isinstance(soft_token, str) or not _TOKEN_PATTERN.match(soft_token):
        raise ValueError(f"{what} must be a non-empty string without spaces, got {soft_token!r}")
    if len(soft_token) > MAX_TOKEN_LENGTH:
        raise ValueError(f"{what} is {len(soft_token)} characters; at most {MAX_TOKEN_LENGTH}")
    return soft_token


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
        raise ValueError(f"a target must be a dict with 'classes' and 'probs', got {_short(data)}")
    classes, probs = data["classes"], data["probs"]
    if not isinstance(classes, Mapping) or not classes or not all(isinstance(n, (list, tuple)) for n in classes.values()):
        raise ValueError(f"target 'classes' must be a non-empty dict of attribute -> list of class names, got "
                         f"{_short(classes)}")
    if not isinstance(probs, (list, tuple)) or not all(is_finite_number(p) for p in probs):
        raise ValueError(f"target 'probs' must be a list of finite numbers, got {_short(probs)}")
    shape = tuple(len(names) for names in classes.values())
    if len(probs) != math.prod(shape):
        raise ValueError(f"target has {len(probs)} probabilities for {math.prod(shape)} cells")
    table = torch.tensor([float(p) for p in probs], dtype=torch.float64).reshape(shape)
    return TargetDistribution.joint(classes, table)


def _short(value) -> str:
    """``repr(value)``, cut to 80 characters for messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_lora_summary(component, summary) -> None:
    """One component's entry of ``lora``, as :func:`~diffusers_fair.adaptors.lora_state.lora_summary` writes it."""
    if not isinstance(component, str) or not isinstance(summary, Mapping):
        raise ValueError(f"lora must map component names to summaries, got {_short(component)}: {_short(summary)}")
    for what in ("rank", "num_layers"):
        value = summary.get(what)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE:
            raise ValueError(f"lora[{component!r}][{what!r}] must be a positive integer, got {_short(value)}")
    if not is_finite_number(summary.get("alpha")):
        raise ValueError(f"lora[{component!r}]['alpha'] must be a finite number, got {_short(summary.get('alpha'))}")


def _check_json(value, what: str):
    if json_depth(value) > MAX_METADATA_DEPTH:
        raise ValueError(f"{what} is nested more than {MAX_METADATA_DEPTH} levels deep")
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
        for what in ("name", "base_model", "base_revision", "license"):
            value = getattr(self, what)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"metadata {what} must be a string, got {type(value).__name__}")
            if value is not None and len(value) > MAX_NAME_LENGTH:
                raise ValueError(f"metadata {what} is {len(value)} characters; at most {MAX_NAME_LENGTH}")
        if self.license is None:
            self.license = ""  # the base model's license
        for what in ("description", "eval_prompts"):
            if not isinstance(getattr(self, what), str):
                raise ValueError(f"metadata {what} must be a string, got {type(getattr(self, what)).__name__}")
        for what in ("text_hidden_size", "cross_attention_dim"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE:
                raise ValueError(f"metadata {what} must be a positive integer of at most {MAX_SIZE}, got "
                                 f"{_short(value)}")
        version = self.format_version
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"format_version must be a positive integer, got {_short(version)}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this adaptor uses format version {self.format_version}; this diffusers-fair reads up to "
                f"version {FORMAT_VERSION}: upgrade diffusers-fair"
            )
        if self.kind is not None and (not isinstance(self.kind, str) or self.kind not in KINDS):
            raise ValueError(f"kind must be one of {KINDS}, got {_short(self.kind)}")
        if not isinstance(self.targets, (list, tuple)):
            raise ValueError(f"targets must be a list of target distributions, got {type(self.targets).__name__}")
        targets = []
        for i, target in enumerate(self.targets):
            try:
                target = target if isinstance(target, TargetDistribution) else target_from_dict(target)
                targets.append(target_to_dict(target))
            except ValueError as error:
                raise ValueError(f"targets[{i}]: {error}") from None
        self.targets = targets
        for what in ("metrics_before", "metrics_after"):
            metrics = getattr(self, what)
            if not isinstance(metrics, Mapping):
                raise ValueError(f"{what} must be a dict of metric name -> number")
            for key, value in metrics.items():
                if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{what}[{_short(key)}] must map a name to a number, got {_short(value)}")
                if not is_finite_number(value):
                    raise ValueError(f"{what}[{key!r}] is not finite (or too large): {_short(value)}")
        for what in ("training", "lora", "library_versions"):
            if not isinstance(getattr(self, what), Mapping):
                raise ValueError(f"metadata {what} must be a dict, got {type(getattr(self, what)).__name__}")
            _check_json(getattr(self, what), what)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.library_versions.items()):
            raise ValueError("library_versions must map package names to version strings")
        for component, summary in self.lora.items():
            _check_lora_summary(component, summary)
        if not isinstance(self.files, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in self.files.items()
        ):
            raise ValueError("files must map file names to hex sha256 digests")
        if not isinstance(self.token_names, list) or not all(isinstance(t, str) for t in self.token_names):
            raise ValueError("token_names must be a list of strings")
        self._check_tokens()

    def _check_tokens(self) -> None:
        """Only soft tokens name tokens: ``soft_token`` and ``token_names`` (its numbered followers) go together,
        and a ``lora`` adaptor has neither."""
        if self.kind == "lora" and (self.soft_token is not None or self.token_names):
            raise ValueError(f"a lora adaptor has no soft tokens, so it cannot set soft_token or token_names "
                             f"(got {_short(self.soft_token)}, {_short(self.token_names)})")
        if self.soft_token is None and self.token_names:
            raise ValueError(f"token_names {_short(self.token_names)} are given without their soft_token")
        if self.soft_token is not None:
            check_soft_token(self.soft_token)
            expected = soft_token_names(self.soft_token, max(len(self.token_names), 1))
            if self.token_names != expected:
                raise ValueError(f"token_names must be {_short(expected)} (soft_token and its numbered followers), "
                                 f"got {_short(self.token_names)}")

    def check_complete(self) -> None:
        """Raise ``ValueError`` unless the fields written on save are all there for the kind: a soft-token
        kind names its tokens, a LoRA kind summarises its LoRA, and neither has the other's."""
        if self.kind is None:
            raise ValueError("kind is missing (it is written on save)")
        if "soft_tokens" in self.kind and self.soft_token is None:
            raise ValueError(f"a {self.kind} adaptor needs its soft_token")
        if bool(self.lora) != ("lora" in self.kind):
            raise ValueError(f"a {self.kind} adaptor {'needs' if 'lora' in self.kind else 'has no'} LoRA summary "
                             f"(lora), got {_short(self.lora)}")

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
