"""One training iteration at Stable Diffusion XL's full model size on the CPU, at a reduced resolution: our
two-pass scheme against the authors' three-pass one-graph scheme, as ``bench_sd15_cpu.py`` measures for SD 1.5.

The models are built from SDXL base 1.0's configurations with random weights (a random-weight network does
the same arithmetic as the trained one, so it takes the same time and memory): the U-Net (2.6 B parameters,
cross-attention 2048, SDXL's pooled-text and time-id conditioning), the CLIP ViT-L/14 and OpenCLIP
ViT-bigG/14 text encoders, each with the paper's LoRA (rank 50 on q/k/v/out_proj and fc1/fc2), and the
VAE. The prompt's conditioning is built as ``components.families.encode_prompt`` builds it (both encoders'
penultimate hidden states side by side, the second encoder's pooled embedding, the time ids), and
``method.dft.adjusted_backward`` hands the pooled embeddings and time ids to every U-Net call. One
iteration samples ``--batch`` images at ``--size`` pixels with ``--steps`` DPM-Solver++ steps and
classifier-free guidance ``--guidance`` (the U-Net sees twice the batch), decodes them with gradient and
backpropagates a loss on the pixels into both encoders' LoRA weights; the schemes are those of
``bench_sd15_cpu.py``.

Precision: the frozen U-Net and text encoders in bfloat16 with float32 LoRA weights (``mixed_precision
="bf16"``; float32 weights alone would take 14 GB), the VAE in float32. Each figure comes from a forked
child process that first runs the same iteration with one sampling step (warm-up), then the measured
iteration: one child times it; another, whose glibc allocator returns freed memory at once, reports its
peak resident memory growth.

    python benchmarks/bench_sdxl_cpu.py --size 256 --batch 1 --steps 4 --threads 2
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_dft import iteration_in_child
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusers_fair.method.dft import adjusted_backward, sample_latents


SCHEMES = ("authors", "ours")
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
SCALING_FACTOR = 0.13025  # SDXL's VAE


def build(args):
    """SDXL base 1.0's U-Net, two text encoders (with LoRA) and VAE with random weights, and the scheduler."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # the frozen weights are made in bfloat16 (no float32 copy)
    try:
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        ))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
        ))
    finally:
        torch.set_default_dtype(torch.float32)
    for model in (unet, text_encoder, text_encoder_2):
        model.requires_grad_(False)
    for encoder in (text_encoder, text_encoder_2):
        encoder.add_adapter(LoraConfig(r=50, lora_alpha=50, init_lora_weights="gaussian",
                                       target_modules=TEXT_LORA_TARGETS))
        for name, param in encoder.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()  # trained weights in float32, as the trainer keeps them
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
        scaling_factor=SCALING_FACTOR, force_upcast=True,
    ).requires_grad_(False)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, timestep_spacing="leading", algorithm_type="dpmsolver++",
                                            solver_order=2)
    latent = args.size // 8
    latents = torch.randn(args.batch, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(2))
    empty = torch.full((1, 77), 49407)
    return dict(unet=unet, encoders=(text_encoder, text_encoder_2), vae=vae, scheduler=scheduler,
                latents=latents.to(torch.bfloat16), ids=ids, empty=empty)


def encode(models, ids, size: int):
    """SDXL's conditioning of one prompt, repeated for the batch: ``(prompt_embeds, added_cond_kwargs)``."""
    batch = models["latents"].shape[0]
    states, pooled = [], None
    for encoder in models["encoders"]:
        output = encoder(ids, output_hidden_states=True)
        if output[0].ndim == 2:
            pooled = output[0]
        states.append(output.hidden_states[-2])
    embeds = torch.cat(states, dim=-1).repeat(batch, 1, 1)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype).repeat(batch, 1)
    return embeds, {"text_embeds": pooled.repeat(batch, 1), "time_ids": time_ids}


