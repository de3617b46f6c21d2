"""Distributional alignment: expected optimal-transport targets and the alignment loss.

This file is the heart of the method; it can be read on its own.

The problem
-----------
A prompt produces a batch of ``N`` images. An attribute classifier gives each image ``i`` a
probability vector ``p_i`` over ``K`` classes. We want the batch to follow a *target
distribution* ``r`` (say 50% male, 50% female), not to push every image towards one class. So
each image needs its own target class, chosen so that (a) the classes over the batch follow ``r``
and (b) each image moves as little as possible.

Expected optimal-transport targets (the paper's eq. 4-5)
--------------------------------------------------------
Draw ``N`` i.i.d. labels ``u_1..u_N`` from ``r`` (one-hot vectors). Match images to labels with the
optimal transport between the two sets of ``N`` points, cost ``|p_i - u_j|^2``; with equal
weights this is an assignment ``sigma`` (a permutation). Image ``i`` receives label
``u_sigma(i)``. The labels are random, so we take the expectation::

    q_i = E_u[ u_sigma*(i) ]          q[i, k] = P(image i is assigned class k)

Each row of ``q`` is a distribution, and the column means of ``q`` equal ``r`` exactly (every
draw hands out its labels to someone). The dynamic target of image ``i`` is ``argmax_k q[i, k]``,
its confidence ``max_k q[i, k]``; images with confidence below ``C = 0.8`` are left alone this step.

How ``q`` is computed (:func:`expected_ot_targets`)
---------------------------------------------------
The assignment depends on the labels only through their *counts* ``n = (n_1..n_K)``, which
follow a multinomial distribution. Three ways to take the expectation:

* **K = 2, closed form.** With two classes the cost difference of image ``i`` is a single score
  (``p_i1 - p_i0`` for probability vectors), and the optimal assignment gives class 1 to the ``m``
  images of highest score, where ``m ~ Binomial(N, r_1)`` is the number of class-1 labels. So the
  image of 0-based ascending rank ``k`` gets class 1 exactly when ``m >= N - k``:
  ``q[i, 1] = P(m >= N - k)``, a binomial tail, computed in log space for ``N`` in the thousands.
* **Exact enumeration** (small ``N`` and ``K``). Visit every count vector ``n``, solve the
  assignment of the images to the multiset of labels it describes, and average the resulting
  one-hot assignments with the multinomial probabilities of ``n``.
* **Monte Carlo** (``num_samples=S``). Draw ``S`` label vectors, solve each assignment exactly,
  average. Draws with the same counts are solved once.

The cost (``cost=``). ``"squared"`` (the default) is the squared distance ``|p_i - u_j|^2`` of the
paper's eq. 4. ``"euclidean"`` is the plain distance ``|p_i - u_j|``, the cost of the authors' code
for its race and joint targets (``ot.dist(..., metric="euclidean")`` in
``exp-6-debias-race/1-main-debias.py``, line 1461; the square root of the summed squared distances in
``exp-3-debias-gender-race/1-main-debias.py``, line 1523). Both rank the images of a two-class
target the same way (for ``p = (1 - x, x)`` the squared costs are ``2x^2, 2(1 - x)^2`` and the
plain ones ``sqrt(2) x, sqrt(2) (1 - x)``), so their two-class targets are equal; with more classes
the optimal assignments, and so the targets, can differ.

Ties. Images whose cost rows differ only by a constant (for probability vectors: identical
``p_i``) are interchangeable in every assignment; they share the average of their rows, which is
the expectation under a uniformly random tie-break, so permuting the images permutes the rows of
``q`` exactly. Any other tie between optimal assignments (rare: it needs exactly equal cost sums)
is broken by the assignment solver's deterministic choice. Either way ``q`` is the expectation of
optimal assignments, rows sum to 1 and the column means equal the target.

Intersectional (joint) targets
------------------------------
For a joint target over several attributes (gender x race), the classes are the cells (tuples of
one class per attribute). Pass ``probs`` as a dict ``{attribute: (N, K_attr)}``; the cost of
assigning image ``i`` to a cell is the sum over attributes of ``|p_attr,i - onehot(cell_attr)|^2``
(with ``cost="euclidean"`` its square root: the distance between the concatenated probability
vectors and the cell's concatenated one-hot vectors).
:func:`marginalize` turns the cell targets back into one target per attribute, and the loss is the
sum over attributes of the cross-entropy toward those marginal targets.

The functions take the whole batch: in multi-process training gather the probabilities first.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .targets import SUM_TOLERANCE, TargetDistribution


Probs = Union[torch.Tensor, Mapping[str, torch.Tensor]]

# Exact enumeration solves one assignment per count vector; above this many, ask for Monte Carlo.
MAX_EXACT_COUNT_VECTORS = 10_000

# Rows of ``probs`` must sum to 1 within this (loose enough for float16 softmax outputs).
PROBS_ROW_TOLERANCE = 1e-3

_REDUCTIONS = ("mean", "sum", "none")

# The transport cost between a probability vector and a one-hot label (see "The cost" above).
OT_COSTS = ("squared", "euclidean")


# --------------------------------------------------------------------------- public API
def expected_ot_targets(
    probs: Probs,
    target: TargetDistribution | torch.Tensor,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    cost: str = "squared",
) -> torch.Tensor:
    """Expected optimal-transport targets ``q`` for a batch (see the module docstring).

    Args:
        probs: ``(N, K)`` class probabilities of the ``N`` images (rows on the simplex), or for a
            joint target a dict ``{attribute: (N, K_attr)}`` with one entry per attribute.
        target: a :class:`TargetDistribution` (marginal or joint) or a length-``K`` tensor of
            class probabilities.
        num_samples: ``None`` for the exact value: the closed form when the target has two
            classes of non-zero probability (any ``N``), enumeration of the count vectors when
            there are at most ``MAX_EXACT_COUNT_VECTORS`` of them (e.g. ``K <= 4`` with
            ``N <= 12``), and otherwise a ``ValueError``. An integer gives a Monte Carlo estimate
            from that many label draws, each solved exactly.
        generator: CPU ``torch.Generator`` for the Monte Carlo draws (reproducible estimates).
        cost: ``"squared"`` (``|p_i - u_j|^2``, the paper's eq. 4) or ``"euclidean"`` (``|p_i - u_j|``).

    Returns:
        ``q``: ``(N, K)`` tensor (``K`` = number of cells for a joint target) on the device of
        ``probs``; ``q[i, k]`` is the probability that image ``i`` is assigned class ``k``.
        Rows sum to 1. No gradient flows through ``q``.

    Raises:
        ValueError: on probabilities that are not ``(N, K)`` rows on the simplex, a target that does
            not match them, a bad ``num_samples`` or ``cost``, or an exact computation that is too large.
    """
    _check_cost(cost)
    matrix, r, device, dtype = _cost_and_target(probs, target, cost)
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
    ):
        raise ValueError(f"num_samples must be a positive integer or None, got {num_samples!r}")
    # Classes of probability 0 never appear among the labels: solve on the others only.
    support = torch.nonzero(r > 0).flatten()
    cost_s, r_s = matrix[:, support], r[support]
    if support.numel() == 1:
        q_s = torch.ones(matrix.shape[0], 1, dtype=torch.float64)
    elif num_samples is not None:
        q_s = _monte_carlo(cost_s, r_s, num_samples, generator)
    elif support.numel() == 2:
        q_s = _two_class_closed_form(cost_s, float(r_s[1]))
    else:
        q_s = _exact_enumeration(cost_s, r_s)
    q = torch.zeros(matrix.shape, dtype=torch.float64)
    q[:, support] = _average_interchangeable_images(q_s, cost_s)
    return q.to(device=device, dtype=dtype)


def marginalize(q_cells: torch.Tensor, target: TargetDistribution) -> dict[str, torch.Tensor]:
    """Split cell targets ``(N, num_cells)`` of a joint target into ``{attribute: (N, K_attr)}``."""
    if not isinstance(target, TargetDistribution):
        raise ValueError("marginalize needs a TargetDistribution (it names the attributes)")
    if q_cells.ndim != 2 or q_cells.shape[1] != target.num_classes:
        raise ValueError(
            f"q_cells must have shape (N, {target.num_classes}), got {tuple(q_cells.shape)}"
        )
    table = q_cells.reshape(q_cells.shape[0], *target.shape)
    result = {}
    for axis, attribute in enumerate(target.attributes):
        other = [1 + a for a in range(len(target.attributes)) if a != axis]
        result[attribute] = table.sum(dim=other) if other else table
    return result


def dynamic_targets(
    probs: Probs,
    target: TargetDistribution | torch.Tensor,
    *,
    threshold: float = 0.8,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    cost: str = "squared",
):
    """Per-image target classes, their confidence, and which images to keep.

    Returns ``(labels, confidence, keep)``: ``labels = argmax q`` (long ``(N,)``),
    ``confidence = max q`` and ``keep = confidence >= threshold`` (bool ``(N,)``). With a dict
    ``probs`` (joint target) each of the three is a dict ``{attribute: tensor}`` computed from the
    marginalised cell targets, so every attribute has its own labels and confidences. ``cost`` is
    the transport cost of :func:`expected_ot_targets`.
    """
    _check_threshold(threshold)
    q = expected_ot_targets(probs, target, num_samples=num_samples, generator=generator, cost=cost)
    if isinstance(probs, Mapping):
        per_attribute = marginalize(q, target)
        labels, confidence, keep = {}, {}, {}
        for attribute, q_attr in per_attribute.items():
            confidence[attribute], labels[attribute] = q_attr.max(dim=1)
            keep[attribute] = confidence[attribute] >= threshold
        return labels, confidence, keep
    confidence, labels = q.max(dim=1)
    return labels, confidence, confidence >= threshold


def distributional_alignment_loss(
    logits: torch.Tensor | Mapping[str, torch.Tensor],
    target: TargetDistribution | torch.Tensor,
    *,
    threshold: float = 0.8,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    cost: str = "squared",
) -> torch.Tensor:
    """The distributional alignment loss (DAL) of a batch.

    The classifier's probabilities (``softmax(logits)``, without gradient) give the dynamic
    targets (:func:`dynamic_targets`); the loss is the cross-entropy of ``logits`` toward them over
    the kept images. For a dict of logits (joint target) it is the sum over attributes.

    Args:
        logits: ``(N, K)`` classifier logits with gradient, or ``{attribute: (N, K_attr)}``.
        target, threshold, num_samples, generator, cost: as in :func:`dynamic_targets`.
        reduction: ``"mean"`` (over kept images; 0 with zero gradient when none is kept),
            ``"sum"``, or ``"none"`` (per image, 0 for dropped images).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(logits, Mapping):
        probs = {a: torch.softmax(l.detach().float(), dim=-1) for a, l in logits.items()}
    else:
        probs = torch.softmax(logits.detach().float(), dim=-1)
    labels, _, keep = dynamic_targets(
        probs, target, threshold=threshold, num_samples=num_samples, generator=generator, cost=cost
    )
    if isinstance(logits, Mapping):
        losses = [kept_cross_entropy(logits[a], labels[a], keep[a], reduction) for a in labels]
        return torch.stack(losses).sum(dim=0)
    return kept_cross_entropy(logits, labels, keep, reduction)


def kept_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of ``logits`` toward ``labels`` on the images where ``keep`` is true.

    Dropped images contribute 0 and receive a gradient of exactly 0. ``"mean"`` divides by the
    number of kept images (and returns 0, still attached to the graph, when none is kept).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or keep.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, K) with labels and keep (N,), got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)} and {tuple(keep.shape)}"
        )
    keep = keep.to(device=logits.device, dtype=torch.bool)
    per_image = F.cross_entropy(logits, labels.to(logits.device), reduction="none")
    per_image = torch.where(keep, per_image, torch.zeros_like(per_image))
    if reduction == "none":
        return per_image
    if reduction == "sum":
        return per_image.sum()
    return per_image.sum() / keep.sum().clamp(min=1)


