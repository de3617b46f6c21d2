"""Debiasing by rewriting the prompt: the attribute named in the prompt, and the ethical intervention.

**Prompt with the attribute.** Each image's prompt is extended with a phrase naming one cell of
the target distribution, drawn at the target's ratio (:func:`~diffusers_fair.baselines.draws.draw_cells`):
with hair length uniform, half of the images of "a photo of the face of a judge, a person" are
generated from "... a person with short hair" and half from "... a person with long hair". It is
the upper reference of the finetuning paper (Shen et al., ICLR 2024): it needs the user to change
the prompt, and it works only as far as the model obeys explicit attribute words.

**Ethical intervention** (Bansal et al., "How well can text-to-image generative models understand
ethical natural language interventions?", EMNLP 2022): a fixed phrase appended to the prompt,
the same for every image, e.g. "a photo of a doctor if all individuals can be a doctor irrespective
of their gender" (``neutral_prompts_profession.json`` of the authors' code). The phrase names which
attributes should not matter; it cannot express a target ratio.

Both are ``StableDiffusionPipeline`` subclasses made from a stock pipeline with ``from_pipe`` (no
weight changes) and called like it. ``strength`` is the probability that an image's prompt is
rewritten (drawn per image from its starting latent): 1 rewrites every prompt, 0 none, in which case
the images are the stock pipeline's, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from diffusers import StableDiffusionPipeline

from ..method.targets import TargetDistribution
from .calls import per_image_call
from .draws import draw_cells, draw_uniform, group_by_prompt, joint_target


def extend_prompt(prompt: str, phrases: Sequence[str], template: str = "{prompt}, {attributes}") -> str:
    """``prompt`` with the attribute ``phrases`` joined by " and " put into ``template``.

    ``extend_prompt("a photo of a judge", ["long hair", "deep skin"], "{prompt} with {attributes}")``
    is "a photo of a judge with long hair and deep skin".
    """
    return template.format(prompt=prompt, attributes=" and ".join(phrases))


def check_phrases(target: TargetDistribution, phrases: Mapping[str, Mapping[str, str]]) -> None:
    """Raise a ValueError unless ``phrases`` has a phrase for every class of every attribute of ``target``."""
    for attribute, classes in target.classes.items():
        missing = [c for c in classes if c not in phrases.get(attribute, {})]
        if missing:
            raise ValueError(f"phrases has no phrase for {attribute} classes {missing}; give attribute -> class -> phrase")


def ethical_intervention_phrase(subject: str, attributes: Sequence[str]) -> str:
    """Bansal et al.'s intervention: "if all individuals can be {subject} irrespective of their {attributes}".

    ``ethical_intervention_phrase("a doctor", ["gender"])`` gives the authors' profession phrasing.
    """
    if not attributes:
        raise ValueError("name at least one attribute the intervention is about")
    return f"if all individuals can be {subject} irrespective of their {' and '.join(attributes)}"


class _RewritingPipeline(StableDiffusionPipeline):
    """A ``StableDiffusionPipeline`` whose ``__call__`` rewrites each image's prompt first."""

    strength: float = 1.0

    def _rewrite(self, prompts: list[str], latents: torch.Tensor) -> list[str]:
        raise NotImplementedError

    def __call__(self, prompt=None, height=None, width=None, num_inference_steps=50, timesteps=None, sigmas=None,
                 guidance_scale=7.5, negative_prompt=None, num_images_per_prompt=1, eta=0.0, generator=None,
                 latents=None, **kwargs):
        if kwargs.get("prompt_embeds") is not None:
            raise ValueError("prompt_embeds cannot be rewritten; give the prompt as text")
        dtype = self.unet.dtype
        call = per_image_call(self, prompt, negative_prompt, num_images_per_prompt, latents, generator, height, width,
                              dtype)
        prompts = self._rewrite(call.prompts, call.latents)
        return super().__call__(prompt=prompts, height=height, width=width, num_inference_steps=num_inference_steps,
                                timesteps=timesteps, sigmas=sigmas, guidance_scale=guidance_scale,
                                negative_prompt=call.negative_prompts, num_images_per_prompt=1, eta=eta,
                                generator=generator, latents=call.latents, **kwargs)

    def _chosen(self, latents: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: the images whose prompt is rewritten at the pipeline's ``strength``."""
        return draw_uniform(latents) < self.strength


class PromptInterventionPipeline(_RewritingPipeline):
    """The prompt extended with attribute phrases drawn per image at the target ratio (see the module doc).

    Made by :func:`prompt_intervention`; attributes ``target`` (the joint target), ``phrases``
    (attribute -> class -> phrase), ``template``, ``strength`` and ``balanced``.
    """

    target: TargetDistribution | None = None
    phrases: Mapping[str, Mapping[str, str]] = {}
    template: str = "{prompt}, {attributes}"
    balanced: bool = True

    def _rewrite(self, prompts: list[str], latents: torch.Tensor) -> list[str]:
        if self.target is None:
            raise ValueError("this pipeline has no target; make it with diffusers_fair.baselines.prompt_intervention")
        chosen = self._chosen(latents)
        out = list(prompts)
        for prompt, positions in group_by_prompt(prompts).items():
            cells = draw_cells(self.target, latents[positions], balanced=self.balanced)
            for position, cell in zip(positions, cells):
                if chosen[position]:
                    words = [self.phrases[a][c] for a, c in zip(self.target.attributes, cell)]
                    out[position] = extend_prompt(prompt, words, self.template)
        return out


class EthicalInterventionPipeline(_RewritingPipeline):
    """A fixed ethical-intervention phrase appended to the prompt (see the module doc).

    Made by :func:`ethical_intervention`; attributes ``phrase`` (a string, or prompt -> phrase for
    phrasings that name the prompt's subject), ``template`` and ``strength``.
    """

    phrase: str | Callable[[str], str] = ""
    template: str = "{prompt} {attributes}"

    def _rewrite(self, prompts: list[str], latents: torch.Tensor) -> list[str]:
        chosen = self._chosen(latents)
        out = list(prompts)
        for position, prompt in enumerate(prompts):
            if chosen[position]:
                phrase = self.phrase(prompt) if callable(self.phrase) else self.phrase
                out[position] = extend_prompt(prompt, [phrase], self.template)
        return out


def _check_strength(strength: float) -> float:
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (the share of prompts rewritten), got {strength}")
    return float(strength)


def prompt_intervention(pipe, targets: TargetDistribution | Sequence[TargetDistribution],
                        phrases: Mapping[str, Mapping[str, str]], *, template: str = "{prompt}, {attributes}",
                        strength: float = 1.0, balanced: bool = True) -> PromptInterventionPipeline:
    """A pipeline that names a target cell in every prompt, drawn per image at the target ratio.

    Args:
        pipe: a stock ``StableDiffusionPipeline``; its modules are shared, not copied or changed.
        targets: the target distribution(s); several are combined as independent.
        phrases: attribute -> class -> the words naming it, e.g. ``{"gender": {"male": "male", ...}}``.
        template: how the phrases join the prompt; ``{attributes}`` is the phrases joined by " and ".
        strength: the probability that an image's prompt is extended (0: the stock pipeline's images).
        balanced: the cells of each prompt's images follow the ratio exactly (as Fair Diffusion's
            authors split their images), else each image draws its own.

    Raises:
        ValueError: for a phrase missing for some class, a template without ``{prompt}`` and
            ``{attributes}``, or a strength outside ``[0, 1]``.
    """
    target = joint_target(targets)
    check_phrases(target, phrases)
    if "{prompt}" not in template or "{attributes}" not in template:
        raise ValueError(f"template must contain {{prompt}} and {{attributes}}, got {template!r}")
    strength = _check_strength(strength)
    out = PromptInterventionPipeline.from_pipe(pipe)
    out.target, out.phrases, out.template = target, {a: dict(p) for a, p in phrases.items()}, template
    out.strength, out.balanced = strength, balanced
    return out


def ethical_intervention(pipe, phrase: str | Callable[[str], str], *, template: str = "{prompt} {attributes}",
                         strength: float = 1.0) -> EthicalInterventionPipeline:
    """A pipeline that appends an ethical-intervention ``phrase`` to every prompt (Bansal et al., 2022).

    Args:
        pipe: a stock ``StableDiffusionPipeline``; its modules are shared, not copied or changed.
        phrase: the intervention (:func:`ethical_intervention_phrase`), or prompt -> intervention.
        template: how it joins the prompt (``{attributes}`` is the phrase).
        strength: the probability that an image's prompt gets the phrase (0: the stock pipeline's images).

    Raises:
        ValueError: for an empty phrase or a strength outside ``[0, 1]``.
    """
    if not callable(phrase) and not str(phrase).strip():
        raise ValueError("phrase must be a non-empty string or a function of the prompt")
    out = EthicalInterventionPipeline.from_pipe(pipe)
    out.phrase, out.template, out.strength = phrase, template, _check_strength(strength)
    return out
