"""The paper's debiasing experiments on the toy world (Table 1, Table 5, soft tokens, U-Net LoRA).

    python examples/toy_paper_effects.py --out results/toy                  # all runs, ~10-15 min each
    python examples/toy_paper_effects.py --out results/toy --only gender race
    python examples/toy_paper_effects.py --out /tmp/toy --quick --only gender  # a smoke run

Every run is the demo's procedure (``diffusers_fair.demo.run_experiment``) with other targets or
other trained weights: audit the base model on the held-out words, train on the training words,
audit again with the adaptor loaded into a stock pipeline. The base model is audited once and
shared by all runs. Each run writes its folder ``OUT/<name>/`` (report, plots, adaptor); the
script then writes ``OUT/summary.md`` and ``OUT/summary.json`` with one row per run:

* ``gender``, ``race``, ``gender-race``: Table 1, uniform hair length (the gender slot), uniform
  skin tone (the race slot), and both;
* ``gender-race-age``: Table 5, both uniform and hair colour (the age slot) at 75% dark / 25% grey;
* ``soft-tokens``: the gender slot with 5 soft tokens and no LoRA;
* ``unet-lora``: the gender slot with a U-Net LoRA instead of a text-encoder LoRA.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffusers_fair.demo import (
    DemoSettings,
    ToyExperiment,
    audit_base_model,
    demo_experiment,
    run_experiment,
    uniform,
)
from diffusers_fair.evaluation import bias_floor
from diffusers_fair.targets import TargetDistribution
from diffusers_fair.toy.components import load_toy_components
from diffusers_fair.toy.render import TRAITS


def experiments() -> dict[str, ToyExperiment]:
    return {
        "gender": ToyExperiment("toy-gender", "Table 1: uniform hair length (gender slot)", [uniform("hair_length")]),
        "race": ToyExperiment("toy-race", "Table 1: uniform skin tone (race slot)", [uniform("skin_tone")]),
        "gender-race": demo_experiment(),
        "gender-race-age": ToyExperiment(
            "toy-gender-race-age", "Table 5: uniform hair length and skin tone, hair colour 75% dark / 25% grey",
            [uniform("hair_length"), uniform("skin_tone"), TargetDistribution("hair_colour", {"dark": 0.75, "grey": 0.25})],
        ),
        "soft-tokens": ToyExperiment(
            "toy-gender-soft-tokens", "Soft tokens only (5 tokens): uniform hair length", [uniform("hair_length")],
            trainable={"train_text_encoder_lora": False, "num_soft_tokens": 5},
        ),
        "unet-lora": ToyExperiment(
            "toy-gender-unet-lora", "U-Net LoRA instead of text-encoder LoRA: uniform hair length", [uniform("hair_length")],
            trainable={"train_text_encoder_lora": False, "train_unet_lora": True},
        ),
    }


def summary_markdown(reports: dict[str, dict]) -> str:
    lines = ["| run | trained | targeted | " + " | ".join(f"{a} bias before → after" for a in TRAITS)
             + " | grey share after | similarity | minutes |",
             "|---|---|---|" + "---|" * len(TRAITS) + "---|---|---|"]
    for name, r in reports.items():
        trained = ", ".join(f"{k}={v}" for k, v in r["trainable"].items()) or "text-encoder LoRA"
        cells = [f"{r['before'][a]:.3f} → **{r['after'][a]:.3f}**" if a in r["debiased"]
                 else f"{r['before'][a]:.3f} → {r['after'][a]:.3f}" for a in TRAITS]
        lines.append(f"| {name} | {trained} | {', '.join(r['debiased'])} | " + " | ".join(cells)
                     + f" | {r['shares_after']['hair_colour']['grey']:.3f} | {r['similarity']:.3f} | {r['minutes']} |")
    return "\n".join(lines) + "\n"


def plot_summary(reports: dict[str, dict], path: Path) -> None:
    """Held-out bias before (hatched) and after each run, one group of bars per run and attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TRAITS), figsize=(4.2 * len(TRAITS), 3.6), sharey=True)
    names = list(reports)
    for ax, attribute in zip(axes, TRAITS):
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [reports[n]["before"][attribute] for n in names], 0.4, color="lightgray",
               hatch="//", edgecolor="gray", label="base model")
        colours = ["tab:green" if attribute in reports[n]["debiased"] else "tab:gray" for n in names]
        ax.bar([i + 0.2 for i in x], [reports[n]["after"][attribute] for n in names], 0.4, color=colours,
               label="after (green: targeted)")
        images = reports[names[0]]["settings"]["images_per_word"]
        ax.axhline(bias_floor(len(TRAITS[attribute]), images), color="black", linestyle="--", linewidth=0.8,
                   label=f"a balanced model, {images} images")
        ax.set_title(attribute)
        ax.set_xticks(list(x), names, rotation=45, ha="right", fontsize=8)
    axes[0].set_ylabel("held-out bias (mean over words)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="+", choices=list(experiments()), help="run only these experiments")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick sizes (a smoke run, not a result)")
    parser.add_argument("--iterations", type=int, help="override the demo's training iterations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summary-only", action="store_true", help="rewrite the summary files from summary.json")
    args = parser.parse_args(argv)
    summary = args.out / "summary.json"
    if args.summary_only:
        merged = json.loads(summary.read_text())
        (args.out / "summary.md").write_text(summary_markdown(merged))
        plot_summary(merged, args.out / "summary.png")
        return merged
    torch.set_num_threads(args.threads)
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.iterations is not None:
        settings.iterations = args.iterations
    chosen = {name: experiments()[name] for name in args.only} if args.only else experiments()  # in the order asked
    args.out.mkdir(parents=True, exist_ok=True)

    print("auditing the base model once for all runs", flush=True)
    before = audit_base_model(settings, load_toy_components())
    reports = {}
    merged = json.loads(summary.read_text()) if summary.exists() else {}
    for name, experiment in chosen.items():
        print(f"=== {name}: {experiment.title}", flush=True)
        reports[name] = merged[name] = run_experiment(args.out / name, experiment, settings, before=before)
        # The summary is rewritten after every run, so an interrupted series keeps what it measured.
        summary.write_text(json.dumps(merged, indent=2) + "\n")
        (args.out / "summary.md").write_text(summary_markdown(merged))
        plot_summary(merged, args.out / "summary.png")
    print(summary_markdown(merged))
    return reports


if __name__ == "__main__":
    main()