# --------------------------------------------------------------------------- inputs
def _cost_and_target(probs: Probs, target, cost: str):
    """Validate the inputs; return the ``(N, K)`` float64 CPU cost matrix and target vector ``r``."""
    if isinstance(probs, Mapping):
        if not isinstance(target, TargetDistribution):
            raise ValueError("a dict of probabilities needs a TargetDistribution naming the attributes")
        if set(probs) != set(target.attributes):
            raise ValueError(
                f"probs has attributes {sorted(probs)}, the target has {sorted(target.attributes)}"
            )
        first = probs[target.attributes[0]]
        per_attribute = []
        for attribute, k in zip(target.attributes, target.shape):
            p = _check_probs(probs[attribute], k, f"probs[{attribute!r}]")
            if p.shape[0] != first.shape[0]:
                raise ValueError("all attributes in probs must have the same number of images")
            per_attribute.append(_squared_distances_to_one_hots(p))
        cell_index = target.cell_class_indices()
        squared = sum(c[:, cell_index[:, a]] for a, c in enumerate(per_attribute))
        return _transport_cost(squared, cost), target.probs.clone(), first.device, _float_dtype(first)

    if isinstance(target, TargetDistribution):
        r = target.probs.clone()
    elif isinstance(target, torch.Tensor):
        r = target.detach().to("cpu", torch.float64)
        if r.ndim != 1 or r.numel() < 1:
            raise ValueError(f"target tensor must be 1-D with at least one class, got {tuple(r.shape)}")
        if not torch.isfinite(r).all() or (r < 0).any() or abs(float(r.sum()) - 1) > SUM_TOLERANCE:
            raise ValueError("target tensor must hold finite, non-negative probabilities summing to 1")
    else:
        raise ValueError(f"target must be a TargetDistribution or a tensor, got {type(target).__name__}")
    if not isinstance(probs, torch.Tensor):
        raise ValueError(f"probs must be a tensor or a dict of tensors, got {type(probs).__name__}")
    p = _check_probs(probs, r.numel(), "probs")
    return _transport_cost(_squared_distances_to_one_hots(p), cost), r, probs.device, _float_dtype(probs)


