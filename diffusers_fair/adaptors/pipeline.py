"""Loading fair adaptors into Stable Diffusion pipelines.

:func:`load_fair_adaptor` works on any ``StableDiffusionPipeline``::

    from diffusers import StableDiffusionPipeline
    from diffusers_fair import load_fair_adaptor

    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    load_fair_adaptor(pipe, "gender-race")          # an index name, a Hub repo id or a local folder

It finds the adaptor (``hub.resolve_adaptor``), checks it against the pipeline *before touching
it* (base model, text hidden size, cross-attention size, every LoRA layer's shape, free token
names, free adapter name), then loads it with diffusers' own loaders: LoRA weights through
``pipe.load_lora_weights`` (so ``set_adapters``, ``fuse_lora`` and ``unload_lora_weights`` keep
working) and soft tokens through ``pipe.load_textual_inversion``. If anything fails, the
pipeline is left as it was.

Several fair adaptors combine: each is a named peft adapter with a weight, and every call
re-activates all of them (``pipe.set_adapters(names, weights)``). ``fuse=True`` merges the active
LoRA weights into the base weights (no per-step overhead); fusing applies to the whole set of
loaded fair adaptors, and loading or unloading one later unfuses, changes the set and fuses again.

:class:`FairFinetunePipeline` is a ``StableDiffusionPipeline`` with these as methods; with soft
tokens loaded it starts every prompt (not the negative prompt) with them. With no adaptor loaded
it generates exactly what ``StableDiffusionPipeline`` generates.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline

from .metadata import LORA_WEIGHT_NAME, SOFT_TOKENS_NAME, FairAdaptorMetadata, base_model_id, canonical_base_model
from .format import FairAdaptor
from .hub import resolve_adaptor

logger = logging.getLogger(__name__)

LORA_COMPONENTS = ["unet", "text_encoder"]
_REGISTRY = "_fair_adaptors"
_FUSED = "_fair_adaptors_fused"


@dataclass
class LoadedFairAdaptor:
    """A fair adaptor loaded into a pipeline.

    Attributes:
        adapter_name: its peft adapter name in the pipeline (``pipe.get_list_adapters()``).
        source: where it came from (folder, index name or ``repo@commit``).
        metadata: its ``fair_adaptor.json``.
        weight: the LoRA weight it is active with.
        has_lora: whether it loaded LoRA weights.
        soft_token: the token that starts prompts, when it has soft tokens.
        token_names: the vocabulary entries its soft tokens added.
    """

    adapter_name: str
    source: str
    metadata: FairAdaptorMetadata
    weight: float
    has_lora: bool
    soft_token: str | None
    token_names: list


def fair_adaptors(pipe) -> dict[str, LoadedFairAdaptor]:
    """The fair adaptors loaded into ``pipe``, by adapter name, in load order (a copy)."""
    return dict(getattr(pipe, _REGISTRY, {}))


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


def _all_adapter_names(pipe) -> set[str]:
    if not hasattr(pipe, "get_list_adapters"):
        return set()
    return {name for names in pipe.get_list_adapters().values() for name in names}


def _lora_target_module(pipe, key: str, source: str):
    """The ``nn.Linear`` a diffusers LoRA key adapts, or a ``ValueError``."""
    component, _, rest = key.partition(".")
    if component not in LORA_COMPONENTS:
        raise ValueError(f"{source}: LoRA key {key!r} belongs to no known component ({LORA_COMPONENTS})")
    model = getattr(pipe, component, None)
    if model is None:
        raise ValueError(f"{source}: the adaptor has {component} LoRA weights but the pipeline has no {component}")
    path = rest.rsplit(".", 2)[0]
    if component == "text_encoder" and not hasattr(model, "text_model"):
        path = path.removeprefix("text_model.")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{source}: the adaptor adapts {component} layer {path!r}, which this pipeline does not have") from None
    module = getattr(module, "base_layer", module)
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"{source}: {component} layer {path!r} is a {type(module).__name__}, LoRA here adapts linear layers")
    return module


def check_compatible(
    pipe, adaptor: FairAdaptor, *, adapter_name: str, weight: float = 1.0, check_base_model: bool = True
) -> None:
    """Raise ``ValueError`` if ``adaptor`` cannot be loaded into ``pipe``; never changes ``pipe``."""
    meta, source = adaptor.metadata, adaptor.source
    for component in ("tokenizer", "text_encoder", "unet"):
        if getattr(pipe, component, None) is None:
            raise ValueError(f"fair adaptors need a pipeline with a {component}; {type(pipe).__name__} has none")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number, got {weight!r}")
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
    if not re.match(r"^[A-Za-z0-9_-]+$", adapter_name or ""):
        raise ValueError(f"adapter_name must be letters, digits, '_' or '-', got {adapter_name!r}")
    if adapter_name in _all_adapter_names(pipe) or adapter_name in fair_adaptors(pipe):
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
        expected = [token] + [f"{token}_{i}" for i in range(1, embeddings.shape[0])]
        if token != meta.soft_token or expected != list(meta.token_names):
            raise ValueError(f"{source}: {SOFT_TOKENS_NAME} holds {token!r} x {embeddings.shape[0]}, the metadata says {meta.token_names}")
        if embeddings.shape[1] != hidden:
            raise ValueError(f"{source}: soft tokens have size {embeddings.shape[1]}, the text encoder {hidden}")
        vocab = pipe.tokenizer.get_vocab()
        taken = [name for name in expected if name in vocab]
        if taken:
            raise ValueError(f"{source}: the tokens {taken} are already in the tokenizer (another soft-token adaptor loaded?)")


# --------------------------------------------------------------------------- loading
def _activate(pipe, registry: dict[str, LoadedFairAdaptor], others: list[str]) -> None:
    """Make every fair LoRA adaptor active with its weight, plus ``others`` (non-fair adapters) at 1.0."""
    names = [name for name, a in registry.items() if a.has_lora]
    if not names and not others:
        return
    if others:
        logger.warning("re-activating the other LoRA adapters %s with weight 1.0; set their weights again with pipe.set_adapters", others)
    pipe.set_adapters(names + others, [registry[n].weight for n in names] + [1.0] * len(others))


def _fuse(pipe, registry: dict[str, LoadedFairAdaptor]) -> bool:
    names = [name for name, a in registry.items() if a.has_lora]
    if names:
        pipe.fuse_lora(components=LORA_COMPONENTS, lora_scale=1.0, adapter_names=names)
    return bool(names)


def _drop_empty_lora_layers(pipe) -> None:
    """With no LoRA adapter left, put the original layers back in place of peft's wrappers."""
    has_wrappers = any(hasattr(m, "base_layer") for c in LORA_COMPONENTS for m in getattr(pipe, c).modules())
    if has_wrappers and not _all_adapter_names(pipe):
        pipe.unload_lora_weights()


