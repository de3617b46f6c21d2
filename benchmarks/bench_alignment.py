"""Speed and accuracy of the expected optimal-transport targets.

Figures:
1. Exact targets, two classes (closed form), N = 4096 images.
2. Monte Carlo targets, gender x race (K = 8 cells), N = 64 images, 2,000 label draws.
3. The same expectation estimated the way the original release does it: 100 label draws, each
   solved with POT's exact solver ``ot.emd`` in a Python loop, the cost matrix built in Python.
   Both estimators are compared at equal estimation error, measured against a high-sample
   reference.

Run (POT is the ``bench`` extra: ``pip install -e ".[bench]"``)::

    OMP_NUM_THREADS=1 python benchmarks/bench_alignment.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from diffusers_fair import TargetDistribution, expected_ot_targets


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` calls (after one warm-up), and its last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def official_scheme(probs: dict[str, torch.Tensor], target: TargetDistribution, num_samples: int, seed: int):
    """Monte Carlo as in the original release: labels drawn per sample, Python-built cost, ot.emd."""
    import ot

    rng = np.random.default_rng(seed)
    p = torch.cat([probs[a] for a in target.attributes], dim=1).tolist()  # concatenated per image
    cells = target.cell_class_indices().tolist()
    offsets = np.cumsum([0, *target.shape[:-1]]).tolist()
    width = sum(target.shape)
    one_hots = []
    for cell in cells:
        u = [0.0] * width
        for offset, index in zip(offsets, cell):
            u[offset + index] = 1.0
        one_hots.append(u)
    n = len(p)
    weights = np.full(n, 1.0 / n)
    q = np.zeros((n, len(cells)))
    for _ in range(num_samples):
        labels = rng.choice(len(cells), size=n, p=target.probs.numpy())
        cost = [[sum((pi[d] - one_hots[j][d]) ** 2 for d in range(width)) for j in labels] for pi in p]
        plan = ot.emd(weights, weights, np.array(cost))
        q[np.arange(n), labels[plan.argmax(axis=1)]] += 1.0
    return q / num_samples


def rms_error(q, reference) -> float:
    return float(np.sqrt(np.mean((np.asarray(q) - np.asarray(reference)) ** 2)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (median)")
    parser.add_argument("--error-seeds", type=int, default=5, help="independent estimates per error figure")
    parser.add_argument("--reference-samples", type=int, default=100_000, help="draws for the reference q")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    print("threads:", torch.get_num_threads())
    print()
    print("| figure | setting | median time |")
    print("|---|---|---|")

    # 1. Closed form, K = 2, N = 4096.
    probs2 = torch.softmax(2 * torch.randn(4096, 2), dim=1)
    gender = TargetDistribution.uniform("gender", ["male", "female"])
    t, _ = timed(lambda: expected_ot_targets(probs2, gender), repeats=max(args.repeats, 20))
    print(f"| exact, closed form | K=2, N=4096 | {t * 1e3:.2f} ms |")

    # 2. Monte Carlo, gender x race, N = 64, 2000 draws.
    race = TargetDistribution.uniform("race", ["wmelh", "asian", "black", "indian"])
    joint = gender * race
    n = 64
    probs = {
        "gender": torch.softmax(2 * torch.randn(n, 2), dim=1),
        "race": torch.softmax(2 * torch.randn(n, 4), dim=1),
    }

    def ours(samples, seed):
        return expected_ot_targets(probs, joint, num_samples=samples, generator=torch.Generator().manual_seed(seed))

    t, _ = timed(lambda: ours(2000, 0), repeats=args.repeats)
    print(f"| Monte Carlo | K=8 (gender x race), N=64, 2000 draws | {t:.3f} s |")
    print()

    # 3. Equal-error comparison against the original scheme.
    start = time.perf_counter()
    reference = ours(args.reference_samples, 10_000).numpy()
    print(f"reference: {args.reference_samples} draws in {time.perf_counter() - start:.1f} s")
    print()
    print("| estimator | draws | RMS error vs reference | median time | time ratio (original / ours) |")
    print("|---|---|---|---|---|")
    t_official, _ = timed(lambda: official_scheme(probs, joint, 100, 0), repeats=args.repeats)
    err_official = statistics.fmean(
        rms_error(official_scheme(probs, joint, 100, seed), reference) for seed in range(1, 1 + args.error_seeds)
    )
    print(f"| original (ot.emd loop) | 100 | {err_official:.4f} | {t_official * 1e3:.1f} ms | 1 |")
    for samples in (100, 500, 2000):
        t_ours, _ = timed(lambda: ours(samples, 0), repeats=args.repeats)
        err = statistics.fmean(
            rms_error(ours(samples, seed).numpy(), reference) for seed in range(1, 1 + args.error_seeds)
        )
        print(f"| ours | {samples} | {err:.4f} | {t_ours * 1e3:.1f} ms | {t_official / t_ours:.1f} |")


if __name__ == "__main__":
    main()
