"""Undoing a fair-adaptor load: what a pipeline held before, and how to put it back whatever failed.

Loading an adaptor goes through diffusers, peft and transformers, which create LoRA layers, add
tokens and resize embedding matrices step by step; any of them can fail half-way (a file they read
differently from the package's checks, a full disk, an interrupt). :class:`PipelineSnapshot` records,
before anything is touched, what those steps change and cannot give back themselves, and
:meth:`PipelineSnapshot.roll_back` removes whatever the failed load left, from whichever step:

* every peft LoRA layer and config entry of the new adapter, in every component, and the layers
  it wrapped for itself (the components' module trees as before);
* the tokens it added to each tokenizer, and each text encoder's embedding module and ``vocab_size``;
* every parameter's ``requires_grad`` flag (peft freezes a model's base weights when it adds an adapter).

Which adapters are active and fused is peft's state and is put back by the caller
(``pipeline._LoraState``). :func:`requires_grad_flags` and :func:`restore_requires_grad` also let
``unload_fair_adaptor`` give back the flags the pipeline had before its first fair adaptor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..components.families import family_of


_PEFT_ATTRIBUTES = ("peft_config", "_hf_peft_config_loaded")
_MISSING = object()


def _models(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's modules that may carry LoRA layers (``ModelFamily.lora_components``)."""
    return {name: getattr(pipe, name) for name in family_of(pipe).lora_components
            if isinstance(getattr(pipe, name, None), torch.nn.Module)}


def _tokenizer_pairs(pipe) -> list[tuple[str, str]]:
    """``(tokenizer attribute, text encoder attribute)`` of each text encoder, in the family's order."""
    family = family_of(pipe)
    return list(zip(family.tokenizers, family.text_encoders))


def requires_grad_flags(pipe) -> dict[tuple[str, str], bool]:
    """``{(component, parameter name): requires_grad}`` for the text encoders and the U-Net."""
    return {(component, name): p.requires_grad for component, model in _models(pipe).items()
            for name, p in model.named_parameters()}


def restore_requires_grad(pipe, flags: dict[tuple[str, str], bool]) -> None:
    """Set every parameter named in ``flags`` back to its flag (parameters not named keep theirs)."""
    for component, model in _models(pipe).items():
        for name, p in model.named_parameters():
            flag = flags.get((component, name))
            if flag is not None and p.requires_grad != flag:
                p.requires_grad_(flag)


def adapter_names_of(layer) -> set[str]:
    """The adapters a peft tuner layer holds anything of (weights, ranks, scalings)."""
    names = set()
    for attribute in (*layer.adapter_layer_names, *layer.other_param_names):
        value = getattr(layer, attribute, None)
        if hasattr(value, "keys"):
            names.update(value.keys())
    return names


def delete_adapter_everywhere(model: torch.nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from every tuner layer of ``model`` and from its ``peft_config``, however
    little of it was created; then unwrap the tuner layers left without any adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in adapter_names_of(module):
            module.delete_adapter(adapter_name)
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict):
        config.pop(adapter_name, None)
    unwrap_empty_layers(model)


