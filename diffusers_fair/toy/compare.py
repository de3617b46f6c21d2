"""The toy world's Table 1: the fair adaptor against the published alternatives, on the held-out words.

Every method starts from the shipped toy model and gets the demo's targets (hair length and skin
tone uniform). Each is audited with the demo's held-out audit (:func:`diffusers_fair.toy.audit.audit_pipeline`,
the demo's guidance and steps) on the same held-out words from the same seeded noise, and compared
with the base model's images from that noise (:func:`diffusers_fair.toy.demo.image_similarity`):

| name | method | what it is given |
|---|---|---|
| ``base`` | the toy model | - |
| ``ours`` | the shipped adaptor for these targets (``toy-gender-race``), or a fresh demo training | the training words |
| ``prompt`` | the prompt with the attribute, cells drawn per image at the target ratio | nothing more |
| ``ethical`` | "if all individuals can be a {word} irrespective of their hair length and skin tone" | the held-out words |
| ``fair-diffusion`` | semantic guidance toward the drawn cell, away from the others | nothing more |
| ``uce`` | closed-form cross-attention edit of each concept, re-balanced by generating | the held-out or training words |
| ``debias-vl`` | calibrated projection of the prompt embedding | the training words |

The attribute words are the toy world's explicit trait words: "with long hair" in the prompt
(as in ``world.explicit_prompt``), and the explicit prompts "a photo of the face of a person with
long hair" as Fair Diffusion's edit prompts and UCE's attribute texts. docs/BASELINES.md lists
every setting and where it departs from the authors'.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..baselines import (
    FairDiffusionSettings,
    UCESettings,
    debias_vl,
    ethical_intervention,
    ethical_intervention_phrase,
    fair_diffusion,
    prompt_intervention,
    uce_debias,
)
from ..baselines.debias_vl import DEFAULT_LAMBDA
from ..evaluation.comparison import CHANGES_PROMPT, METHODS, check_methods, write_comparison
from . import world
from .audit import AuditResult, audit_pipeline
from .demo import DemoSettings, audit_settings, demo_experiment, image_similarity, load_toy_pipeline
from .render import TRAITS


TEMPLATE = "{prompt} with {attributes}"  # "... a person with long hair and deep skin"
TRAIT_WORDS = {"hair_length": "hair length", "skin_tone": "skin tone", "hair_colour": "hair colour"}
AUTHORS_STEPS = 50  # Fair Diffusion's warm-up of 5 steps is counted out of 50


@dataclass
class CompareSettings:
    """What the comparison runs.

    Attributes:
        seed: the audit noise (and the training draws with ``train``, UCE's loop noise).
        images_per_word, num_words: the held-out audit (the demo's: 32 images, 20 words).
        adaptor: the shipped adaptor that is ``ours`` (an index name or a folder).
        train: train ``ours`` afresh with the demo's settings instead (about 7 minutes).
        uce_concepts: ``"held-out"`` (UCE edits the audited words, as it is used: the user names
            the concepts) or ``"train"`` (the training words, like the other methods).
        uce_iterations: UCE's re-balancing iterations at most (the authors' 30; fewer on a CPU).
        debias_vl_lambda: Debias-VL's ``λ`` (the authors' 500).
        threads: torch threads.
    """

    seed: int = 0
    images_per_word: int = 32
    num_words: int = 20
    adaptor: str = "toy-gender-race"
    train: bool = False
    uce_concepts: str = "held-out"
    uce_iterations: int = 10
    debias_vl_lambda: float = DEFAULT_LAMBDA
    threads: int = 1


def phrases(attributes) -> dict[str, dict[str, str]]:
    """Attribute -> class -> its explicit trait words ("long hair", "deep skin")."""
    return {a: {c: world.explicit_prompt(**{a: c}).split(" with ", 1)[1] for c in TRAITS[a]} for a in attributes}


def explicit_prompts(attributes) -> dict[str, dict[str, str]]:
    """Attribute -> class -> the explicit prompt naming it ("a photo of the face of a person with long hair")."""
    return {a: {c: world.explicit_prompt(**{a: c}) for c in TRAITS[a]} for a in attributes}


def build_method(name: str, base, settings: CompareSettings, components, out: Path):
    """``(pipeline, extra record entries)`` of one method, made from the base pipeline ``base``."""
    targets = demo_experiment().targets
    attributes = [a for t in targets for a in t.attributes]
    held_out = world.words("occupation", "test")[: settings.num_words]
    train_prompts = [world.prompt(w) for w in world.words("occupation", "train")]
    sampling = audit_settings(DemoSettings(seed=settings.seed))
    if name == "ours":
        return _ours(base, settings, out), {"adaptor": "trained" if settings.train else settings.adaptor}
    if name == "prompt":
        return prompt_intervention(base, targets, phrases(attributes), template=TEMPLATE), {}
    if name == "ethical":
        subjects = {world.prompt(w): f"a {w.name}" for w in held_out}
        about = [TRAIT_WORDS[a] for a in attributes]
        return ethical_intervention(
            base, lambda prompt: ethical_intervention_phrase(subjects.get(prompt, "a person"), about)), {}
    if name == "fair-diffusion":
        warmup = round(FairDiffusionSettings().edit_warmup_steps * sampling["num_inference_steps"] / AUTHORS_STEPS)
        fd = FairDiffusionSettings(edit_warmup_steps=warmup)
        return fair_diffusion(base, targets, explicit_prompts(attributes), settings=fd), {"settings": asdict(fd)}
    if name == "uce":
        pipe = type(base).from_pipe(base, unet=copy.deepcopy(base.unet))
        words = held_out if settings.uce_concepts == "held-out" else world.words("occupation", "train")
        uce = UCESettings(max_iterations=settings.uce_iterations, num_inference_steps=sampling["num_inference_steps"],
                          guidance_scale=sampling["guidance_scale"])
        result = uce_debias(pipe, targets, [world.prompt(w) for w in words], explicit_prompts(attributes), components,
                            settings=uce, seed=settings.seed)
        return pipe, {"settings": asdict(uce), "concepts": settings.uce_concepts, "iterations": result.iterations,
                      "errors": result.errors}
    if name == "debias-vl":
        pipe = debias_vl(base, train_prompts, targets, phrases(attributes), template=TEMPLATE,
                         lam=settings.debias_vl_lambda)
        return pipe, {"lambda": settings.debias_vl_lambda}
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def _ours(base, settings: CompareSettings, out: Path):
    from ..adaptors.pipeline import load_fair_adaptor
    from .demo import run_experiment

    source = settings.adaptor
    if settings.train:
        demo = DemoSettings(seed=settings.seed, images_per_word=settings.images_per_word, num_words=settings.num_words)
        run_experiment(out / "ours-training", demo_experiment(), demo)
        source = out / "ours-training" / "adaptor"
    pipe = load_toy_pipeline(fair=True)
    load_fair_adaptor(pipe, source)
    return pipe


def record(audit: AuditResult, base: AuditResult, components, seconds: float, audit_seconds: float) -> dict:
    """One method's entry of the comparison: bias and shares per trait, similarity, times."""
    return {
        "bias": {a: audit.summary[a].mean_bias for a in TRAITS},
        "shares": {a: audit.summary[a].shares for a in TRAITS},
        "similarity": image_similarity(base.images, audit.images, components),
        "seconds": round(seconds, 1),
        "audit_seconds": round(audit_seconds, 1),
    }


