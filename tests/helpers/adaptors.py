"""Tiny random-weight pipelines of the toy architecture and random fair adaptors for them."""

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig

from diffusers_fair.adaptors.format import save_fair_adaptor
from diffusers_fair.adaptors.metadata import TOY_BASE_MODEL, FairAdaptorMetadata
from diffusers_fair.adaptors.pipeline import fair_adaptors
from diffusers_fair.method.targets import TargetDistribution
from diffusers_fair.toy.architecture import (
    make_sampler,
    make_text_encoder,
    make_unet,
    make_vae,
)
from diffusers_fair.toy.tokenizer import build_tokenizer


WORDS = ["a", "photo", "of", "the", "face", "doctor", "nurse", "person", "smiling"]
PROMPT = "a photo of the face of a doctor"
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 4


def tiny_pipeline(seed: int = 0, cls=StableDiffusionPipeline):
    """The toy architecture with random weights drawn from ``seed`` (same seed, same weights)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(WORDS)
    pipe = cls(
        vae=make_vae(),
        text_encoder=make_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=make_unet(),
        scheduler=make_sampler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt=PROMPT, seed: int = 1, **kwargs) -> np.ndarray:
    """Three DPM-Solver steps at 32x32 from a fixed seed, as a float array."""
    kwargs.setdefault("num_inference_steps", 3)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def text_states(pipe, prompt=PROMPT) -> torch.Tensor:
    """The text encoder's last hidden states for ``prompt`` (what the U-Net is conditioned on)."""
    ids = pipe.tokenizer(
        pipe.maybe_convert_prompt(prompt, pipe.tokenizer),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def random_lora(model: torch.nn.Module, targets, seed: int, rank: int = RANK, scale: float = 0.2):
    """A peft LoRA state dict (nonzero A and B) for every linear layer of ``model`` named by ``targets``."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in targets):
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * scale
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * scale
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets))
    return state, config


class LoraHooks:
    """Adds ``weight * B @ A @ x`` to each adapted layer's output by forward hooks (the reference)."""

    def __init__(self, model, *weighted_states):
        self.handles = []
        for weight, state in weighted_states:
            for key in [k for k in state if k.endswith(".lora_A.weight")]:
                module = model.get_submodule(key.removesuffix(".lora_A.weight"))
                a, b = state[key], state[key.replace("lora_A", "lora_B")]
                self.handles.append(module.register_forward_hook(self._hook(a, b, weight)))

    @staticmethod
    def _hook(a, b, weight):
        return lambda module, inputs, output: output + weight * (inputs[0] @ a.T @ b.T)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def make_metadata(name: str = "test-gender", **kwargs) -> FairAdaptorMetadata:
    fields = {
        "name": name,
        "base_model": TOY_BASE_MODEL,
        "text_hidden_size": 64,
        "cross_attention_dim": 64,
        "description": "A test adaptor.",
        "targets": [TargetDistribution.uniform("gender", ["male", "female"])],
        "training": {"steps": 10, "lr": 5e-5},
        "metrics_before": {"bias_gender": 0.6},
        "metrics_after": {"bias_gender": 0.125},
        "eval_prompts": "toy held-out occupations",
    }
    fields.update(kwargs)
    return FairAdaptorMetadata(**fields)


def save_random_adaptor(folder, pipe, *, seed=0, text_encoder=True, unet=False, soft_tokens=0, soft_token="<fair>", name="test-gender", **meta):
    """Save an adaptor with random weights shaped for ``pipe``; returns (metadata, te_state, unet_state, tokens)."""
    te_state = unet_state = tokens = None
    kwargs = {}
    if text_encoder:
        te_state, config = random_lora(pipe.text_encoder, TE_TARGETS, seed)
        kwargs.update(text_encoder_lora=te_state, text_encoder_lora_config=config)
    if unet:
        unet_state, config = random_lora(pipe.unet, UNET_TARGETS, seed + 1000)
        kwargs.update(unet_lora=unet_state, unet_lora_config=config)
    if soft_tokens:
        tokens = torch.randn(soft_tokens, 64, generator=torch.Generator().manual_seed(seed + 2000))
        kwargs.update(soft_tokens=tokens, soft_token=soft_token)
    metadata = save_fair_adaptor(folder, metadata=make_metadata(name, **meta), **kwargs)
    return metadata, te_state, unet_state, tokens


def pipeline_state(pipe):
    """What must not change when a load fails: images, text states, adapters, vocabulary."""
    return {
        "image": generate(pipe),
        "text": text_states(pipe),
        "adapters": pipe.get_list_adapters(),
        "vocab": len(pipe.tokenizer),
        "vocab_size": pipe.text_encoder.config.vocab_size,
        "fair": list(fair_adaptors(pipe)),
    }


def assert_same(before, after):
    assert np.array_equal(before["image"], after["image"])
    assert torch.equal(before["text"], after["text"])
    for key in ("adapters", "vocab", "vocab_size", "fair"):
        assert before[key] == after[key], key
