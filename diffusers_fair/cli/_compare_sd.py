"""``diffusers-fair compare --config CONFIG``: Table 1 on Stable Diffusion, from a ``diffusers-fair train`` config.

The config names everything: the base model (``training.base_model``), the targets, the training
prompts, the components and the held-out audit (``evaluation.prompts`` and
``evaluation.images_per_prompt``). Every method is audited with
:func:`diffusers_fair.evaluation.audit.evaluate` on the held-out prompts from the same seeded noise,
with the evaluation classifier (``components.eval_classifier``), and compared with the base model's
images from that noise (CLIP-I, else DINO):

| name | method | what it is given |
|---|---|---|
| ``base`` | ``training.base_model`` | - |
| ``ours`` | the trained adaptor: ``--adaptor``, else ``<training.output_dir>/adaptor`` | the training prompts |
| ``prompt`` | the prompt with the attribute (", male"), cells drawn per image at the target ratio | nothing more |
| ``ethical`` | "if all individuals can be a {subject} irrespective of their {attributes}" | the held-out prompts |
| ``fair-diffusion`` | semantic guidance toward "{class} person", away from the others | nothing more |
| ``uce`` | closed-form cross-attention edit, re-balanced by generating (read with the training classifier) | the held-out or training prompts |
| ``debias-vl`` | calibrated projection of the prompt embedding | the training prompts |

The baselines keep their authors' settings (docs/BASELINES.md). Training ``ours`` here is not
offered: run ``diffusers-fair train CONFIG`` first.

The base model's images are generated once, from the audit's noise, and kept in
``OUT/base_images`` (one safetensors file per prompt, in the pipeline's precision): every method's
audit compares with them (``reference_images``), and the base model's own numbers are read from them
in the first method's audit. A stopped comparison resumes where it stopped when run again with the
same arguments: ``OUT/audits/progress.json`` holds its settings and the numbers of the finished
methods, which are not run again, and ``OUT/audits/<method>/prompts`` the audited prompts of the
method it stopped in. Other settings are refused.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._utils.io import load_safetensors, read_json, read_safetensors_header, replace_atomically
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


# The words naming a class in a prompt; a class not listed is named by itself ("_" read as a space).
CLASS_WORDS = {"wmelh": "white", "asian": "Asian", "black": "Black", "indian": "Indian"}
GUIDANCE_SCALE, STEPS = 7.5, 25  # the audit's sampling, as diffusers-fair eval's for Stable Diffusion
# What a comparison keeps in its output folder besides comparison.json, .md and .png.
BASE_IMAGES, AUDITS, PROGRESS = "base_images", "audits", "progress.json"


@dataclass
class SDCompareSettings:
    """What the Stable Diffusion comparison runs.

    Attributes:
        seed: the audit noise and UCE's loop noise.
        adaptor: ``ours`` (a folder or index name); ``None``: ``<training.output_dir>/adaptor``.
        uce_concepts: ``"held-out"`` (UCE edits the audited prompts) or ``"train"`` (the training prompts).
        uce_iterations: UCE's re-balancing iterations at most (the authors' 30).
        batch_size: images per pipeline call; ``None``: all of a prompt's images in one call, so the
            per-image draws of prompt intervention and Fair Diffusion are exactly at the target ratio.
    """

    seed: int = 0
    adaptor: str | None = None
    uce_concepts: str = "held-out"
    uce_iterations: int = 10
    batch_size: int | None = None


def class_words(attributes: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """Attribute -> class -> the word naming it ("male", "Asian")."""
    return {a: {c: CLASS_WORDS.get(c, c.replace("_", " ")) for c in classes} for a, classes in attributes.items()}


def subject_of(prompt: str) -> str:
    """Who a prompt shows, for the ethical intervention: "a photo of the face of a baker, a person" -> "a baker"."""
    subject = prompt.rsplit(" of ", 1)[-1].split(",", 1)[0].strip()
    return subject or "a person"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base_pipeline(model: str, device: torch.device, dtype: torch.dtype):
    """A fresh ``StableDiffusionPipeline`` of ``model`` (a Hub id or folder) on ``device``."""
    from ..components.families import load_pipeline

    return load_pipeline(model, dtype=dtype, safety_checker=None, requires_safety_checker=False).to(device)


def load_components(experiment, device: torch.device, dtype: torch.dtype):
    """The config's ``SD15Components`` with the evaluation classifier loaded."""
    from ..components.stable_diffusion import load_sd15_components

    return load_sd15_components(experiment.components, device=device, dtype=dtype, load_eval_classifier=True)