def _check_probs(probs: torch.Tensor, num_classes: int, what: str) -> torch.Tensor:
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor")
    if probs.ndim != 2 or probs.shape[1] != num_classes or probs.shape[0] < 1:
        raise ValueError(f"{what} must have shape (N >= 1, {num_classes}), got {tuple(probs.shape)}")
    p = probs.detach().to("cpu", torch.float64)
    if not torch.isfinite(p).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    if (p < -PROBS_ROW_TOLERANCE).any() or ((p.sum(dim=1) - 1).abs() > PROBS_ROW_TOLERANCE).any():
        raise ValueError(f"{what} rows must be probability vectors (did you pass logits?)")
    return p


def _squared_distances_to_one_hots(p: torch.Tensor) -> torch.Tensor:
    """``(N, K)``: ``|p_i - e_k|^2 = |p_i|^2 - 2 p_ik + 1``."""
    return (p * p).sum(dim=1, keepdim=True) - 2 * p + 1


def _transport_cost(squared: torch.Tensor, cost: str) -> torch.Tensor:
    """The cost matrix from the squared distances: themselves, or their square roots."""
    if cost == "squared":
        return squared
    # Rounding can leave a distance to a point's own one-hot vector a hair below 0.
    return squared.clamp(min=0.0).sqrt()


