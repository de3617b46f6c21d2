"""The toy world's Table 1 over seeds: the fair adaptor against the published alternatives.

    OMP_NUM_THREADS=1 python benchmarks/toy_compare.py --out results/compare --seeds 0 1 2

runs ``diffusers-fair compare`` (``diffusers_fair.toy.compare.run_comparison``) once per seed into
``OUT/seed<N>/`` and writes ``OUT/summary.md``: per method, the mean ± std over the seeds of the
held-out bias of each trait and of the similarity, and on how many seeds it lay on each targeted
attribute's Pareto front. A seed already finished (its ``comparison.json`` has every method) is
read back, not run again.

    python benchmarks/toy_compare.py --out results/compare --seeds 0 1 2 --remeasure ours

audits the base model and the methods named again in finished seeds (after a shipped adaptor
changed, say) and puts their new records in place of the old ones; the other methods are kept. The
base model's audit must come out as it was, or the seed is refused (its settings differ).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from diffusers_fair.evaluation.comparison import METHODS, write_comparison
from diffusers_fair.toy.compare import CompareSettings, run_comparison


def summary(comparisons: dict[int, dict]) -> str:
    """Mean ± std over seeds per method and trait, the similarity, and the seeds on each Pareto front."""
    first = next(iter(comparisons.values()))
    targeted, names = first["targeted"], list(first["methods"])
    traits = list(first["methods"]["base"]["bias"])
    head = ["method"] + [f"bias {t}" for t in traits] + ["similarity"] + [f"front {t}" for t in targeted]
    lines = [f"Seeds {', '.join(map(str, comparisons))}; mean ± std over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        rows = [c["methods"][name] for c in comparisons.values()]
        cells = [name]
        for t in traits:
            values = np.array([r["bias"][t] for r in rows])
            cells.append(f"{values.mean():.3f} ± {values.std():.3f}")
        similarity = np.array([r["similarity"] for r in rows])
        cells.append(f"{similarity.mean():.3f} ± {similarity.std():.3f}")
        cells += [f"{sum(t in r['pareto'] for r in rows)}/{len(rows)}" for t in targeted]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def remeasure(comparison: dict, folder: Path, methods: list[str], settings: CompareSettings) -> None:
    """Audit the base model and ``methods`` again and put their records into ``comparison`` (written to ``folder``).

    Raises:
        ValueError: the base model's bias or shares differ from the recorded ones (other settings).
    """
    with tempfile.TemporaryDirectory() as scratch:
        fresh = run_comparison(scratch, methods, settings)
    old, new = comparison["methods"]["base"], fresh["methods"]["base"]
    if (old["bias"], old["shares"]) != (new["bias"], new["shares"]):
        raise ValueError(f"{folder}: the base model's audit differs from the recorded one ({old['bias']} against "
                         f"{new['bias']}); run the seed afresh in another folder")
    for name in methods:
        comparison["methods"][name] = fresh["methods"][name]
    write_comparison(comparison, folder)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--train", action="store_true", help="train our adaptor per seed instead of the shipped one")
    parser.add_argument("--uce-iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--remeasure", nargs="+", choices=METHODS, default=[],
                        help="audit these methods again in finished seeds and replace their records")
    args = parser.parse_args(argv)
    comparisons = {}
    for seed in args.seeds:
        folder = args.out / f"seed{seed}"
        done = folder / "comparison.json"
        settings = CompareSettings(seed=seed, train=args.train, uce_iterations=args.uce_iterations, threads=args.threads)
        if done.exists() and set(args.methods) <= set(json.loads(done.read_text())["methods"]):
            comparisons[seed] = json.loads(done.read_text())
            if args.remeasure:
                remeasure(comparisons[seed], folder, args.remeasure, settings)
            continue
        comparisons[seed] = run_comparison(folder, args.methods, settings)
    (args.out / "summary.md").write_text(summary(comparisons))
    print(summary(comparisons))


if __name__ == "__main__":
    main()
