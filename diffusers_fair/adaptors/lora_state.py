"""LoRA weights for a fair adaptor: a peft-wrapped module or state dict to diffusers' layout and a summary,
and the checks of weight files read back (:func:`check_lora_file`, :func:`check_soft_token_file`).

Used by :func:`diffusers_fair.adaptors.format.save_fair_adaptor` and
:class:`~diffusers_fair.adaptors.format.FairAdaptor`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

import torch


def lora_state_and_config(lora, config, component: str) -> tuple[dict, dict]:
    """Normalise a LoRA given as a peft-wrapped module or as a state dict + config.

    Returns ``(state_dict, config_dict)``: keys are module paths ending in ``lora_A.weight`` /
    ``lora_B.weight`` without any component prefix (text-encoder keys start with
    ``text_model.``), tensors are detached CPU copies, and the config is ``LoraConfig.to_dict()``.
    """
    from peft import LoraConfig, get_peft_model_state_dict

    if isinstance(lora, torch.nn.Module):
        if config is not None:
            raise ValueError(f"{component}_lora_config is read from the module; pass it only with a state dict")
        peft_config = getattr(lora, "peft_config", None)
        if not peft_config:
            raise ValueError(f"the {component} module has no peft LoRA adapter")
        if len(peft_config) != 1:
            raise ValueError(
                f"the {component} module has several adapters {sorted(peft_config)}; pass the state dict "
                f"of one (peft.get_peft_model_state_dict) and its LoraConfig"
            )
        adapter, config = next(iter(peft_config.items()))
        state = get_peft_model_state_dict(lora, adapter_name=adapter)
    elif isinstance(lora, Mapping):
        if config is None:
            raise ValueError(f"a {component} LoRA state dict needs its LoraConfig ({component}_lora_config=)")
        state = dict(lora)
    else:
        raise ValueError(f"{component}_lora must be a peft-wrapped module or a state dict, got {type(lora).__name__}")

    if isinstance(config, Mapping):
        try:
            config = LoraConfig(**config)
        except TypeError as error:
            raise ValueError(f"{component} LoRA config is not a valid LoraConfig: {error}") from None
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{component} LoRA config must be a peft LoraConfig, got {type(config).__name__}")
    if getattr(config, "use_dora", False):
        raise ValueError(f"{component}: DoRA adapters are not supported")
    if not state:
        raise ValueError(f"the {component} LoRA state dict is empty")

    clean = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{component} LoRA entry {key!r} is not a tensor")
        for prefix in ("base_model.model.", f"{component}."):
            key = key.removeprefix(prefix)
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(
                f"{component} LoRA key {key!r} is not a peft LoRA weight (expected '<module>.lora_A.weight' or "
                f"'<module>.lora_B.weight'; use peft.get_peft_model_state_dict, not model.state_dict())"
            )
        if component in ("text_encoder", "text_encoder_2") and not key.startswith("text_model."):
            key = "text_model." + key
        clean[key] = tensor.detach().to("cpu").contiguous().clone()

    modules = sorted({key.rsplit(".", 2)[0] for key in clean})
    for module in modules:
        a, b = clean.get(f"{module}.lora_A.weight"), clean.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"{component} LoRA layer {module!r} lacks its lora_A or lora_B weight")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{component} LoRA layer {module!r} has inconsistent shapes {tuple(a.shape)}, {tuple(b.shape)}")
        if not config.rank_pattern and a.shape[0] != config.r:
            raise ValueError(f"{component} LoRA layer {module!r} has rank {a.shape[0]}, its config says r={config.r}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"{component} LoRA layer {module!r} has NaN or infinite weights")
    return clean, config.to_dict()


def lora_summary(state: dict, config: dict) -> dict:
    modules = sorted({key.rsplit(".", 2)[0] for key in state})
    targets = config.get("target_modules")
    targets = sorted(targets) if isinstance(targets, (list, set, tuple)) else targets
    return {
        "rank": int(config["r"]),
        "alpha": float(config["lora_alpha"]),
        "target_modules": targets,
        "num_layers": len(modules),
    }


def check_lora_shapes(component: str, state: dict, expected: int, what: str) -> None:
    """Text-encoder q/k/v inputs have the hidden size; U-Net cross-attention k/v inputs the context size."""
    if component == "text_encoder":
        pattern = re.compile(r"self_attn\.(q|k|v)_proj\.lora_A\.weight$")
    else:
        pattern = re.compile(r"attn2\.to_(k|v)\.lora_A\.weight$")
    for key, tensor in state.items():
        if pattern.search(key) and tensor.shape[1] != expected:
            raise ValueError(f"{component} LoRA {key!r} takes inputs of size {tensor.shape[1]}, metadata says {what}={expected}")


# --------------------------------------------------------------------------- reading: what no saver would write
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_RANK_PATTERNS = 10_000
MAX_PATTERN_LENGTH = 500


def _check_weight(tensor: torch.Tensor, name: str, what: str, dims: tuple[int, ...]) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what}: {name!r} is {str(tensor.dtype).removeprefix('torch.')}, not a floating-point "
                         f"tensor (float16, bfloat16, float32 or float64); it is refused, not converted")
    if tensor.dim() not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{what}: {name!r} has shape {tuple(tensor.shape)}; {expected} expected")
    if tensor.numel() == 0:
        raise ValueError(f"{what}: {name!r} has shape {tuple(tensor.shape)}; at least one value in each dimension "
                         f"expected")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what}: {name!r} holds NaN or infinite values")


def check_soft_token_file(state: dict, what: str) -> None:
    """Raise ``ValueError`` unless every entry of a soft-token file is a finite floating-point tensor of
    one vector (1-D) or ``(n_tokens, hidden)`` vectors (2-D), with at least one vector."""
    if not state:
        raise ValueError(f"{what} holds no soft tokens")
    for name, tensor in state.items():
        _check_weight(tensor, name, what, dims=(1, 2))


def check_lora_file(state: dict, header: dict, summaries: dict, what: str) -> None:
    """Raise ``ValueError`` unless a LoRA file holds what ``save_fair_adaptor`` writes.

    Every key is ``<component>.<module>.lora_A.weight`` or ``...lora_B.weight``; every tensor is a
    finite floating-point 2-D tensor; every layer has both halves, of one rank; the ranks agree with
    the ``LoraConfig`` of each component in the file's header (``r``, ``rank_pattern``), which
    diffusers builds the layers from, and with the metadata's summary ``summaries`` (``fair_adaptor.json``'s
    ``lora``: the components, their rank and number of layers).

    Args:
        state: the file's tensors.
        header: the ``__metadata__`` strings of the file's header.
        summaries: ``FairAdaptorMetadata.lora``.
        what: the file, for messages.
    """
    if not state:
        raise ValueError(f"{what} holds no LoRA weights")
    layers: dict[str, dict[str, dict]] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        if not rest.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{what}: {key[:200]!r} is not a LoRA weight (expected "
                             f"'<component>.<module>.lora_A.weight' or '<component>.<module>.lora_B.weight')")
        _check_weight(tensor, key, what, dims=(2,))
        module, half, _ = rest.rsplit(".", 2)
        layers.setdefault(component, {}).setdefault(module, {})[half] = tensor
    configs = _header_configs(header, what)
    if sorted(layers) != sorted(summaries):
        raise ValueError(f"{what} holds LoRA weights for {sorted(layers)}, fair_adaptor.json's lora lists "
                         f"{sorted(summaries)}")
    for component, modules in layers.items():
        ranks = {}
        for module, halves in modules.items():
            for half in ("lora_A", "lora_B"):
                if half not in halves:
                    raise ValueError(f"{what}: {component} LoRA layer {module!r} lacks its {half} weight")
            a, b = halves["lora_A"], halves["lora_B"]
            if a.shape[0] != b.shape[1]:
                raise ValueError(f"{what}: {component} LoRA layer {module!r} has a lora_A of rank {a.shape[0]} and a "
                                 f"lora_B of rank {b.shape[1]}")
            ranks[module] = a.shape[0]
        _check_ranks(component, ranks, configs.get(component), summaries[component], what)


def _header_configs(header: dict, what: str) -> dict[str, dict]:
    """Per component, the ``LoraConfig`` fields diffusers stores in the header (``lora_adapter_metadata``)."""
    text = header.get("lora_adapter_metadata")
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError(f"{what}: the header's lora_adapter_metadata is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: the header's lora_adapter_metadata must be a JSON object")
    configs: dict[str, dict] = {}
    for key, value in data.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _check_ranks(component: str, ranks: dict[str, int], config: dict | None, summary: dict, what: str) -> None:
    from peft.utils.other import get_pattern_key

    expected = dict.fromkeys(ranks)
    if config is not None:
        r, pattern = config.get("r"), config.get("rank_pattern", {})
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{what}: the header's {component}.r must be a positive integer, got {str(r)[:50]}")
        if config.get("use_dora"):
            raise ValueError(f"{what}: {component}: DoRA adapters are not supported")
        _check_patterns(component, "rank_pattern", pattern, what, integers=True)
        _check_patterns(component, "alpha_pattern", config.get("alpha_pattern", {}), what, integers=False)
        alpha = config.get("lora_alpha")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"{what}: the header's {component}.lora_alpha must be a finite number, got "
                             f"{str(alpha)[:50]}")
        for module in ranks:
            key = get_pattern_key(list(pattern), module)
            expected[module] = pattern[key] if key in pattern else r
        if summary["rank"] != r:
            raise ValueError(f"{what}: fair_adaptor.json says {component} LoRA rank {summary['rank']}, the file's "
                             f"header r={r}")
    elif len(set(ranks.values())) == 1 and summary["rank"] not in ranks.values():
        raise ValueError(f"{what}: fair_adaptor.json says {component} LoRA rank {summary['rank']}, the layers have "
                         f"rank {next(iter(ranks.values()))}")
    for module, rank in ranks.items():
        if expected[module] is not None and rank != expected[module]:
            raise ValueError(f"{what}: {component} LoRA layer {module!r} has rank {rank}, the file's header says "
                             f"r={expected[module]}")
    if summary["num_layers"] != len(ranks):
        raise ValueError(f"{what}: fair_adaptor.json says {summary['num_layers']} {component} LoRA layers, the file "
                         f"holds {len(ranks)}")


def _check_patterns(component: str, field: str, pattern, what: str, *, integers: bool) -> None:
    """``rank_pattern`` / ``alpha_pattern``: a bounded dict of regular expressions to positive ranks / finite
    alphas."""
    if not isinstance(pattern, dict) or len(pattern) > MAX_RANK_PATTERNS:
        raise ValueError(f"{what}: the header's {component}.{field} must be a dict of module patterns")
    for key, value in pattern.items():
        if len(key) > MAX_PATTERN_LENGTH:
            raise ValueError(f"{what}: the header's {component}.{field} has a pattern of {len(key)} characters")
        try:
            re.compile(key)
        except re.error:
            raise ValueError(f"{what}: the header's {component}.{field} has an invalid pattern {key[:50]!r}") from None
        good = (isinstance(value, int) and value >= 1) if integers else isinstance(value, (int, float))
        if isinstance(value, bool) or not good or (not integers and not math.isfinite(value)):
            raise ValueError(f"{what}: the header's {component}.{field}[{key[:50]!r}] is {str(value)[:50]}")
