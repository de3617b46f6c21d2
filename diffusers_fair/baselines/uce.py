"""UCE debiasing (Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024): a
closed-form edit of the U-Net's cross-attention keys and values, re-balanced by generating and counting.

This follows the authors' current script (``trainscripts/uce_sd_debias.py`` at commit 28c81ed), not
the 2023 one (``train_debias.py``), which differs in the tokens it edits, in how it scales and
accumulates the attribute directions and in its preserve set. For every ``to_k`` and ``to_v`` of
every ``attn2`` (lines 41-44), with ``W₀`` the original weight, ``c`` the text-encoder output at
the last word token of an edit concept (lines 58-66) and ``a`` that of an attribute class::

    v*_c = W₀ c + Σ_a α_{c,a} W₀ a                                              (lines 124-127)
    W = (λ W₀ + s_e Σ_E v*_c cᵀ + s_p Σ_P W₀ c cᵀ) (λ I + s_e Σ_E c cᵀ + s_p Σ_P c cᵀ)⁻¹   (lines 114-140)

Every solve starts from ``W₀`` (line 116). The re-balancing loop (lines 14-35, 173-179): generate
``images_per_concept`` images of each edit concept with the current weights, read their attribute
shares ``p̂``, and add ``p* − p̂`` to ``α`` (the script accumulates it in place, line 124; its
``step_size`` is unused); a concept within ``tolerance`` of the target on every class gets no
update; stop when every concept is, or after ``max_iterations``. Defaults: ``λ = 0.5``, ``s_e =
s_p = 1``, 30 iterations, tolerance 0.05, 10 images per concept, 20 steps, guidance 7.5.

Differences from the script: the shares are read with the given face detector and attribute
classifier (the script asks CLIP ViT-B/32 zero-shot which attribute word fits the whole image);
images without a face are left out of the shares; several attributes are balanced at once (one ``α``
per class of each, the shares read per attribute); the loop's noise is seeded; the model stays in
float32 and the solve runs in float64 (the script generates in bfloat16 and inverts in float32).
``strength`` multiplies every update of ``α``; at 0 the weights are left as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..components.faces import read_faces
from ..method.targets import TargetDistribution
from .draws import joint_target


@dataclass
class UCESettings:
    """The values of the authors' script (``uce_sd_debias.py`` argument defaults).

    Attributes:
        lamb: ``λ``, the weight of staying at ``W₀``.
        edit_scale: ``s_e``; ``preserve_scale``: ``s_p``.
        max_iterations: re-balancing iterations at most; ``tolerance``: the largest error in a share
            that counts as balanced.
        images_per_concept: images generated per edit concept and iteration.
        num_inference_steps, guidance_scale: the loop's sampling.
    """

    lamb: float = 0.5
    edit_scale: float = 1.0
    preserve_scale: float = 1.0
    max_iterations: int = 30
    tolerance: float = 0.05
    images_per_concept: int = 10
    num_inference_steps: int = 20
    guidance_scale: float = 7.5


@dataclass
class UCEResult:
    """What :func:`uce_debias` did.

    Attributes:
        weights: module name + ``".weight"`` -> the edited weight (the ``load_state_dict`` form the
            authors save).
        original: the same names -> the original weights (to undo the edit).
        iterations: solves made.
        errors: per iteration, the largest ``|p* − p̂|`` over concepts and classes, measured before its solve.
        converged: every concept reached the tolerance.
    """

    weights: dict[str, torch.Tensor]
    original: dict[str, torch.Tensor]
    iterations: int = 0
    errors: list[float] = field(default_factory=list)
    converged: bool = False


def cross_attention_projections(unet) -> dict[str, torch.nn.Linear]:
    """Name -> module of every ``to_k`` and ``to_v`` of the U-Net's cross-attention (``attn2``) layers."""
    return {name: module for name, module in unet.named_modules()
            if "attn2" in name and (name.endswith("to_k") or name.endswith("to_v"))}


@torch.no_grad()
def last_word_embedding(pipe, text: str) -> torch.Tensor:
    """``(D,)`` the text encoder's output at the last word token of ``text`` (the one before end-of-text)."""
    mask = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").attention_mask
    embeds = pipe.encode_prompt(text, device=pipe.text_encoder.device, num_images_per_prompt=1,
                                do_classifier_free_guidance=False)[0]
    return embeds[0, int(mask.sum()) - 2].float()


def solve(original: torch.Tensor, edits: Sequence[tuple[torch.Tensor, torch.Tensor]],
          preserve: Sequence[torch.Tensor], settings: UCESettings) -> torch.Tensor:
    """The closed-form weight of the module doc, for one module (float64 solve, the original's dtype).

    Args:
        original: ``W₀`` ``(out, in)``.
        edits: ``(c, v*)`` pairs, ``(in,)`` and ``(out,)``.
        preserve: the ``c`` to keep, ``(in,)`` each.
    """
    w0 = original.double()
    mat1 = settings.lamb * w0
    mat2 = settings.lamb * torch.eye(w0.shape[1], dtype=torch.float64)
    for c, v in edits:
        c, v = c.double()[:, None], v.double()[:, None]
        mat1 = mat1 + settings.edit_scale * (v @ c.T)
        mat2 = mat2 + settings.edit_scale * (c @ c.T)
    for c in preserve:
        c = c.double()[:, None]
        mat1 = mat1 + settings.preserve_scale * (w0 @ c @ c.T)
        mat2 = mat2 + settings.preserve_scale * (c @ c.T)
    return (mat1 @ torch.linalg.inv(mat2)).to(original.dtype)


