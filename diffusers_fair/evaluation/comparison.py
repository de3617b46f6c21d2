"""Methods side by side: held-out bias against similarity to the base images, the paper's Table 1.

A comparison is a dict, written as ``comparison.json``::

    {"targeted": ["hair_length", "skin_tone"],
     "methods": {"base": {"bias": {"hair_length": 0.78, ...}, "similarity": 1.0, "seconds": 0.0, ...},
                 "ours": {...}, "fair-diffusion": {...}, ...},
     "settings": {...}}

Per method: ``bias`` (attribute -> mean bias over the audited prompts, every attribute read),
``similarity`` (mean cosine similarity of the method's images to the base model's from the same
noise; 1 for the base model), ``seconds`` (the time to apply the method: training, editing or
calibrating; 0 for prompt rewriting) and ``audit_seconds`` (the time to generate and read the audit's
images, where per-image costs such as extra guidance passes show), and ``changes_prompt``.

A method is on the **Pareto front** of an attribute when no other method has at most its bias
and at least its similarity, one of them strictly (:func:`pareto_front`). :func:`write_comparison`
writes the JSON, ``comparison.md`` (the table) and ``comparison.png`` (one panel per targeted
attribute: bias against similarity, the front joined by a line).
"""

from __future__ import annotations

import json
from pathlib import Path

from .._utils.plotting import pyplot


# The methods a comparison can hold besides the base model (docs/BASELINES.md), and those that rewrite the prompt.
METHODS = ("ours", "prompt", "ethical", "fair-diffusion", "uce", "debias-vl")
CHANGES_PROMPT = frozenset({"prompt", "ethical"})


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names whose ``(bias, similarity)`` no other point dominates (lower bias is better, higher similarity)."""
    front = []
    for name, (bias, similarity) in points.items():
        dominated = any(b <= bias and s >= similarity and (b < bias or s > similarity)
                        for other, (b, s) in points.items() if other != name)
        if not dominated:
            front.append(name)
    return front


def check_methods(methods, uce_concepts: str) -> None:
    """Raise a ValueError for a method not in :data:`METHODS` or UCE concepts other than held-out or train."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if uce_concepts not in ("held-out", "train"):
        raise ValueError(f"uce_concepts must be 'held-out' or 'train', got {uce_concepts!r}")


def check_comparison(comparison: dict) -> None:
    """Raise a ValueError naming what is missing from a comparison dict (see the module doc)."""
    if not comparison.get("targeted"):
        raise ValueError("comparison has no targeted attributes")
    methods = comparison.get("methods") or {}
    if "base" not in methods:
        raise ValueError("comparison has no 'base' method to compare with")
    for name, record in methods.items():
        missing = [a for a in comparison["targeted"] if a not in record.get("bias", {})]
        if missing or "similarity" not in record:
            raise ValueError(f"method {name!r} lacks the bias of {missing} or its similarity")


def add_pareto(comparison: dict) -> dict:
    """Mark each method's ``pareto`` list: the targeted attributes on whose front it lies."""
    check_comparison(comparison)
    methods = comparison["methods"]
    for record in methods.values():
        record["pareto"] = []
    for attribute in comparison["targeted"]:
        points = {n: (r["bias"][attribute], r["similarity"]) for n, r in methods.items()}
        for name in pareto_front(points):
            methods[name]["pareto"].append(attribute)
    return comparison


def comparison_markdown(comparison: dict) -> str:
    """The Table-1 layout: bias per attribute (targeted ones first), similarity, time, the Pareto fronts."""
    targeted = list(comparison["targeted"])
    attributes = targeted + [a for a in next(iter(comparison["methods"].values()))["bias"] if a not in targeted]
    head = ["method", "prompt"] + [f"bias {a}" + ("" if a in targeted else " (untargeted)") for a in attributes]
    head += ["similarity", "time to apply (s)", "audit time (s)", "Pareto front"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in comparison["methods"].items():
        cells = [name, "changed" if r.get("changes_prompt") else "kept"]
        cells += ["-" if r["bias"][a] is None else f"{r['bias'][a]:.3f}" for a in attributes]  # None: no face
        cells += [f"{r['similarity']:.3f}", f"{r.get('seconds', 0.0):.0f}", f"{r.get('audit_seconds', 0.0):.0f}",
                  ", ".join(r.get("pareto", [])) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    settings = comparison.get("settings", {})
    lines += ["", "Bias: the paper's bias(P), mean over the audited prompts (0: balanced). Similarity: mean cosine "
              "similarity of each image to the base model's image from the same noise.",
              "Pareto front: no other method has at most this bias and at least this similarity for the attribute."]
    if settings:
        lines += ["", "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items() if not isinstance(v, (dict, list)))
                  + "."]
    return "\n".join(lines) + "\n"


def plot_comparison(comparison: dict, path: str | Path) -> Path:
    """One panel per targeted attribute: each method's bias against its similarity, the Pareto front joined."""
    plt = pyplot()
    targeted = comparison["targeted"]
    methods = comparison["methods"]
    fig, axes = plt.subplots(1, len(targeted), figsize=(5.2 * len(targeted), 4.2), squeeze=False)
    for ax, attribute in zip(axes[0], targeted):
        points = {n: (r["bias"][attribute], r["similarity"]) for n, r in methods.items()}
        front = sorted(pareto_front(points), key=lambda n: points[n][1])
        ax.plot([points[n][1] for n in front], [points[n][0] for n in front], color="0.6", linestyle="--",
                zorder=1, label="Pareto front")
        for name, (bias, similarity) in points.items():
            marker = "s" if methods[name].get("changes_prompt") else "o"
            ax.scatter(similarity, bias, marker=marker, s=60 if name in front else 30, zorder=2,
                       edgecolors="black" if name in front else "none")
            ax.annotate(name, (similarity, bias), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel("similarity to the base images")
        ax.set_ylabel(f"held-out bias: {attribute}")
        ax.set_title(f"{attribute} (squares change the prompt)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_comparison(comparison: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``comparison.json``, ``comparison.md`` and ``comparison.png`` into ``out_dir`` (Pareto marks added).

    Raises:
        ValueError: when the comparison lacks the base model, a targeted attribute's bias or a similarity.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    add_pareto(comparison)
    paths = {"json": out / "comparison.json", "markdown": out / "comparison.md", "picture": out / "comparison.png"}
    paths["json"].write_text(json.dumps(comparison, indent=2) + "\n")
    paths["markdown"].write_text(comparison_markdown(comparison) + "\n![bias against similarity](comparison.png)\n")
    plot_comparison(comparison, paths["picture"])
    return paths
