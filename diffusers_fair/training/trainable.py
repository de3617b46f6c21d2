"""The weights a fair finetuning run trains, and how they are added to a pipeline.

The base model stays frozen; what is trained is small and ships as an adaptor. Three kinds of
trainable weights can be combined (``FairTrainingConfig`` chooses):

* **Text-encoder LoRA** (``train_text_encoder_lora``, the paper's main setting): low-rank updates
  ``W + (alpha / r) * B @ A`` on the text encoder's attention projections and MLP layers. The
  prompt's embedding changes, so the U-Net draws a different distribution of people.
* **U-Net LoRA** (``train_unet_lora``): the same low-rank updates on the U-Net's attention
  projections.
* **Soft-token prefix** (``num_soft_tokens > 0``): learnable token embeddings ``<fair>``,
  ``<fair>_1``, ... (the names diffusers gives a multi-vector textual-inversion token) put in
  front of every training prompt. Only these vectors are trained; the embedding table is frozen
  and a forward hook substitutes the vectors wherever their token ids appear.

LoRA layers are added with peft (``module.add_adapter``), so the frozen model is the same module
with its adapters disabled (:func:`disabled_adapters`); the soft tokens are simply left out of the
prompt. Every trainable weight is kept in float32 (also under mixed precision) and initialised
from a CPU generator seeded by the config: LoRA ``A`` matrices kaiming-uniform as peft's default,
``B`` matrices zero (so training starts at the base model), soft tokens at the embedding of
``soft_token_init``. The same seed gives the same initial weights on any device.

On an SDXL pipeline (``components/families.py``) the soft tokens go into both tokenizers and text
encoders (one vector set each), and the text-encoder LoRA into the encoders
``sdxl_text_encoder_lora`` names.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..components.families import family_of, lora_text_encoders
from .config import FairTrainingConfig
from .draws import derive_seed


@dataclass
class TrainableWeights:
    """What :func:`add_trainable_weights` added to a pipeline.

    Attributes:
        params: the trained parameters by name, in a fixed order: ``"soft_tokens"`` (shape
            ``(num_soft_tokens, hidden)``) first if any (SDXL: then ``"soft_tokens_2"``, the second
            text encoder's), then ``"text_encoder.<peft name>"`` (SDXL: then
            ``"text_encoder_2.<peft name>"``), then ``"unet.<peft name>"``. All float32,
            ``requires_grad=True``.
        lora_configs: the peft ``LoraConfig`` of each part that got a LoRA (``"text_encoder"``,
            ``"text_encoder_2"``, ``"unet"``).
        soft_token_ids: the token ids of the soft tokens (empty without soft tokens).
    """

    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    lora_configs: dict = field(default_factory=dict)
    soft_token_ids: torch.Tensor | None = None


def soft_token_names(config: FairTrainingConfig, tokenizer, prompts) -> list[str]:
    """The soft-token names ``<fair>, <fair>_1, ...`` of ``config`` (empty without soft tokens).

    ``tokenizer`` is the pipeline's tokenizer, or a list of them (SDXL's two), each checked.
    Raises ``ValueError`` early if a name is already in a tokenizer, if ``soft_token_init`` is not
    a single token, or if a prompt with the soft tokens prepended is too long for a tokenizer.
    """
    stem = config.soft_token_prefix
    names = [stem] + [f"{stem}_{i}" for i in range(1, config.num_soft_tokens)] if config.num_soft_tokens else []
    for tokenizer in tokenizer if isinstance(tokenizer, (list, tuple)) else [tokenizer]:
        clashes = [n for n in names if n in tokenizer.get_vocab()]
        if clashes:
            raise ValueError(f"soft token names {clashes} are already in the tokenizer; "
                             "choose another soft_token_prefix")
        if names and len(tokenizer(config.soft_token_init, add_special_tokens=False).input_ids) != 1:
            raise ValueError(f"soft_token_init {config.soft_token_init!r} must be a single token of the tokenizer")
        for prompt in prompts:
            length = len(tokenizer(prompt).input_ids) + len(names)
            if length > tokenizer.model_max_length:
                raise ValueError(f"prompt {prompt!r} (with soft tokens) is {length} tokens long; "
                                 f"the tokenizer takes {tokenizer.model_max_length}")
    return names


def soft_token_prefix(names: list[str]) -> str:
    """The text put in front of a prompt so that it uses the soft tokens (``""`` without them)."""
    return "".join(name + " " for name in names)


class SoftTokenSubstitution:
    """Forward hook of the text encoder's input embedding: rows of ``token_ids`` get ``vectors``.

    ``vectors`` is the trained parameter ``(n, hidden)``; row ``i`` replaces the embedding of
    ``token_ids[i]``. The output is untouched where no soft token appears, so the gradient reaches
    ``vectors`` only through the prompts that use them.
    """

    def __init__(self, token_ids: torch.Tensor, vectors: torch.nn.Parameter):
        self.token_ids, self.vectors = token_ids, vectors

    def __call__(self, module, args, output):
        ids = args[0]
        match = ids.unsqueeze(-1) == self.token_ids  # (B, T, n)
        if not bool(match.any()):
            return output
        vectors = match.to(output.dtype) @ self.vectors.to(output.dtype)
        return torch.where(match.any(dim=-1, keepdim=True), vectors, output)


def add_soft_tokens(pipeline, names: list[str], init_word: str, device, *, tokenizer=None,
                    encoder=None) -> tuple[torch.nn.Parameter, torch.Tensor]:
    """Add the tokens ``names`` to a tokenizer and its text encoder; return ``(vectors, ids)``.

    The pair is ``tokenizer`` and ``encoder`` (SDXL's second one), by default the pipeline's
    ``tokenizer`` and ``text_encoder``. ``vectors`` (float32, ``(len(names), hidden)``) starts at the
    embedding of ``init_word`` and is substituted by a :class:`SoftTokenSubstitution` hook; the
    embedding table itself stays frozen.
    """
    tokenizer = tokenizer if tokenizer is not None else pipeline.tokenizer
    encoder = encoder if encoder is not None else pipeline.text_encoder
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    tokenizer.add_tokens(names)
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    encoder.get_input_embeddings().requires_grad_(False)
    token_ids = torch.tensor(tokenizer.convert_tokens_to_ids(names), device=device)
    embedding = encoder.get_input_embeddings()
    with torch.no_grad():
        init = embedding.weight[init_ids[0]].detach().clone()
        embedding.weight[token_ids] = init.to(embedding.weight.dtype)
    vectors = torch.nn.Parameter(init.float().repeat(len(names), 1))
    embedding.register_forward_hook(SoftTokenSubstitution(token_ids, vectors))
    return vectors, token_ids


def add_lora(module: torch.nn.Module, part: str, rank: int, alpha: float | None, target_modules,
             generator: torch.Generator):
    """Add a peft LoRA to ``module`` (``part`` names it in errors); return ``(lora_config, {name: param})``.

    ``A`` is drawn kaiming-uniform (peft's default) from ``generator``, ``B`` is zero; both float32.
    """
    from peft import LoraConfig

    lora_config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(target_modules))
    module.add_adapter(lora_config)
    found = [(n, p) for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    if not found:
        field = "unet_lora_modules" if part == "unet" else "text_encoder_lora_modules"  # SDXL: both encoders'
        raise ValueError(f"no {part} layer matched {field} {list(target_modules)}")
    params = {}
    for name, param in found:
        param.data = param.data.float()
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(param.shape[1])
            param.data.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
        else:
            param.data.zero_()
        param.requires_grad_(True)
        params[name] = param
    return lora_config, params


def add_trainable_weights(pipeline, config: FairTrainingConfig, names: list[str], device) -> TrainableWeights:
    """Add the soft tokens ``names``, the text-encoder LoRA and the U-Net LoRA that ``config`` asks for.

    The pipeline is modified in place. LoRA weights are drawn from one CPU generator seeded by
    ``derive_seed(config.seed, "init")``, text encoder first: the same values on any device.
    """
    weights = TrainableWeights()
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "init"))
    family = family_of(pipeline)
    if config.num_soft_tokens:
        weights.params["soft_tokens"], weights.soft_token_ids = add_soft_tokens(
            pipeline, names, config.soft_token_init, device)
        for index, (tokenizer, encoder) in enumerate(family.encoder_pairs(pipeline)[1:], start=2):
            weights.params[f"soft_tokens_{index}"], _ = add_soft_tokens(
                pipeline, names, config.soft_token_init, device, tokenizer=tokenizer, encoder=encoder)
    text_encoders = lora_text_encoders(family, config.sdxl_text_encoder_lora)
    for part, enabled, rank, alpha, modules in (
        *((part, config.train_text_encoder_lora, config.text_encoder_lora_rank, config.text_encoder_lora_alpha,
           config.text_encoder_lora_modules) for part in text_encoders),
        ("unet", config.train_unet_lora, config.unet_lora_rank, config.unet_lora_alpha, config.unet_lora_modules),
    ):
        if not enabled:
            continue
        lora_config, params = add_lora(getattr(pipeline, part), part, rank, alpha, modules, generator)
        weights.lora_configs[part] = lora_config
        weights.params.update({f"{part}.{name}": param for name, param in params.items()})
    return weights


@contextmanager
def disabled_adapters(modules):
    """Disable the LoRA adapters of ``modules`` inside the block: the original (frozen) model."""
    modules = list(modules)
    for module in modules:
        module.disable_adapters()
    try:
        yield
    finally:
        for module in modules:
            module.enable_adapters()


@contextmanager
def swapped_weights(params: dict[str, torch.Tensor], values: dict[str, torch.Tensor]):
    """Copy ``values`` (e.g. the EMA) into ``params`` inside the block; restore the live weights after."""
    saved = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
