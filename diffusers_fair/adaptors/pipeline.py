"""Loading fair adaptors into Stable Diffusion pipelines.

``import diffusers_fair`` gives diffusers' Stable Diffusion pipelines (SD 1.x / 2.x:
``StableDiffusionPipeline`` and its img2img and inpainting variants; SDXL:
``StableDiffusionXLPipeline`` and its variants, LoRA of both text encoders and soft tokens in both) the methods
``load_fair_adaptor`` and ``unload_fair_adaptor`` and the read-only property ``fair_adaptors``
(:func:`register_pipeline_methods`), the way diffusers' loader mixins give them ``load_lora_weights``::

    from diffusers import StableDiffusionPipeline

    import diffusers_fair

    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    pipe.load_fair_adaptor("gender-race")           # an index name, a Hub repo id or a local folder

The functions :func:`load_fair_adaptor` and :func:`unload_fair_adaptor` do the same with the
pipeline as first argument. They find the adaptor (``hub.resolve_adaptor``), check it against the
pipeline *before touching it* (base model, text hidden size, cross-attention size, every LoRA
layer's shape, free token names, free adapter name), then load it with diffusers' own loaders:
LoRA weights through ``pipe.load_lora_weights`` and soft tokens through
``pipe.load_textual_inversion``. If anything fails, the pipeline is left as it was.

*The state of record is peft's and the tokenizer's.* Which LoRA adapters exist, which are active,
their weights (each layer's scaling) and which are fused are read from the peft layers at every
call; which soft tokens exist, from the tokenizer. The pipeline keeps only what peft cannot know:
which adapter or tokens came from which fair adaptor, and its metadata. Stock calls in between
(``set_adapters``, ``fuse_lora``, ``unfuse_lora``, ``delete_adapters``, ``unload_lora_weights``,
``unload_textual_inversion``, ``load_lora_weights``) are respected: a package call keeps every
other adapter's activity, weights and fusing as they are, and forgets a fair adaptor whose LoRA
and tokens the user removed.

Several fair adaptors combine: each is a named peft adapter with a weight. ``fuse=True`` merges
the active LoRA adapters into the base weights (diffusers' ``fuse_lora``, no per-step overhead);
an adaptor loaded into a fused pipeline is fused too, and unloading one unfuses, removes it and
fuses the rest again.

:class:`FairFinetunePipeline` is a ``StableDiffusionPipeline`` that also starts every prompt (not
the negative prompt) with the loaded soft tokens, and pads prompts as the loaded adaptors were
trained (``prompt_padding.py``). With no adaptor loaded it generates exactly what
``StableDiffusionPipeline`` generates.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import re
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline

from ..components.families import SDXL, family_of, load_soft_tokens, unload_soft_tokens
from .format import FairAdaptor
from .hub import resolve_adaptor
from .metadata import (
    LORA_WEIGHT_NAME,
    SOFT_TOKENS_NAME,
    FairAdaptorMetadata,
    base_model_id,
    canonical_base_model,
    is_finite_number,
    soft_token_names,
)
from .prompt_padding import PROMPT_PADDINGS, encode_natural, prompt_padding_of
from .transaction import (
    PipelineSnapshot,
    input_embedding_flags,
    restore_input_embedding_flags,
    restore_requires_grad,
    unwrap_empty_layers,
)


logger = logging.getLogger(__name__)

LORA_COMPONENTS = ["unet", "text_encoder", "text_encoder_2"]
# diffusers' Stable Diffusion 1.x / 2.x pipelines (one CLIP text encoder) and SDXL pipelines (two),
# each with one U-Net, LoRA and textual-inversion loaders; components/families.py holds their differences.
STABLE_DIFFUSION_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
)


def _components(pipe) -> list[str]:
    """The LoRA components ``pipe`` has (``text_encoder_2`` only on SDXL), for diffusers' fuse and unfuse calls."""
    return [component for component in LORA_COMPONENTS if getattr(pipe, component, None) is not None]
METHOD_NAMES = ("load_fair_adaptor", "unload_fair_adaptor", "fair_adaptors")
_REGISTRY = "_fair_adaptors"
MAX_ADAPTER_NAME = 64


@dataclass(frozen=True)
class _Provenance:
    """What peft cannot know about a loaded fair adaptor: where it came from and what it holds.

    ``requires_grad``: the flags of the pipeline's parameters before its first fair adaptor
    (:func:`~.transaction.requires_grad_flags`), held by the oldest loaded record and given back
    when the last one is unloaded; ``None`` on the others.
    """

    source: str
    metadata: FairAdaptorMetadata
    has_lora: bool
    token_names: tuple
    requires_grad: dict | None = None


