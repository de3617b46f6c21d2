"""The Stable Diffusion families: what differs between SD 1.x / 2.x and SDXL, in one place.

The method is the same for every family: the losses read images, the adjusted backward needs a
U-Net and a linear scheduler step, the adaptors are LoRA and soft tokens. What differs is how a
pipeline turns a prompt into the U-Net's conditioning, which modules carry adaptors, and how the
adaptor files name them. diffusers keeps these differences in its pipelines and loaders; this module
keeps them for the trainer, the adaptor format and loader, and the audit:

============================  ==========================================  ===========================================
                              SD 1.x / 2.x (``"sd15"``)                    SDXL (``"sdxl"``)
============================  ==========================================  ===========================================
pipeline                      ``StableDiffusionPipeline``                  ``StableDiffusionXLPipeline`` (the refiner
                                                                           is not supported)
text encoders, tokenizers     ``text_encoder`` / ``tokenizer``             ``text_encoder`` (CLIP ViT-L/14) and
                                                                           ``text_encoder_2`` (OpenCLIP ViT-bigG/14
                                                                           with projection), each with its tokenizer
U-Net's ``encoder_hidden_``   the encoder's last hidden state              both encoders' penultimate hidden states,
``states``                                                                 concatenated (768 + 1280 = 2048)
U-Net's ``added_cond_kwargs``  none                                        ``text_embeds``: the second encoder's pooled,
                                                                           projected embedding; ``time_ids``: original
                                                                           size, crop corner, target size
empty negative prompt         encoded                                      zeros (``force_zeros_for_empty_prompt``)
native resolution             512 (SD 2.x: 768)                            1024
LoRA components and keys      ``text_encoder.``, ``unet.``                 ``text_encoder.``, ``text_encoder_2.``,
                                                                           ``unet.``
soft tokens file              ``{token: (n, 768)}``                        ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``
VAE under float16             float16                                      float32 (``force_upcast``: the SDXL VAE
                                                                           overflows in float16)
============================  ==========================================  ===========================================

The conditioning is built as the stock pipelines build it (``encode_prompt``, ``_get_add_time_ids``),
so the trainer's images from a prompt and a noise are the stock pipeline's images from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


__all__ = [
    "Conditioning",
    "ModelFamily",
    "SD1",
    "SDXL",
    "encode_prompt",
    "family_of",
    "load_pipeline",
    "load_soft_tokens",
    "lora_text_encoders",
    "soft_tokens_by_encoder",
    "unload_soft_tokens",
    "vae_dtype",
]


@dataclass(frozen=True)
class ModelFamily:
    """What a Stable Diffusion family's pipelines look like to the package.

    Attributes:
        name: ``"sd15"`` (SD 1.x / 2.x) or ``"sdxl"``.
        pipeline_class: the diffusers pipeline class of the family's text-to-image pipelines.
        text_encoders: the pipeline attributes of its text encoders, in the order the U-Net's
            conditioning concatenates them.
        tokenizers: the tokenizer of each text encoder, in the same order.
        textual_inversion_keys: the key of each text encoder's soft tokens in
            ``learned_embeds.safetensors``; ``None`` for one text encoder, whose file has one entry
            named by the token, as diffusers' ``load_textual_inversion`` reads it.
        default_resolution: the side in pixels of the images its base models draw.
    """

    name: str
    pipeline_class: str
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    textual_inversion_keys: tuple[str, ...] | None
    default_resolution: int

    @property
    def lora_components(self) -> tuple[str, ...]:
        """The pipeline attributes that may carry LoRA layers (the adaptor keys' prefixes)."""
        return (*self.text_encoders, "unet")

    def encoder_pairs(self, pipe) -> list[tuple]:
        """``[(tokenizer, text_encoder), ...]`` of ``pipe``, in the family's order."""
        return [(getattr(pipe, t), getattr(pipe, e)) for t, e in zip(self.tokenizers, self.text_encoders)]


SD1 = ModelFamily(
    name="sd15", pipeline_class="StableDiffusionPipeline", text_encoders=("text_encoder",), tokenizers=("tokenizer",),
    textual_inversion_keys=None, default_resolution=512,
)
SDXL = ModelFamily(
    name="sdxl", pipeline_class="StableDiffusionXLPipeline", text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"), textual_inversion_keys=("clip_l", "clip_g"), default_resolution=1024,
)
FAMILIES = {family.name: family for family in (SD1, SDXL)}

# The choices of FairTrainingConfig.sdxl_text_encoder_lora: which SDXL text encoders get the text-encoder LoRA.
SDXL_TEXT_ENCODER_CHOICES = {"both": ("text_encoder", "text_encoder_2"), "text_encoder": ("text_encoder",),
                             "text_encoder_2": ("text_encoder_2",)}


def family_of(pipe) -> ModelFamily:
    """The family of a pipeline (or of anything with its parts): SDXL when its U-Net takes ``text_time``
    added conditioning, else SD 1.x / 2.x.

    Raises:
        ValueError: an SDXL U-Net without both text encoders and tokenizers (the SDXL refiner, which
            has only the second encoder, is not supported).
    """
    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(unet.config, "addition_embed_type", None) != "text_time":
        return SD1
    missing = [part for part in (*SDXL.text_encoders, *SDXL.tokenizers) if getattr(pipe, part, None) is None]
    if missing:
        raise ValueError(f"this SDXL-type pipeline has no {', '.join(missing)}: fair adaptors need both of SDXL's text "
                         "encoders and tokenizers (the SDXL refiner is not supported; use the base model)")
    return SDXL


def family_of_sizes(text_hidden_size: int, cross_attention_dim: int) -> ModelFamily:
    """The family of the pipeline an adaptor's sizes describe (``fair_adaptor.json``): SDXL's U-Net reads both
    text encoders side by side, so its cross-attention is wider than the first encoder; SD 1.x / 2.x's
    is the encoder's width."""
    return SDXL if cross_attention_dim > text_hidden_size else SD1


def lora_text_encoders(family: ModelFamily, sdxl_choice: str = "both") -> tuple[str, ...]:
    """The text encoders that get the text-encoder LoRA: the one of SD 1.x; for SDXL ``sdxl_choice``
    (``"both"``, ``"text_encoder"`` or ``"text_encoder_2"``)."""
    if family is not SDXL:
        return family.text_encoders
    if sdxl_choice not in SDXL_TEXT_ENCODER_CHOICES:
        raise ValueError(f"sdxl_text_encoder_lora must be one of {sorted(SDXL_TEXT_ENCODER_CHOICES)}, "
                         f"got {sdxl_choice!r}")
    return SDXL_TEXT_ENCODER_CHOICES[sdxl_choice]


def vae_dtype(pipe, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype to keep the frozen VAE in: ``weight_dtype``, except float32 for a float16 run of a VAE
    whose config asks for it (``force_upcast``, the SDXL VAE, which overflows in float16)."""
    if weight_dtype == torch.float16 and pipe.vae.config.get("force_upcast", False) and family_of(pipe) is SDXL:
        return torch.float32
    return weight_dtype


# --------------------------------------------------------------------------- the U-Net's conditioning
@dataclass
class Conditioning:
    """What the U-Net is conditioned on for a batch: ``encoder_hidden_states`` and, for SDXL, ``added_cond_kwargs``.

    Attributes:
        prompt_embeds: ``(B, tokens, cross_attention_dim)``.
        added_cond_kwargs: ``None`` (SD 1.x), or ``{"text_embeds": (B, projection_dim), "time_ids": (B, 6)}`` (SDXL).
    """

    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def repeat(self, batch: int) -> Conditioning:
        """The same conditioning for ``batch`` images (from one prompt's)."""
        added = None
        if self.added_cond_kwargs is not None:
            added = {key: value.repeat(batch, 1) for key, value in self.added_cond_kwargs.items()}
        return Conditioning(self.prompt_embeds.repeat(batch, 1, 1), added)


def _tokens(tokenizer, text: str, length: int | None):
    return tokenizer([text], padding="max_length", max_length=length or tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")


def time_ids(pipe, height: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """SDXL's ``time_ids`` ``(1, 6)``: original size, crop top-left corner (0, 0), target size, as
    ``StableDiffusionXLPipeline._get_add_time_ids`` builds them for an uncropped ``height x width`` image.

    Raises:
        ValueError: the U-Net's added-embedding input does not match its config and the second text
            encoder's projection size.
    """
    values = [height, width, 0, 0, height, width]
    expected = pipe.unet.add_embedding.linear_1.in_features
    given = pipe.unet.config.addition_time_embed_dim * len(values) + pipe.text_encoder_2.config.projection_dim
    if expected != given:
        raise ValueError(f"the U-Net expects an added embedding of {expected} values, its config and text_encoder_2 "
                         f"give {given}: the pipeline's parts do not fit together")
    return torch.tensor([values], dtype=dtype, device=device)


def encode_prompt(pipe, text: str, *, height: int | None = None, width: int | None = None, length: int | None = None,
                  negative: bool = False, device=None) -> Conditioning:
    """The U-Net's conditioning for one text (batch 1), as the family's stock pipeline builds it.

    SD 1.x: the text encoder's last hidden state, the text padded to the tokenizer's maximum length
    without an attention mask (``length=None``), or to ``length`` tokens with the attention mask
    (natural padding). SDXL: each encoder's penultimate hidden state, concatenated, plus
    ``added_cond_kwargs`` (the second encoder's pooled embedding and the ``time_ids`` of a
    ``height x width`` image); with ``negative=True`` an empty text gives zeros where the pipeline's
    config says ``force_zeros_for_empty_prompt``, as ``StableDiffusionXLPipeline`` does for a
    negative prompt left out.

    Raises:
        ValueError: natural padding (``length``) on SDXL, which stock SDXL pipelines do not use; an
            SDXL text without ``height`` and ``width``.
    """
    family = family_of(pipe)
    device = device if device is not None else pipe.text_encoder.device
    if family is SD1:
        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        tokens = _tokens(tokenizer, text, length)
        if length is None:
            return Conditioning(encoder(tokens.input_ids.to(device))[0])
        return Conditioning(encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0])
    if length is not None:
        raise ValueError("prompt_padding='natural' is for SD 1.x pipelines; SDXL pipelines pad prompts to the "
                         "tokenizers' maximum length: use prompt_padding='max_length'")
    if height is None or width is None:
        raise ValueError("SDXL conditioning needs the image height and width (its time_ids)")
    states, pooled = [], None
    for tokenizer, encoder in family.encoder_pairs(pipe):
        output = encoder(_tokens(tokenizer, text, None).input_ids.to(device), output_hidden_states=True)
        if pooled is None and output[0].ndim == 2:  # the pooled, projected embedding (CLIPTextModelWithProjection)
            pooled = output[0]
        states.append(output.hidden_states[-2])
    embeds = torch.cat(states, dim=-1)
    if negative and text == "" and pipe.config.get("force_zeros_for_empty_prompt", False):
        embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    added = {"text_embeds": pooled, "time_ids": time_ids(pipe, height, width, embeds.dtype, embeds.device)}
    return Conditioning(embeds, added)


# --------------------------------------------------------------------------- soft tokens in adaptor files
def soft_tokens_by_encoder(family: ModelFamily, state: dict[str, torch.Tensor], token: str) -> dict[str, torch.Tensor]:
    """``{text encoder attribute: (n, hidden)}`` from a ``learned_embeds.safetensors`` state dict.

    SD 1.x: one entry named by ``token``; SDXL: ``clip_l`` (``text_encoder``) and ``clip_g``
    (``text_encoder_2``), the layout SDXL textual inversions share.

    Raises:
        ValueError: the entries are not the family's.
    """
    keys = (token,) if family.textual_inversion_keys is None else family.textual_inversion_keys
    if sorted(state) != sorted(keys):
        raise ValueError(f"soft tokens for {family.name} pipelines are stored under {list(keys)}, the file holds "
                         f"{sorted(state)}")
    out = {}
    for encoder, key in zip(family.text_encoders, keys):
        embeddings = state[key]
        out[encoder] = embeddings[None] if embeddings.dim() == 1 else embeddings
    return out


def load_soft_tokens(pipe, embeddings: dict[str, torch.Tensor], token: str) -> None:
    """Add soft tokens to each text encoder and tokenizer with diffusers' ``load_textual_inversion``.

    ``embeddings`` maps each text encoder attribute to its ``(n, hidden)`` vectors (see
    :func:`soft_tokens_by_encoder`); diffusers adds ``token``, ``token_1``, ... to each tokenizer. For
    SDXL this is the two calls diffusers documents for SDXL textual inversions. If a call raises,
    the tokens already added are removed before the error goes on.
    """
    family = family_of(pipe)
    loaded = []
    try:
        for tokenizer_name, encoder_name in zip(family.tokenizers, family.text_encoders):
            tokenizer, encoder = getattr(pipe, tokenizer_name), getattr(pipe, encoder_name)
            pipe.load_textual_inversion(embeddings[encoder_name], token=token, tokenizer=tokenizer, text_encoder=encoder)
            loaded.append((tokenizer, encoder))
    except BaseException:
        names = [token] + [f"{token}_{i}" for i in range(1, next(iter(embeddings.values())).shape[0])]
        for tokenizer, encoder in loaded:
            _unload(pipe, names, tokenizer, encoder)
        raise


def unload_soft_tokens(pipe, token_names) -> None:
    """Remove the tokens ``token_names`` from every tokenizer and text encoder of ``pipe`` that has them."""
    for tokenizer, encoder in family_of(pipe).encoder_pairs(pipe):
        present = [name for name in token_names if name in tokenizer.get_vocab()]
        if present:
            _unload(pipe, present, tokenizer, encoder)


def _unload(pipe, names, tokenizer, encoder) -> None:
    pipe.unload_textual_inversion(tokens=list(names), tokenizer=tokenizer, text_encoder=encoder)
    # diffusers shrinks the embedding matrix but leaves the config's vocab_size behind.
    encoder.config.vocab_size = encoder.get_input_embeddings().weight.shape[0]


# --------------------------------------------------------------------------- loading a base model
def load_pipeline(name_or_path: str, **kwargs):
    """Load a text-to-image base model as its family's stock pipeline.

    The family is read from the model's ``model_index.json`` (``StableDiffusionXLPipeline``: SDXL;
    anything else is loaded as a ``StableDiffusionPipeline``). ``kwargs`` go to ``from_pretrained``;
    the SD 1.x safety-checker arguments (``safety_checker``, ``requires_safety_checker``) are dropped
    for SDXL, which has no safety checker.
    """
    import diffusers

    class_name = diffusers.DiffusionPipeline.load_config(name_or_path).get("_class_name")
    family = SDXL if class_name == SDXL.pipeline_class else SD1
    if family is SDXL:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("safety_checker", "requires_safety_checker")}
    return getattr(diffusers, family.pipeline_class).from_pretrained(name_or_path, **kwargs)