def _unload_tokens(pipe, token_names: list[str]) -> None:
    pipe.unload_textual_inversion(tokens=list(token_names))
    # diffusers shrinks the embedding matrix but leaves the config's vocab_size behind.
    pipe.text_encoder.config.vocab_size = pipe.text_encoder.get_input_embeddings().weight.shape[0]


def _load_lora_quietly(pipe, folder: str, adapter_name: str) -> None:
    # transformers logs a "LOAD REPORT" listing the base weights as missing when an adapter is
    # loaded, and diffusers warns when a component has no LoRA keys; the keys were checked above,
    # so these messages only mislead.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    progress_bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        pipe.load_lora_weights(folder, adapter_name=adapter_name, weight_name=LORA_WEIGHT_NAME, use_safetensors=True)
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

    Args:
        pipe: a ``StableDiffusionPipeline`` (or subclass, e.g. ``FairFinetunePipeline``).
        name_or_path: an index name (``"gender-race"``, ``"toy-gender-race"``), a local adaptor
            folder, or a Hub repo id ``owner/name``.
        revision: Hub branch, tag or commit sha (default: the index's pinned commit, or ``main``).
        weight: LoRA weight (1.0 = as trained; soft tokens cannot be weighted).
        adapter_name: peft adapter name (default: the adaptor's name).
        fuse: merge the active fair LoRA weights into the base weights (faster sampling).
        token: Hub token for private repos.
        check_base_model: refuse an adaptor trained on another base model (where the pipeline's
            base model can be told; see :func:`~diffusers_fair.adaptors.metadata.base_model_id`).

    Returns:
        The :class:`LoadedFairAdaptor` record (also in ``fair_adaptors(pipe)``).
    """
    adaptor = resolve_adaptor(name_or_path, revision=revision, token=token)
    adapter_name = adapter_name if adapter_name is not None else _default_adapter_name(adaptor)
    check_compatible(pipe, adaptor, adapter_name=adapter_name, weight=weight, check_base_model=check_base_model)

    registry = fair_adaptors(pipe)
    fused = getattr(pipe, _FUSED, False)
    others = [n for n in (pipe.get_active_adapters() if _all_adapter_names(pipe) else []) if n not in registry]
    record = LoadedFairAdaptor(
        adapter_name=adapter_name,
        source=adaptor.source,
        metadata=adaptor.metadata,
        weight=float(weight),
        has_lora=adaptor.has_lora,
        soft_token=adaptor.metadata.soft_token,
        token_names=list(adaptor.metadata.token_names),
    )
    refuse = fused and adaptor.has_lora  # the new LoRA joins the fused set: unfuse, load, fuse again
    lora_loaded = tokens_loaded = False
    try:
        if refuse:
            pipe.unfuse_lora(components=LORA_COMPONENTS)
        if adaptor.has_lora:
            _load_lora_quietly(pipe, str(adaptor.folder), adapter_name)
            lora_loaded = True
        if adaptor.has_soft_tokens:
            pipe.load_textual_inversion(str(adaptor.folder), weight_name=SOFT_TOKENS_NAME, use_safetensors=True)
            tokens_loaded = True
        new_registry = {**registry, adapter_name: record}
        if adaptor.has_lora:
            _activate(pipe, new_registry, others)
        now_fused = _fuse(pipe, new_registry) if refuse or (fuse and not fused) else fused
    except BaseException:
        if tokens_loaded:
            _unload_tokens(pipe, record.token_names)
        if lora_loaded:
            pipe.delete_adapters([adapter_name])
            _drop_empty_lora_layers(pipe)
        if adaptor.has_lora:
            _activate(pipe, registry, others)
            if refuse:
                _fuse(pipe, registry)
        raise
    setattr(pipe, _REGISTRY, new_registry)
    setattr(pipe, _FUSED, now_fused)
    return record


def unload_fair_adaptor(pipe, adapter_name: str | None = None) -> None:
    """Remove one fair adaptor (by adapter name) or, with ``None``, all of them (at least one must be loaded).

    LoRA adapters are deleted (``pipe.delete_adapters``) and soft tokens removed from the
    tokenizer and text encoder. Unfused, the pipeline is then bit-identical to before loading;
    after fusing, the weights are restored by subtraction (equal up to float rounding).
    """
    registry = fair_adaptors(pipe)
    if not registry:
        raise ValueError("no fair adaptor is loaded into this pipeline; there is nothing to unload")
    if adapter_name is not None and adapter_name not in registry:
        raise ValueError(f"no fair adaptor named {adapter_name!r} is loaded; loaded: {sorted(registry)}")
    names = [adapter_name] if adapter_name is not None else list(registry)
    fused = getattr(pipe, _FUSED, False)
    if fused:
        pipe.unfuse_lora(components=LORA_COMPONENTS)
    for name in names:
        record = registry.pop(name)
        if record.has_lora:
            pipe.delete_adapters([name])
        if record.token_names:
            _unload_tokens(pipe, record.token_names)
    if any(record.has_lora for record in registry.values()):
        others = [n for n in pipe.get_active_adapters() if n not in registry]
        _activate(pipe, registry, others)
    _drop_empty_lora_layers(pipe)
    setattr(pipe, _REGISTRY, registry)
    setattr(pipe, _FUSED, _fuse(pipe, registry) if fused else False)


# --------------------------------------------------------------------------- the pipeline
class FairAdaptorMixin:
    """Fair-adaptor methods for a diffusers pipeline with LoRA and textual-inversion loaders."""

    def load_fair_adaptor(self, name_or_path, **kwargs) -> LoadedFairAdaptor:
        """See :func:`load_fair_adaptor` (same keyword arguments)."""
        return load_fair_adaptor(self, name_or_path, **kwargs)

    def unload_fair_adaptor(self, adapter_name: str | None = None) -> None:
        """See :func:`unload_fair_adaptor`."""
        unload_fair_adaptor(self, adapter_name)

    @property
    def fair_adaptors(self) -> dict[str, LoadedFairAdaptor]:
        """The loaded fair adaptors by adapter name."""
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
        if shared and fair_adaptors(pipeline):
            setattr(new, _REGISTRY, fair_adaptors(pipeline))
            setattr(new, _FUSED, getattr(pipeline, _FUSED, False))
        return new


class FairFinetunePipeline(FairAdaptorMixin, StableDiffusionPipeline):
    """A ``StableDiffusionPipeline`` that loads fair adaptors and uses their soft tokens.

    ``from_pretrained`` and ``from_pipe`` work as in diffusers. ``__call__`` takes the same
    arguments as ``StableDiffusionPipeline.__call__``; when soft-token adaptors are loaded, each
    prompt (a string or a list) is started with their tokens; the negative prompt is left alone.
    ``prompt_embeds`` would bypass the soft tokens, so they are refused while soft tokens are
    loaded: encode ``pipe.add_fair_tokens(prompt)`` with ``pipe.encode_prompt`` yourself instead.
    With no adaptor loaded it generates exactly what ``StableDiffusionPipeline`` generates.
    """

    def __call__(self, prompt=None, *args, **kwargs):
        if any(a.soft_token for a in fair_adaptors(self).values()):
            if prompt is None:
                if kwargs.get("prompt_embeds") is not None:
                    raise ValueError(
                        "prompt_embeds bypass the soft tokens of the loaded fair adaptors; pass prompt=, or encode "
                        "pipe.add_fair_tokens(prompt) with pipe.encode_prompt and call StableDiffusionPipeline.__call__"
                    )
            else:
                prompt = self.add_fair_tokens(prompt)
        return super().__call__(prompt, *args, **kwargs)