@dataclass(frozen=True)
class LoadedFairAdaptor:
    """A fair adaptor loaded into a pipeline, as the pipeline holds it now.

    ``source`` and ``metadata`` are recorded at loading; the rest is read from peft's layers and
    the tokenizer, so it follows stock calls such as ``pipe.set_adapters`` or ``pipe.fuse_lora``.

    Attributes:
        adapter_name: its peft adapter name in the pipeline (``pipe.get_list_adapters()``).
        source: where it came from (folder, index name or ``repo@commit``).
        metadata: its ``fair_adaptor.json``.
        weight: its LoRA weight (1.0 = as trained); ``None`` where its layers have different
            weights (``set_adapters`` with per-component weights). 1.0 for soft tokens alone.
        has_lora: whether its LoRA adapter is in the pipeline.
        active: whether its LoRA adapter is active (``pipe.get_active_adapters()``), or, for soft
            tokens alone, whether they are in the tokenizer.
        fused: whether its LoRA weights are merged into the base weights.
        soft_token: the token that starts prompts, while its soft tokens are in the tokenizer.
        token_names: its vocabulary entries that are in the tokenizer.
    """

    adapter_name: str
    source: str
    metadata: FairAdaptorMetadata
    weight: float | None
    has_lora: bool
    active: bool
    fused: bool
    soft_token: str | None
    token_names: list


