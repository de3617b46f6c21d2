"""Audit a toy text-to-image model: which traits does each concept word produce?

For each word, generate images from seeded noise, find the face, read its traits with the toy
classifier, and count. The result per word and attribute is the class frequency vector ``f`` and
the paper's bias ``bias(P) = mean over class pairs of |f_i - f_j|``; set against the word's training
skew (``data/world.json``), it tells whether the base model learned the biases it was given:

* **per-word correlation** of an attribute: the Pearson correlation, across words, between the
  generated and the training frequencies: for a binary attribute of the share of its second class
  (long hair, grey hair), for a multi-class one over all (word, class) entries;
* the mean bias over words, generated and in the training skews, and the overall class shares
  (e.g. the share of grey hair, the age slot's "old" share).

    python -m diffusers_fair.toy.audit --model FOLDER --split test --images-per-word 32 --out DIR

writes ``audit.json``, ``audit.md`` (tables) and one bar chart per attribute (``audit_<attr>.png``).

The images are generated and read as in the general audit (:mod:`diffusers_fair.evaluation.audit`):
``generate`` from the noise of ``initial_noise``, ``read_faces`` (detect, crop, classify), then
``class_counts``, ``frequencies`` and ``bias_metric``. What the toy world adds is its ground truth:
each word's training skew and the comparison with it, and two checks of the classifier on the
model's images (:func:`explicit_prompt_agreement`, :func:`reconstruction_accuracy`).

Noise: image ``i`` of a prompt starts from a latent seeded by ``(seed, prompt, i)``. Two models
audited with the same seed therefore start every image from the same latent, so that their
differences come from the weights; different words get independent noise, so that the mean over
words averages independent draws (with one noise shared by all words, the words' errors would move
together and the mean bias of a balanced model would swing with the seed by as much as a single word's).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .._utils.plotting import pyplot
from ..evaluation.audit import generate, initial_noise, latent_shape, read_faces
from ..evaluation.metrics import bias_metric, class_counts, frequencies
from ..evaluation.results import ImageReadout
from . import world
from .components import ToyComponents
from .render import TRAITS


@dataclass
class WordAudit:
    """The audit of one word.

    Attributes:
        word, group, split: the word and where it sits in the toy world.
        prompt: the prompt the images were generated from.
        num_images: images generated; ``num_faces`` of them had a detected face (only those are counted).
        freqs: attribute -> generated class frequencies (over images with a face).
        skew: attribute -> the word's training distribution.
        bias: attribute -> bias of ``freqs``; ``skew_bias``: bias of ``skew``.
    """

    word: str
    group: str
    split: str
    prompt: str
    num_images: int
    num_faces: int
    freqs: dict[str, list[float]]
    skew: dict[str, list[float]]
    bias: dict[str, float]
    skew_bias: dict[str, float]


@dataclass
class AttributeSummary:
    """One attribute over all audited words.

    Attributes:
        slot: the paper's attribute the trait stands for (gender, race, age).
        correlation: per-word correlation between generated and training frequencies (see module doc).
        mean_bias, std_bias: generated bias over words; ``mean_skew_bias``: the same for the skews.
        mean_abs_error: mean over words and classes of ``|f - skew|``.
        shares: class -> generated frequency averaged over words; ``skew_shares``: the same for the skews.
    """

    slot: str
    classes: list[str]
    correlation: float
    mean_bias: float
    std_bias: float
    mean_skew_bias: float
    mean_abs_error: float
    shares: dict[str, float]
    skew_shares: dict[str, float]


@dataclass
class AuditResult:
    """Per-word audits, their summary, the settings, and (with ``keep_images=True``) the images.

    ``images`` is ``(words * images_per_word, 3, H, W)`` in ``[0, 1]``, word by word in audit order.
    """

    words: list[WordAudit]
    summary: dict[str, AttributeSummary]
    settings: dict = field(default_factory=dict)
    images: torch.Tensor | None = None

    def to_json(self) -> str:
        return json.dumps({"settings": self.settings, "summary": {k: asdict(v) for k, v in self.summary.items()},
                           "words": [asdict(w) for w in self.words]}, indent=2)

    def to_markdown(self) -> str:
        header = ("| attribute (slot) | per-word correlation | bias (generated) | bias (training skew) "
                  "| mean abs error | shares (generated) | shares (skew) |")
        lines = [header, "|---|---|---|---|---|---|---|"]
        for name, s in self.summary.items():
            shares = ", ".join(f"{c} {s.shares[c]:.2f}" for c in s.classes)
            skew = ", ".join(f"{c} {s.skew_shares[c]:.2f}" for c in s.classes)
            lines.append(f"| {name} ({s.slot}) | {s.correlation:.3f} | {s.mean_bias:.3f} ± {s.std_bias:.3f} | "
                         f"{s.mean_skew_bias:.3f} | {s.mean_abs_error:.3f} | {shares} | {skew} |")
        settings = ", ".join(f"{k} {v}" for k, v in self.settings.items() if not isinstance(v, dict))
        lines += ["", f"Settings: {settings}."]
        checks = (("explicit_prompt_agreement", "Explicit trait prompts read back as named"),
                  ("reconstruction_accuracy", "Classifier accuracy on renders through the model's autoencoder"))
        for key, label in checks:
            if key in self.settings:
                lines.append(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in self.settings[key].items()) + ".")
        lines += ["", "Per word (generated frequency / training skew; faces found / images):", ""]
        head = ["word", "faces"] + [f"{a}: {'/'.join(c)}" for a, c in TRAITS.items()] + [f"bias {a}" for a in TRAITS]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for w in self.words:
            cells = [f"{w.word} ({w.split})", f"{w.num_faces}/{w.num_images}"]
            for a in TRAITS:
                gen = "/".join(f"{x:.2f}" for x in w.freqs[a])
                cells.append(f"{gen} (skew {'/'.join(f'{x:.2f}' for x in w.skew[a])})")
            cells += [f"{w.bias[a]:.2f} ({w.skew_bias[a]:.2f})" for a in TRAITS]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def audit_pipeline(pipe, words: list[world.Word | str], images_per_word: int, components: ToyComponents, *,
                   seed: int = 0, guidance_scale: float = 4.0, num_inference_steps: int = 15, batch_size: int = 32,
                   keep_images: bool = False) -> AuditResult:
    """Generate ``images_per_word`` images for each word's prompt and read their traits.

    Args:
        pipe: a ``StableDiffusionPipeline`` (e.g. the toy model, with or without a fair adaptor).
        words: toy-world words (``world.Word`` or their names).
        images_per_word: images per word; image ``i`` of a word starts from the latent seeded by
            ``(seed, prompt, i)``.
        components: the toy components (``load_toy_components()``).
        batch_size: images per pipeline call and per detector / classifier batch.
        keep_images: keep the generated images in the result (e.g. to compare two models image by image).

    Returns:
        An :class:`AuditResult`: per-word frequencies and bias against the training skews, and a
        per-attribute summary.

    Raises:
        ValueError: for an unknown word, no words, non-positive counts, or when no image had a face.
    """
    if images_per_word < 1 or batch_size < 1:
        raise ValueError("images_per_word and batch_size must be positive")
    words = [_as_word(w) for w in words]
    if not words:
        raise ValueError("no words to audit")
    pipe.set_progress_bar_config(disable=True)
    audits, kept = [], []
    for word in tqdm(words, desc="audit", mininterval=5):
        prompt = world.prompt(word)
        images = _generate(pipe, prompt, images_per_word, seed, guidance_scale=guidance_scale,
                           num_inference_steps=num_inference_steps, batch_size=batch_size)
        audits.append(word_audit(word, prompt, read_faces(images, components, batch_size=batch_size)))
        if keep_images:
            kept.append(images)
    settings = {"seed": seed, "guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps,
                "images_per_word": images_per_word, "num_words": len(words)}
    return AuditResult(words=audits, summary=summarize(audits), settings=settings,
                       images=torch.cat(kept) if keep_images else None)


def word_audit(word: world.Word, prompt: str, readout: ImageReadout) -> WordAudit:
    """One word's audit from what was read off its images (``read_faces``).

    Frequencies and bias count the images with a face; where none had one, they are NaN.
    """
    freqs, skew, bias, skew_bias = {}, {}, {}, {}
    for name, classes in TRAITS.items():
        counts = class_counts(readout.probs[name], readout.found)
        freqs[name] = frequencies(counts).tolist()
        bias[name] = float(bias_metric(counts)) if counts.sum() > 0 else float("nan")
        skew[name] = [float(word.traits[name][c]) for c in classes]
        skew_bias[name] = float(bias_metric(torch.tensor(skew[name])))
    return WordAudit(word.name, word.group, word.split, prompt, readout.num_images, readout.num_faces,
                     freqs, skew, bias, skew_bias)


def summarize(words: list[WordAudit]) -> dict[str, AttributeSummary]:
    """Attribute -> its summary over the words with a face (see the module doc).

    Raises:
        ValueError: when no word had a detected face.
    """
    counted = [w for w in words if w.num_faces > 0]
    if not counted:
        raise ValueError("no audited word had a detected face")
    slots = {trait: slot for slot, trait in world.load_world()["slots"].items()}
    summary = {}
    for name, classes in TRAITS.items():
        f = np.array([w.freqs[name] for w in counted])
        q = np.array([w.skew[name] for w in counted])
        b = np.array([w.bias[name] for w in counted])
        summary[name] = AttributeSummary(
            slot=slots.get(name, ""),
            classes=list(classes),
            correlation=per_word_correlation(f, q) if len(counted) > 1 else float("nan"),
            mean_bias=float(b.mean()),
            std_bias=float(b.std()),
            mean_skew_bias=float(np.mean([w.skew_bias[name] for w in counted])),
            mean_abs_error=float(np.abs(f - q).mean()),
            shares={c: float(f[:, i].mean()) for i, c in enumerate(classes)},
            skew_shares={c: float(q[:, i].mean()) for i, c in enumerate(classes)},
        )
    return summary


def per_word_correlation(freqs: np.ndarray, skews: np.ndarray) -> float:
    """Correlation across words of generated and training frequencies, both ``(words, classes)``.

    Binary attributes: the share of the second class; more classes: all (word, class) entries.
    NaN where either side does not vary.

    Raises:
        ValueError: when the two arrays are not ``(words, classes)`` of one shape.
    """
    if freqs.shape != skews.shape or freqs.ndim != 2:
        raise ValueError(f"freqs and skews must be (words, classes) of one shape, got {freqs.shape} and {skews.shape}")
    if freqs.shape[1] == 2:
        return _pearson(freqs[:, 1], skews[:, 1])
    return _pearson(freqs.ravel(), skews.ravel())


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x**2).sum() * (y**2).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def _as_word(word: world.Word | str) -> world.Word:
    if isinstance(word, world.Word):
        return word
    known = {w.name: w for w in world.words()}
    if word not in known:
        raise ValueError(f"unknown toy-world word {word!r}; see diffusers_fair.toy.world.words()")
    return known[word]


def _generate(pipe, prompt: str, num_images: int, seed: int, **sampling) -> torch.Tensor:
    """Images of ``prompt`` at ``pipe``'s native size; image ``i`` starts from the noise of ``(seed, prompt, i)``."""
    return generate(pipe, prompt, initial_noise(seed, prompt, num_images, latent_shape(pipe)), **sampling)