def iteration(models, scheme: str, steps: int, args) -> None:
    """One iteration's sampling and gradient work (the optimizer step is the same in both schemes)."""
    unet, vae, scheduler = models["unet"], models["vae"], models["scheduler"]
    latents = models["latents"]
    for encoder in models["encoders"]:
        encoder.zero_grad(set_to_none=True)

    def decode(z0):
        return (vae.decode(z0.float() / SCALING_FACTOR).sample / 2 + 0.5).clamp(0, 1)

    def conditioning(finetuned: bool, ids):
        for encoder in models["encoders"]:
            encoder.enable_adapters() if finetuned else encoder.disable_adapters()
        return encode(models, ids, args.size)

    with torch.no_grad():
        uncond, uncond_added = conditioning(True, models["empty"])
        frozen, frozen_added = conditioning(False, models["ids"])
    for encoder in models["encoders"]:
        encoder.enable_adapters()
    negative = dict(negative_prompt_embeds=uncond, negative_added_cond_kwargs=uncond_added)
    kwargs = dict(num_inference_steps=steps, guidance_scale=args.guidance, **negative)
    if scheme == "authors":
        with torch.no_grad():
            cond, added = conditioning(True, models["ids"])
            sample_latents(unet, scheduler, latents, cond, added_cond_kwargs=added, **kwargs)  # for the targets
    with torch.no_grad():
        reference = decode(sample_latents(unet, scheduler, latents, frozen, added_cond_kwargs=frozen_added, **kwargs))

    def loss_fn(z0):
        return ((decode(z0) - reference) ** 2).mean()

    cond, added = conditioning(True, models["ids"])  # with gradient into both encoders' LoRA weights
    if scheme == "authors":
        unet.enable_gradient_checkpointing()
        adjusted_backward(unet, scheduler, latents, cond, loss_fn, mode="one_graph", added_cond_kwargs=added, **kwargs)
        unet.disable_gradient_checkpointing()
    else:
        adjusted_backward(unet, scheduler, latents, cond, loss_fn, mode="two_pass", added_cond_kwargs=added, **kwargs)
    for encoder in models["encoders"]:
        # The first encoder's last layer gets none: SDXL reads its penultimate hidden states.
        grads = [p.grad for p in encoder.parameters() if p.requires_grad and p.grad is not None]
        if not grads or any(not torch.isfinite(g).all() for g in grads):
            raise RuntimeError(f"{scheme}: the LoRA weights of a text encoder got no finite gradient")


def measure(scheme: str, args, memory: bool = False) -> float:
    """One iteration's wall seconds, or (``memory=True``) its peak resident memory growth in MiB, each in
    a child process of its own (``bench_dft.iteration_in_child``)."""
    def iterate(models, steps):
        iteration(models, scheme, steps, args)

    return iteration_in_child(lambda: build(args), iterate, args.steps, args.threads, memory=memory)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents: size / 8)")
    parser.add_argument("--batch", type=int, default=1, help="images per iteration")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated: authors, ours")
    parser.add_argument("--no-memory", action="store_true", help="time only (one child per scheme, not two)")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    schemes = [s for s in args.schemes.split(",") if s]
    if not schemes or any(s not in SCHEMES for s in schemes):
        parser.error(f"--schemes must name some of {SCHEMES}")
    # Every model is built and run in forked children only: a process that forks after torch's thread
    # pool has started can deadlock in the child.
    print(f"SDXL architecture, random weights: U-Net, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with LoRA r=50, VAE; "
          f"{args.batch} images at {args.size}x{args.size}, {args.steps} DPM-Solver++ steps, guidance "
          f"{args.guidance}, bfloat16 frozen weights, {args.threads} threads", flush=True)
    results = {}
    for scheme in schemes:
        results[scheme] = {"seconds": measure(scheme, args)}
        print(f"{scheme:>8}: {results[scheme]['seconds']:7.1f} s per iteration", flush=True)
        if not args.no_memory:
            results[scheme]["peak_mb"] = measure(scheme, args, memory=True)
            print(f"{scheme:>8}: peak memory growth {results[scheme]['peak_mb']:8.0f} MiB", flush=True)
    record = {"settings": vars(args), "results": results}
    if len(results) == 2:
        ratio = {key: results["ours"][key] / results["authors"][key] for key in results["ours"]}
        print("ours / authors: " + ", ".join(f"{key} {value:.2f}" for key, value in ratio.items()))
        record["ours_over_authors"] = ratio
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    return record


if __name__ == "__main__":
    main()