def check_sd_experiment(experiment, methods: Sequence[str], settings: SDCompareSettings) -> str:
    """Refuse what cannot run, before anything is loaded; return the adaptor that is ``ours``.

    Raises:
        ValueError: a toy-world config, no ``evaluation`` section, no evaluation classifier, no
            CLIP or DINOv2 for the similarity, no method, an unknown method or UCE concept set, or no adaptor.
    """
    from ..training.experiment import adaptor_folder

    source = experiment.source
    if experiment.toy_world:
        raise ValueError(f"{source} is a toy-world config: run diffusers-fair compare without --config for the toy "
                         "world's comparison")
    check_methods(methods, settings.uce_concepts)
    if not methods:  # the base model's numbers are read in a method's audit
        raise ValueError(f"no methods to compare with the base model: name one or more of {', '.join(METHODS)}")
    if experiment.evaluation is None:
        raise ValueError(f"{source} has no 'evaluation' section: add {{prompts: FILE, images_per_prompt: N}}, the "
                         "held-out prompts of the comparison")
    if experiment.components.eval_classifier is None:
        raise ValueError(f"{source} has no components.eval_classifier, the classifier the comparison audits with")
    if experiment.components.clip_model is None and experiment.components.dinov2 is None:
        raise ValueError(f"{source} names neither components.clip_model nor components.dinov2: the similarity to the "
                         "base images needs one")
    adaptor = settings.adaptor
    if adaptor is None and "ours" in methods:
        adaptor = str(adaptor_folder(experiment))
        if not Path(adaptor).is_dir():
            raise ValueError(f"no adaptor at {adaptor}: train it with diffusers-fair train {source}, or pass --adaptor "
                             "(--train runs on the toy world only)")
    return adaptor


# --------------------------------------------------------------------------- the base images, generated once
def base_image_file(folder: Path, prompt: str) -> Path:
    """Where ``prompt``'s base images are kept: named by the digest the audit's prompt cache uses."""
    from ..evaluation.audit import PromptCache

    return Path(folder) / f"{PromptCache.key(prompt)}.safetensors"


def save_base_images(pipe, prompts: Sequence[str], folder: Path, settings: dict) -> float:
    """Generate and keep the images of every prompt that ``folder`` lacks; return the seconds all of them took.

    A prompt's images start from the audit's noise (:func:`~diffusers_fair.evaluation.audit.initial_noise`)
    and are generated as the audit generates them, so an audit given them as ``reference_images``
    measures what it measures with ``reference_pipe=pipe``. They are kept in the precision of the
    VAE that decoded them (float16 on a GPU), exactly as made, under the key ``"images"``; the file's header holds the
    prompt, ``settings`` (seed, images per prompt, batch size, sampling) and the seconds it took.
    A file is written whole or not at all, so a stopped run leaves only finished prompts.

    Raises:
        ValueError: a file in ``folder`` made for another prompt or with other settings, or unreadable.
    """
    from safetensors.torch import save_file

    from ..evaluation.audit import generate, initial_noise, latent_shape

    settings = json.loads(json.dumps(settings))  # as it reads back from a header
    folder.mkdir(parents=True, exist_ok=True)
    shape = latent_shape(pipe)
    total = 0.0
    progress_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        for prompt in prompts:
            path = base_image_file(folder, prompt)
            if path.exists():
                header = read_safetensors_header(path, f"base images {path}")
                if header.get("prompt") != prompt or json.loads(header.get("settings", "null")) != settings:
                    raise ValueError(f"{path} holds base images made for another prompt or with other settings: "
                                     "remove it, or pass --overwrite to start the comparison over")
                total += float(header["seconds"])
                continue
            started = time.time()
            noise = initial_noise(settings["seed"], prompt, settings["images_per_prompt"], shape)
            images = generate(pipe, prompt, noise, guidance_scale=settings["guidance_scale"],
                              num_inference_steps=settings["num_inference_steps"], batch_size=settings["batch_size"])
            seconds = time.time() - started
            # the VAE decodes the images: in its precision they are kept without loss
            tensors = {"images": images.to(pipe.vae.dtype).contiguous()}
            header = {"prompt": prompt, "settings": json.dumps(settings), "seconds": f"{seconds:.3f}"}
            replace_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=header))
            total += seconds
    finally:
        pipe.set_progress_bar_config(**progress_bar)
    return total


class StoredImages(Mapping):
    """Prompt -> its ``(N, 3, H, W)`` base images, read from ``folder`` when asked (:func:`save_base_images`).

    The ``reference_images`` of :func:`~diffusers_fair.evaluation.audit.evaluate`, holding one
    prompt's images in memory at a time rather than every prompt's.
    """

    def __init__(self, folder: Path, prompts: Sequence[str]):
        self.folder = Path(folder)
        self.prompts = list(prompts)

    def __getitem__(self, prompt: str) -> torch.Tensor:
        if prompt not in self.prompts:
            raise KeyError(prompt)
        path = base_image_file(self.folder, prompt)
        return load_safetensors(path, f"base images {path}")["images"]

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    def __len__(self) -> int:
        return len(self.prompts)


