"""Naive vs adjusted direct finetuning on the toy world (the paper's Fig. 1a).

    python examples/toy_dft_variants.py --out results/dft-variants            # ~10 minutes on 2 CPU cores
    python examples/toy_dft_variants.py --out /tmp/dft --iterations 3 --seeds 1  # a smoke run

The task: train a soft prompt (5 tokens in front of "a photo of the face of a person") so that the
toy model's images match one fixed target image under the image-semantics loss (one minus the
cosine similarity of the toy image embeddings, summed over the embedders). Every iteration draws
fresh noise, samples with classifier-free guidance and updates the soft tokens with the gradient of
one of three DFT variants (``diffusers_fair.method.dft.adjusted_backward``):

* ``naive``: the exact gradient through the whole sampling chain;
* ``adjusted``: every step's U-Net gradient with the same weight (``standardize=True``), the paper's method;
* ``adjusted-unstandardised``: every step weighted by its coefficient ``a_k`` (``standardize=False``).

Each variant runs from the same initial soft tokens and the same noise draws for each seed. The
script writes ``curves.json`` (the loss per iteration, per variant and seed) and ``curves.png``
(mean and range over seeds, smoothed over 5 iterations).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffusers_fair._utils.plotting import pyplot
from diffusers_fair.method import dft, losses
from diffusers_fair.toy.components import load_toy_components
from diffusers_fair.toy.demo import load_toy_pipeline
from diffusers_fair.toy.render import TRAITS, render
from diffusers_fair.training import trainable


VARIANTS = {
    "naive": {"mode": "naive"},
    "adjusted": {"mode": "two_pass", "standardize": True},
    "adjusted-unstandardised": {"mode": "two_pass", "standardize": False},
}
PROMPT = "a photo of the face of a person"
SOFT_TOKENS = [f"<dft>_{i}" if i else "<dft>" for i in range(5)]


def target_image(seed: int) -> torch.Tensor:
    """One rendered portrait ``(1, 3, 32, 32)``: long grey hair and deep skin, a seeded scene."""
    traits = {name: np.array([len(classes) - 1]) for name, classes in TRAITS.items()}
    return torch.from_numpy(render(traits, seed).images)




def encode(pipe, text: str, batch: int) -> torch.Tensor:
    tokenizer = pipe.tokenizer
    ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0].expand(batch, -1, -1)


def run_variant(variant: str, seed: int, args, components, target: torch.Tensor) -> list[float]:
    """Train a fresh soft prompt with one DFT variant; return the loss of every iteration."""
    torch.manual_seed(seed)
    pipe = load_toy_pipeline()
    vectors, _ = trainable.add_soft_tokens(pipe, SOFT_TOKENS, "person", "cpu")
    optimizer = torch.optim.Adam([vectors], lr=args.learning_rate)
    prompt = trainable.soft_token_prefix(SOFT_TOKENS) + PROMPT
    unet, vae = pipe.unet, pipe.vae

    embedder = components.image_embedders[args.embedder]
    with torch.no_grad():
        target_embedding = embedder(target).expand(args.batch, -1)
        negative = encode(pipe, "", args.batch)

    def loss_fn(latents: torch.Tensor) -> torch.Tensor:
        """The mean ``1 - cos(embed(image), embed(target))`` over the images."""
        images = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        return losses.cosine_distance(embedder(images), target_embedding).mean()

    shape = (args.batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    history = []
    for iteration in tqdm(range(args.iterations), desc=f"{variant} seed {seed}", mininterval=5):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + iteration))
        optimizer.zero_grad()
        result = dft.adjusted_backward(
            unet, pipe.scheduler, noise, encode(pipe, prompt, args.batch), loss_fn,
            num_inference_steps=args.steps, guidance_scale=args.guidance_scale, negative_prompt_embeds=negative,
            **VARIANTS[variant],
        )
        optimizer.step()
        history.append(float(result.loss))
    return history


def smooth(values: np.ndarray, width: int = 5) -> np.ndarray:
    """Trailing moving average over ``width`` iterations (shorter at the start)."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0, axis=-1), axis=-1)
    ends = np.arange(1, values.shape[-1] + 1)
    starts = np.maximum(0, ends - width)
    return (cumulative[..., ends] - cumulative[..., starts]) / (ends - starts)


def plot(curves: dict[str, list[list[float]]], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for variant, runs in curves.items():
        values = smooth(np.array(runs))
        x = np.arange(1, values.shape[1] + 1)
        ax.plot(x, values.mean(axis=0), label=variant)
        ax.fill_between(x, values.min(axis=0), values.max(axis=0), alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("image-semantics loss to the target")
    ax.set_title(f"DFT variants, soft prompt, {len(next(iter(curves.values())))} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="images per iteration")
    parser.add_argument("--steps", type=int, default=12, help="sampling steps")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--learning-rate", type=float, default=2e-2)
    parser.add_argument("--embedder", type=int, default=1,
                        help="which toy image embedder: 0 the scene embedder, 1 the random-feature embedder (sees the traits)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    components = load_toy_components()
    target = target_image(seed=12345)
    started = time.time()
    curves = {variant: [run_variant(variant, seed, args, components, target) for seed in range(args.seeds)]
              for variant in args.variants}
    summary = {variant: {"first_5": float(np.mean([run[:5] for run in runs])),
                         "last_10": float(np.mean([run[-10:] for run in runs]))} for variant, runs in curves.items()}
    record = {"settings": vars(args) | {"out": str(args.out)}, "summary": summary, "curves": curves,
              "minutes": round((time.time() - started) / 60, 2)}
    (args.out / "curves.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(curves, args.out / "curves.png")
    for variant, values in summary.items():
        print(f"{variant:>24}: loss over the first 5 iterations {values['first_5']:.4f}, last 10 {values['last_10']:.4f}")
    return record


if __name__ == "__main__":
    main()