# --------------------------------------------------------------------------- peft's state
def _lora_layers(pipe):
    """``(component, module name, layer)`` for every peft LoRA layer of the pipeline."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in LORA_COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and hasattr(module, "scaling"):
                yield component, name, module


def _all_adapter_names(pipe) -> set[str]:
    if not hasattr(pipe, "get_list_adapters"):
        return set()
    return {name for names in pipe.get_list_adapters().values() for name in names}


def _unit_scaling(layer, adapter: str) -> float:
    """The scaling of ``adapter`` in ``layer`` at weight 1 (peft's alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    rank = layer.r[adapter]
    return layer.lora_alpha[adapter] / (math.sqrt(rank) if layer.use_rslora.get(adapter, False) else rank)


def _lora_adapters(pipe) -> dict[str, dict]:
    """Per LoRA adapter, read from peft's layers: ``{"weight": float | None, "active": bool, "fused": bool}``."""
    weights, active, fused = {}, set(), set()
    for _, _, layer in _lora_layers(pipe):
        for adapter, scaling in layer.scaling.items():
            weights.setdefault(adapter, []).append(scaling / _unit_scaling(layer, adapter))
        active.update(name for name in layer.active_adapters if name in layer.scaling)
        fused.update(layer.merged_adapters)
    state = {}
    for adapter, values in weights.items():
        same = all(math.isclose(v, values[0], rel_tol=1e-6, abs_tol=1e-12) for v in values)
        state[adapter] = {
            "weight": float(f"{values[0]:.12g}") if same else None,
            "active": adapter in active,
            "fused": adapter in fused,
        }
    return state


@dataclass
class _LoraState:
    """peft's LoRA state of a pipeline at one moment, to put back after loading or unloading an adapter.

    ``layers``: per layer, its active adapters (loading an adapter makes it the only active one,
    deleting one may activate another). ``merged``: per component, the adapters merged into its
    base weights (``fuse_lora``). The weights (each layer's scaling) need no copy: loading and
    deleting adapters leave the other adapters' scalings alone.
    """

    layers: dict
    merged: dict

    @classmethod
    def capture(cls, pipe) -> _LoraState:
        layers, merged = {}, {}
        for component, name, layer in _lora_layers(pipe):
            layers[(component, name)] = list(layer.active_adapters)
            merged.setdefault(component, set()).update(layer.merged_adapters)
        return cls(layers, {component: sorted(names) for component, names in merged.items() if names})

    def restore(self, pipe, *, added: str | None = None, weight: float = 1.0, removed=()) -> None:
        """Put back each layer's active adapters, with ``added`` active at ``weight`` and ``removed``
        left out. A layer created since (for ``added``) gets its component's active adapters."""
        component_active = {}
        for (component, _), active in self.layers.items():
            component_active.setdefault(component, active)
        for component, name, layer in _lora_layers(pipe):
            active = self.layers.get((component, name), component_active.get(component, []))
            active = [adapter for adapter in active if adapter not in removed and adapter != added]
            if added is not None and added in layer.scaling:
                layer.set_scale(added, weight)
                active.append(added)
            layer.set_adapter(active)

    def fuse(self, pipe, *, added: str | None = None, removed=()) -> None:
        """Merge again what was merged, less ``removed``. ``added`` joins the merge in the components
        that were fused and in those where it is the only LoRA adapter."""
        had_layers = {component for component, _ in self.layers}
        for component in _components(pipe):
            names = [name for name in self.merged.get(component, []) if name not in removed]
            if added is not None and self.merged and (names or component not in had_layers):
                names.append(added)
            if names:
                pipe.fuse_lora(components=[component], lora_scale=1.0, adapter_names=names)


def _drop_empty_lora_layers(pipe) -> None:
    """With no LoRA adapter left, put the original layers back in place of peft's wrappers."""
    if any(True for _ in _lora_layers(pipe)) and not _all_adapter_names(pipe):
        pipe.unload_lora_weights()


# --------------------------------------------------------------------------- the record of fair adaptors
def _provenance(pipe) -> dict[str, _Provenance]:
    """The pipeline's record of fair adaptors, reconciled with peft and the tokenizer.

    An adaptor whose LoRA adapter and soft tokens were all removed by stock calls
    (``unload_lora_weights``, ``delete_adapters``, ``unload_textual_inversion``) is forgotten.
    """
    recorded = getattr(pipe, _REGISTRY, {})
    if not recorded:
        return {}
    adapters = _all_adapter_names(pipe)
    tokenizer = getattr(pipe, "tokenizer", None)
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    kept = {
        name: record for name, record in recorded.items()
        if (record.has_lora and name in adapters) or any(token in vocab for token in record.token_names)
    }
    if len(kept) != len(recorded):
        setattr(pipe, _REGISTRY, kept)
    return dict(kept)


def fair_adaptors(pipe) -> dict[str, LoadedFairAdaptor]:
    """The fair adaptors loaded into ``pipe``, by adapter name, in load order, as the pipeline holds them now.

    Weights, activity and fusing are read from peft's layers, soft tokens from the tokenizer
    (:class:`LoadedFairAdaptor`). A new dict each call; changing it changes nothing.
    """
    records = _provenance(pipe)
    if not records:
        return {}
    lora = _lora_adapters(pipe)
    vocab = pipe.tokenizer.get_vocab()
    listing = {}
    for name, record in records.items():
        tokens = [token for token in record.token_names if token in vocab]
        complete = bool(tokens) and len(tokens) == len(record.token_names)
        state = lora.get(name) if record.has_lora else None
        listing[name] = LoadedFairAdaptor(
            adapter_name=name,
            source=record.source,
            metadata=record.metadata,
            weight=state["weight"] if state else 1.0,
            has_lora=state is not None,
            active=state["active"] if state else complete,
            fused=bool(state and state["fused"]),
            soft_token=record.metadata.soft_token if complete else None,
            token_names=tokens,
        )
    return listing


def add_fair_tokens(pipe, prompt: str | list[str]) -> str | list[str]:
    """``prompt`` started with the soft tokens of the fair adaptors loaded into ``pipe``.

    diffusers expands each token (``<fair>``) into all of its vectors when encoding. Use this on
    a stock pipeline; ``FairFinetunePipeline`` does it in ``__call__``.
    """
    tokens = [a.soft_token for a in fair_adaptors(pipe).values() if a.soft_token]
    if not tokens:
        return prompt
    prefix = " ".join(tokens)
    if isinstance(prompt, str):
        return f"{prefix} {prompt}"
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        return [f"{prefix} {p}" for p in prompt]
    raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")


# --------------------------------------------------------------------------- checks
def _default_adapter_name(adaptor: FairAdaptor) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", adaptor.metadata.name)


def _lora_target_module(pipe, key: str, source: str):
    """The ``nn.Linear`` a diffusers LoRA key adapts, or a ``ValueError``."""
    component, _, rest = key.partition(".")
    if component not in LORA_COMPONENTS:
        raise ValueError(f"{source}: LoRA key {key!r} belongs to no known component ({LORA_COMPONENTS})")
    model = getattr(pipe, component, None)
    if model is None:
        raise ValueError(f"{source}: the adaptor has {component} LoRA weights but the pipeline has no {component}")
    path = rest.rsplit(".", 2)[0]
    if component.startswith("text_encoder") and not hasattr(model, "text_model"):
        path = path.removeprefix("text_model.")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{source}: the adaptor adapts {component} layer {path!r}, which this pipeline does not have") from None
    module = getattr(module, "base_layer", module)
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"{source}: {component} layer {path!r} is a {type(module).__name__}, LoRA here adapts linear layers")
    return module


