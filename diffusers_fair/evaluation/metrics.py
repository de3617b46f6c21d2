"""Measuring fairness: the bias metric of the paper and the class frequencies an audit reports.

``bias(P)`` measures how far the class frequencies of one prompt's images are from uniform: the
mean, over every pair of classes ``i < j``, of ``|f_i - f_j|``. It is 0 for a perfectly balanced
prompt and ``2 / K`` when every image falls in one of ``K`` classes (1 for ``K = 2``). The paper
reports it averaged over test prompts.

An *audit* (:func:`~diffusers_fair.evaluation.audit.evaluate`) measures it for a pipeline. For
every prompt it generates ``N`` images from seeded noise, finds the largest face in each image,
classifies the face's attributes with an evaluation classifier and counts the predicted classes.
Per prompt and over all prompts it reports:

* the class frequencies of each attribute (over the images where a face was found) and of joint
  attributes (``gender x race``: one class per cell), and ``bias(P)``'s mean and standard
  deviation over prompts;
* the share of images with no detected face (those images are not counted in the frequencies);
* CLIP-T: the cosine between the CLIP embeddings of the prompt and of the image (needs a text
  embedder);
* with a reference (the base model, when auditing an adapted one): CLIP-I and DINO, the cosines
  between the embeddings of each image and the reference image generated from the *same* noise,
  and the reference's own frequencies and bias, so that one audit gives "before" and "after".

The audit itself (seeded noise, generation, face reading, the per-prompt cache) lives in
:mod:`diffusers_fair.evaluation.audit`, its result records in :mod:`diffusers_fair.evaluation.results`.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


SOURCES = ("model", "reference")


# --------------------------------------------------------------------------- the bias metric
def bias_metric(freqs: torch.Tensor | Sequence) -> torch.Tensor:
    """The paper's ``bias(P) = mean_{i<j} |f_i - f_j|``.

    Args:
        freqs: ``(K,)`` frequencies or counts of the ``K`` classes for one prompt, or
            ``(P, K)`` for ``P`` prompts. Each row is normalised to sum to 1 first, so raw counts
            are fine. Values must be finite and non-negative, and no row may sum to 0.

    Returns:
        A float64 tensor: a scalar for a ``(K,)`` input, ``(P,)`` per-prompt values for ``(P, K)``.
    """
    values = torch.as_tensor(freqs, dtype=torch.float64).detach().cpu()
    if values.ndim not in (1, 2):
        raise ValueError(f"freqs must be (K,) or (P, K), got shape {tuple(values.shape)}")
    num_classes = values.shape[-1]
    if num_classes < 2:
        raise ValueError(f"bias needs at least 2 classes, got {num_classes}")
    if not torch.isfinite(values).all():
        raise ValueError("freqs contains NaN or infinite values")
    if (values < 0).any():
        raise ValueError("freqs contains negative values")
    totals = values.sum(dim=-1, keepdim=True)
    if (totals == 0).any():
        raise ValueError("a row of freqs sums to 0 (no images counted)")
    f = values / totals
    pairwise = (f.unsqueeze(-1) - f.unsqueeze(-2)).abs()  # (..., K, K), each pair counted twice
    num_pairs = num_classes * (num_classes - 1) / 2
    return pairwise.sum(dim=(-1, -2)) / 2 / num_pairs


def mean_std(values: torch.Tensor | Sequence, *, ddof: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of per-prompt values (``ddof=0``: population std).

    ``bias_metric`` of a ``(P, K)`` table gives per-prompt values; this summarises them the way
    the paper's tables do (mean over prompts), with their spread.
    """
    v = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
    if v.numel() == 0:
        raise ValueError("mean_std needs at least one value")
    if v.numel() <= ddof:
        raise ValueError(f"mean_std with ddof={ddof} needs more than {ddof} values, got {v.numel()}")
    if not torch.isfinite(v).all():
        raise ValueError("values contains NaN or infinite entries")
    mean = float(v.mean())
    std = float(((v - mean) ** 2).sum() / (v.numel() - ddof)) ** 0.5
    return mean, std


@functools.lru_cache(maxsize=4096)
def bias_floor(num_classes: int, num_images: int, *, draws: int = 20000, seed: int = 0) -> float:
    """Expected ``bias(P)`` of ``num_images`` images drawn from a *perfectly uniform* model.

    Finite samples are never exactly balanced, so even a fair model scores above 0: with 8 images
    and two classes the expected bias is about 0.27; with 60, about 0.10. Estimated by Monte Carlo
    (``draws`` multinomial draws, seeded), to read audits with few images per prompt.
    """
    if num_classes < 2 or num_images < 1 or draws < 1:
        raise ValueError("bias_floor needs num_classes >= 2, num_images >= 1 and draws >= 1")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (draws, num_images), generator=generator)
    counts = F.one_hot(labels, num_classes).sum(dim=1)
    return float(bias_metric(counts).mean())


# --------------------------------------------------------------------------- counting classes
def class_counts(probs: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """How many images with a face fall in each class: ``(K,)`` float64 counts.

    Args:
        probs: ``(N, K)`` class probabilities (or logits) per image; each image counts for its
            most likely class.
        found: ``(N,)`` bool, ``True`` where a face was detected; other images are not counted.
    """
    return joint_counts([probs], found)


def joint_counts(probs: Sequence[torch.Tensor], found: torch.Tensor) -> torch.Tensor:
    """Counts of the cells of joint attributes: ``(K_1 * K_2 * ...,)`` float64.

    Each image with a face counts for the cell of its most likely classes ``(c_1, c_2, ...)``,
    numbered row-major: ``cell = (c_1 * K_2 + c_2) * K_3 + c_3 ...`` (the order of
    :func:`joint_classes`).
    """
    if not probs:
        raise ValueError("joint_counts needs at least one attribute")
    found = torch.as_tensor(found).bool().cpu()
    cell = torch.zeros(found.shape[0], dtype=torch.long)
    num_cells = 1
    for p in probs:
        if p.ndim != 2 or p.shape[0] != found.shape[0]:
            raise ValueError(f"probs must be (N, K) with N = {found.shape[0]}, got {tuple(p.shape)}")
        cell = cell * p.shape[1] + p.detach().cpu().argmax(dim=1)
        num_cells *= p.shape[1]
    return torch.bincount(cell[found], minlength=num_cells).to(torch.float64)


def joint_classes(attributes: Mapping[str, Sequence[str]], names: Sequence[str]) -> list[str]:
    """Class names of the joint attribute ``names``, e.g. ``["male/wmelh", "male/asian", ...]``."""
    return ["/".join(cell) for cell in itertools.product(*(attributes[n] for n in names))]


def frequencies(counts: torch.Tensor) -> torch.Tensor:
    """Counts -> frequencies; all NaN when nothing was counted."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    total = counts.sum()
    return counts / total if total > 0 else torch.full_like(counts, float("nan"))


def _nan_to_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)
