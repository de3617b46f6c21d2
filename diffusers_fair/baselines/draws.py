"""Which attribute classes each image is steered toward: per-image draws at the target ratio.

Prompt intervention and Fair Diffusion steer every image toward one cell of the target distribution
(one class per attribute), drawn at the target's ratio. Fair Diffusion's authors split the images
of each prompt exactly at the ratio, in random order (``utils.py`` ``get_random``: exactly half of
the images edited toward each gender). :func:`draw_cells` does the same for any target: each
cell gets its exact share of the images of one prompt (largest remainders, ties broken at random),
in a random order; or, with ``balanced=False``, every image draws its cell independently.

The draws are seeded by the images' starting latents, so that the same noise always gets the same
cells, whatever process or device generates it, and two audits from the same seeded noise steer the
same images the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from ..method.targets import TargetDistribution


def joint_target(targets: TargetDistribution | Sequence[TargetDistribution]) -> TargetDistribution:
    """One target over every attribute: the independent product of ``targets``.

    Raises:
        ValueError: when there are no targets or two of them share an attribute.
    """
    if isinstance(targets, TargetDistribution):
        return targets
    targets = list(targets)
    if not targets or not all(isinstance(t, TargetDistribution) for t in targets):
        raise ValueError("targets must be a non-empty list of TargetDistribution")
    joint = targets[0]
    for target in targets[1:]:
        joint = joint * target
    return joint


def latent_generator(latents: torch.Tensor) -> torch.Generator:
    """A CPU generator seeded by a SHA-256 digest of ``latents`` (their float32 values)."""
    digest = hashlib.sha256(latents.detach().float().cpu().contiguous().numpy().tobytes()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def exact_counts(probs: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """How many of ``num`` images each class gets: ``floor(num * p)`` plus one for the largest remainders.

    Ties between equal remainders are broken at random, so that no class is favoured by its position
    (with 4 images and 8 equally likely cells, 4 random cells get one image each).
    """
    expected = probs.double() * num
    counts = expected.floor().long()
    remainder = expected - counts
    order = torch.randperm(len(probs), generator=generator)
    ranked = order[torch.argsort(remainder[order], descending=True, stable=True)]
    counts[ranked[: num - int(counts.sum())]] += 1
    return counts


def draw_cells(target: TargetDistribution, latents: torch.Tensor, *, balanced: bool = True) -> list[tuple[str, ...]]:
    """One cell of ``target`` per image, seeded by the images' starting ``latents`` ``(N, ...)``.

    With ``balanced=True`` the cells of the ``N`` images follow the target's ratio exactly (as far as
    ``N`` allows) in a random order; with ``False`` each image draws its cell independently.
    """
    generator = latent_generator(latents)
    num = latents.shape[0]
    probs = target.probs.double()
    if balanced:
        counts = exact_counts(probs, num, generator)
        index = torch.repeat_interleave(torch.arange(len(probs)), counts)
        index = index[torch.randperm(num, generator=generator)]
    else:
        index = torch.multinomial(probs, num, replacement=True, generator=generator)
    return [target.cells[int(k)] for k in index]


def draw_uniform(latents: torch.Tensor) -> torch.Tensor:
    """``(N,)`` numbers in ``[0, 1)``, one per image, seeded by the images' starting ``latents``.

    Independent of :func:`draw_cells` (the generator is advanced past nothing shared): used to pick
    which images a partial strength steers.
    """
    generator = latent_generator(latents)
    generator.manual_seed(generator.initial_seed() ^ 0x5DEECE66D)
    return torch.rand(latents.shape[0], generator=generator)


def group_by_prompt(prompts: Sequence[str]) -> dict[str, list[int]]:
    """Prompt -> the positions of its images, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for position, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(position)
    return groups