def vocabulary_clashes(tokenizer, names) -> list[str]:
    """The ``names`` that are already vocabulary entries in any form the tokenizer reads text in.

    A name clashes when the vocabulary holds it as it is, as the tokenizer normalises it (CLIP
    lower-cases: ``Doctor``), or as a whole word (CLIP's ``doctor</w>``), or when an added token is
    the same up to case. Such a name, added as a token, would take over that word in every prompt.
    """
    vocab = tokenizer.get_vocab()
    added = {token.lower() for token in tokenizer.get_added_vocab()}
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    clashes = []
    for name in names:
        forms = {name, name.lower()}
        if normalizer is not None:
            forms.add(normalizer.normalize_str(name))
        if any(form in vocab or f"{form}</w>" in vocab or form.lower() in added for form in forms):
            clashes.append(name)
    return clashes


def check_compatible(
    pipe, adaptor: FairAdaptor, *, adapter_name: str, weight: float = 1.0, check_base_model: bool = True
) -> None:
    """Raise ``ValueError`` if ``adaptor`` cannot be loaded into ``pipe``; never changes ``pipe``."""
    meta, source = adaptor.metadata, adaptor.source
    for component in ("tokenizer", "text_encoder", "unet"):
        if getattr(pipe, component, None) is None:
            raise ValueError(f"fair adaptors need a pipeline with a {component}; {type(pipe).__name__} has none")
    if not is_finite_number(weight):
        raise ValueError(f"weight must be a finite number, got {str(weight)[:50]}")
    if not adaptor.has_lora and weight != 1.0:
        raise ValueError(f"{source} has only soft tokens, which cannot be weighted; use weight=1.0")
    hidden = pipe.text_encoder.config.hidden_size
    if meta.text_hidden_size != hidden:
        raise ValueError(f"{source} expects a text encoder of hidden size {meta.text_hidden_size}; this pipeline's is {hidden}")
    cross = pipe.unet.config.cross_attention_dim
    if meta.cross_attention_dim != cross:
        raise ValueError(f"{source} expects a U-Net cross-attention size of {meta.cross_attention_dim}; this pipeline's is {cross}")
    base = base_model_id(pipe)
    if check_base_model and base is not None and base != canonical_base_model(meta.base_model):
        raise ValueError(
            f"{source} was trained on {meta.base_model}, this pipeline is {base}; pass check_base_model=False "
            f"to load it anyway"
        )
    if not isinstance(adapter_name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,%d}" % MAX_ADAPTER_NAME, adapter_name):
        raise ValueError(f"adapter_name must be 1 to {MAX_ADAPTER_NAME} letters, digits, '_' or '-', got "
                         f"{str(adapter_name)[:80]!r}")
    if adapter_name in _all_adapter_names(pipe) or adapter_name in _provenance(pipe):
        raise ValueError(f"an adapter named {adapter_name!r} is already loaded; pass another adapter_name=")

    if adaptor.has_lora:
        if not hasattr(pipe, "load_lora_weights"):
            raise ValueError(f"{type(pipe).__name__} cannot load LoRA weights (no load_lora_weights)")
        for key, tensor in adaptor.lora_state_dict().items():
            module = _lora_target_module(pipe, key, source)
            if key.endswith(".lora_A.weight") and tensor.shape[1] != module.in_features:
                raise ValueError(f"{source}: {key} takes {tensor.shape[1]} inputs, the layer has {module.in_features}")
            if key.endswith(".lora_B.weight") and tensor.shape[0] != module.out_features:
                raise ValueError(f"{source}: {key} gives {tensor.shape[0]} outputs, the layer has {module.out_features}")
    if adaptor.has_soft_tokens:
        if not hasattr(pipe, "load_textual_inversion"):
            raise ValueError(f"{type(pipe).__name__} cannot load soft tokens (no load_textual_inversion)")
        token, embeddings = adaptor.soft_tokens()
        expected = soft_token_names(token, embeddings.shape[0])
        if token != meta.soft_token or expected != list(meta.token_names):
            raise ValueError(f"{source}: {SOFT_TOKENS_NAME} holds {token!r} x {embeddings.shape[0]}, the metadata says {meta.token_names}")
        if embeddings.shape[1] != hidden:
            raise ValueError(f"{source}: soft tokens have size {embeddings.shape[1]}, the text encoder {hidden}")
        taken = vocabulary_clashes(pipe.tokenizer, expected)
        if taken:
            raise ValueError(f"{source}: the tokens {taken} are already in the tokenizer (another soft-token adaptor loaded?)")
        _check_soft_tokens_per_encoder(pipe, adaptor, expected)


