"""Experiments: one training run described by one config file, read, checked, described and run.

``diffusers-fair train CONFIG`` runs an experiment; the paper's are the configs in
``examples/configs/``. A config is a YAML (``.yaml``, ``.yml``) or JSON (``.json``) mapping with
the keys of :data:`EXPERIMENT_KEYS` (docs/TRAINING.md describes each one):

* ``name``, ``description``: the adaptor's name and one paragraph about it;
* ``preset``: ``"sd15"`` (the paper's Stable Diffusion 1.5 settings, ``FairTrainingConfig()``) or
  ``"toy"`` (``FairTrainingConfig.toy()``): the defaults of the ``training`` fields the config
  leaves out; by default ``"toy"`` with ``components: toy``, else ``"sd15"``;
* ``targets``: target distributions in ``TargetDistribution.parse`` syntax; may be left out when
  every prompt set has its own;
* ``prompts``: a prompt-set file in the format :func:`~diffusers_fair.training.prompts.load_prompt_sets` reads;
* ``training``: ``FairTrainingConfig`` fields; ``base_model: toy`` names the toy world's model;
* ``components``: ``SD15ComponentSettings`` fields, or ``toy`` for the toy world's components;
* ``evaluation`` (optional): ``{prompts: FILE, images_per_prompt: N}`` for the audit command
  printed after training.

Relative paths are relative to the current folder. An unknown key at any level is refused with a
one-line ``ValueError`` that names it. The toy world's models are loaded by
``diffusers_fair.toy.experiment`` (this module does not import the toy world); the SD 1.5 ones by
:func:`train_experiment`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .._utils.io import read_json
from ..adaptors.metadata import TOY_BASE_MODEL, default_license
from ..components.stable_diffusion import SD15ComponentSettings
from ..method.targets import TargetDistribution
from .config import FairTrainingConfig
from .prompts import PromptSet, load_prompt_sets, resolve_prompt_sets
from .setup_checks import check_attribute_factors


EXPERIMENT_KEYS = ("name", "description", "preset", "targets", "prompts", "training", "components", "evaluation")
EVALUATION_KEYS = ("prompts", "images_per_prompt")
PRESETS = ("sd15", "toy")
TOY = "toy"  # ``components: toy`` and ``training.base_model: toy`` name the toy world's parts
SD15_LICENSE = "creativeml-openrail-m"  # the license of Stable Diffusion 1.5's weights


@dataclass
class Experiment:
    """A read and checked experiment config.

    Attributes:
        name: the adaptor's name.
        description: one paragraph for the adaptor's model card.
        preset: ``"sd15"`` or ``"toy"``: where the training fields the config leaves out come from.
        config: the training settings (validated, every field resolved).
        prompt_file: the prompt-set file, as the config names it.
        prompt_sets: the prompt sets, each with its targets.
        default_targets: the config's ``targets`` (for the prompt sets without their own), or ``None``.
        components: which SD 1.5 models to load; ``None`` for the toy world's components.
        evaluation: ``{"prompts": path, "images_per_prompt": n}`` or ``None``.
        source: the config file.
    """

    name: str
    description: str
    preset: str
    config: FairTrainingConfig
    prompt_file: str
    prompt_sets: list[PromptSet]
    default_targets: list[TargetDistribution] | None
    components: SD15ComponentSettings | None
    evaluation: dict | None
    source: Path

    @property
    def toy_world(self) -> bool:
        """Whether the experiment trains the toy world's model with the toy world's components."""
        return self.components is None

    @property
    def targets(self) -> list[TargetDistribution]:
        """Every distinct target of the prompt sets."""
        return list({repr(t): t for s in self.prompt_sets for t in s.targets}.values())

    def to_dict(self) -> dict:
        """The resolved config: every training and component field filled in, readable as a config again."""
        data = {"name": self.name, "description": self.description, "preset": self.preset}
        if self.default_targets is not None:
            data["targets"] = [str(t) for t in self.default_targets]
        data["prompts"] = self.prompt_file
        data["training"] = self.config.to_dict()
        data["components"] = TOY if self.components is None else self.components.to_dict()
        data["evaluation"] = None if self.evaluation is None else dict(self.evaluation)
        return data


# --------------------------------------------------------------------------- reading config files
class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's numbers and booleans, refusing repeated keys.

    PyYAML follows YAML 1.1, which reads ``1e-4`` as text and ``no``, ``on`` or ``y`` as booleans;
    here ``1e-4`` is a number and only ``true`` and ``false`` are booleans. A key written twice in
    one mapping would silently keep the last value; it is an error instead.
    """

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor" merges another mapping; the base class handles it
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: the base class refuses it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_ConfigLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str, what: str) -> Any:
    """The YAML document ``text``; a syntax error raises a one-line ``ValueError`` naming ``what`` and the line."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ValueError(f"{what} is not valid YAML: {error.problem or error.context}{where}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{what} is not valid YAML: {' '.join(str(error).split())}") from None


def read_config_file(path: str | Path) -> dict:
    """The mapping of a YAML (``.yaml``, ``.yml``) or JSON (``.json``) config file, as written.

    Raises:
        ValueError: naming the file: another suffix, a missing or unreadable file, a syntax error,
            a repeated key (YAML), or a document that is not a mapping.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"config file {path} must be YAML (.yaml, .yml) or JSON (.json)")
    if suffix == ".json":
        data = read_json(path, "config file")
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or error
            raise ValueError(f"config file {path} cannot be read: {reason}") from None
        data = parse_yaml(text, f"config file {path}")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping with the keys {list(EXPERIMENT_KEYS)}")
    return data