def unwrap_empty_layers(model: torch.nn.Module) -> None:
    """Put back the original layer in place of every peft tuner layer that holds no adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if name and isinstance(module, BaseTunerLayer) and not adapter_names_of(module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())


def input_embedding_flags(pipe) -> dict[str, bool]:
    """``{text encoder attribute: requires_grad of its input embedding weight}``."""
    return {name: getattr(pipe, name).get_input_embeddings().weight.requires_grad
            for _, name in _tokenizer_pairs(pipe) if getattr(pipe, name, None) is not None}


def restore_input_embedding_flags(pipe, flags: dict[str, bool]) -> None:
    """Give the text encoders' input embedding weights their flags back (diffusers builds a new,
    trainable embedding when it removes tokens)."""
    for name, flag in flags.items():
        getattr(pipe, name).get_input_embeddings().weight.requires_grad_(flag)


@dataclass
class _Embedding:
    """A text encoder's input embedding as it was: the module, its weight, the weight's data and sizes."""

    module: torch.nn.Embedding
    weight: torch.nn.Parameter
    data: torch.Tensor
    num_embeddings: int
    padding_idx: int | None
    vocab_size: int

    def put_back(self, encoder) -> None:
        if encoder.get_input_embeddings() is not self.module:
            encoder.set_input_embeddings(self.module)
        if self.module.weight is not self.weight:
            self.module.weight = self.weight
        if self.weight.data_ptr() != self.data.data_ptr() or self.weight.shape != self.data.shape:
            self.weight.data = self.data
        self.module.num_embeddings, self.module.padding_idx = self.num_embeddings, self.padding_idx
        encoder.config.vocab_size = self.vocab_size


@dataclass
class PipelineSnapshot:
    """What a fair-adaptor load may change in a pipeline, recorded before it starts (no weights are copied).

    Attributes:
        requires_grad: :func:`requires_grad_flags`.
        peft_attributes: per component, its own ``peft_config`` / ``_hf_peft_config_loaded`` entries
            (a copy of the config dict), absent ones as missing.
        vocabularies: per tokenizer attribute, its vocabulary entries.
        embeddings: per text encoder attribute, its input embedding (module, weight, the weight's
            data, sizes) and ``config.vocab_size``; references, not copies.
    """

    requires_grad: dict
    peft_attributes: dict
    vocabularies: dict
    embeddings: dict

    @classmethod
    def capture(cls, pipe) -> PipelineSnapshot:
        peft_attributes = {}
        for component, model in _models(pipe).items():
            own = vars(model)
            peft_attributes[component] = {
                name: (dict(own[name]) if isinstance(own.get(name), dict) else own[name]) if name in own else _MISSING
                for name in _PEFT_ATTRIBUTES
            }
        vocabularies, embeddings = {}, {}
        for tokenizer_name, encoder_name in _tokenizer_pairs(pipe):
            tokenizer, encoder = getattr(pipe, tokenizer_name, None), getattr(pipe, encoder_name, None)
            if tokenizer is None or encoder is None:
                continue
            vocabularies[tokenizer_name] = set(tokenizer.get_vocab())
            module = encoder.get_input_embeddings()
            # transformers resizes an embedding by giving its weight new data in place: keep the old data.
            embeddings[encoder_name] = _Embedding(module, module.weight, module.weight.data, module.num_embeddings,
                                                  module.padding_idx, encoder.config.vocab_size)
        return cls(requires_grad_flags(pipe), peft_attributes, vocabularies, embeddings)

    def roll_back(self, pipe, *, adapter_name: str | None, token_names=()) -> None:
        """Remove what a load of ``adapter_name`` and ``token_names`` added since :meth:`capture`.

        The adapter was not in the pipeline then (``check_compatible`` makes sure), so every trace
        of it goes; the other adapters stay as they are. Call it with the LoRA layers unfused.
        """
        if adapter_name is not None:
            for component, model in _models(pipe).items():
                delete_adapter_everywhere(model, adapter_name)
                own = vars(model)
                for name, value in self.peft_attributes.get(component, {}).items():
                    if value is _MISSING:
                        own.pop(name, None)
                    else:
                        setattr(model, name, value)
        for tokenizer_name, encoder_name in _tokenizer_pairs(pipe):
            if tokenizer_name not in self.vocabularies:
                continue
            tokenizer, encoder = getattr(pipe, tokenizer_name), getattr(pipe, encoder_name)
            added = [name for name in token_names if name in tokenizer.get_vocab()
                     and name not in self.vocabularies[tokenizer_name]]
            if added:
                pipe.unload_textual_inversion(tokens=added, tokenizer=tokenizer, text_encoder=encoder)
            self.embeddings[encoder_name].put_back(encoder)
        restore_requires_grad(pipe, self.requires_grad)
