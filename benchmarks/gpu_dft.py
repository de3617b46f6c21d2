"""GPU benchmark of the direct-finetuning gradient engine at Stable Diffusion 1.5 size.

A random-weight UNet2DConditionModel with SD 1.5's config in float16, frozen, with float32 LoRA
adapters (rank ``--rank``) on every attention projection as the trainable part; DPM-Solver++ 2M,
classifier-free guidance 7.5 (the U-Net sees twice the batch), 8 images at 64x64 latents, 20 steps.
The loss is a cheap function of z_0 (no VAE and no loss models: they cost the same in every mode).

Prints a table of wall time and peak GPU memory (``torch.cuda.max_memory_allocated`` above the
weights) for a no-grad sampling pass, ``two_pass`` (with and without gradient checkpointing),
``one_graph`` (with checkpointing: the official form; and without), and ``naive``; modes that run out
of memory are reported as OOM. Then one training iteration in the official scheme (finetuned and
frozen no-grad passes, then the finetuned pass with grad in one graph with checkpointing) against
ours (frozen no-grad pass, then ``two_pass``, without and with checkpointing). Runs in about 2-4
minutes on one H100.

    python benchmarks/gpu_dft.py            # on a GPU
    python benchmarks/gpu_dft.py --tiny     # a small CPU smoke test of the script itself
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

from diffusers_fair.method.dft import adjusted_backward, sample_latents


class LoRALinear(torch.nn.Module):
    """``base(x) + up(down(x))`` with a frozen low-precision base and float32 adapter weights."""

    def __init__(self, base: torch.nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        torch.nn.init.normal_(self.up.weight, std=1e-3)
        self.enabled = True

    def forward(self, x):
        out = self.base(x)
        if self.enabled:
            out = out + self.up(self.down(x.float())).to(out.dtype)
        return out


def add_lora(unet, rank: int) -> list[LoRALinear]:
    """Wrap every attention projection (to_q, to_k, to_v, to_out.0) in a LoRALinear."""
    layers = []
    for module in list(unet.modules()):
        for name in ("to_q", "to_k", "to_v"):
            if isinstance(getattr(module, name, None), torch.nn.Linear):
                layers.append(LoRALinear(getattr(module, name), rank))
                setattr(module, name, layers[-1])
        to_out = getattr(module, "to_out", None)
        if isinstance(to_out, torch.nn.ModuleList) and isinstance(to_out[0], torch.nn.Linear):
            layers.append(LoRALinear(to_out[0], rank))
            to_out[0] = layers[-1]
    return layers


def set_lora(layers, enabled: bool) -> None:
    for layer in layers:
        layer.enabled = enabled


def build(args, device, dtype):
    torch.manual_seed(0)
    if args.tiny:
        config = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=16,
                      attention_head_dim=8, norm_num_groups=8,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        tokens = 8
    else:  # Stable Diffusion 1.5's U-Net
        config = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                      sample_size=64, attention_head_dim=8, norm_num_groups=32,
                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        tokens = 77
    with torch.device(device):
        unet = UNet2DConditionModel(**config).to(dtype).requires_grad_(False)
        lora = add_lora(unet, args.rank)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, algorithm_type="dpmsolver++", solver_order=2)
    gen = torch.Generator(device="cpu").manual_seed(1)
    size = config["sample_size"]
    latents = torch.randn(args.batch, 4, size, size, generator=gen).to(device, dtype)
    cond = torch.randn(args.batch, tokens, config["cross_attention_dim"], generator=gen).to(device, dtype)
    uncond = torch.randn(args.batch, tokens, config["cross_attention_dim"], generator=gen).to(device, dtype)
    return unet, lora, scheduler, latents, cond, uncond


def make_loss(target):
    def loss_fn(z0):
        return ((torch.tanh(z0.float()) - target) ** 2).mean()
    return loss_fn


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="images per call (the U-Net sees twice as many)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up")
    parser.add_argument("--tiny", action="store_true", help="small model on CPU in float32 (smoke test)")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    unet, lora, scheduler, latents, cond, uncond = build(args, device, dtype)
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, negative_prompt_embeds=uncond)
    target = torch.zeros_like(latents, dtype=torch.float32)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def cleanup():
        unet.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    def measure(fn):
        """(median seconds, peak MiB above the memory held before) or None on out-of-memory."""
        cleanup()
        base = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, failed = [], False
        try:
            for i in range(args.repeats + 1):
                unet.zero_grad(set_to_none=True)
                sync()
                start = time.perf_counter()
                fn()
                sync()
                if i > 0:  # the first call is the warm-up
                    times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError:
            failed = True
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
        cleanup()
        return None if failed else (statistics.median(times), peak)

    def backward(mode, checkpointing, loss_fn):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        try:
            adjusted_backward(unet, scheduler, latents, cond, loss_fn, mode=mode, **kwargs)
        finally:
            unet.disable_gradient_checkpointing()

    def grad_call(mode, checkpointing):
        return lambda: backward(mode, checkpointing, make_loss(target))

    def scheme(name, checkpointing):
        def fn():
            if name == "official":
                sample_latents(unet, scheduler, latents, cond, **kwargs)  # finetuned: targets
            set_lora(lora, False)
            try:
                reference = sample_latents(unet, scheduler, latents, cond, **kwargs)  # frozen: references
            finally:
                set_lora(lora, True)
            loss_fn = make_loss(torch.tanh(reference.float()))
            if name == "official":
                backward("one_graph", checkpointing, loss_fn)  # finetuned with grad, one graph
            else:
                backward("two_pass", checkpointing, loss_fn)  # its pass 1 gives the images for the targets
        return fn

    weights = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; "
          f"{'SD 1.5 U-Net' if not args.tiny else 'tiny U-Net'} {dtype} + fp32 LoRA r={args.rank}; "
          f"batch {args.batch} (U-Net batch {2 * args.batch}), {args.steps} steps, guidance {args.guidance}; "
          f"weights {weights:.2f} GiB; median of {args.repeats} after a warm-up\n")
    rows = [
        ("no-grad sampling pass", lambda: sample_latents(unet, scheduler, latents, cond, **kwargs)),
        ("two_pass", grad_call("two_pass", False)),
        ("two_pass + checkpointing", grad_call("two_pass", True)),
        ("one_graph + checkpointing", grad_call("one_graph", True)),
        ("official iteration", scheme("official", True)),
        ("our iteration", scheme("ours", False)),
        ("our iteration + ckpt", scheme("ours", True)),
        ("one_graph", grad_call("one_graph", False)),
        ("naive", grad_call("naive", False)),
    ]
    results = {}
    print(f"{'':>26} {'time (s)':>9} {'x sampling':>10} {'peak (MiB)':>11}")
    for name, fn in rows:
        results[name] = measure(fn)
        if results[name] is None:
            print(f"{name:>26} {'OOM':>9}", flush=True)
            continue
        seconds, peak = results[name]
        print(f"{name:>26} {seconds:9.2f} {seconds / results['no-grad sampling pass'][0]:10.2f} {peak:11.0f}",
              flush=True)
    official = results["official iteration"]
    print()
    for name in ("our iteration", "our iteration + ckpt"):
        ours = results[name]
        if official and ours:
            print(f"{name} / official iteration: time {ours[0] / official[0]:.2f}, "
                  f"peak memory {ours[1] / official[1]:.2f}")


if __name__ == "__main__":
    main()