# --------------------------------------------------------------------------- command-line overrides
def parse_override(item: str) -> tuple[list[str], Any]:
    """``"training.learning_rate=1e-4"`` -> ``(["training", "learning_rate"], 0.0001)``.

    The value is read as YAML, as if written after the key in a config file: ``1e-4`` and ``200`` are
    numbers, ``true`` and ``false`` booleans, ``null`` is nothing, ``[a, b]`` a list, ``{race: 0.6}``
    a mapping, anything else text (quoted, a number stays text).

    Raises:
        ValueError: no ``=``, an empty key or key part, or a value that is not valid YAML.
    """
    key, sep, value = item.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ValueError(f"--set expects KEY=VALUE such as training.learning_rate=1e-4, got {item!r}")
    return path, parse_yaml(value, f"--set {key} value {value!r}")


def apply_overrides(data: dict, overrides: list[tuple[list[str], Any]]) -> dict:
    """A copy of the config mapping ``data`` with each ``(key path, value)`` set, missing mappings created.

    Raises:
        ValueError: a key path runs through a value that is not a mapping, or names a training field
            without ``training.``.
    """
    data = copy.deepcopy(data)
    fields = {f.name for f in dataclasses.fields(FairTrainingConfig)}
    for path, value in overrides:
        if len(path) == 1 and path[0] not in EXPERIMENT_KEYS and path[0] in fields:
            raise ValueError(f"--set {path[0]}: a training setting is set as training.{path[0]}=VALUE")
        node = data
        for depth, key in enumerate(path[:-1]):
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise ValueError(f"--set {'.'.join(path)}: {'.'.join(path[:depth + 1])} is {node!r}, not a mapping")
        node[path[-1]] = value
    return data


# --------------------------------------------------------------------------- checking a config
def _refuse_unknown_keys(values: dict, known, where: str) -> None:
    unknown = [key for key in values if key not in known]
    if not unknown:
        return
    described = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), list(known), n=1)
        described.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"{where} has unknown key{'s' if len(unknown) > 1 else ''} {', '.join(described)} "
                     f"(known: {', '.join(known)})")


def _parse_targets(values) -> list[TargetDistribution]:
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ValueError("'targets' must be a non-empty list of strings such as \"gender: male, female\"")
    return [TargetDistribution.parse(v) for v in values]


def _evaluation(values) -> dict | None:
    if values is None:
        return None
    if not isinstance(values, dict):
        raise ValueError(f"'evaluation' must be a mapping {{prompts: FILE, images_per_prompt: N}}, got {values!r}")
    _refuse_unknown_keys(values, EVALUATION_KEYS, "evaluation")
    missing = [key for key in EVALUATION_KEYS if key not in values]
    if missing:
        raise ValueError(f"evaluation needs {' and '.join(repr(k) for k in missing)}")
    if not isinstance(values["prompts"], str) or not Path(values["prompts"]).is_file():
        raise ValueError(f"evaluation prompt file {values['prompts']} does not exist")
    count = values["images_per_prompt"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"evaluation images_per_prompt must be a positive integer, got {count!r}")
    return dict(values)


def _training_config(values, preset: str) -> FairTrainingConfig:
    """The ``training`` section on top of the preset; ``base_model: toy`` is the toy model's id."""
    if not isinstance(values, dict):
        raise ValueError(f"'training' must be a mapping of FairTrainingConfig fields, got {values!r}")
    values = dict(values)
    if values.get("base_model") == TOY:
        values["base_model"] = TOY_BASE_MODEL
    try:
        return FairTrainingConfig.toy(**values) if preset == "toy" else FairTrainingConfig.from_dict(values)
    except ValueError as error:
        raise ValueError(f"training: {error}") from None


