"""LoRA weights for a fair adaptor: a peft-wrapped module or state dict to diffusers' layout and a summary.

Used by :func:`diffusers_fair.adaptors.format.save_fair_adaptor`.
"""

from __future__ import annotations

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
        if component == "text_encoder" and not key.startswith("text_model."):
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
