"""The audit report: the files an audit's result is written to (``diffusers-fair eval`` writes them).

:func:`write_report` turns an :class:`~diffusers_fair.evaluation.results.EvalResult` into files anyone can
read: ``results.json`` (every number), ``report.md`` (tables), bar charts of the class frequencies
per prompt and overall (``charts/``), and image grids that show the reference (base) model's images
beside the audited model's images from the same noise (``grids/``)::

    diffusers-fair eval --model toy --adaptor toy-gender --prompts examples/prompts/toy_audit50.txt \\
        --images-per-prompt 8 --out audit/

Plots use matplotlib's Agg backend (no display needed); everything heavy is imported inside the
functions, so ``diffusers-fair --help`` stays fast.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from .._utils.io import replace_atomically
from .._utils.plotting import pyplot
from .results import EvalResult


GRID_ROWS = 8  # prompts per image-grid file
DPI = 90


# --------------------------------------------------------------------------- text
def short_labels(prompts: list[str], max_length: int = 40) -> list[str]:
    """The part of each prompt that differs from the others (common leading and trailing words cut).

    ``["a photo of the face of a judge, a person", "a photo of the face of a welder, a person"]``
    gives ``["judge,", "welder,"]``; labels are cut to ``max_length`` characters.
    """
    words = [p.split() for p in prompts]
    head = tail = 0
    if len(words) > 1:
        shortest = min(len(w) for w in words)
        while head < shortest - 1 and len({tuple(w[: head + 1]) for w in words}) == 1:
            head += 1
        while tail < shortest - head - 1 and len({tuple(w[len(w) - tail - 1 :]) for w in words}) == 1:
            tail += 1
    labels = [" ".join(w[head : len(w) - tail]).strip(",.;:") for w in words]
    return [label if len(label) <= max_length else label[: max_length - 3] + "..." for label in labels]


def _number(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _describe(model: dict | str | None) -> str:
    if model is None:
        return "none"
    if isinstance(model, str):
        return model
    adaptors = " + ".join(f"{a['source']}" + (f" (weight {a['weight']:g})" if a["weight"] != 1 else "") for a in model["adaptors"])
    return f"`{model['name_or_path'] or model['class']}`" + (f" with fair adaptor {adaptors}" if adaptors else "")


def _file_name(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", group.replace(" x ", "_x_"))


def markdown(result: EvalResult, figures: dict[str, list[str]] | None = None) -> str:
    """The report as markdown: settings, the summary table, class frequencies, per-prompt table, figures."""
    s = result.settings
    sources = ["reference", "model"] if result.has_reference else ["model"]
    summaries = {source: result.summary(source) for source in sources}
    model = summaries["model"]
    lines = ["# Fairness audit", "",
             f"- model: {_describe(s['model'])}", f"- reference: {_describe(s['reference'])}",
             f"- {model['num_prompts']} prompts, {s['images_per_prompt']} images each ({s['width']}x{s['height']}), seed {s['seed']}, "
             f"{s['num_inference_steps']} steps, guidance {s['guidance_scale']:g}",
             "- attributes read from the largest detected face of each image; images without a face are left out of the "
             "frequencies and counted in the no-face share",
             "- bias(P) = mean over class pairs of |f_i - f_j| per prompt (0 = uniform), mean ± std over prompts; the floor is "
             "the mean bias a perfectly uniform model scores with the same number of faces", ""]
    header = ["metric"] + [{"reference": "reference (base)", "model": "model"}[x] for x in sources]
    lines += ["## Summary", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in result.groups:
        cells = []
        for source in sources:
            g = summaries[source]["groups"][name]
            cells.append("-" if g["bias_mean"] is None else f"{g['bias_mean']:.3f} ± {g['bias_std']:.3f} (floor {g['bias_floor']:.3f})")
        lines.append(f"| bias {name} | " + " | ".join(cells) + " |")
    lines.append("| no-face share | " + " | ".join(_number(summaries[x]["no_face_share"]) for x in sources) + " |")
    if model["clip_t"] is not None:
        lines.append("| CLIP-T | " + " | ".join(f"{summaries[x]['clip_t']['mean']:.3f} ± {summaries[x]['clip_t']['std']:.3f}" for x in sources) + " |")
    for name, sim in model.get("similarity", {}).items():
        label = {"clip": "CLIP-I", "dino": "DINO"}.get(name, f"similarity ({name})")
        lines.append(f"| {label} to the reference image | - | {sim['mean']:.3f} ± {sim['std']:.3f} |")
    lines += ["", "## Class frequencies (mean over prompts)", "", "| attribute | " + " | ".join(header[1:]) + " |",
              "|---|" + "---|" * len(sources)]
    for name in result.attributes:
        cells = [", ".join(f"{c} {_number(f, 2)}" for c, f in zip(result.groups[name], summaries[x]["groups"][name]["freqs"]))
                 for x in sources]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += _prompt_table(result, sources)
    for title, paths in (figures or {}).items():
        lines += ["", f"## {title}", ""] + [f"![{Path(p).stem}]({p})" for p in paths]
    return "\n".join(lines) + "\n"


def _prompt_table(result: EvalResult, sources: list[str]) -> list[str]:
    rows = {source: result.prompt_metrics(source) for source in sources}
    note = " (reference → model)" if len(sources) == 2 else ""
    head = ["#", "prompt", "faces"] + [f"{a}: {'/'.join(c)}" for a, c in result.attributes.items()] + [f"bias {g}" for g in result.groups]
    lines = ["", f"## Per prompt{note}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def both(fmt) -> str:
        return " → ".join(fmt(rows[source][i]) for source in sources)

    for i, row in enumerate(rows["model"]):
        cells = [str(row["index"]), row["prompt"], both(lambda r: f"{r['num_faces']}/{r['num_images']}")]
        cells += [both(lambda r, a=a: "/".join(_number(f, 2) for f in r["freqs"][a])) for a in result.attributes]
        cells += [both(lambda r, g=g: _number(r["bias"][g], 2)) for g in result.groups]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --------------------------------------------------------------------------- figures
def _colours(plt, n: int):
    return plt.get_cmap("tab10" if n <= 10 else "tab20").colors


def plot_prompt_distributions(result: EvalResult, group: str, path: Path) -> Path:
    """Stacked bars of ``group``'s class frequencies per prompt (with a reference: hatched, left)."""
    import numpy as np

    plt = pyplot()
    classes = result.groups[group]
    labels = short_labels([p.prompt for p in result.prompts])
    x = np.arange(len(labels))
    sources = [("reference", -0.2, "//"), ("model", 0.2, None)] if result.has_reference else [("model", 0.0, None)]
    colours = _colours(plt, len(classes))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(labels) + 2.5), 4.2))
    for source, offset, hatch in sources:
        freqs = np.array([[np.nan if f is None else f for f in r["freqs"][group]] for r in result.prompt_metrics(source)])
        freqs = np.nan_to_num(freqs)
        bottom = np.zeros(len(labels))
        for k, name in enumerate(classes):
            ax.bar(x + offset, freqs[:, k], 0.38 if hatch or result.has_reference else 0.7, bottom=bottom,
                   color=colours[k % len(colours)], hatch=hatch, edgecolor="white", linewidth=0.3,
                   label=name if source == "model" else None)
            bottom += freqs[:, k]
    ax.set_title(f"{group} per prompt" + (" (hatched: reference)" if result.has_reference else ""), fontsize=9)
    ax.set_xticks(x, labels, rotation=70, fontsize=7, ha="right")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    width = fig.get_figwidth()
    fig.subplots_adjust(left=0.6 / width, right=1 - 1.3 / width, bottom=0.4, top=0.9)  # fixed margins: no extra layout pass
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_overall(result: EvalResult, path: Path) -> Path:
    """One panel per attribute / joint: mean class frequencies (reference and model); dashed: uniform."""
    import numpy as np

    plt = pyplot()
    groups = list(result.groups)
    sources = ["reference", "model"] if result.has_reference else ["model"]
    summaries = {source: result.summary(source)["groups"] for source in sources}
    widths = [max(2.0, 0.45 * len(result.groups[g]) + 1.0) for g in groups]
    fig, axes = plt.subplots(1, len(groups), figsize=(sum(widths) + 1, 3.4), gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, group in zip(axes[0], groups):
        classes = result.groups[group]
        x = np.arange(len(classes))
        step = 0.8 / len(sources)
        for i, source in enumerate(sources):
            freqs = [0.0 if f is None else f for f in summaries[source][group]["freqs"]]
            ax.bar(x - 0.4 + step * (i + 0.5), freqs, step, label=source, color=("#bbbbbb", "#1f77b4")[i + 2 - len(sources)])
        ax.axhline(1 / len(classes), color="black", linestyle="--", linewidth=0.8)
        ax.set_title(group, fontsize=9)
        tilt = len(classes) > 3 or max(len(c) for c in classes) > 8
        ax.set_xticks(x, classes, rotation=60 if tilt else 0, fontsize=7, ha="right" if tilt else "center")
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("class frequencies, mean over prompts (dashed: uniform)", fontsize=9)
    fig.subplots_adjust(left=0.5 / fig.get_figwidth(), right=1 - 0.2 / fig.get_figwidth(), bottom=0.25, top=0.82, wspace=0.35)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_grids(result: EvalResult, folder: Path, rows: int = GRID_ROWS) -> list[Path]:
    """Image grids, ``rows`` prompts per file: per prompt the reference's sample images, then the
    model's images from the same noise (same column = same starting latent)."""
    import numpy as np

    plt = pyplot()
    prompts = [p for p in result.prompts if p.samples is not None and p.samples.shape[0] > 0]
    paths = []
    for chunk_index, start in enumerate(range(0, len(prompts), rows)):
        chunk = prompts[start : start + rows]
        strips = []
        for p in chunk:
            parts = [p.reference_samples, p.samples] if p.reference_samples is not None else [p.samples]
            images = [np.concatenate(list(s.permute(0, 2, 3, 1).numpy()), axis=1) for s in parts]
            gap = np.full((images[0].shape[0], max(2, images[0].shape[0] // 8), 3), 255, dtype=np.uint8)
            strips.append(np.concatenate([images[0], gap, images[1]], axis=1) if len(images) == 2 else images[0])
        aspect = strips[0].shape[1] / strips[0].shape[0]
        fig, axes = plt.subplots(len(chunk), 1, figsize=(min(16.0, 1.4 * aspect + 0.5), 1.55 * len(chunk)), squeeze=False)
        for ax, p, strip in zip(axes[:, 0], chunk, strips):
            ax.imshow(strip, interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(p.prompt, fontsize=7, loc="left")
        if result.has_reference:
            fig.suptitle("left: reference (base) model; right: audited model; same noise per column", fontsize=8)
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.45 / fig.get_figheight(), hspace=0.3)
        path = folder / f"grid_{chunk_index:02d}.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(result: EvalResult, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``report.md``, ``charts/*.png`` and ``grids/*.png`` into ``out_dir``."""
    out = Path(out_dir)
    (out / "charts").mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "report": out / "report.md"}
    figures: dict[str, list[str]] = {}
    if plots:
        paths["overall"] = plot_overall(result, out / "charts" / "overall.png")
        figures["Overall distribution"] = [os.path.relpath(paths["overall"], out)]
        figures["Per-prompt distributions"] = []
        for group in result.groups:
            path = plot_prompt_distributions(result, group, out / "charts" / f"prompts_{_file_name(group)}.png")
            paths[f"prompts {group}"] = path
            figures["Per-prompt distributions"].append(os.path.relpath(path, out))
        grids = plot_grids(result, out / "grids")
        figures["Image grids"] = [os.path.relpath(p, out) for p in grids]
        paths.update({f"grid {i}": p for i, p in enumerate(grids)})
    # Each file under a temporary name, then renamed: a report interrupted half-way is absent, not partial.
    for key, text in (("results", json.dumps(result.to_dict(), indent=1) + "\n"), ("report", markdown(result, figures))):
        replace_atomically(paths[key], lambda temporary, text=text: temporary.write_text(text, encoding="utf-8"))
    return paths
