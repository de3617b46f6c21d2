"""The toy-world demo: audit a biased model, debias it with the paper's method, audit again.

    diffusers-fair demo --out demo-out            # about 15 minutes on 2 CPU cores
    diffusers-fair demo --quick --out demo-out    # a few minutes, a smaller run

Steps, all on the toy world shipped in the package (``diffusers_fair.toy``):

1. Audit the base model on the held-out occupation words: per word, the share of each trait that
   the toy classifier reads from the generated faces, and the paper's bias metric.
2. Train a text-encoder LoRA with the distributional alignment loss and adjusted direct finetuning,
   on the training words only, towards a uniform distribution of hair length (the gender slot) and
   of skin tone (the race slot), both at once.
3. Save the adaptor (``OUT/adaptor``), load it into a fresh stock pipeline with
   :func:`~diffusers_fair.pipeline.load_fair_adaptor` and audit the held-out words again, from the same noise.
4. Write ``report.json``, ``report.md``, bar charts of the distributions and before/after image grids.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .config import FairTrainingConfig
from .pipeline import load_fair_adaptor
from .targets import TargetDistribution
from .toy import model_path, world
from .toy.audit import AuditResult, audit_pipeline, generate, initial_latents
from .toy.render import TRAITS

DEBIASED = ("hair_length", "skin_tone")


@dataclass
class DemoSettings:
    """What the demo runs.

    Attributes:
        iterations: training iterations (one prompt and ``images_per_prompt`` images each).
        images_per_prompt: images generated per training iteration (the batch the loss aligns).
        images_per_word: images per held-out word in each audit.
        num_words: how many held-out words to audit (the first ones of the held-out split).
        learning_rate: AdamW learning rate of the LoRA weights.
        seed: seeds the training draws and the audit noise.
    """

    iterations: int = 100
    images_per_prompt: int = 8
    images_per_word: int = 16
    num_words: int = 20
    learning_rate: float = 4e-3
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(iterations=12, images_per_word=8, num_words=8)


def load_toy_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def targets() -> list[TargetDistribution]:
    return [TargetDistribution.uniform(name, TRAITS[name]) for name in DEBIASED]


def run_demo(out: str | Path, settings: DemoSettings | None = None) -> dict:
    """Run the demo into the folder ``out``; returns the report (also written as ``report.json``)."""
    from .toy.components import load_toy_components
    from .trainer import DistributionalAlignmentTrainer

    settings = settings or DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    components = load_toy_components()
    config = FairTrainingConfig.toy(
        num_iterations=settings.iterations, images_per_prompt=settings.images_per_prompt,
        micro_batch_size=settings.images_per_prompt, learning_rate=settings.learning_rate, seed=settings.seed,
        output_dir=str(out / "training"), checkpoint_every=0, sample_every=0,
    )
    held_out = world.words("occupation", "test")[: settings.num_words]
    audit = dict(seed=settings.seed, guidance_scale=config.guidance_scale, num_inference_steps=config.max_inference_steps)
    started = time.time()

    print(f"[1/3] auditing the base model on {len(held_out)} held-out words", flush=True)
    base = load_toy_pipeline()
    before = audit_pipeline(base, held_out, settings.images_per_word, components, **audit)

    print(f"[2/3] training a text-encoder LoRA for {settings.iterations} iterations", flush=True)
    prompts = [world.prompt(w) for w in world.words("occupation", "train")]
    trainer = DistributionalAlignmentTrainer(config, load_toy_pipeline(), targets(), prompts, components)
    trainer.train()
    trainer.save_adaptor(out / "adaptor", name="toy-gender-race", overwrite=True)

    print("[3/3] auditing the debiased model (adaptor loaded into a stock pipeline)", flush=True)
    adapted = load_toy_pipeline()
    load_fair_adaptor(adapted, out / "adaptor")
    after = audit_pipeline(adapted, held_out, settings.images_per_word, components, **audit)

    report = {
        "before": {a: before.summary[a].mean_bias for a in TRAITS},
        "after": {a: after.summary[a].mean_bias for a in TRAITS},
        "debiased": list(DEBIASED),
        "shares_before": {a: before.summary[a].shares for a in TRAITS},
        "shares_after": {a: after.summary[a].shares for a in TRAITS},
        "held_out_words": [w.name for w in held_out],
        "settings": asdict(settings),
        "audit": audit,
        "minutes": round((time.time() - started) / 60, 2),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    # Save again with the measured held-out bias, which the model card and the index then show.
    trainer.save_adaptor(out / "adaptor", name="toy-gender-race", overwrite=True,
                         metrics_before={f"held_out_bias/{a}": v for a, v in report["before"].items()},
                         metrics_after={f"held_out_bias/{a}": v for a, v in report["after"].items()})
    write_markdown(out, report)
    plot_bias(out, report)
    plot_shares(out, before, after)
    image_grid(out, base, adapted, held_out[:4], audit)
    print(f"done in {report['minutes']} min; report in {out / 'report.md'}", flush=True)
    return report


def write_markdown(out: Path, report: dict) -> Path:
    lines = ["# Toy-world demo: debiasing hair length (gender slot) and skin tone (race slot)", "",
             f"Held-out words: {', '.join(report['held_out_words'])}.", "",
             "| attribute | slot | bias before | bias after | debiased |", "|---|---|---|---|---|"]
    slots = {v: k for k, v in world.load_world()["slots"].items()}
    for a in TRAITS:
        lines.append(f"| {a} | {slots[a]} | {report['before'][a]:.3f} | {report['after'][a]:.3f} | "
                     f"{'yes' if a in report['debiased'] else 'no'} |")
    lines += ["", "Class shares over all held-out images:", "", "| attribute | before | after |", "|---|---|---|"]
    for a in TRAITS:
        fmt = lambda shares: ", ".join(f"{c} {v:.2f}" for c, v in shares.items())  # noqa: E731
        lines.append(f"| {a} | {fmt(report['shares_before'][a])} | {fmt(report['shares_after'][a])} |")
    lines += ["", "![bias](bias.png)", "", "![shares](shares.png)", "", "![images](images.png)", "",
              "Image grid: per word, the base model (top row) and the debiased model (bottom row) from the same noise.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bias(out: Path, report: dict) -> Path:
    plt = _pyplot()
    names = list(TRAITS)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(x - 0.2, [report["before"][a] for a in names], 0.4, label="base model")
    ax.bar(x + 0.2, [report["after"][a] for a in names], 0.4, label="with fair adaptor")
    ax.set_xticks(x, names)
    ax.set_ylabel("held-out bias (mean over words)")
    ax.legend()
    fig.tight_layout()
    path = out / "bias.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_shares(out: Path, before: AuditResult, after: AuditResult) -> Path:
    """Per word, the generated share of each class, before (left bar) and after (right bar)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(DEBIASED), 1, figsize=(10, 3.2 * len(DEBIASED)))
    names = [w.word for w in before.words]
    x = np.arange(len(names))
    colours = plt.get_cmap("tab10").colors
    for ax, attr in zip(axes, DEBIASED):
        for offset, result, hatch in ((-0.2, before, "//"), (0.2, after, None)):
            bottom = np.zeros(len(names))
            for i, c in enumerate(TRAITS[attr]):
                h = np.nan_to_num(np.array([w.freqs[attr][i] for w in result.words]))
                ax.bar(x + offset, h, 0.38, bottom=bottom, color=colours[i], hatch=hatch, edgecolor="white",
                       linewidth=0.3, label=c if result is after else None)
                bottom += h
        ax.set_title(f"{attr}: base model (hatched) vs with the fair adaptor")
        ax.set_xticks(x, names, rotation=60, fontsize=7)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.12, 1))
    fig.tight_layout()
    path = out / "shares.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def image_grid(out: Path, base, adapted, words: list, audit: dict, per_word: int = 8) -> Path:
    from torchvision.utils import save_image

    latents = initial_latents(base, per_word, audit["seed"])
    rows = []
    for word in words:
        for pipe in (base, adapted):
            rows.append(generate(pipe, world.prompt(word), latents, guidance_scale=audit["guidance_scale"],
                                 num_inference_steps=audit["num_inference_steps"], batch_size=per_word).cpu())
    path = out / "images.png"
    images = torch.nn.functional.interpolate(torch.cat(rows), scale_factor=3, mode="nearest")
    save_image(images, path, nrow=per_word, padding=2)
    return path
