"""CPU benchmark of the direct-finetuning gradient engine (diffusers_fair.dft).

Measures, on a small random-weight UNet2DConditionModel with a LoRA adapter (frozen base weights),
DPM-Solver++ 2M and classifier-free guidance:

1. peak memory of one ``adjusted_backward`` call for ``two_pass``, ``one_graph`` and ``naive`` at
   several step counts;
2. wall time of each mode and of one no-grad sampling pass;
3. one training iteration in the official scheme (three sampling passes: finetuned without grad for
   the targets, frozen for the references, finetuned with grad in one graph with gradient
   checkpointing) against ours (frozen and finetuned passes without grad, then the recompute):
   time ratio and peak memory ratio.

Memory method: each memory figure comes from a forked child process (Linux resets a child's peak
resident set size to its current size). The child runs the same call once with one step (warm-up:
code pages, allocator), reads its resident set size (RSS), runs the measured call and reports
``ru_maxrss - RSS before``: the growth of peak resident memory caused by the call. glibc's mmap
threshold is pinned to 4 KiB and its trim threshold to 0 (``mallopt``), so that freed tensors go
back to the system and the peak follows live memory. The figures include everything the call
allocates (U-Net activations, graphs, stored inputs, scheduler state), not only tensors saved for
backward. Caveat: the one-step warm-up's own peak also counts, so a figure is never below it.

Time method: in this process, one warm-up call, then the median of ``--repeats`` calls (the two
training schemes alternate).

    OMP_NUM_THREADS=1 python benchmarks/bench_dft.py
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import time
import traceback

import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
from peft import LoraConfig

from diffusers_fair.method.dft import adjusted_backward, sample_latents


MODES = ("two_pass", "one_graph", "naive")
SCHEMES = ("official", "ours")


def build(args):
    """Model, scheduler and inputs; the LoRA adapter is the only trainable part."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=16,
        sample_size=args.latent_size,
        norm_num_groups=4,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, algorithm_type="dpmsolver++", solver_order=2)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(args.batch, 4, args.latent_size, args.latent_size, generator=gen)
    cond = torch.randn(args.batch, 8, 16, generator=gen)
    uncond = torch.randn(args.batch, 8, 16, generator=gen)
    return unet, scheduler, latents, cond, uncond


def make_loss(target):
    """A stand-in for the decoder and loss models: cheap, non-linear in z_0."""
    def loss_fn(z0):
        return ((torch.tanh(z0) - target) ** 2).mean()
    return loss_fn


def run_mode(args, unet, scheduler, latents, cond, uncond, mode, steps):
    unet.zero_grad(set_to_none=True)
    adjusted_backward(unet, scheduler, latents, cond, make_loss(torch.zeros_like(latents)),
                      num_inference_steps=steps, guidance_scale=args.guidance, negative_prompt_embeds=uncond,
                      mode=mode)


def run_sampling(args, unet, scheduler, latents, cond, uncond, steps):
    sample_latents(unet, scheduler, latents, cond, num_inference_steps=steps, guidance_scale=args.guidance,
                   negative_prompt_embeds=uncond)


def run_scheme(args, unet, scheduler, latents, cond, uncond, scheme, steps):
    """One training iteration's sampling and gradient work (the optimizer step is the same in both)."""
    kwargs = dict(num_inference_steps=steps, guidance_scale=args.guidance, negative_prompt_embeds=uncond)
    unet.zero_grad(set_to_none=True)
    if scheme == "official":
        sample_latents(unet, scheduler, latents, cond, **kwargs)  # finetuned, for the targets
        unet.disable_adapters()
        reference = sample_latents(unet, scheduler, latents, cond, **kwargs)  # frozen, for the references
        unet.enable_adapters()
        unet.enable_gradient_checkpointing()
        adjusted_backward(unet, scheduler, latents, cond, make_loss(torch.tanh(reference)), mode="one_graph",
                          **kwargs)
        unet.disable_gradient_checkpointing()
    else:
        unet.disable_adapters()
        reference = sample_latents(unet, scheduler, latents, cond, **kwargs)  # frozen, for the references
        unet.enable_adapters()
        # Pass 1 of two_pass gives the images the targets are computed from (inside loss_fn).
        adjusted_backward(unet, scheduler, latents, cond, make_loss(torch.tanh(reference)), mode="two_pass",
                          **kwargs)


