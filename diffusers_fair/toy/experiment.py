"""Experiment configs on the toy world: its model and components behind ``diffusers-fair train``.

A config with ``components: toy`` and ``training.base_model: toy`` (the toy configs, shipped in the
package as ``diffusers_fair/toy/configs/<name>.yaml`` (:func:`toy_config_path`) and linked from
``examples/configs/toy_<name>.yaml``) trains the model shipped in the package (:func:`~diffusers_fair.toy.model_path`)
with the toy world's components (:func:`~diffusers_fair.toy.components.load_toy_components`);
``preset: toy``, the default with ``components: toy``, fills the training fields the config leaves
out from ``FairTrainingConfig.toy()``. Reading and running a config is
``diffusers_fair.training.experiment``; this module adds what needs the toy world.
"""

from __future__ import annotations

from pathlib import Path

from ..method.targets import TargetDistribution
from ..training.experiment import Experiment, train_experiment
from . import model_path
from .render import TRAITS


CONFIG_FOLDER = Path(__file__).parent / "configs"


def toy_config_path(name: str) -> Path:
    """The toy experiment config shipped in the package as ``diffusers_fair/toy/configs/<name>.yaml``.

    ``name`` is e.g. ``"gender_race"`` (the demo's run); ``examples/configs/toy_<name>.yaml`` links to the file.

    Raises:
        ValueError: no shipped config has that name (the message lists the names).
    """
    path = CONFIG_FOLDER / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIG_FOLDER.glob("*.yaml")))
        raise ValueError(f"no toy experiment config named {name!r}; the package ships {names}")
    return path


def check_toy_experiment(experiment: Experiment) -> None:
    """Every target must be over toy traits with their classes in order (what the toy classifier reads).

    Raises:
        ValueError: naming the attribute and the toy world's traits or classes.
    """
    check_toy_targets(experiment.targets)


def check_toy_targets(targets: list[TargetDistribution]) -> None:
    """:func:`check_toy_experiment` for a list of targets."""
    for target in targets:
        for attribute, classes in target.classes.items():
            if attribute not in TRAITS:
                raise ValueError(f"target attribute {attribute!r} is not a toy-world trait; the toy classifier "
                                 f"reads {', '.join(TRAITS)}")
            if list(classes) != TRAITS[attribute]:
                raise ValueError(f"target classes of {attribute!r} are {list(classes)}, the toy world's are "
                                 f"{TRAITS[attribute]} (same names in the same order needed)")


def load_toy_pipeline():
    """The shipped toy model in a stock ``StableDiffusionPipeline`` (float32, no progress bar)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_toy_experiment(experiment: Experiment):
    """Train a toy-world experiment with :func:`~diffusers_fair.training.experiment.train_experiment`
    on the toy model and components; return the trainer. Call it on every process.

    Raises:
        ValueError: the experiment is not a toy-world one, or a target is not over toy traits.
    """
    from .components import load_toy_components

    if not experiment.toy_world:
        raise ValueError(f"{experiment.source} does not train the toy world (it needs 'components: toy')")
    check_toy_experiment(experiment)
    return train_experiment(experiment, pipeline=load_toy_pipeline(), components=load_toy_components())