# --------------------------------------------------------------------------- classifier checks
@torch.no_grad()
def explicit_prompt_agreement(pipe, components: ToyComponents, images_per_prompt: int = 16, *, seed: int = 0,
                              guidance_scale: float = 4.0, num_inference_steps: int = 15,
                              batch_size: int = 32) -> dict[str, float]:
    """How often the classifier reads the trait an explicit prompt names, per attribute.

    For every class of every trait, generate from "a photo of the face of a person with <class>
    ..." and count the images classified as that class (faces not found count as misses). This
    measures the model and the classifier together: a lower bound on the classifier's accuracy on
    generated images, and the model's obedience to explicit prompts.
    """
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for name, classes in TRAITS.items():
        hits = 0
        for index, value in enumerate(classes):
            prompt = world.explicit_prompt(**{name: value})
            images = _generate(pipe, prompt, images_per_prompt, seed, guidance_scale=guidance_scale,
                               num_inference_steps=num_inference_steps, batch_size=batch_size)
            readout = read_faces(images, components, batch_size=batch_size)
            hits += int(((readout.probs[name].argmax(dim=1) == index) & readout.found).sum())
        out[name] = hits / (images_per_prompt * len(classes))
    return out


@torch.no_grad()
def reconstruction_accuracy(pipe, components: ToyComponents, num_images: int = 400, *,
                            seed: int = 0) -> dict[str, float]:
    """The classifier's accuracy on rendered portraits passed through the model's autoencoder.

    Encoding and decoding with ``pipe.vae`` gives images with the model's own blur and artefacts
    whose traits are known exactly, so this measures the detector and classifier on the model's
    image domain (faces not found count as errors).
    """
    from .render import random_traits, render

    rng = np.random.default_rng(seed)
    portraits = render(random_traits(num_images, rng), rng)
    vae = pipe.vae
    images = torch.from_numpy(portraits.images).to(vae.device, vae.dtype) * 2 - 1
    gen = torch.Generator().manual_seed(seed)
    latents = vae.encode(images).latent_dist.sample(generator=gen)
    decoded = (vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)
    readout = read_faces(decoded, components)
    accuracy = {}
    for name in TRAITS:
        right = (readout.probs[name].argmax(dim=1) == torch.from_numpy(portraits.traits[name])) & readout.found
        accuracy[name] = float(right.float().mean())
    return accuracy


