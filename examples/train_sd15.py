"""Finetune Stable Diffusion 1.5 for fairness from a JSON experiment config.

One script runs every experiment of the paper with the one trainer; each experiment is a config in
``examples/configs/`` (gender; gender x race; gender x race + age 75/25; soft tokens; several
concepts at once; race)::

    python examples/train_sd15.py examples/configs/gender.json --dry-run      # check, load nothing
    python examples/train_sd15.py examples/configs/gender.json                # train (one GPU)
    accelerate launch --num_processes 2 examples/train_sd15.py examples/configs/gender.json
    python examples/train_sd15.py examples/configs/gender.json --set num_iterations=2000 --set resume_from=latest

A config is a JSON object with the keys

* ``name``, ``description``: the adaptor's name and one paragraph about it;
* ``targets``: target distributions in ``TargetDistribution.parse`` syntax, e.g.
  ``"gender: male, female * race: wmelh, asian, black, indian"`` (a joint target) or
  ``"age: young=0.75, old=0.25"``; may be left out when every prompt set has its own;
* ``prompts``: a prompt-set file in the library's format (read with ``load_prompt_sets``): a JSON
  list of sets ``{"name", "prompts" (a list) or "file" (a text file, one prompt per line, relative
  to the prompt-set file), "weight" (oversampling weight, default 1), "targets" (optional)}``, e.g.
  ``examples/prompts/occupations_train.json``;
* ``training``: ``FairTrainingConfig`` fields (missing ones keep the paper's SD 1.5 defaults;
  ``base_model`` defaults to ``stable-diffusion-v1-5/stable-diffusion-v1-5``);
* ``components``: ``SD15ComponentSettings`` fields: the CLIP and DINOv2 models, the training
  ``classifier`` and the separate ``eval_classifier`` (``{"kind": "mobilenet", "path": ...}`` or
  ``{"kind": "clip", ...}``), the ``face_embedder`` and ``reference_faces`` files, the ``detector``;
* ``evaluation`` (optional): ``{"prompts": file, "images_per_prompt": n}`` for the audit command
  printed at the end (run with ``diffusers-fair eval`` and the evaluation classifier).

Relative paths in the config are relative to the current folder: run the script from the
repository root. Training needs a GPU and downloads the base model, CLIP ViT-H-14 and DINOv2 on
first use; the classifier, face-embedder and reference-face files are yours to provide (see
docs/COMPONENTS.md). The adaptor (the EMA weights) is saved to ``<output_dir>/adaptor``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from diffusers_fair._utils.io import read_json
from diffusers_fair.components.stable_diffusion import SD15ComponentSettings
from diffusers_fair.method.targets import TargetDistribution
from diffusers_fair.training.config import FairTrainingConfig
from diffusers_fair.training.prompts import PromptSet, load_prompt_sets, resolve_prompt_sets


EXPERIMENT_KEYS = ("name", "description", "targets", "prompts", "training", "components", "evaluation")
ADAPTOR_LICENSE = "creativeml-openrail-m"  # the license of Stable Diffusion 1.5's weights


@dataclass
class Experiment:
    """A parsed, checked experiment config.

    Attributes:
        name: the adaptor's name.
        description: one paragraph for the adaptor's model card.
        config: the training settings (validated).
        prompt_sets: the prompt sets, each with its targets.
        components: which models to load.
        evaluation: ``{"prompts": path, "images_per_prompt": n}`` or ``None``.
        source: the config file.
    """

    name: str
    description: str
    config: FairTrainingConfig
    prompt_sets: list[PromptSet]
    components: SD15ComponentSettings
    evaluation: dict | None
    source: Path

    @property
    def targets(self) -> list[TargetDistribution]:
        """Every distinct target of the prompt sets."""
        return list({repr(t): t for s in self.prompt_sets for t in s.targets}.values())


def _parse_targets(values, where: str) -> list[TargetDistribution]:
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: 'targets' must be a non-empty list of strings such as \"gender: male, female\"")
    return [TargetDistribution.parse(v) for v in values]


def _evaluation(values) -> dict | None:
    if values is None:
        return None
    if not isinstance(values, dict) or sorted(values) != ["images_per_prompt", "prompts"]:
        raise ValueError("'evaluation' must be {\"prompts\": file, \"images_per_prompt\": n}")
    if not Path(values["prompts"]).is_file():
        raise ValueError(f"evaluation prompt file {values['prompts']} does not exist")
    count = values["images_per_prompt"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"evaluation images_per_prompt must be a positive integer, got {count!r}")
    return dict(values)


def read_experiment(path: str | Path, overrides: dict | None = None) -> Experiment:
    """Read and check an experiment config; ``overrides`` replace ``training`` fields.

    Everything that can be checked without loading a model is: the training settings, the targets
    and prompt files, the component settings, targets against the classifiers' classes (CLIP
    zero-shot prompts; MobileNet files that exist), and that each enabled loss has its model.
    """
    path = Path(path)
    data = read_json(path, "config file")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a JSON object")
    unknown = sorted(set(data) - set(EXPERIMENT_KEYS))
    if unknown:
        raise ValueError(f"config file {path} has unknown keys {unknown} (known: {list(EXPERIMENT_KEYS)})")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"config file {path} needs a 'name'")
    training = dict(data.get("training", {}))
    training.update(overrides or {})
    config = FairTrainingConfig.from_dict(training)
    targets = _parse_targets(data["targets"], "config") if "targets" in data else None
    prompt_file = data.get("prompts")
    if not isinstance(prompt_file, str) or not prompt_file:
        raise ValueError(f"config file {path} needs 'prompts', the name of a prompt-set file "
                         "(e.g. \"examples/prompts/occupations_train.json\")")
    prompt_sets = resolve_prompt_sets(load_prompt_sets(prompt_file), targets)
    components = SD15ComponentSettings.from_dict(data.get("components", {}))
    components.check_targets([t for s in prompt_sets for t in s.targets])
    components.check_training(config)
    return Experiment(name=name, description=str(data.get("description", "")), config=config,
                      prompt_sets=prompt_sets, components=components, evaluation=_evaluation(data.get("evaluation")),
                      source=path)


def eval_command(experiment: Experiment) -> str | None:
    """The ``diffusers-fair eval`` command that audits the trained adaptor with the evaluation classifier."""
    spec, evaluation = experiment.components.eval_classifier, experiment.evaluation
    if spec is None or evaluation is None:
        return None
    out = Path(experiment.config.output_dir)
    classifier = spec.path if spec.kind == "mobilenet" else "clip"
    return (f"diffusers-fair eval --model {experiment.config.base_model} --adaptor {adaptor_folder(experiment)} "
            f"--prompts {evaluation['prompts']} --images-per-prompt {evaluation['images_per_prompt']} "
            f"--classifier {classifier} --out {out / 'eval'}")


def describe(experiment: Experiment) -> str:
    """A readable summary of what a run would do, and the files it still needs."""
    c, s = experiment.config, experiment.components
    total = sum(p.weight for p in experiment.prompt_sets)
    trained = [f"text-encoder LoRA rank {c.text_encoder_lora_rank}"] if c.train_text_encoder_lora else []
    trained += [f"U-Net LoRA rank {c.unet_lora_rank}"] if c.train_unet_lora else []
    trained += [f"{c.num_soft_tokens} soft tokens {c.soft_token_prefix}"] if c.num_soft_tokens else []
    lines = [f"experiment {experiment.name} ({experiment.source})", f"  base model: {c.base_model}",
             f"  trains: {', '.join(trained)}",
             (f"  {c.num_iterations} iterations, {c.images_per_prompt} images per prompt, lr {c.learning_rate}, "
              f"{c.min_inference_steps}-{c.max_inference_steps} {c.sampler} steps, guidance {c.guidance_scale}, "
              f"{c.mixed_precision}"),
             (f"  losses: weight_loss_img {c.weight_loss_img} (change factor {c.image_change_factor}, per attribute "
              f"{c.attribute_change_factors or '-'}, face region {c.face_region_factor}), "
              f"weight_loss_face {c.weight_loss_face}"),
             "  prompt sets:"]
    for p in experiment.prompt_sets:
        lines.append(f"    {p.name}: {len(p.prompts)} prompts, {100 * p.weight / total:.0f}% of draws, "
                     f"targets {' & '.join(str(t) for t in p.targets)}")
    clip = f"{s.clip_model}/{s.clip_pretrained}" if s.clip_model else "none"
    lines.append(f"  semantics: CLIP {clip}, DINOv2 {s.dinov2 or 'none'}")
    for role in ("classifier", "eval_classifier"):
        spec = getattr(s, role)
        text = "not configured" if spec is None else (spec.path if spec.kind == "mobilenet" else "CLIP zero-shot")
        lines.append(f"  {role}: {text}")
    lines.append(f"  face realism: {s.face_embedder or 'none'}, reference faces {s.reference_faces or 'none'}")
    missing = s.missing_files(evaluation=True)
    for role, path in missing.items():
        lines.append(f"  to provide: {role} {path}")
    command = eval_command(experiment)
    if command:
        lines.append(f"  audit afterwards: {command}")
    return "\n".join(lines)


def _device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def adaptor_folder(experiment: Experiment) -> Path:
    """Where :func:`train` saves the adaptor: ``<output_dir>/adaptor``."""
    return Path(experiment.config.output_dir) / "adaptor"


def train(experiment: Experiment, *, pipeline=None, components=None):
    """Run the experiment, save the adaptor to :func:`adaptor_folder`; return the trainer.

    ``pipeline`` (a ``StableDiffusionPipeline``) and ``components`` (a bundle with the attributes of
    ``SD15Components``) may be given already built; by default the base model is loaded by name
    and the components with ``load_sd15_components``.
    """
    import torch

    from diffusers_fair.components.stable_diffusion import load_sd15_components
    from diffusers_fair.training.trainer import DistributionalAlignmentTrainer

    config = experiment.config
    if components is None:
        missing = experiment.components.missing_files()
        if missing:
            raise ValueError("missing component files: " + ", ".join(f"{r} {p}" for r, p in missing.items()))
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    if pipeline is None:
        from diffusers import StableDiffusionPipeline

        pipeline = StableDiffusionPipeline.from_pretrained(config.base_model, dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False)
    if components is None:
        components = load_sd15_components(experiment.components, device=_device(), dtype=dtype)
    trainer = DistributionalAlignmentTrainer(config, pipeline, None, experiment.prompt_sets, components)
    trainer.train()
    folder = adaptor_folder(experiment)
    trainer.save_adaptor(folder, name=experiment.name, overwrite=True, description=experiment.description,
                         license=ADAPTOR_LICENSE)
    if trainer.accelerator.is_main_process:
        print(f"saved the adaptor to {folder}")
        command = eval_command(experiment)
        if command:
            print(f"audit it with the evaluation classifier:\n  {command}")
    return trainer


def parse_overrides(items: list[str]) -> dict:
    """``["num_iterations=2000", "resume_from=\\"latest\\""]`` -> training overrides (values read as JSON, else text)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment config (JSON), e.g. examples/configs/gender.json")
    parser.add_argument("--dry-run", action="store_true", help="check the config and print the plan; load no model")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a training field (repeatable), e.g. --set num_iterations=2000")
    args = parser.parse_args(argv)
    try:
        experiment = read_experiment(args.config, parse_overrides(args.set))
        if args.dry_run:
            print(describe(experiment))
            print("config OK")
            return 0
        train(experiment)
    except ValueError as error:
        print(f"train_sd15: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
