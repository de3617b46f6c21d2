"""The paper's debiasing experiments on the toy world (Table 1, Table 5, soft tokens, U-Net LoRA).

    python examples/toy_paper_effects.py --out results/toy                  # all runs, ~10-15 min each
    python examples/toy_paper_effects.py --out results/toy --only gender race
    python examples/toy_paper_effects.py --out /tmp/toy --quick --only gender  # a smoke run
    python examples/toy_paper_effects.py --out results/seeds --only gender-race --seeds 0 1 2
    python examples/toy_paper_effects.py --out results/no-preserve --no-preserve   # the paper's loss alone

Every run is a toy experiment config shipped in the package (``diffusers_fair/toy/configs/<config>.yaml``,
linked from ``examples/configs/toy_<config>.yaml``, the ones ``diffusers-fair train`` runs) put through
the demo's procedure (``diffusers_fair.toy.demo.run_experiment``): audit the base model on the
held-out words, train on the training words, audit again with the adaptor loaded into a stock
pipeline. The base model is audited once and shared by all runs. Each run writes its folder
``OUT/<name>/`` (report, plots, adaptor); the script then writes ``OUT/summary.md`` and
``OUT/summary.json`` with one row per run:

* ``gender``, ``race``, ``gender-race`` (the demo's run): Table 1, uniform hair length (the gender
  slot), uniform skin tone (the race slot), and both;
* ``gender-race-age``: Table 5, both uniform and hair colour (the age slot) at 75% dark / 25% grey,
  with the image-semantics weight 8 and a cosine learning-rate decay;
* ``soft-tokens``: the gender slot with 5 soft tokens and no LoRA;
* ``unet-lora``: the gender slot with a U-Net LoRA instead of a text-encoder LoRA.

``--seeds`` repeats each run with other seeds (the training draws and the audit noise; the base
model is audited once per seed) into ``OUT/<name>/seed<k>/``; the summary then adds the mean and
standard deviation over the seeds of each targeted attribute's after / before ratio.

Every run holds the traits it does not target where the base model draws them (``preserve``, on by
default); ``--no-preserve`` trains with the paper's loss alone (``preserve=[]``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from diffusers_fair._utils.plotting import pyplot
from diffusers_fair.evaluation.metrics import bias_floor
from diffusers_fair.toy.components import load_toy_components
from diffusers_fair.toy.demo import DemoSettings, ToyExperiment, audit_base_model, run_experiment
from diffusers_fair.toy.experiment import toy_config_path
from diffusers_fair.toy.render import TRAITS


# Each run's shipped config (diffusers_fair/toy/configs/<config>.yaml), in the order the runs go.
RUNS = {"gender": "gender", "race": "race", "gender-race": "gender_race", "gender-race-age": "gender_race_age",
        "soft-tokens": "soft_tokens", "unet-lora": "unet_lora"}


def experiments() -> dict[str, ToyExperiment]:
    """Every run, read from its config."""
    return {run: ToyExperiment.from_config(toy_config_path(config)) for run, config in RUNS.items()}


def untargeted_change(report: dict) -> float:
    """The largest change of a class share, before → after, over the traits the run does not target (0 if none)."""
    before, after = report["shares_before"], report["shares_after"]
    return max((abs(after[a][c] - before[a][c]) for a in before if a not in report["debiased"] for c in before[a]),
               default=0.0)


def summary_markdown(reports: dict[str, dict]) -> str:
    lines = ["| run | trained | targeted | " + " | ".join(f"{a} bias before → after" for a in TRAITS)
             + " | grey share after | largest untargeted share change | similarity | minutes |",
             "|---|---|---|" + "---|" * len(TRAITS) + "---|---|---|---|"]
    for name, r in reports.items():
        trained = ", ".join(f"{k}={v}" for k, v in r["trainable"].items()) or "text-encoder LoRA"
        cells = [f"{r['before'][a]:.3f} → **{r['after'][a]:.3f}**" if a in r["debiased"]
                 else f"{r['before'][a]:.3f} → {r['after'][a]:.3f}" for a in TRAITS]
        lines.append(f"| {name} | {trained} | {', '.join(r['debiased'])} | " + " | ".join(cells)
                     + f" | {r['shares_after']['hair_colour']['grey']:.3f} | {untargeted_change(r):.3f}"
                     + f" | {r['similarity']:.3f} | {r['minutes']} |")
    return "\n".join(lines) + "\n"


def seed_statistics(reports: dict[str, dict]) -> dict[str, dict]:
    """Mean and standard deviation over seeds, per experiment, of each targeted attribute's held-out
    bias after / before, of the grey share after and of the largest untargeted share change
    (:func:`untargeted_change`), with the number of seeds where that change is at most 0.05. Runs are
    grouped by their ``experiment`` name; a single run gets a standard deviation of 0."""
    groups: dict[str, list[dict]] = {}
    for report in reports.values():
        groups.setdefault(report["experiment"], []).append(report)
    out = {}
    for experiment, runs in groups.items():
        ratios = {a: [r["after"][a] / r["before"][a] for r in runs] for a in runs[0]["debiased"]}
        grey = [r["shares_after"]["hair_colour"]["grey"] for r in runs]
        change = [untargeted_change(r) for r in runs]
        out[experiment] = {
            "seeds": [r["settings"]["seed"] for r in runs],
            "ratio_mean": {a: statistics.fmean(v) for a, v in ratios.items()},
            "ratio_std": {a: statistics.pstdev(v) for a, v in ratios.items()},
            "grey_mean": statistics.fmean(grey),
            "grey_std": statistics.pstdev(grey),
            "untargeted_change_mean": statistics.fmean(change),
            "untargeted_change_std": statistics.pstdev(change),
            "untargeted_within_0.05": sum(c <= 0.05 for c in change),
        }
    return out


def seed_markdown(reports: dict[str, dict]) -> str:
    """The table of :func:`seed_statistics`: held-out bias after / before, mean ± std over seeds."""
    lines = ["| experiment | seeds | targeted: after / before (mean ± std) | grey share after "
             "| largest untargeted share change (seeds within 0.05) |", "|---|---|---|---|---|"]
    for experiment, s in seed_statistics(reports).items():
        ratios = ", ".join(f"{a} {s['ratio_mean'][a]:.2f} ± {s['ratio_std'][a]:.2f}" for a in s["ratio_mean"])
        lines.append(f"| {experiment} | {', '.join(map(str, s['seeds']))} | {ratios} | "
                     f"{s['grey_mean']:.2f} ± {s['grey_std']:.2f} | {s['untargeted_change_mean']:.3f} ± "
                     f"{s['untargeted_change_std']:.3f} ({s['untargeted_within_0.05']}/{len(s['seeds'])}) |")
    return "\n".join(lines) + "\n"


def plot_summary(reports: dict[str, dict], path: Path) -> None:
    """Held-out bias before (hatched) and after each run, one group of bars per run and attribute."""
    plt = pyplot()

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
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"],
                        help="override the demo's learning-rate schedule (an experiment's own settings win)")
    parser.add_argument("--seeds", type=int, nargs="+", help="repeat each run with these seeds (default: the demo's seed)")
    parser.add_argument("--no-preserve", action="store_true",
                        help="train without holding the untargeted traits (preserve=[], the paper's loss)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summary-only", action="store_true", help="rewrite the summary files from summary.json")
    args = parser.parse_args(argv)
    summary = args.out / "summary.json"
    if args.summary_only:
        merged = json.loads(summary.read_text())
        write_summary(merged, args.out)
        return merged
    torch.set_num_threads(args.threads)
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.iterations is not None:
        settings.iterations = args.iterations
    if args.lr_schedule is not None:
        settings.lr_schedule = args.lr_schedule
    seeds = args.seeds or [settings.seed]
    chosen = {name: experiments()[name] for name in args.only} if args.only else experiments()  # in the order asked
    if args.no_preserve:
        chosen = {name: replace(e, trainable={**e.trainable, "preserve": []}) for name, e in chosen.items()}
    args.out.mkdir(parents=True, exist_ok=True)

    reports = {}
    merged = json.loads(summary.read_text()) if summary.exists() else {}
    for seed in seeds:
        seeded = replace(settings, seed=seed)
        print(f"auditing the base model once for all runs (seed {seed})", flush=True)
        before = audit_base_model(seeded, load_toy_components())
        for name, experiment in chosen.items():
            key, folder = (name, args.out / name) if args.seeds is None else (f"{name}/seed{seed}", args.out / name / f"seed{seed}")
            print(f"=== {key}: {experiment.title}", flush=True)
            reports[key] = merged[key] = run_experiment(folder, experiment, seeded, before=before)
            # The summary is rewritten after every run, so an interrupted series keeps what it measured.
            summary.write_text(json.dumps(merged, indent=2) + "\n")
            write_summary(merged, args.out)
    print((args.out / "summary.md").read_text())
    return reports


def write_summary(reports: dict[str, dict], out: Path) -> None:
    """``summary.md`` (one row per run; with several seeds of a run, also their mean) and ``summary.png``."""
    text = summary_markdown(reports)
    if len({r["settings"]["seed"] for r in reports.values()}) > 1:
        text += "\nHeld-out bias after / before over seeds:\n\n" + seed_markdown(reports)
    (out / "summary.md").write_text(text)
    plot_summary(reports, out / "summary.png")


if __name__ == "__main__":
    main()