def in_child(fn) -> dict:
    """Run ``fn()`` (returning a JSON-able dict) in a forked child process and return its result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 1
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(fn()).encode())
            status = 0
        except BaseException:  # noqa: BLE001 - report any failure of the child, then exit
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise RuntimeError("the measuring child process failed")
    return json.loads(data)


def measure_memory(fn, warm_up) -> float:
    """Peak resident memory growth (MiB) of ``fn()`` in a forked child, after ``warm_up()`` there."""
    def run():
        warm_up()
        with open("/proc/self/statm") as f:
            rss_before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
        return {"peak_mb": (peak - rss_before) / 2**20}

    return in_child(run)["peak_mb"]


def iteration_in_child(build, iterate, steps: int, threads: int, memory: bool = False) -> float:
    """One training iteration of ``steps`` sampling steps in a forked child, after a one-step warm-up.

    ``build()`` makes the models in the child, ``iterate(models, steps)`` runs an iteration. Returns
    its wall seconds with the allocator as it comes, or (``memory=True``) its peak resident memory
    growth in MiB with an allocator that returns freed memory at once (which slows allocation, hence
    one child per figure).
    """
    def run():
        torch.set_num_threads(threads)
        if memory:
            pin_mmap_threshold()
        models = build()
        iterate(models, 1)
        if memory:
            with open("/proc/self/statm") as f:
                rss_before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            iterate(models, steps)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
            return {"value": (peak - rss_before) / 2**20}
        start = time.perf_counter()
        iterate(models, steps)
        return {"value": time.perf_counter() - start}

    return in_child(run)["value"]


def pin_mmap_threshold() -> None:
    """Make glibc serve allocations of 4 KiB and more with mmap (returned to the system on free) and
    trim the heap on every free, so that resident memory follows live memory."""
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc = ctypes.CDLL("libc.so.6")
    if libc.mallopt(m_mmap_threshold, 4096) != 1 or libc.mallopt(m_trim_threshold, 0) != 1:
        raise RuntimeError("mallopt failed: this memory measurement needs glibc")


def median_time(fn, repeats) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[6, 12, 24, 48], help="step counts for memory")
    parser.add_argument("--time-steps", type=int, default=20, help="step count for the timings")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (after one warm-up)")
    parser.add_argument("--batch", type=int, default=2, help="images per call (the U-Net sees twice as many)")
    parser.add_argument("--latent-size", type=int, default=16, help="latent height and width")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pin_mmap_threshold()
    unet, scheduler, latents, cond, uncond = build(args)
    inputs = (args, unet, scheduler, latents, cond, uncond)

    print(f"model: UNet2DConditionModel (16, 32) + LoRA r=4, latents {args.batch}x4x{args.latent_size}x"
          f"{args.latent_size}, guidance {args.guidance}, DPM-Solver++ 2M, float32, 1 thread\n")

    print("Peak memory growth of one adjusted_backward call (MiB)")
    print(f"{'steps':>6} " + " ".join(f"{m:>10}" for m in MODES))
    memory = {}
    for steps in args.steps:
        memory[steps] = {
            m: measure_memory(lambda m=m, n=steps: run_mode(*inputs, m, n), lambda m=m: run_mode(*inputs, m, 1))
            for m in MODES
        }
        print(f"{steps:>6} " + " ".join(f"{memory[steps][m]:>10.1f}" for m in MODES), flush=True)
    first, last = args.steps[0], args.steps[-1]
    growth = {m: memory[last][m] - memory[first][m] for m in MODES}
    print(f"growth {first}->{last} steps: " + ", ".join(f"{m} {growth[m]:.1f}" for m in MODES)
          + f"; two_pass / naive growth = {growth['two_pass'] / growth['naive']:.3f}\n")

    # All memory figures are taken before any timing, so that every child forks from the same state.
    steps = args.time_steps
    scheme_memory = {
        scheme: measure_memory(lambda s=scheme: run_scheme(*inputs, s, steps),
                               lambda s=scheme: run_scheme(*inputs, s, 1))
        for scheme in SCHEMES
    }

    print(f"Wall time at {steps} steps (s, median of {args.repeats})")
    sampling = median_time(lambda: run_sampling(*inputs, steps), args.repeats)
    print(f"{'no-grad sampling pass':>24} {sampling:8.2f}  1.00x", flush=True)
    for mode in MODES:
        seconds = median_time(lambda m=mode: run_mode(*inputs, m, steps), args.repeats)
        print(f"{mode:>24} {seconds:8.2f}  {seconds / sampling:.2f}x", flush=True)

    print(f"\nOne training iteration at {steps} steps (official: 3 passes + one-graph backward with checkpointing;"
          " ours: 2 no-grad passes + recompute)")
    # The two schemes are timed alternately, so that load from other processes affects both alike.
    times = {scheme: [] for scheme in SCHEMES}
    for scheme in SCHEMES:
        run_scheme(*inputs, scheme, steps)  # warm-up
    for _ in range(args.repeats):
        for scheme in SCHEMES:
            start = time.perf_counter()
            run_scheme(*inputs, scheme, steps)
            times[scheme].append(time.perf_counter() - start)
    results = {}
    for scheme in SCHEMES:
        results[scheme] = (statistics.median(times[scheme]), scheme_memory[scheme])
        print(f"{scheme:>10} {results[scheme][0]:8.2f} s {scheme_memory[scheme]:10.1f} MiB", flush=True)
    print(f"ours / official: time {results['ours'][0] / results['official'][0]:.2f}, "
          f"peak memory {results['ours'][1] / results['official'][1]:.2f}")


if __name__ == "__main__":
    main()