# --------------------------------------------------------------------------- resuming
def read_progress(out: Path) -> dict | None:
    """``out/audits/progress.json``: ``{"settings": ..., "records": {method: numbers}}``, or ``None`` if absent.

    Raises:
        ValueError: the file is unreadable or not a progress file.
    """
    path = Path(out) / AUDITS / PROGRESS
    if not path.exists():
        return None
    progress = read_json(path, "comparison progress file")
    if not (isinstance(progress, dict) and isinstance(progress.get("settings"), dict)
            and isinstance(progress.get("records"), dict)):
        raise ValueError(f"{path} is not a comparison progress file: remove it, or pass --overwrite to start over")
    return progress


def write_progress(out: Path, settings: dict, records: dict) -> None:
    """Replace ``out/audits/progress.json`` whole with ``settings`` and the finished methods' ``records``."""
    path = Path(out) / AUDITS / PROGRESS
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"settings": settings, "records": records}, indent=1) + "\n"
    replace_atomically(path, lambda temporary: temporary.write_text(text))


def interrupted_comparison(out: str | Path) -> bool:
    """Whether ``out`` holds a comparison that stopped before every method was audited (it can be resumed)."""
    try:
        progress = read_progress(Path(out))
    except ValueError:
        return False
    if progress is None:
        return False
    methods = progress["settings"].get("methods")
    return isinstance(methods, list) and not {"base", *methods} <= set(progress["records"])


