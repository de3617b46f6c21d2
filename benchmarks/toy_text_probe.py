"""How well a toy model's text encoder carries each word's trait skews: a linear probe.

    python benchmarks/toy_text_probe.py                                  # the shipped toy model
    python benchmarks/toy_text_probe.py --model runs/toy_base/pipeline --ridge 1e-2

The pooled text embedding of every word's prompt is mapped to the word's training skews (all
classes of all traits side by side) by a ridge regression fitted on the training words; the probe
then predicts the held-out words' skews, and the script prints, per trait, the per-word correlation
between predicted and true skews (the toy audit's ``per_word_correlation``). A trait the probe
cannot read from the text is one the U-Net cannot follow either, whatever its sampler or guidance.
Runs in a few seconds (the text encoder only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from diffusers_fair.toy import model_path, world
from diffusers_fair.toy.audit import per_word_correlation
from diffusers_fair.toy.render import TRAITS
from diffusers_fair.toy.train_base import encode_prompts


def skew_matrix(words: list[world.Word]) -> np.ndarray:
    """``(words, classes)``: each word's training skew, traits side by side in ``TRAITS`` order."""
    return np.array([[w.traits[t][c] for t, classes in TRAITS.items() for c in classes] for w in words])


@torch.no_grad()
def pooled_embeddings(model: Path, *word_lists: list[world.Word]) -> list[np.ndarray]:
    """The pooled text embedding of each word's prompt, one ``(words, hidden)`` array per list."""
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval()
    return [encode_prompts(tokenizer, text_encoder, [world.prompt(w) for w in words])[1].double().numpy()
            for words in word_lists]


def _design(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Standardised inputs with a column of ones for the intercept."""
    return np.hstack([(x - mean) / scale, np.ones((len(x), 1))])


def ridge_fit(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights for standardised inputs (with the mean and scale used), solved in closed form."""
    mean, scale = x.mean(0), x.std(0) + 1e-8
    design = _design(x, mean, scale)
    penalty = ridge * len(x) * np.eye(design.shape[1])
    penalty[-1, -1] = 0.0  # the intercept is not penalised
    return np.linalg.solve(design.T @ design + penalty, design.T @ y), mean, scale


def ridge_predict(fit: tuple[np.ndarray, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    weights, mean, scale = fit
    return _design(x, mean, scale) @ weights


def probe(model: Path, ridge: float) -> dict[str, float]:
    train, test = world.words(split="train"), world.words(split="test")
    train_embeddings, test_embeddings = pooled_embeddings(model, train, test)
    predicted = ridge_predict(ridge_fit(train_embeddings, skew_matrix(train), ridge), test_embeddings)
    true = skew_matrix(test)
    out, start = {}, 0
    for trait, classes in TRAITS.items():
        end = start + len(classes)
        out[trait] = per_word_correlation(predicted[:, start:end], true[:, start:end])
        start = end
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=model_path(), help="a StableDiffusionPipeline folder")
    parser.add_argument("--ridge", type=float, default=1e-2, help="ridge penalty (per training word, on standardised inputs)")
    args = parser.parse_args()
    result = probe(args.model, args.ridge)
    print(f"linear probe, pooled text embedding -> held-out word skews ({args.model}):")
    for trait, r in result.items():
        print(f"  {trait}: correlation {r:.3f}")


if __name__ == "__main__":
    main()
