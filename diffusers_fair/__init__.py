"""diffusers-fair: finetune text-to-image diffusion models for fairness.

Distributional alignment of generated images toward a target distribution of protected
attributes (gender, race, age, and their intersections), with adjusted direct finetuning of the
sampling chain; results ship as small adaptors loadable with Hugging Face diffusers.

The method's and the adaptors' names (targets, alignment, the adjusted backward, the bias metric,
``FairFinetunePipeline``, ``load_fair_adaptor``, ``save_fair_adaptor``, ...) are imported here; the
training names (``DistributionalAlignmentTrainer``, ``FairTrainingConfig``, ...) are loaded lazily
from their subpackage on first use.

Importing the package gives diffusers' Stable Diffusion pipelines the methods
``load_fair_adaptor`` and ``unload_fair_adaptor`` and the property ``fair_adaptors``
(``adaptors.pipeline.register_pipeline_methods``), so that a stock pipeline loads a fair adaptor
with ``pipe.load_fair_adaptor("gender-race")``; this imports diffusers.
"""

import importlib
from typing import TYPE_CHECKING

from .adaptors.format import save_fair_adaptor
from .adaptors.metadata import FairAdaptorMetadata
from .adaptors.pipeline import FairFinetunePipeline, load_fair_adaptor, register_pipeline_methods, unload_fair_adaptor
from .evaluation.metrics import bias_metric, mean_std
from .method.alignment import (
    distributional_alignment_loss,
    dynamic_targets,
    expected_ot_targets,
    kept_cross_entropy,
    marginalize,
)
from .method.dft import adjusted_backward
from .method.targets import TargetDistribution
from .version import __version__


_LAZY = {
    "DistributionalAlignmentTrainer": "training.trainer",
    "FairTrainingConfig": "training.config",
    "PromptSet": "training.prompts",
    "load_prompt_sets": "training.prompts",
}

if TYPE_CHECKING:
    from .training.config import FairTrainingConfig
    from .training.prompts import PromptSet, load_prompt_sets
    from .training.trainer import DistributionalAlignmentTrainer

__all__ = [
    "__version__",
    "TargetDistribution",
    "expected_ot_targets",
    "marginalize",
    "dynamic_targets",
    "distributional_alignment_loss",
    "kept_cross_entropy",
    "adjusted_backward",
    "bias_metric",
    "mean_std",
    "FairFinetunePipeline",
    "load_fair_adaptor",
    "unload_fair_adaptor",
    "register_pipeline_methods",
    "save_fair_adaptor",
    "FairAdaptorMetadata",
    # loaded lazily (``_LAZY``)
    "DistributionalAlignmentTrainer",
    "FairTrainingConfig",
    "PromptSet",
    "load_prompt_sets",
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Adds load_fair_adaptor, unload_fair_adaptor and fair_adaptors to diffusers' Stable Diffusion pipelines.
register_pipeline_methods()

