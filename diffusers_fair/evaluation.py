"""Measuring fairness: the bias metric of the paper and summaries over prompts.

``bias(P)`` measures how far the class frequencies of one prompt's images are from uniform: the
mean, over every pair of classes ``i < j``, of ``|f_i - f_j|``. It is 0 for a perfectly balanced
prompt and ``2 / K`` when every image falls in one of ``K`` classes (1 for ``K = 2``). The paper
reports it averaged over test prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def bias_metric(freqs: torch.Tensor | Sequence) -> torch.Tensor:
    """The paper's ``bias(P) = mean_{i<j} |f_i - f_j|``.

    Args:
        freqs: ``(K,)`` frequencies or counts of the ``K`` classes for one prompt, or
            ``(P, K)`` for ``P`` prompts. Each row is normalised to sum to 1 first, so raw counts
            are fine. Values must be finite and non-negative, and no row may sum to 0.

    Returns:
        A float64 tensor: a scalar for a ``(K,)`` input, ``(P,)`` per-prompt values for ``(P, K)``.
    """
    values = torch.as_tensor(freqs).detach().to("cpu", torch.float64)
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
    v = torch.as_tensor(values).detach().to("cpu", torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("mean_std needs at least one value")
    if v.numel() <= ddof:
        raise ValueError(f"mean_std with ddof={ddof} needs more than {ddof} values, got {v.numel()}")
    if not torch.isfinite(v).all():
        raise ValueError("values contains NaN or infinite entries")
    mean = float(v.mean())
    std = float(((v - mean) ** 2).sum() / (v.numel() - ddof)) ** 0.5
    return mean, std