def _check_soft_tokens_per_encoder(pipe, adaptor: FairAdaptor, names: list[str]) -> None:
    """Soft tokens for each of the pipeline's text encoders (SDXL: both), of its size, not in its tokenizer."""
    family, source = family_of(pipe), adaptor.source
    vectors = adaptor.soft_tokens_by_encoder()
    if sorted(vectors) != sorted(family.text_encoders):
        raise ValueError(f"{source}: the soft tokens are for the text encoders {sorted(vectors)}, this "
                         f"{family.name} pipeline has {list(family.text_encoders)}")
    for tokenizer_name, encoder_name in zip(family.tokenizers, family.text_encoders):
        size, hidden = vectors[encoder_name].shape, getattr(pipe, encoder_name).config.hidden_size
        if size != (len(names), hidden):
            raise ValueError(f"{source}: the soft tokens of {encoder_name} have shape {tuple(size)}, expected "
                             f"({len(names)}, {hidden})")
        taken = vocabulary_clashes(getattr(pipe, tokenizer_name), names)
        if taken:
            raise ValueError(f"{source}: the tokens {taken} are already in {tokenizer_name}")


# --------------------------------------------------------------------------- loading
def _unload_tokens(pipe, token_names) -> None:
    unload_soft_tokens(pipe, token_names)  # from every tokenizer and text encoder (SDXL: both)


def _load_lora_quietly(pipe, folder: str, adapter_name: str, source: str) -> None:
    # transformers logs a "LOAD REPORT" listing the base weights as missing when an adapter is
    # loaded, and diffusers warns when a component has no LoRA keys; the keys were checked above,
    # so these messages only mislead. An error that refers to that silenced report is raised again
    # with its own message.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    progress_bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        pipe.load_lora_weights(folder, adapter_name=adapter_name, weight_name=LORA_WEIGHT_NAME, use_safetensors=True)
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        cause = " ".join(lines[:2] if lines and lines[0].endswith(":") else lines[:1])
        cause = re.sub(r"\s*For details look at the above report!?", "", cause).strip()
        raise ValueError(f"{source}: diffusers could not load {LORA_WEIGHT_NAME} ({type(error).__name__}"
                         f"{': ' + cause if cause else ''})") from error
    finally:
        transformers_logging.set_verbosity(levels[0])
        diffusers_logging.set_verbosity(levels[1])
        if progress_bars:
            transformers_logging.enable_progress_bar()