def experiment_from_dict(data: dict, source: str | Path = "<config>") -> Experiment:
    """Check a config mapping (a parsed file, with any overrides applied) and resolve it.

    Everything that can be checked without loading a model is: every key, the training settings,
    the targets and the prompt-set file, the component settings, the targets against the SD 1.5
    classifiers' classes where those are known (CLIP zero-shot prompts; MobileNet files that exist),
    that each enabled loss has its model, and that the toy world's model and components go together.
    The toy world's classes are checked by ``diffusers_fair.toy.experiment.check_toy_experiment``.

    Raises:
        ValueError: one line naming the config and the key at fault.
    """
    source = Path(source)
    if not isinstance(data, dict):
        raise ValueError(f"config {source} must be a mapping with the keys {list(EXPERIMENT_KEYS)}")
    _refuse_unknown_keys(data, EXPERIMENT_KEYS, f"config {source}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"config {source} needs a 'name', the adaptor's name")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"config {source}: 'description' must be text, got {description!r}")
    components = data.get("components", {})
    if isinstance(components, str) and components != TOY:
        raise ValueError(f"config {source}: 'components' must be a mapping of SD15ComponentSettings fields "
                         f"or {TOY!r} (the toy world's), got {components!r}")
    toy_components = components == TOY
    preset = data.get("preset", "toy" if toy_components else "sd15")
    if preset not in PRESETS:
        raise ValueError(f"config {source}: 'preset' must be one of {', '.join(map(repr, PRESETS))}, got {preset!r}")
    config = _training_config(data.get("training", {}) or {}, preset)
    toy_model = config.base_model == TOY_BASE_MODEL
    if toy_components and not toy_model:
        raise ValueError(f"config {source}: 'components: {TOY}' goes with the toy world's model only: set "
                         f"'training.base_model: {TOY}' (got {config.base_model!r})")
    if toy_model and not toy_components:
        raise ValueError(f"config {source}: training.base_model is the toy world's model ({TOY_BASE_MODEL!r}, also "
                         f"the toy preset's default), which goes with 'components: {TOY}' only")
    default_targets = _parse_targets(data["targets"]) if data.get("targets") is not None else None
    prompt_file = data.get("prompts")
    if not isinstance(prompt_file, str) or not prompt_file:
        raise ValueError(f"config {source} needs 'prompts', the name of a prompt-set file "
                         "(e.g. examples/prompts/occupations_train.json)")
    prompt_sets = resolve_prompt_sets(load_prompt_sets(prompt_file), default_targets)
    try:
        check_attribute_factors(config, prompt_sets)
    except ValueError as error:
        raise ValueError(f"training: {error}") from None
    settings = None
    if not toy_components:
        settings = SD15ComponentSettings.from_dict(components if components is not None else {})
        settings.check_targets([t for s in prompt_sets for t in s.targets])
        settings.check_training(config)
    return Experiment(name=name, description=description, preset=preset, config=config, prompt_file=prompt_file,
                      prompt_sets=prompt_sets, default_targets=default_targets, components=settings,
                      evaluation=_evaluation(data.get("evaluation")), source=source)


def read_experiment(path: str | Path, overrides: Sequence[str] = (), *, output_dir: str | Path | None = None,
                    resume_from: str | None = None) -> Experiment:
    """Read and check the experiment config file ``path`` (see :func:`experiment_from_dict`).

    Args:
        path: a YAML or JSON config file.
        overrides: ``KEY=VALUE`` texts (:func:`parse_override`), applied in order, e.g.
            ``["training.num_iterations=2000"]``.
        output_dir: replaces ``training.output_dir`` (after the overrides).
        resume_from: replaces ``training.resume_from``: ``"latest"`` or a checkpoint folder.

    Raises:
        ValueError: one line naming the file, override or key at fault.
    """
    data = read_config_file(path)
    pairs = [parse_override(item) for item in overrides]
    if output_dir is not None:
        pairs.append((["training", "output_dir"], str(output_dir)))
    if resume_from is not None:
        pairs.append((["training", "resume_from"], str(resume_from)))
    return experiment_from_dict(apply_overrides(data, pairs), path)


# --------------------------------------------------------------------------- describing and running
def adaptor_folder(experiment: Experiment) -> Path:
    """Where :func:`train_experiment` saves the adaptor: ``<output_dir>/adaptor``."""
    return Path(experiment.config.output_dir) / "adaptor"


def eval_command(experiment: Experiment) -> str | None:
    """The ``diffusers-fair eval`` command that audits the trained adaptor on the ``evaluation`` prompts.

    SD 1.5 experiments are audited with the evaluation classifier (none configured: ``None``), toy
    ones with the toy world's components.
    """
    evaluation = experiment.evaluation
    if evaluation is None:
        return None
    if experiment.toy_world:
        model, classifier = TOY, ""
    else:
        spec = experiment.components.eval_classifier
        if spec is None:
            return None
        model = experiment.config.base_model
        classifier = f" --classifier {spec.path if spec.kind == 'mobilenet' else 'clip'}"
    out = Path(experiment.config.output_dir) / "eval"
    return (f"diffusers-fair eval --model {model} --adaptor {adaptor_folder(experiment)} "
            f"--prompts {evaluation['prompts']} --images-per-prompt {evaluation['images_per_prompt']}"
            f"{classifier} --out {out}")


def describe(experiment: Experiment) -> str:
    """A readable summary of what a run would do, and the files it still needs."""
    c, s = experiment.config, experiment.components
    total = sum(p.weight for p in experiment.prompt_sets)
    trained = [f"text-encoder LoRA rank {c.text_encoder_lora_rank}"] if c.train_text_encoder_lora else []
    trained += [f"U-Net LoRA rank {c.unet_lora_rank}"] if c.train_unet_lora else []
    trained += [f"{c.num_soft_tokens} soft tokens {c.soft_token_prefix}"] if c.num_soft_tokens else []
    lines = [f"experiment {experiment.name} ({experiment.source}), preset {experiment.preset}",
             f"  base model: {c.base_model}", f"  trains: {', '.join(trained)}",
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
    if s is None:
        lines.append("  components: the toy world's (diffusers_fair.toy.components.load_toy_components)")
    else:
        clip = f"{s.clip_model}/{s.clip_pretrained}" if s.clip_model else "none"
        lines.append(f"  semantics: CLIP {clip}, DINOv2 {s.dinov2 or 'none'}")
        for role in ("classifier", "eval_classifier"):
            spec = getattr(s, role)
            text = "not configured" if spec is None else (spec.path if spec.kind == "mobilenet" else "CLIP zero-shot")
            lines.append(f"  {role}: {text}")
        lines.append(f"  face realism: {s.face_embedder or 'none'}, reference faces {s.reference_faces or 'none'}")
        for role, path in s.missing_files(evaluation=True).items():
            lines.append(f"  to provide: {role} {path}")
    lines.append(f"  output: {c.output_dir}, the adaptor in {adaptor_folder(experiment)}"
                 + (f", resuming from {c.resume_from}" if c.resume_from else ""))
    command = eval_command(experiment)
    if command:
        lines.append(f"  audit afterwards: {command}")
    return "\n".join(lines)


def _device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def train_experiment(experiment: Experiment, *, pipeline=None, components=None):
    """Run the experiment, save the adaptor to :func:`adaptor_folder`; return the trainer.

    Call it on every process of a multi-process run: each trains its share, and each saves (the
    main process writes the adaptor, the others wait for it). ``pipeline`` (a
    ``StableDiffusionPipeline``) and ``components`` (a bundle with the attributes of
    ``SD15Components``) may be given already built; by default the base model is loaded by name and
    the components with ``load_sd15_components``. A toy-world experiment needs both given
    (``diffusers_fair.toy.experiment.train_toy_experiment`` gives them).

    Raises:
        ValueError: a toy-world experiment without its pipeline and components; component files
            that are missing; anything the trainer refuses.
    """
    import torch

    from ..components.stable_diffusion import load_sd15_components
    from .trainer import DistributionalAlignmentTrainer

    config = experiment.config
    if experiment.toy_world and (pipeline is None or components is None):
        raise ValueError(f"{experiment.source} trains the toy world: run it with diffusers-fair train or "
                         "diffusers_fair.toy.experiment.train_toy_experiment, which load the toy model and components")
    if components is None:
        missing = experiment.components.missing_files()
        if missing:
            raise ValueError("missing component files: " + ", ".join(f"{r} {p}" for r, p in missing.items()))
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    if pipeline is None:
        from ..components.families import load_pipeline

        # A StableDiffusionPipeline, or a StableDiffusionXLPipeline for an SDXL base model.
        pipeline = load_pipeline(config.base_model, dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if components is None:
        components = load_sd15_components(experiment.components, device=_device(), dtype=dtype)
    trainer = DistributionalAlignmentTrainer(config, pipeline, None, experiment.prompt_sets, components)
    trainer.train()
    folder = adaptor_folder(experiment)
    # The base model's license (SDXL: openrail++); SD 1.5's for base models the package does not know.
    license_fields = {} if experiment.toy_world else {"license": default_license(config.base_model) or SD15_LICENSE}
    written = trainer.save_adaptor(folder, name=experiment.name, overwrite=True, description=experiment.description,
                                   **license_fields)
    if written is not None:  # the main process
        print(f"saved the adaptor to {folder}")
        command = eval_command(experiment)
        if command:
            print(f"audit it:\n  {command}")
    return trainer
