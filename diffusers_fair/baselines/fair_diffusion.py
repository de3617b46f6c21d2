"""Fair Diffusion (Friedrich et al., "Fair Diffusion: Instructing Text-to-Image Generation Models on
Fairness", 2023): semantic guidance toward one attribute class and away from the others, per image.

Semantic guidance (SEGA, Brack et al., 2023) adds an edit term to classifier-free guidance. With
``ε∅``, ``εp`` and ``εc`` the noise predictions for the empty prompt, the prompt and an edit prompt
``c`` on its own::

    ψ_c = ± s_e (ε_c − ε∅)        (− for a reversed edit; entries below the λ-quantile of |ψ_c|,
                                    taken per sample and latent channel over H x W, are zeroed)
    g   = Σ_c w_c ψ_c + s_m ν,     ν ← β ν + (1 − β) g
    ε̂   = ε∅ + s_g (εp − ε∅) + g   (g added from the warm-up step on; ν accumulates from the start)

Fair Diffusion draws, per image, the class to steer toward at the target ratio (exactly half of
each occupation's images per gender, ``utils.py`` ``get_random``) and edits toward that class and
away from the other (``generate_images.py`` lines 69-98: ``editing_prompt=['male person', 'female
person']`` with ``reverse_editing_direction=[True, False]``, or the swap).

The guidance is diffusers' own :class:`~diffusers.SemanticStableDiffusionPipeline`, not a copy.
Its defaults differ from the authors' script, so :class:`FairDiffusionSettings` passes every value:
the authors' ``edit_warmup_steps=5, edit_guidance_scale=4, edit_threshold=0.95,
edit_momentum_scale=0.5, edit_mom_beta=0.6`` (and ``guidance_scale=7``, which callers choose).
Edit directions are set per call, not per sample, so a call's images are grouped by their drawn
cell and generated group by group from their own starting latents.

Beyond the authors' binary case: an attribute with ``K > 2`` classes is edited toward the drawn
class with weight 1 and away from each of the ``K − 1`` others with weight ``1 / (K − 1)``, so the
push away has the binary case's total weight; several attributes are edited at once, one edit
prompt per class. ``strength`` scales ``s_e``; at 0 there is no edit term, the call is not split
into groups, and the images are the stock pipeline's, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from diffusers import SemanticStableDiffusionPipeline

from ..method.targets import TargetDistribution
from .calls import concatenate, per_image_call
from .draws import draw_cells, group_by_prompt, joint_target
from .prompt_intervention import check_phrases


@dataclass
class FairDiffusionSettings:
    """The semantic-guidance values, the Fair Diffusion authors' by default (``generate_images.py`` 88-98).

    Attributes:
        edit_guidance_scale: ``s_e``, the edit scale at strength 1.
        edit_warmup_steps: sampling steps before the edit term is added (5 of the authors' 50).
        edit_cooldown_steps: the step from which the edit term stops (``None``: never).
        edit_threshold: ``λ``, the quantile of ``|ψ_c|`` below which entries are zeroed.
        edit_momentum_scale: ``s_m``.
        edit_mom_beta: ``β``.
    """

    edit_guidance_scale: float = 4.0
    edit_warmup_steps: int = 5
    edit_cooldown_steps: int | None = None
    edit_threshold: float = 0.95
    edit_momentum_scale: float = 0.5
    edit_mom_beta: float = 0.6


class FairDiffusionPipeline(SemanticStableDiffusionPipeline):
    """Semantic guidance toward a cell drawn per image at the target ratio (see the module doc).

    Made by :func:`fair_diffusion`; attributes ``target``, ``concepts`` (attribute -> class -> edit
    prompt), ``settings``, ``strength`` and ``balanced``. Called like the SEGA pipeline without its
    ``editing_*`` arguments, which it sets per image.
    """

    target: TargetDistribution | None = None
    concepts: Mapping[str, Mapping[str, str]] = {}
    settings: FairDiffusionSettings = FairDiffusionSettings()
    strength: float = 1.0
    balanced: bool = True

    def edit_arguments(self, cell: Sequence[str]) -> dict:
        """SEGA's edit arguments for images steered toward ``cell`` (one class per attribute)."""
        prompts, reverse, weights = [], [], []
        for attribute, chosen in zip(self.target.attributes, cell):
            classes = self.target.classes[attribute]
            for name in classes:
                prompts.append(self.concepts[attribute][name])
                reverse.append(name != chosen)
                weights.append(1.0 if name == chosen else 1.0 / max(len(classes) - 1, 1))
        settings = asdict(self.settings)
        settings["edit_guidance_scale"] = self.strength * settings["edit_guidance_scale"]
        return {"editing_prompt": prompts, "reverse_editing_direction": reverse, "edit_weights": weights, **settings}

    def __call__(self, prompt, height=None, width=None, num_inference_steps=50, guidance_scale=7.5,
                 negative_prompt=None, num_images_per_prompt=1, eta=0.0, generator=None, latents=None,
                 output_type="pil", return_dict=True, **kwargs):
        if self.target is None:
            raise ValueError("this pipeline has no target; make it with diffusers_fair.baselines.fair_diffusion")
        passed = sorted(k for k in kwargs if k.startswith("edit") or k in ("reverse_editing_direction", "sem_guidance"))
        if passed:
            raise ValueError(f"{passed} are set per image by Fair Diffusion; change FairDiffusionSettings instead")
        call = per_image_call(self, prompt, negative_prompt, num_images_per_prompt, latents, generator, height, width,
                              self.unet.dtype)
        if self.strength == 0:
            # no edit term: one call without edits, as the stock pipeline batches it (smaller groups
            # would change the images by floating-point rounding)
            return super().__call__(call.prompts, height=height, width=width, num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale, negative_prompt=call.negative_prompts, eta=eta,
                                    generator=generator, latents=call.latents, output_type=output_type,
                                    return_dict=return_dict, **kwargs)
        cells = [None] * len(call.prompts)
        for positions in group_by_prompt(call.prompts).values():
            for position, cell in zip(positions, draw_cells(self.target, call.latents[positions],
                                                            balanced=self.balanced)):
                cells[position] = cell
        groups: dict[tuple, list[int]] = {}
        for position, cell in enumerate(cells):
            # one call per prompt and cell: SEGA's edit prompts and its negative prompts apply to the whole call
            negative = None if call.negative_prompts is None else call.negative_prompts[position]
            groups.setdefault((call.prompts[position], negative, cell), []).append(position)
        outputs, order = [], []
        for (text, negative, cell), positions in groups.items():
            result = super().__call__(
                [text] * len(positions), height=height, width=width, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, negative_prompt=None if negative is None else [negative] * len(positions),
                eta=eta, generator=generator, latents=call.latents[positions], output_type=output_type,
                return_dict=True, **self.edit_arguments(cell), **kwargs)
            outputs.append(result.images)
            order += positions
        images = concatenate(outputs, order)
        if not return_dict:
            return (images, None)
        from diffusers.pipelines.deprecated.semantic_stable_diffusion.pipeline_output import (
            SemanticStableDiffusionPipelineOutput,
        )

        return SemanticStableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)