def run_sd_comparison(config: str | Path, out: str | Path, methods: Sequence[str] = METHODS,
                      overrides: Sequence[str] = (), settings: SDCompareSettings | None = None) -> dict:
    """Audit the base model and every method in ``methods`` on the config's held-out prompts; write the comparison.

    Returns the comparison (see :mod:`diffusers_fair.evaluation.comparison`), also written as
    ``out/comparison.json`` with ``comparison.md`` and ``comparison.png`` after every method. When
    ``out`` holds a comparison started with the same settings, its finished methods and audited
    prompts are kept and only the rest is run (see the module doc).

    Raises:
        ValueError: a config the comparison cannot run (:func:`check_sd_experiment`), no methods, an
            ``out`` holding a comparison started with other settings (before anything is loaded), or an
            SDXL base model (before any method is applied).
    """
    from .._utils.io import read_prompts
    from ..adaptors.pipeline import FairFinetunePipeline, load_fair_adaptor
    from ..components.base import EvalComponents
    from ..components.families import SD1, family_of
    from ..evaluation.audit import NOISE_SCHEME, evaluate
    from ..training.experiment import read_experiment

    settings = settings or SDCompareSettings()
    experiment = read_experiment(config, overrides)
    adaptor = check_sd_experiment(experiment, methods, settings)
    held_out = read_prompts(experiment.evaluation["prompts"])
    images_per_prompt = experiment.evaluation["images_per_prompt"]
    train_prompts = list(dict.fromkeys(p for s in experiment.prompt_sets for p in s.prompts))
    targets = experiment.targets
    device = _device()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = experiment.config.base_model
    out = Path(out)
    # What a stopped comparison in ``out`` must have been started with to be resumed.
    resume_settings = json.loads(json.dumps({
        **asdict(settings), "adaptor": adaptor, "methods": list(methods), "dtype": str(dtype),
        "held_out_prompts": held_out, "train_prompts": train_prompts, "experiment": experiment.to_dict()}))
    progress = read_progress(out)
    if progress is not None and progress["settings"] != resume_settings:
        earlier = progress["settings"]
        changed = sorted(k for k in set(earlier) | set(resume_settings) if earlier.get(k) != resume_settings.get(k))
        raise ValueError(f"{out} holds a comparison started with other settings ({', '.join(changed)}): run it "
                         "again with the same arguments to resume it, or pass --overwrite to start over")
    records = progress["records"] if progress is not None else {}

    base_pipe = load_base_pipeline(model, device, dtype)
    if family_of(base_pipe) is not SD1:
        raise ValueError(f"{model} is not a Stable Diffusion 1.x model: the baselines take SD 1.x pipelines")
    components = load_components(experiment, device, dtype)
    audit_components = components.evaluation_components()
    embedders = {name: e for name, e in (("clip", components.clip), ("dino", components.dinov2)) if e is not None}
    similarity_name = next(iter(embedders))
    # UCE's loop reads shares with the classifier the finetuning is guided by; the audit uses its own.
    loop_components = EvalComponents(classifier=components.classifier, detector=components.detector,
                                     crop_factor=components.crop_factor)
    attributes = {a: list(c) for t in targets for a, c in t.classes.items()}
    words = class_words(attributes)
    batch_size = settings.batch_size or images_per_prompt
    out.mkdir(parents=True, exist_ok=True)
    base_images = StoredImages(out / BASE_IMAGES, held_out)

    def audit(name, pipe):
        started = time.time()
        result = evaluate(pipe, held_out, audit_components, images_per_prompt=images_per_prompt, seed=settings.seed,
                          batch_size=batch_size, guidance_scale=GUIDANCE_SCALE, num_inference_steps=STEPS,
                          reference_images=base_images, image_embedders=embedders, num_samples=0,
                          out_dir=out / AUDITS / name, progress=False)
        return result, time.time() - started

    def record(result, source, seconds, audit_seconds, changes_prompt) -> dict:
        summary = result.summary(source)
        similarities = {n: s["mean"] for n, s in summary.get("similarity", {}).items()}
        return {"bias": {a: summary["groups"][a]["bias_mean"] for a in result.attributes},
                "shares": {a: summary["groups"][a]["freqs"] for a in result.attributes},
                "similarity": similarities.get(similarity_name, 1.0), "similarities": similarities,
                "no_face_share": summary["no_face_share"], "seconds": round(seconds, 1),
                "audit_seconds": round(audit_seconds, 1), "changes_prompt": changes_prompt}

    def build(name: str):
        if name == "ours":
            pipe = FairFinetunePipeline.from_pipe(load_base_pipeline(model, device, dtype))
            load_fair_adaptor(pipe, adaptor)
            return pipe, {"adaptor": adaptor}
        if name == "prompt":
            return prompt_intervention(base_pipe, targets, words), {}
        if name == "ethical":
            about = [a.replace("_", " ") for a in attributes]
            return ethical_intervention(base_pipe, lambda p: ethical_intervention_phrase(subject_of(p), about)), {}
        if name == "fair-diffusion":
            concepts = {a: {c: f"{w} person" for c, w in classes.items()} for a, classes in words.items()}
            fd = FairDiffusionSettings()
            return fair_diffusion(base_pipe, targets, concepts, settings=fd), {"settings": asdict(fd)}
        if name == "uce":
            pipe = type(base_pipe).from_pipe(base_pipe, unet=copy.deepcopy(base_pipe.unet))
            concepts = held_out if settings.uce_concepts == "held-out" else train_prompts
            uce = UCESettings(max_iterations=settings.uce_iterations)
            result = uce_debias(pipe, targets, concepts, words, loop_components, settings=uce, seed=settings.seed)
            return pipe, {"settings": asdict(uce), "concepts": settings.uce_concepts, "iterations": result.iterations,
                          "errors": result.errors}
        pipe = debias_vl(base_pipe, train_prompts, targets, words)  # "debias-vl"
        return pipe, {"lambda": DEFAULT_LAMBDA}

    comparison = {
        "targeted": list(attributes),
        "methods": {},
        "settings": {**asdict(settings), "config": str(experiment.source), "base_model": model,
                     "images_per_prompt": images_per_prompt, "guidance_scale": GUIDANCE_SCALE,
                     "num_inference_steps": STEPS, "similarity": similarity_name, "held_out_prompts": held_out,
                     "targets": [str(t) for t in targets]},
    }

    def write():
        # copies: write_comparison marks the Pareto fronts in the records it is given
        comparison["methods"] = {n: dict(records[n]) for n in ("base", *methods) if n in records}
        write_comparison(comparison, out)

    write_progress(out, resume_settings, records)
    image_settings = {"base_model": model, "seed": settings.seed, "images_per_prompt": images_per_prompt,
                      "batch_size": batch_size, "guidance_scale": GUIDANCE_SCALE, "num_inference_steps": STEPS,
                      "noise": NOISE_SCHEME, "dtype": str(dtype)}
    print(f"generating the base model's images of {len(held_out)} held-out prompts", flush=True)
    base_seconds = save_base_images(base_pipe, held_out, out / BASE_IMAGES, image_settings)
    pending = [name for name in methods if name not in records]
    if len(pending) < len(methods):
        print(f"resuming: {', '.join(n for n in methods if n in records)} audited already", flush=True)
    for name in pending:
        print(f"applying {name}", flush=True)
        started = time.time()
        pipe, extra = build(name)
        seconds = time.time() - started
        print(f"auditing {name}", flush=True)
        result, audit_seconds = audit(name, pipe)
        if "base" not in records:  # every audit reads the same base images: the first gives the base's numbers
            records["base"] = record(result, "reference", 0.0, base_seconds, False)
        records[name] = {**record(result, "model", seconds, audit_seconds, name in CHANGES_PROMPT), **extra}
        write_progress(out, resume_settings, records)
        write()  # after every method, so that a stopped run shows what it measured
    if not pending:  # every method was audited by an earlier run
        write()
    print((out / "comparison.md").read_text(), flush=True)
    return comparison