def load_fair_adaptor(
    pipe,
    name_or_path,
    *,
    revision: str | None = None,
    weight: float = 1.0,
    adapter_name: str | None = None,
    fuse: bool = False,
    token: str | None = None,
    check_base_model: bool = True,
) -> LoadedFairAdaptor:
    """Load a fair adaptor into a Stable Diffusion pipeline.

    The other LoRA adapters keep their activity, weights and fusing exactly as they are (read from
    peft, whatever set them); the new adapter is made active beside them at ``weight``.

    Args:
        pipe: a ``StableDiffusionPipeline`` (or its img2img / inpainting variant, or ``FairFinetunePipeline``).
        name_or_path: an index name (``"gender-race"``, ``"toy-gender-race"``), a local adaptor
            folder, or a Hub repo id ``owner/name``.
        revision: Hub branch, tag or commit sha (default: the index's pinned commit, or ``main``).
        weight: LoRA weight (1.0 = as trained; soft tokens cannot be weighted).
        adapter_name: peft adapter name (default: the adaptor's name).
        fuse: merge the active LoRA adapters into the base weights (faster sampling). In a pipeline
            that is fused already, the new adapter is fused whatever ``fuse`` says.
        token: Hub token for private repos.
        check_base_model: refuse an adaptor trained on another base model (where the pipeline's
            base model can be told; see :func:`~diffusers_fair.adaptors.metadata.base_model_id`).

    Returns:
        Its :class:`LoadedFairAdaptor` (also in ``fair_adaptors(pipe)``).

    Raises:
        ValueError: the adaptor cannot be found, read or verified, does not fit the pipeline, or
            diffusers could not load it; nothing was changed. Any other error raised half-way (an
            ``OSError``, an interrupt) propagates after the load is undone, the pipeline as before.
    """
    adaptor = resolve_adaptor(name_or_path, revision=revision, token=token)
    adapter_name = adapter_name if adapter_name is not None else _default_adapter_name(adaptor)
    check_compatible(pipe, adaptor, adapter_name=adapter_name, weight=weight, check_base_model=check_base_model)

    records = _provenance(pipe)
    before = _LoraState.capture(pipe)
    snapshot = PipelineSnapshot.capture(pipe)
    unfused = adaptor.has_lora and bool(before.merged)  # the new adapter joins the fused set: unfuse, load, fuse again
    try:
        if unfused:
            pipe.unfuse_lora(components=_components(pipe))
        if adaptor.has_lora:
            _load_lora_quietly(pipe, str(adaptor.folder), adapter_name, adaptor.source)
            before.restore(pipe, added=adapter_name, weight=float(weight))
        if adaptor.has_soft_tokens:
            if family_of(pipe) is SDXL:  # one vector set per text encoder, as diffusers loads SDXL textual inversions
                load_soft_tokens(pipe, adaptor.soft_tokens_by_encoder(), adaptor.metadata.soft_token)
            else:
                pipe.load_textual_inversion(str(adaptor.folder), weight_name=SOFT_TOKENS_NAME, use_safetensors=True)
        if unfused:
            before.fuse(pipe, added=adapter_name)
        elif fuse and not before.merged and _all_adapter_names(pipe):
            pipe.fuse_lora(components=_components(pipe), lora_scale=1.0)
    except BaseException:
        # Whichever step raised (peft, diffusers, transformers, the filesystem, an interrupt), remove
        # all the load left: a half-created adapter, added tokens, resized embeddings, frozen flags;
        # then give the other adapters back their activity and fusing.
        if any(layer.merged for _, _, layer in _lora_layers(pipe)):
            pipe.unfuse_lora(components=_components(pipe))
        snapshot.roll_back(pipe, adapter_name=adapter_name if adaptor.has_lora else None,
                           token_names=adaptor.metadata.token_names)
        before.restore(pipe)
        before.fuse(pipe)
        raise
    records[adapter_name] = _Provenance(
        source=adaptor.source,
        metadata=adaptor.metadata,
        has_lora=adaptor.has_lora,
        token_names=tuple(adaptor.metadata.token_names),
        requires_grad=None if records else snapshot.requires_grad,
    )
    setattr(pipe, _REGISTRY, records)
    return fair_adaptors(pipe)[adapter_name]


def unload_fair_adaptor(pipe, adapter_name: str | None = None) -> None:
    """Remove one fair adaptor (by adapter name) or, with ``None``, all of them (at least one must be loaded).

    LoRA adapters are deleted (``pipe.delete_adapters``) and soft tokens removed from the
    tokenizer and text encoder. The other adapters keep their activity, weights and fusing.
    Unfused, the pipeline is then bit-identical to before loading; after fusing, the weights are
    restored by subtraction (equal up to float rounding).
    """
    records = _provenance(pipe)
    if not records:
        raise ValueError("no fair adaptor is loaded into this pipeline; there is nothing to unload")
    if adapter_name is not None and adapter_name not in records:
        raise ValueError(f"no fair adaptor named {adapter_name!r} is loaded; loaded: {sorted(records)}")
    names = [adapter_name] if adapter_name is not None else list(records)
    adapters = _all_adapter_names(pipe)
    lora_names = [name for name in names if records[name].has_lora and name in adapters]
    flags = next((record.requires_grad for record in records.values() if record.requires_grad is not None), None)
    before = _LoraState.capture(pipe)
    if lora_names and before.merged:
        pipe.unfuse_lora(components=_components(pipe))
    for name in names:
        record = records.pop(name)
        if name in lora_names:
            pipe.delete_adapters([name])
        vocab = pipe.tokenizer.get_vocab()
        # Tokens another loaded adaptor names stay: they are its tokens too.
        kept = {token for other in records.values() for token in other.token_names}
        present = [token for token in record.token_names if token in vocab and token not in kept]
        if present:
            embedding_flags = input_embedding_flags(pipe)
            _unload_tokens(pipe, present)
            restore_input_embedding_flags(pipe, embedding_flags)
    if lora_names:
        _drop_empty_lora_layers(pipe)
        for model in (getattr(pipe, component) for component in _components(pipe)):
            unwrap_empty_layers(model)  # layers only the removed adapters had: their module trees as before
        before.restore(pipe, removed=lora_names)
        before.fuse(pipe, removed=lora_names)
    if flags is not None and not records:
        restore_requires_grad(pipe, flags)  # peft froze the base weights when the first adapter came
    elif flags is not None and all(record.requires_grad is None for record in records.values()):
        oldest = next(iter(records))
        records[oldest] = dataclasses.replace(records[oldest], requires_grad=flags)
    setattr(pipe, _REGISTRY, records)


