"""One training iteration at Stable Diffusion 1.5's full size on the CPU: our two-pass scheme against the
authors' three-pass one-graph scheme.

The models are built from SD 1.5's configurations with random weights (a random-weight network does the
same arithmetic as the trained one, so it takes the same time and memory): the U-Net (860 M
parameters, cross-attention 768), the CLIP ViT-L/14 text encoder with the paper's LoRA (rank 50 on
q/k/v/out_proj and fc1/fc2), and the VAE. One iteration samples ``--batch`` images at ``--size`` pixels
with ``--steps`` DPM-Solver++ steps and classifier-free guidance ``--guidance`` (the U-Net sees twice
the batch), decodes them with gradient and backpropagates a loss on the pixels into the LoRA weights:

* authors' scheme: the finetuned model samples without gradient (for the targets), the frozen model
  samples without gradient (for the references), then the finetuned model samples again with one
  graph through the whole chain (U-Net inputs detached, gradient checkpointing on the U-Net), and the
  loss is backpropagated through it;
* ours (``method.dft.adjusted_backward``, ``two_pass``): the frozen model samples (references), the
  finetuned model samples once without gradient keeping each step's U-Net input, and each step's noise
  prediction is recomputed with gradient and receives ``s_k * dL/dz_0``, one step's graph at a time.

The classifier, CLIP and DINOv2 models of the real loss run once per iteration in both schemes and are
left out; the pixel loss stands in for them. Float32 (the CPU's precision), ``torch`` threads as set by
``--threads``.

Each figure comes from a forked child process that first runs the same iteration with one sampling
step (warm-up), then the measured iteration: one child times it; another, whose glibc allocator
returns freed memory at once (see ``bench_dft.py``), reports its peak resident memory growth
(``ru_maxrss`` minus the resident size before it).

    python benchmarks/bench_sd15_cpu.py --threads 2
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_dft import iteration_in_child
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel

from diffusers_fair.method.dft import adjusted_backward, sample_latents


SCHEMES = ("authors", "ours")
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def build(args):
    """SD 1.5's U-Net, text encoder (with LoRA) and VAE with random weights, and the scheduler."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).requires_grad_(False)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    )).requires_grad_(False)
    text_encoder.add_adapter(LoraConfig(r=50, lora_alpha=50, init_lora_weights="gaussian", target_modules=TEXT_LORA_TARGETS))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    ).requires_grad_(False)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, algorithm_type="dpmsolver++", solver_order=2)
    latent = args.size // 8
    latents = torch.randn(args.batch, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(2))
    empty = torch.full((1, 77), 49407)
    return dict(unet=unet, text_encoder=text_encoder, vae=vae, scheduler=scheduler, latents=latents, ids=ids,
                empty=empty)


def iteration(models, scheme: str, steps: int, guidance: float) -> None:
    """One iteration's sampling and gradient work (the optimizer step is the same in both schemes)."""
    unet, text_encoder, vae, scheduler = models["unet"], models["text_encoder"], models["vae"], models["scheduler"]
    latents, batch = models["latents"], models["latents"].shape[0]
    text_encoder.zero_grad(set_to_none=True)

    def encode(ids):
        return text_encoder(ids)[0].repeat(batch, 1, 1)

    def decode(z0):
        return (vae.decode(z0 / 0.18215).sample / 2 + 0.5).clamp(0, 1)

    with torch.no_grad():
        uncond = encode(models["empty"])
        text_encoder.disable_adapters()
        frozen_cond = encode(models["ids"])
        text_encoder.enable_adapters()
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, negative_prompt_embeds=uncond)
    if scheme == "authors":
        with torch.no_grad():
            sample_latents(unet, scheduler, latents, encode(models["ids"]), **kwargs)  # finetuned, for the targets
    with torch.no_grad():
        reference = decode(sample_latents(unet, scheduler, latents, frozen_cond, **kwargs))  # frozen, for the references

    def loss_fn(z0):
        return ((decode(z0) - reference) ** 2).mean()

    cond = encode(models["ids"])  # with gradient into the LoRA weights
    if scheme == "authors":
        unet.enable_gradient_checkpointing()
        adjusted_backward(unet, scheduler, latents, cond, loss_fn, mode="one_graph", **kwargs)
        unet.disable_gradient_checkpointing()
    else:
        adjusted_backward(unet, scheduler, latents, cond, loss_fn, mode="two_pass", **kwargs)
    grads = [p.grad for p in text_encoder.parameters() if p.requires_grad]
    if not grads or any(g is None or not torch.isfinite(g).all() for g in grads):
        raise RuntimeError(f"{scheme}: the LoRA weights got no finite gradient")


def measure(scheme: str, args, memory: bool = False) -> float:
    """One iteration's wall seconds, or (``memory=True``) its peak resident memory growth in MiB, each in
    a child process of its own (``bench_dft.iteration_in_child``)."""
    def iterate(models, steps):
        iteration(models, scheme, steps, args.guidance)

    return iteration_in_child(lambda: build(args), iterate, args.steps, args.threads, memory=memory)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents: size / 8)")
    parser.add_argument("--batch", type=int, default=2, help="images per iteration")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-memory", action="store_true", help="time only (one child per scheme, not two)")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    # Every model is built and run in forked children only: a process that forks after torch's thread
    # pool has started can deadlock in the child.
    print(f"SD 1.5 architecture, random weights: U-Net, CLIP ViT-L/14 text encoder with LoRA r=50, VAE; "
          f"{args.batch} images at {args.size}x{args.size}, "
          f"{args.steps} DPM-Solver++ steps, guidance {args.guidance}, float32, {args.threads} threads", flush=True)
    results = {}
    for scheme in SCHEMES:
        results[scheme] = {"seconds": measure(scheme, args)}
        print(f"{scheme:>8}: {results[scheme]['seconds']:7.1f} s per iteration", flush=True)
        if not args.no_memory:
            results[scheme]["peak_mb"] = measure(scheme, args, memory=True)
            print(f"{scheme:>8}: peak memory growth {results[scheme]['peak_mb']:8.0f} MiB", flush=True)
    ratio = {"time": results["ours"]["seconds"] / results["authors"]["seconds"]}
    if not args.no_memory:
        ratio["peak_memory"] = results["ours"]["peak_mb"] / results["authors"]["peak_mb"]
    print("ours / authors: " + ", ".join(f"{key} {value:.2f}" for key, value in ratio.items()))
    record = {"settings": vars(args), "results": results, "ours_over_authors": ratio}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    return record


if __name__ == "__main__":
    main()