@torch.no_grad()
def measured_shares(pipe, concept: str, classes: Mapping[str, Sequence[str]], components, settings: UCESettings,
                    generator: torch.Generator) -> dict[str, torch.Tensor] | None:
    """Attribute -> ``(K,)`` class shares read from ``images_per_concept`` images of ``concept``; ``None`` without faces."""
    images = pipe(concept, num_images_per_prompt=settings.images_per_concept, generator=generator,
                  num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                  output_type="pt").images.float()
    reading = read_faces(images, components.detector, components.classifier,
                         crop_factor=float(getattr(components, "crop_factor", 1.0)))
    found = reading.found.cpu()
    if not bool(found.any()):
        return None
    shares = {}
    for attribute, names in classes.items():
        labels = reading.logits[attribute].cpu()[found].argmax(dim=1)
        shares[attribute] = torch.bincount(labels, minlength=len(names)).double() / int(found.sum())
    return shares


def uce_debias(pipe, targets: TargetDistribution | Sequence[TargetDistribution], concepts: Sequence[str],
               attribute_prompts: Mapping[str, Mapping[str, str]], components, *,
               preserve_concepts: Sequence[str] = (), settings: UCESettings | None = None, strength: float = 1.0,
               seed: int = 0, progress: bool = True) -> UCEResult:
    """Edit ``pipe``'s U-Net in place so that the images of each concept follow the target marginals.

    Args:
        pipe: a stock ``StableDiffusionPipeline``; its cross-attention ``to_k`` / ``to_v`` weights
            are replaced (``result.original`` undoes it).
        targets: the target distribution(s); each attribute's marginal is balanced.
        concepts: the edit concepts: texts whose last word token is edited and whose images the loop
            generates (the authors: profession words).
        attribute_prompts: attribute -> class -> the text whose last word token stands for the class
            (the authors: "male", "female").
        components: ``detector``, ``classifier`` (with every target attribute) and optionally
            ``crop_factor``, to read the loop's images.
        preserve_concepts: texts whose outputs are kept (none in the authors' script).
        settings: the authors' values by default.
        strength: multiplies each update of ``α`` (0: nothing is edited).
        seed: seeds the loop's noise.

    Raises:
        ValueError: for no concepts, an attribute prompt missing, an attribute the classifier does not
            read, or a negative strength.
    """
    from tqdm.auto import tqdm

    settings = settings or UCESettings()
    target = joint_target(targets)
    marginals = {a: target.marginal(a) for a in target.attributes}
    if not concepts:
        raise ValueError("concepts is empty; give the texts to debias")
    if float(strength) < 0:
        raise ValueError(f"strength must be non-negative, got {strength}")
    for attribute, classes in target.classes.items():
        missing = [c for c in classes if c not in attribute_prompts.get(attribute, {})]
        if missing:
            raise ValueError(f"attribute_prompts has no text for {attribute} classes {missing}")
        if list(components.classifier.attributes.get(attribute, ())) != list(classes):
            raise ValueError(f"the classifier does not read {attribute} with classes {list(classes)}")

    modules = cross_attention_projections(pipe.unet)
    original = {name: module.weight.detach().clone() for name, module in modules.items()}
    result = UCEResult(weights={f"{n}.weight": w.clone() for n, w in original.items()},
                       original={f"{n}.weight": w for n, w in original.items()})
    if float(strength) == 0:
        return result

    attribute_texts = [(a, c, attribute_prompts[a][c]) for a, classes in target.classes.items() for c in classes]
    embeds = {text: last_word_embedding(pipe, text)
              for text in list(concepts) + [t for _, _, t in attribute_texts] + list(preserve_concepts)}
    # W₀ x for every module and text: the guide outputs of the script (lines 68-84)
    outputs = {name: {text: original[name] @ e.to(original[name].dtype) for text, e in embeds.items()}
               for name in modules}
    alpha = torch.zeros(len(concepts), len(attribute_texts), dtype=torch.float64)
    desired = torch.cat([marginals[a].probs.double() for a in target.attributes])
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(settings.max_iterations), desc="UCE", disable=not progress):
        update = torch.zeros_like(alpha)
        for index, concept in enumerate(concepts):
            shares = measured_shares(pipe, concept, target.classes, components, settings, generator)
            if shares is None:
                continue
            error = desired - torch.cat([shares[a] for a in target.attributes])
            if float(error.abs().max()) >= settings.tolerance:
                update[index] = error
        result.errors.append(float(update.abs().max()))
        if not bool(update.any()):
            result.converged = True
            break
        alpha += float(strength) * update
        for name, module in modules.items():
            edits = []
            for index, concept in enumerate(concepts):
                v = outputs[name][concept].double().clone()
                for k, (_, _, text) in enumerate(attribute_texts):
                    v += alpha[index, k] * outputs[name][text].double()
                edits.append((embeds[concept], v))
            weight = solve(original[name], edits, [embeds[t] for t in preserve_concepts], settings)
            module.weight.data.copy_(weight)
            result.weights[f"{name}.weight"] = weight.detach().clone()
        result.iterations += 1
    return result