def _check_cost(cost: str) -> None:
    if cost not in OT_COSTS:
        raise ValueError(f"cost must be one of {', '.join(map(repr, OT_COSTS))}, got {cost!r}")


def _float_dtype(tensor: torch.Tensor) -> torch.dtype:
    return tensor.dtype if tensor.is_floating_point() else torch.float32


def _check_threshold(threshold: float) -> None:
    if not isinstance(threshold, (int, float)) or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")


# --------------------------------------------------------------------------- solvers
def _two_class_closed_form(cost: torch.Tensor, r1: float) -> torch.Tensor:
    """``(N, 2)`` expected assignment for two classes; ``r1`` is the probability of class 1.

    Assigning image ``i`` to class 1 instead of class 0 changes the total cost by
    ``cost[i, 1] - cost[i, 0]``, so with ``m`` labels of class 1 the optimal assignment gives them
    to the ``m`` images with the highest score ``cost[i, 0] - cost[i, 1]``. The image of 0-based
    ascending rank ``k`` is among them iff ``m >= N - k``, with ``m ~ Binomial(N, r1)``.
    """
    num_images = cost.shape[0]
    score = cost[:, 0] - cost[:, 1]
    tail = _binomial_upper_tails(num_images, r1)  # tail[j] = P(m >= j), j = 0..N
    rank = torch.empty(num_images, dtype=torch.long)
    rank[torch.argsort(score, stable=True)] = torch.arange(num_images)
    q1 = tail[num_images - rank]
    return torch.stack([1.0 - q1, q1], dim=1)


def _binomial_upper_tails(n: int, r: float) -> torch.Tensor:
    """``P(m >= j)`` for ``j = 0..n`` and ``m ~ Binomial(n, r)``, in float64 via log-space pmf."""
    m = torch.arange(n + 1, dtype=torch.float64)
    r_t = torch.tensor(r, dtype=torch.float64)
    log_pmf = (
        torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64))
        - torch.lgamma(m + 1)
        - torch.lgamma(n - m + 1)
        + torch.special.xlogy(m, r_t)
        + torch.special.xlogy(n - m, 1 - r_t)
    )
    pmf = torch.exp(log_pmf)
    tail = torch.flip(torch.cumsum(torch.flip(pmf, [0]), 0), [0])  # sum of pmf[j:]
    return tail.clamp(0.0, 1.0)