def run_comparison(out: str | Path, methods=METHODS, settings: CompareSettings | None = None) -> dict:
    """Audit the base model and every method in ``methods`` on the held-out words; write the comparison into ``out``.

    Returns the comparison (see :mod:`diffusers_fair.evaluation.comparison`), also written as
    ``out/comparison.json`` with ``comparison.md`` and ``comparison.png``.

    Raises:
        ValueError: for an unknown method or settings out of range, before anything runs.
    """
    from .components import load_toy_components

    settings = settings or CompareSettings()
    check_methods(methods, settings.uce_concepts)
    if settings.images_per_word < 1 or not 1 <= settings.num_words <= len(world.words("occupation", "test")):
        raise ValueError("images_per_word must be positive and num_words between 1 and the 20 held-out words")
    torch.set_num_threads(settings.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    components = load_toy_components()
    held_out = world.words("occupation", "test")[: settings.num_words]
    sampling = audit_settings(DemoSettings(seed=settings.seed))

    def audit(pipe) -> tuple[AuditResult, float]:
        started = time.time()
        result = audit_pipeline(pipe, held_out, settings.images_per_word, components, keep_images=True,
                                batch_size=settings.images_per_word, **sampling)
        return result, time.time() - started

    base_pipe = load_toy_pipeline()
    print(f"auditing base on {len(held_out)} held-out words", flush=True)
    base, base_seconds = audit(base_pipe)
    comparison = {
        "targeted": list(demo_experiment().debiased),
        "methods": {"base": {**record(base, base, components, 0.0, base_seconds), "changes_prompt": False}},
        "settings": {**asdict(settings), **sampling, "held_out_words": [w.name for w in held_out],
                     "targets": [str(t) for t in demo_experiment().targets]},
    }
    write_comparison(comparison, out)  # and after every method, so that a stopped run keeps what it measured
    for name in methods:
        print(f"applying {name}", flush=True)
        started = time.time()
        pipe, extra = build_method(name, base_pipe, settings, components, out)
        seconds = time.time() - started
        print(f"auditing {name}", flush=True)
        result, audit_seconds = audit(pipe)
        comparison["methods"][name] = {**record(result, base, components, seconds, audit_seconds),
                                       "changes_prompt": name in CHANGES_PROMPT, **extra}
        write_comparison(comparison, out)
    print((out / "comparison.md").read_text(), flush=True)
    return comparison
