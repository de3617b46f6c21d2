"""Debias-VL (Chuang et al., "Debiasing Vision-Language Models via Biased Prompts", 2023): a calibrated
projection of the text embedding, in closed form, for Stable Diffusion.

Pairs of prompts that differ only in the attribute ("A photo of a male doctor." / "A photo of a
female doctor.") give the directions to remove. With ``z`` the L2-normalised text-encoder output at
the end-of-text token of a prompt and ``S`` the pairs::

    M = (1/|S|) Σ_{(i,j) ∈ S} (z_i − z_j)(z_i − z_j)ᵀ
    P = (I + λ M)⁻¹                                      (generative/main.py lines 20-30, 114-117)
    E' = E Pᵀ                                            (line 147)

``P`` is applied to all token vectors of the prompt's embedding ``E`` (every position, not only the
pooled one), and the unconditional embedding is left alone (line 148). The Stable Diffusion version
has no prior projection ``P₀`` (the CLIP version's), applies no ``text_projection``, and uses
``λ = 500``; ``P`` shrinks each paired difference direction by ``1 / (1 + λσ)`` rather than removing
it. ``M`` comes from unit vectors while ``P`` acts on the raw token vectors, as in the authors' code.

For classes beyond two, every pair of classes of an attribute is a pair in ``S``; for several
attributes, the pairs of all of them. The projection knows which attributes to remove, not a target
ratio: it aims at "independent of the attribute", which is the uniform target at best.
``strength`` multiplies ``λ``; at 0, ``P = I`` exactly and the images are the stock pipeline's.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from diffusers import StableDiffusionPipeline

from ..method.targets import TargetDistribution
from .draws import joint_target
from .prompt_intervention import check_phrases, extend_prompt


DEFAULT_LAMBDA = 500.0  # generative/main.py line 38


def paired_prompts(prompts: Sequence[str], targets: TargetDistribution | Sequence[TargetDistribution],
                   phrases: Mapping[str, Mapping[str, str]], template: str = "{prompt}, {attributes}"
                   ) -> list[tuple[str, str]]:
    """The prompt pairs ``S``: for each prompt and attribute, every pair of its classes named in the prompt.

    ``paired_prompts(["A photo of a doctor"], gender, {"gender": {"male": "male", "female": "female"}})``
    gives ``[("A photo of a doctor, male", "A photo of a doctor, female")]`` with the default template.
    """
    target = joint_target(targets)
    check_phrases(target, phrases)
    pairs = []
    for prompt in prompts:
        for attribute, classes in target.classes.items():
            for a, b in itertools.combinations(classes, 2):
                pairs.append((extend_prompt(prompt, [phrases[attribute][a]], template),
                              extend_prompt(prompt, [phrases[attribute][b]], template)))
    return pairs


@torch.no_grad()
def end_of_text_embeddings(pipe, texts: Sequence[str]) -> torch.Tensor:
    """``(N, D)`` float64: the text encoder's last hidden state at each text's end-of-text token, L2-normalised."""
    tokens = pipe.tokenizer(list(texts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    ids = tokens.input_ids
    hidden = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].double().cpu()
    # the first end-of-text token (the authors take argmax(ids), which is the same for CLIP's vocabulary)
    eos = (ids == pipe.tokenizer.eos_token_id).int().argmax(dim=1)
    return torch.nn.functional.normalize(hidden[torch.arange(len(texts)), eos], dim=-1)


def calibration_matrix(pipe, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """``M`` of the module doc, ``(D, D)`` float64.

    Raises:
        ValueError: when there are no pairs.
    """
    if not pairs:
        raise ValueError("pairs is empty; give prompt pairs that differ only in the attribute (paired_prompts)")
    z = end_of_text_embeddings(pipe, [text for pair in pairs for text in pair])
    differences = z[0::2] - z[1::2]
    return differences.T @ differences / len(pairs)


def debias_projection(pipe, pairs: Sequence[tuple[str, str]], lam: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """``P = (I + λ M)⁻¹``, ``(D, D)`` float32 (computed in float64).

    Raises:
        ValueError: for a negative ``lam`` or no pairs.
    """
    if lam < 0:
        raise ValueError(f"lam must be non-negative, got {lam}")
    m = calibration_matrix(pipe, pairs)
    return torch.linalg.inv(torch.eye(m.shape[0], dtype=torch.float64) + lam * m).float()


class DebiasVLPipeline(StableDiffusionPipeline):
    """A ``StableDiffusionPipeline`` that projects the prompt's text embedding with ``projection`` (``E Pᵀ``).

    The negative (unconditional) embedding is left alone. Made by :func:`debias_vl`.
    """

    projection: torch.Tensor | None = None

    def encode_prompt(self, *args, **kwargs):
        prompt_embeds, negative_prompt_embeds = super().encode_prompt(*args, **kwargs)
        if self.projection is None:
            raise ValueError("this pipeline has no projection; make it with diffusers_fair.baselines.debias_vl")
        projection = self.projection.to(prompt_embeds.device, prompt_embeds.dtype)
        return prompt_embeds @ projection.T, negative_prompt_embeds


def debias_vl(pipe, prompts: Sequence[str], targets: TargetDistribution | Sequence[TargetDistribution],
              phrases: Mapping[str, Mapping[str, str]], *, template: str = "{prompt}, {attributes}",
              lam: float = DEFAULT_LAMBDA, strength: float = 1.0) -> DebiasVLPipeline:
    """Debias-VL on a stock pipeline's modules (shared, not copied or changed).

    Args:
        pipe: a stock ``StableDiffusionPipeline``.
        prompts: the prompts whose attribute-paired versions calibrate ``M`` (the authors: 80
            training professions; the audited prompts need not be among them).
        targets: which attributes to remove (their classes and ``phrases`` make the pairs).
        phrases: attribute -> class -> the words naming it in a prompt.
        template: how a phrase joins a prompt (:func:`~diffusers_fair.baselines.prompt_intervention.extend_prompt`).
        lam: ``λ`` at strength 1 (the authors' 500 for Stable Diffusion).
        strength: multiplies ``λ`` (0: ``P = I``, the stock pipeline's images).

    Raises:
        ValueError: for no prompts, a missing phrase or a negative strength.
    """
    if not prompts:
        raise ValueError("prompts is empty; give the prompts that calibrate the projection")
    if float(strength) < 0:
        raise ValueError(f"strength must be non-negative, got {strength}")
    pairs = paired_prompts(prompts, targets, phrases, template)
    out = DebiasVLPipeline.from_pipe(pipe)
    out.projection = debias_projection(pipe, pairs, float(strength) * lam)
    return out
