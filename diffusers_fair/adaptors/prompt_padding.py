"""How prompts reach the text encoder: the padding an adaptor was trained with, and natural padding.

A stock ``StableDiffusionPipeline`` pads every prompt to the tokenizer's maximum length (77 tokens)
and passes no attention mask; the U-Net then attends to the padding tokens' embeddings too. The
authors' code pads each prompt only to its natural length and passes the attention mask, the
negative prompt padded to the same length, and their released weights were trained that way. An
adaptor says which padding it was trained with in ``metadata.training["prompt_padding"]``
(``FairTrainingConfig.prompt_padding``): ``"max_length"`` (the stock pipeline's, and what an
adaptor without the field used) or ``"natural"``.

:func:`prompt_padding_of` reads the padding of the loaded adaptors; :func:`encode_natural`
encodes prompts and negative prompts as the trainer does with ``prompt_padding="natural"``, so that
a pipeline called with the resulting ``prompt_embeds`` and ``negative_prompt_embeds`` conditions the
U-Net as training did. ``FairFinetunePipeline`` and the audit use both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


__all__ = ["PROMPT_PADDINGS", "adaptor_prompt_padding", "encode_natural", "prompt_padding_of"]

PROMPT_PADDINGS = ("max_length", "natural")
DEFAULT_PROMPT_PADDING = "max_length"  # adaptors that do not record their padding were trained with it


def adaptor_prompt_padding(metadata, source: str = "the adaptor") -> str:
    """The prompt padding a fair adaptor was trained with: its ``training["prompt_padding"]``, else ``"max_length"``.

    Raises:
        ValueError: the metadata records another value.
    """
    padding = (metadata.training or {}).get("prompt_padding", DEFAULT_PROMPT_PADDING)
    if padding not in PROMPT_PADDINGS:
        raise ValueError(f"{source} records training.prompt_padding={padding!r}; expected one of {PROMPT_PADDINGS}")
    return padding


def prompt_padding_of(adaptors: Iterable) -> str:
    """The prompt padding of the active loaded fair adaptors (``LoadedFairAdaptor`` records).

    ``"max_length"`` without an active adaptor. Adaptors that are loaded but not active (a LoRA
    switched off with ``set_adapters``) do not count.

    Raises:
        ValueError: the active adaptors were trained with different paddings (pass the padding to use,
            or deactivate one), or one records an unknown padding.
    """
    paddings = {a.adapter_name: adaptor_prompt_padding(a.metadata, a.source) for a in adaptors if a.active}
    if len(set(paddings.values())) > 1:
        raise ValueError(f"the loaded fair adaptors were trained with different prompt paddings {paddings}; pass "
                         f"prompt_padding= to choose one, or deactivate the adaptors of the other padding")
    return next(iter(paddings.values()), DEFAULT_PROMPT_PADDING)


def _natural_length(tokenizer, text: str) -> int:
    """The number of tokens of ``text``, start and end tokens included, at most the tokenizer's maximum."""
    return len(tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids)


@torch.no_grad()
def encode_natural(pipe, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *,
                   lora_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings of ``prompts`` and ``negative_prompts``, each padded to the longest natural length among them.

    Every text is tokenized and padded to that common length (the U-Net's guidance batch needs one
    length) and encoded with its attention mask, exactly as the trainer's ``_encode`` does with
    ``prompt_padding="natural"``; for one prompt and its negative prompt the embeddings are the
    trainer's, bit for bit. A pipeline with textual-inversion tokens expands multi-vector tokens
    first (``maybe_convert_prompt``), as its ``encode_prompt`` does.

    Args:
        pipe: a Stable Diffusion pipeline (``tokenizer``, ``text_encoder``).
        prompts: the prompts, one per image batch row (soft tokens already in front where wanted).
        negative_prompts: one per prompt, or ``None`` without classifier-free guidance.
        lora_scale: scale of the text encoder's LoRA layers while encoding, as
            ``cross_attention_kwargs={"scale": ...}`` sets it in ``StableDiffusionPipeline``.

    Returns:
        ``(prompt_embeds, negative_prompt_embeds)``, each ``(len(prompts), length, hidden)`` on the
        pipeline's execution device; ``negative_prompt_embeds`` is ``None`` without negative prompts.

    Raises:
        ValueError: no prompts, or a number of negative prompts other than the number of prompts.
    """
    from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt")
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        raise ValueError(f"negative_prompts must hold one negative prompt per prompt ({len(prompts)}), "
                         f"got {len(negative_prompts)}")
    texts = prompts + list(negative_prompts or [])
    if hasattr(pipe, "maybe_convert_prompt"):
        texts = pipe.maybe_convert_prompt(texts, pipe.tokenizer)
    tokenizer, device = pipe.tokenizer, pipe._execution_device
    length = max(_natural_length(tokenizer, text) for text in texts)
    scaled = lora_scale is not None and USE_PEFT_BACKEND
    if scaled:
        scale_lora_layers(pipe.text_encoder, lora_scale)
    try:
        encoded = {}
        for text in dict.fromkeys(texts):  # each distinct text once: a batch repeats its prompt
            tokens = tokenizer([text], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            encoded[text] = pipe.text_encoder(tokens.input_ids.to(device),
                                              attention_mask=tokens.attention_mask.to(device))[0]
    finally:
        if scaled:
            unscale_lora_layers(pipe.text_encoder, lora_scale)
    prompt_embeds = torch.cat([encoded[text] for text in texts[:len(prompts)]])
    if negative_prompts is None:
        return prompt_embeds, None
    return prompt_embeds, torch.cat([encoded[text] for text in texts[len(prompts):]])