def fair_diffusion(pipe, targets: TargetDistribution | Sequence[TargetDistribution],
                   concepts: Mapping[str, Mapping[str, str]], *, settings: FairDiffusionSettings | None = None,
                   strength: float = 1.0, balanced: bool = True) -> FairDiffusionPipeline:
    """Fair Diffusion on a stock pipeline's modules (shared, not copied or changed).

    Args:
        pipe: a stock ``StableDiffusionPipeline``.
        targets: the target distribution(s); several are combined as independent.
        concepts: attribute -> class -> edit prompt, e.g. ``{"gender": {"male": "male person",
            "female": "female person"}}`` (the authors').
        settings: the semantic-guidance values (default: the authors').
        strength: multiplies ``edit_guidance_scale`` (0: the stock pipeline's images).
        balanced: each prompt's images are split exactly at the target ratio (the authors'), else
            each image draws its own direction.

    Raises:
        ValueError: for an edit prompt missing for some class or a negative strength.
    """
    target = joint_target(targets)
    check_phrases(target, concepts)
    if float(strength) < 0:
        raise ValueError(f"strength must be non-negative, got {strength}")
    out = FairDiffusionPipeline.from_pipe(pipe)
    out.target, out.concepts = target, {a: dict(c) for a, c in concepts.items()}
    out.settings = settings or FairDiffusionSettings()
    out.strength, out.balanced = float(strength), balanced
    return out