# --------------------------------------------------------------------------- charts and the command
def plot(result: AuditResult, out_dir: Path) -> list[Path]:
    """One stacked bar chart per attribute: per word, the training skew (left, hatched) beside the
    generated frequencies (right); written as ``out_dir/audit_<attr>.png``."""
    plt = pyplot()

    paths = []
    names = [w.word for w in result.words]
    x = np.arange(len(names))
    for attr, classes in TRAITS.items():
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 3.6))
        colours = plt.get_cmap("tab10").colors
        for offset, key, hatch in ((-0.2, "skew", "//"), (0.2, "freqs", None)):
            bottom = np.zeros(len(names))
            for i, c in enumerate(classes):
                h = np.nan_to_num(np.array([getattr(w, key)[attr][i] for w in result.words]))
                ax.bar(x + offset, h, 0.38, bottom=bottom, color=colours[i], hatch=hatch, edgecolor="white",
                       linewidth=0.3, label=c if key == "freqs" else None)
                bottom += h
        s = result.summary[attr]
        ax.set_title(f"{attr} ({s.slot}): training skew (hatched) vs generated; correlation {s.correlation:.2f}")
        ax.set_xticks(x, names, rotation=70, fontsize=7)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.13, 1))
        fig.tight_layout()
        path = out_dir / f"audit_{attr}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> AuditResult:
    from diffusers import StableDiffusionPipeline

    from .components import load_toy_components

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a StableDiffusionPipeline folder (e.g. diffusers_fair.toy.model_path())")
    parser.add_argument("--split", choices=["train", "test", "all"], default="test")
    parser.add_argument("--group", default="occupation", help="occupation, sport, descriptor or all")
    parser.add_argument("--images-per-word", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--explicit", type=int, default=0,
                        help="also check explicit-trait prompts with this many images each")
    parser.add_argument("--reconstructions", type=int, default=0,
                        help="also measure the classifier on this many renders passed through the model's autoencoder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    components = load_toy_components()
    chosen = world.words(None if args.group == "all" else args.group, None if args.split == "all" else args.split)
    result = audit_pipeline(pipe, chosen, args.images_per_word, components, seed=args.seed,
                            guidance_scale=args.guidance_scale, num_inference_steps=args.steps,
                            batch_size=args.batch_size)
    result.settings.update(model=str(args.model), split=args.split, group=args.group)
    if args.explicit:
        result.settings["explicit_prompt_agreement"] = explicit_prompt_agreement(
            pipe, components, args.explicit, seed=args.seed, guidance_scale=args.guidance_scale,
            num_inference_steps=args.steps, batch_size=args.batch_size)
    if args.reconstructions:
        result.settings["reconstruction_accuracy"] = reconstruction_accuracy(pipe, components, args.reconstructions,
                                                                             seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "audit.json").write_text(result.to_json() + "\n")
    (args.out / "audit.md").write_text(result.to_markdown())
    plot(result, args.out)
    print(result.to_markdown().split("\n\n")[0])
    for key in ("explicit_prompt_agreement", "reconstruction_accuracy"):
        if key in result.settings:
            print(f"{key}:", {k: round(v, 3) for k, v in result.settings[key].items()})
    return result


if __name__ == "__main__":
    main()
