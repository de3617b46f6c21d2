"""Generation time with a fair LoRA adaptor: unfused, fused, fused and unloaded, against the base model.

Four copies of the toy architecture (random weights; the timing does not depend on them):

* ``base``: no adaptor;
* ``lora``: the adaptor loaded with ``load_fair_adaptor`` (peft computes ``B A x`` at every layer);
* ``fused``: ``load_fair_adaptor(..., fuse=True)``: the LoRA weights merged into the base weights,
  peft's wrappers kept so that the adaptor can still be unloaded;
* ``fused+unloaded``: fused, then ``pipe.unload_lora_weights()`` (plain layers, cannot be undone).

The adaptor is a LoRA of rank ``--rank`` on the text encoder (q/k/v/out_proj, fc1, fc2) and, with
``--unet``, on the U-Net's attention (to_q/to_k/to_v/to_out.0).

Three units are timed: one U-Net evaluation (a sampling step with classifier-free guidance), one
prompt encoding, and a whole generation (``--steps`` steps, VAE decoding included); a generation
costs about ``steps`` U-Net evaluations plus one encoding and one decoding. Each round runs the
unit once per configuration, in a shuffled order, and divides each time by the time ``base`` took
in the same round; the table gives the median of these paired ratios as the overhead, and the
median CPU time. On a shared machine single timings vary by 10% and more, but load hits the runs
of one round alike, so the median paired ratio is stable to about 0.1% (``fused+unloaded`` runs
exactly the layers of ``base`` and shows the noise that remains).

    OMP_NUM_THREADS=1 python benchmarks/bench_fused_adaptor.py --unet
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from tqdm import tqdm

from diffusers_fair.adaptors.format import save_fair_adaptor
from diffusers_fair.adaptors.metadata import FairAdaptorMetadata
from diffusers_fair.adaptors.pipeline import load_fair_adaptor
from diffusers_fair.toy import world
from diffusers_fair.toy.architecture import (
    IMAGE_SIZE,
    make_sampler,
    make_text_encoder,
    make_unet,
    make_vae,
)
from diffusers_fair.toy.tokenizer import build_tokenizer


TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def toy_pipeline(seed: int) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(world.vocabulary())
    pipe = StableDiffusionPipeline(
        vae=make_vae(), text_encoder=make_text_encoder(tokenizer), tokenizer=tokenizer, unet=make_unet(),
        scheduler=make_sampler(), safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_lora(model, targets, rank, generator):
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in targets):
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.05
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.05
    return state, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="sampler steps per generation")
    parser.add_argument("--batch", type=int, default=2, help="images per generation")
    parser.add_argument("--unet-rounds", type=int, default=300, help="timed U-Net steps and encodings per configuration")
    parser.add_argument("--generation-rounds", type=int, default=30, help="timed generations per configuration")
    parser.add_argument("--rank", type=int, default=50, help="LoRA rank (the paper's)")
    parser.add_argument("--unet", action="store_true", help="also put LoRA on the U-Net's attention")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipes = {name: toy_pipeline(0) for name in ("base", "lora", "fused", "fused+unloaded")}
    shapes = pipes["base"]
    generator = torch.Generator().manual_seed(1)
    te_state, te_config = random_lora(shapes.text_encoder, TE_TARGETS, args.rank, generator)
    unet_kwargs = {}
    if args.unet:
        unet_state, unet_config = random_lora(shapes.unet, UNET_TARGETS, args.rank, generator)
        unet_kwargs = {"unet_lora": unet_state, "unet_lora_config": unet_config}
    with tempfile.TemporaryDirectory() as folder:
        metadata = FairAdaptorMetadata(name="bench", base_model="diffusers-fair/toy", text_hidden_size=64, cross_attention_dim=64)
        save_fair_adaptor(Path(folder), metadata=metadata, text_encoder_lora=te_state, text_encoder_lora_config=te_config, **unet_kwargs)
        load_fair_adaptor(pipes["lora"], folder)
        load_fair_adaptor(pipes["fused"], folder, fuse=True)
        load_fair_adaptor(pipes["fused+unloaded"], folder, fuse=True)
        pipes["fused+unloaded"].unload_lora_weights()

    prompt = world.prompt(world.words("occupation")[0])
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(2 * args.batch, 4, 16, 16, generator=generator)
    context = torch.randn(2 * args.batch, shapes.tokenizer.model_max_length, 64, generator=generator)

    def generation(pipe):
        return pipe(prompt, num_images_per_prompt=args.batch, num_inference_steps=args.steps, height=IMAGE_SIZE,
                    width=IMAGE_SIZE, generator=torch.Generator().manual_seed(3), output_type="np").images

    @torch.no_grad()
    def unet_step(pipe):
        return pipe.unet(latents, 500, encoder_hidden_states=context).sample

    @torch.no_grad()
    def encoding(pipe):
        return pipe.encode_prompt([prompt] * args.batch, "cpu", 1, True, [""] * args.batch)

    images = {name: generation(pipe) for name, pipe in pipes.items()}  # warm-up, and how exact fusing is
    units = [("U-Net step", unet_step, args.unet_rounds), ("prompt encoding", encoding, args.unet_rounds),
             (f"generation ({args.steps} steps)", generation, args.generation_rounds)]
    cpu = {(unit, name): [] for unit, _, _ in units for name in pipes}
    ratio = {(unit, name): [] for unit, _, _ in units for name in pipes}
    order, shuffler = list(pipes), random.Random(0)
    for unit, run, rounds in units:
        for _ in tqdm(range(rounds), desc=unit):
            shuffler.shuffle(order)
            times = {}
            for name in order:
                start = time.process_time()
                run(pipes[name])
                times[name] = time.process_time() - start
            for name in pipes:
                cpu[unit, name].append(times[name])
                ratio[unit, name].append(times[name] / times["base"])

    print(f"toy architecture, batch {args.batch} (x2 for guidance), LoRA rank {args.rank} on the text encoder"
          f"{' and U-Net' if args.unet else ''}, {args.threads} thread(s)")
    print("overhead against base: median over rounds of the paired time ratio; median CPU time in ms in brackets")
    print(f"{'configuration':<16}" + "".join(f"{unit:>28}" for unit, _, _ in units) + f"{'max |img - lora img|':>22}")
    for name in pipes:
        row = f"{name:<16}"
        for unit, _, _ in units:
            overhead = 100 * (statistics.median(ratio[unit, name]) - 1)
            row += f"{overhead:>15.1f}% [{1000 * statistics.median(cpu[unit, name]):8.2f}]"
        diff = float(abs(images[name] - images["lora"]).max()) if name != "base" else float("nan")
        print(row + f"{diff:>22.2e}")


if __name__ == "__main__":
    main()