def _count_vectors(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every tuple of ``parts`` non-negative integers summing to ``total``."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total, -1, -1):
        for rest in _count_vectors(total - first, parts - 1):
            yield (first, *rest)


def _exact_enumeration(cost: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Average the optimal assignment of every count vector, weighted by its multinomial probability."""
    num_images, num_classes = cost.shape
    count = math.comb(num_images + num_classes - 1, num_classes - 1)
    if count > MAX_EXACT_COUNT_VECTORS:
        raise ValueError(
            f"exact targets for N={num_images} images and {num_classes} classes would solve "
            f"{count} assignments (limit {MAX_EXACT_COUNT_VECTORS}); pass num_samples for a "
            "Monte Carlo estimate"
        )
    counts = torch.tensor(list(_count_vectors(num_images, num_classes)), dtype=torch.float64)
    log_weight = (
        torch.lgamma(torch.tensor(num_images + 1.0, dtype=torch.float64))
        - torch.lgamma(counts + 1).sum(dim=1)
        + (counts * torch.log(r)).sum(dim=1)
    )
    weights = torch.exp(log_weight)
    return _weighted_assignments(cost, counts.long(), weights)


def _monte_carlo(cost: torch.Tensor, r: torch.Tensor, num_samples: int, generator) -> torch.Tensor:
    """Average the optimal assignments of ``num_samples`` i.i.d. label draws.

    Only the label counts matter, so identical count vectors are solved once, with their
    multiplicity as weight.
    """
    num_images, num_classes = cost.shape
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator")
    draws = torch.multinomial(r, num_samples * num_images, replacement=True, generator=generator)
    counts = torch.zeros(num_samples, num_classes, dtype=torch.long)
    counts.scatter_add_(1, draws.view(num_samples, num_images), torch.ones(num_samples, num_images, dtype=torch.long))
    unique_counts, multiplicity = torch.unique(counts, dim=0, return_counts=True)
    return _weighted_assignments(cost, unique_counts, multiplicity.double() / num_samples)


def _weighted_assignments(cost: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_c weights[c] * onehot(optimal assignment for label counts counts[c])``.

    For each count vector the labels form a sorted multiset (``counts[c, k]`` copies of class
    ``k``); the assignment of images to it is a square assignment problem on the cost matrix with
    repeated columns, solved exactly by ``scipy.optimize.linear_sum_assignment``.
    """
    num_images, num_classes = cost.shape
    keep = weights > 0
    counts, weights = counts[keep], weights[keep]
    # labels[c, j] = the class of the j-th smallest label of draw c: (C, N), no Python loop.
    boundaries = torch.cumsum(counts, dim=1)
    positions = torch.arange(num_images).expand(counts.shape[0], num_images).contiguous()
    labels = torch.searchsorted(boundaries, positions, right=True)
    assigned = np.empty((counts.shape[0], num_images), dtype=np.int64)
    # The square cost matrices square[c, i, j] = cost[i, labels[c, j]], gathered in chunks that
    # keep memory bounded (about 32 MB of float64) whatever the number of draws.
    chunk = max(1, 4_000_000 // (num_images * num_images))
    for start in range(0, counts.shape[0], chunk):
        block = labels[start : start + chunk]
        squares = cost.T[block].transpose(1, 2).contiguous().numpy()  # (chunk, N images, N labels)
        block_np = block.numpy()
        for offset in range(block_np.shape[0]):
            rows, cols = linear_sum_assignment(squares[offset])
            assigned[start + offset, rows] = block_np[offset, cols]
    # q[i, k] = sum over draws of weight * [image i got class k], as one weighted bincount.
    flat = (np.arange(num_images) * num_classes + assigned).ravel()
    per_draw = np.repeat(weights.numpy(), num_images)
    q = np.bincount(flat, weights=per_draw, minlength=num_images * num_classes)
    return torch.from_numpy(q.reshape(num_images, num_classes))


def _identical_row_groups(matrix: torch.Tensor) -> torch.Tensor:
    """Group index per row (equal rows share one), via stable sorts column by column."""
    num_rows = matrix.shape[0]
    order = torch.arange(num_rows)
    for column in reversed(range(matrix.shape[1])):
        order = order[torch.argsort(matrix[order, column], stable=True)]
    ordered = matrix[order]
    new_group = torch.ones(num_rows, dtype=torch.long)
    new_group[1:] = (ordered[1:] != ordered[:-1]).any(dim=1).long()
    group = torch.empty(num_rows, dtype=torch.long)
    group[order] = torch.cumsum(new_group, dim=0) - 1
    return group


def _average_interchangeable_images(q: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """Give images whose cost rows differ only by a constant the average of their rows of ``q``."""
    canonical = cost[:, 1:] - cost[:, :1]
    group = _identical_row_groups(canonical)
    num_groups = int(group.max()) + 1
    if num_groups == cost.shape[0]:
        return q
    sums = torch.zeros(num_groups, q.shape[1], dtype=q.dtype).index_add_(0, group, q)
    sizes = torch.bincount(group, minlength=num_groups).unsqueeze(1).to(q.dtype)
    return (sums / sizes)[group]