# --------------------------------------------------------------------------- the methods on pipelines
class FairAdaptorMixin:
    """Fair-adaptor methods for a diffusers pipeline with LoRA and textual-inversion loaders."""

    def load_fair_adaptor(self, name_or_path, **kwargs) -> LoadedFairAdaptor:
        """Load a fair adaptor (an index name, a Hub repo id or a local folder): see
        :func:`diffusers_fair.adaptors.pipeline.load_fair_adaptor` (same keyword arguments)."""
        return load_fair_adaptor(self, name_or_path, **kwargs)

    def unload_fair_adaptor(self, adapter_name: str | None = None) -> None:
        """Remove one fair adaptor, or all of them: see
        :func:`diffusers_fair.adaptors.pipeline.unload_fair_adaptor`."""
        unload_fair_adaptor(self, adapter_name)

    @property
    def fair_adaptors(self) -> dict[str, LoadedFairAdaptor]:
        """The loaded fair adaptors by adapter name, as the pipeline holds them now (read-only)."""
        return fair_adaptors(self)

    def add_fair_tokens(self, prompt: str | list[str]) -> str | list[str]:
        """See :func:`add_fair_tokens`."""
        return add_fair_tokens(self, prompt)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' ``from_pipe``; the fair adaptors come along when the text encoder, tokenizer
        and U-Net are shared."""
        new = super().from_pipe(pipeline, **kwargs)
        shared = all(getattr(new, c, None) is getattr(pipeline, c, None) for c in ("text_encoder", "tokenizer", "unet"))
        if shared and _provenance(pipeline):
            setattr(new, _REGISTRY, _provenance(pipeline))
        return new


def register_pipeline_methods(classes=None) -> None:
    """Give diffusers' Stable Diffusion pipelines ``load_fair_adaptor``, ``unload_fair_adaptor`` and
    the read-only property ``fair_adaptors``, as diffusers' loader mixins give them ``load_lora_weights``.

    ``import diffusers_fair`` calls it. By default the classes are diffusers' SD 1.x / 2.x and SDXL
    pipelines (``STABLE_DIFFUSION_PIPELINES``). A class that already has an attribute of one of these names
    keeps its own: nothing is ever overridden.
    """
    if classes is None:
        import diffusers

        classes = [getattr(diffusers, name) for name in STABLE_DIFFUSION_PIPELINES]
    for cls in classes:
        for name in METHOD_NAMES:
            if not hasattr(cls, name):
                setattr(cls, name, FairAdaptorMixin.__dict__[name])


class FairFinetunePipeline(FairAdaptorMixin, StableDiffusionPipeline):
    """A ``StableDiffusionPipeline`` that loads fair adaptors and uses their soft tokens and prompt padding.

    ``from_pretrained`` and ``from_pipe`` work as in diffusers. ``__call__`` takes the same
    arguments as ``StableDiffusionPipeline.__call__``, and ``prompt_padding``:

    * When soft-token adaptors are loaded, each prompt (a string or a list) is started with their
      tokens; the negative prompt is left alone. ``prompt_embeds`` would bypass the soft tokens, so
      they are refused while soft tokens are loaded: encode ``pipe.add_fair_tokens(prompt)`` with
      ``pipe.encode_prompt`` yourself instead.
    * Prompts are padded as the active adaptors were trained (their ``training["prompt_padding"]``),
      or as ``prompt_padding`` says (``"max_length"`` or ``"natural"``). ``"max_length"`` is the
      stock pipeline's encoding. ``"natural"`` encodes the prompts and negative prompts padded to
      the longest natural length among them, with the attention mask
      (:func:`~diffusers_fair.adaptors.prompt_padding.encode_natural`), and passes the embeddings
      to ``StableDiffusionPipeline.__call__``; for one prompt these are the trainer's embeddings.

    With no adaptor loaded it generates exactly what ``StableDiffusionPipeline`` generates.

    ``save_pretrained`` writes a folder whose ``model_index.json`` names ``StableDiffusionPipeline``,
    so that ``DiffusionPipeline.from_pretrained`` and ``AutoPipelineForText2Image.from_pretrained``
    load it (as a ``StableDiffusionPipeline``), and ``FairFinetunePipeline.from_pretrained`` as this class.
    """

    def __call__(self, prompt=None, *args, prompt_padding: str | None = None, **kwargs):
        adaptors = fair_adaptors(self)
        if any(a.soft_token for a in adaptors.values()):
            if prompt is None:
                if kwargs.get("prompt_embeds") is not None:
                    raise ValueError(
                        "prompt_embeds bypass the soft tokens of the loaded fair adaptors; pass prompt=, or encode "
                        "pipe.add_fair_tokens(prompt) with pipe.encode_prompt and call StableDiffusionPipeline.__call__"
                    )
            else:
                prompt = self.add_fair_tokens(prompt)
        if prompt_padding is None:
            prompt_padding = prompt_padding_of(adaptors.values())
        elif prompt_padding not in PROMPT_PADDINGS:
            raise ValueError(f"prompt_padding must be one of {PROMPT_PADDINGS} or None, got {prompt_padding!r}")
        if prompt_padding == "natural" and prompt is not None:
            return self._call_with_natural_padding(prompt, args, kwargs)
        return super().__call__(prompt, *args, **kwargs)

    def _call_with_natural_padding(self, prompt, args, kwargs):
        """``StableDiffusionPipeline.__call__`` on the embeddings of :func:`encode_natural`."""
        signature = inspect.signature(StableDiffusionPipeline.__call__)
        arguments = dict(signature.bind(self, prompt, *args, **kwargs).arguments)
        del arguments["self"]
        extra = arguments.pop("kwargs", {})
        if arguments.get("prompt_embeds") is not None or arguments.get("negative_prompt_embeds") is not None:
            raise ValueError("with natural prompt padding the pipeline encodes prompt and negative_prompt itself: "
                             "pass them as text, or pass prompt_padding='max_length' to use your own embeddings")
        if arguments.get("clip_skip") is not None:
            raise ValueError("clip_skip is not supported with natural prompt padding; adaptors are trained without it")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))):
            raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        guidance_scale = arguments.get("guidance_scale", signature.parameters["guidance_scale"].default)
        negative = arguments.pop("negative_prompt", None)
        negatives = None
        # StableDiffusionPipeline's own test for classifier-free guidance (do_classifier_free_guidance).
        if guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None:
            negatives = [negative or ""] * len(prompts) if negative is None or isinstance(negative, str) else negative
        lora_scale = (arguments.get("cross_attention_kwargs") or {}).get("scale")
        embeds, negative_embeds = encode_natural(self, prompts, negatives, lora_scale=lora_scale)
        arguments.update(prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds)
        return super().__call__(**arguments, **extra)

    def to_json_string(self) -> str:
        # diffusers resolves a model_index.json's class name in its own namespace; naming the stock
        # class lets every diffusers loader read the folder.
        config = json.loads(super().to_json_string())
        config["_class_name"] = StableDiffusionPipeline.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' ``save_pretrained``; refused while LoRA adapters are loaded.

        With LoRA adapters attached, the text encoder would be saved as its adapters only and the
        folder would not load. Loaded soft tokens are saved as part of the tokenizer and text encoder.

        Raises:
            ValueError: LoRA adapters are loaded (unload them, or fuse them and ``unload_lora_weights``).
        """
        adapters = _all_adapter_names(self)
        if adapters:
            raise ValueError(
                f"the pipeline has LoRA adapters loaded ({sorted(adapters)}), which save_pretrained would write "
                f"in place of the text encoder's weights: unload them first (pipe.unload_fair_adaptor()), or make "
                f"them permanent with pipe.fuse_lora() and pipe.unload_lora_weights(); save an adaptor itself with "
                f"save_fair_adaptor"
            )
        return super().save_pretrained(save_directory, *args, **kwargs)
