"""diffusers-fair: finetune text-to-image diffusion models for fairness.

Distributional alignment of generated images toward a target distribution of protected
attributes (gender, race, age, and their intersections), with adjusted direct finetuning of the
sampling chain; results ship as small adaptors loadable with Hugging Face diffusers.

The training, pipeline and adaptor names (``DistributionalAlignmentTrainer``,
``FairFinetunePipeline``, ``save_fair_adaptor``, ...) are imported lazily: ``import diffusers_fair``
stays fast, and a name is loaded from its module (with torch, diffusers, peft) on first use.
"""

import importlib

__version__ = "0.1.0"

from .alignment import (
    distributional_alignment_loss,
    dynamic_targets,
    expected_ot_targets,
    kept_cross_entropy,
    marginalize,
)
from .evaluation import bias_metric, mean_std
from .targets import TargetDistribution

_LAZY = {
    "DistributionalAlignmentTrainer": "trainer",
    "FairTrainingConfig": "config",
    "PromptSet": "config",
    "load_prompt_sets": "config",
    "FairFinetunePipeline": "pipeline",
    "load_fair_adaptor": "pipeline",
    "unload_fair_adaptor": "pipeline",
    "save_fair_adaptor": "adaptors",
    "FairAdaptorMetadata": "adaptors",
}

__all__ = [
    "__version__",
    "TargetDistribution",
    "expected_ot_targets",
    "marginalize",
    "dynamic_targets",
    "distributional_alignment_loss",
    "kept_cross_entropy",
    "bias_metric",
    "mean_std",
    # loaded lazily (``_LAZY``)
    "DistributionalAlignmentTrainer",
    "FairTrainingConfig",
    "PromptSet",
    "load_prompt_sets",
    "FairFinetunePipeline",
    "load_fair_adaptor",
    "unload_fair_adaptor",
    "save_fair_adaptor",
    "FairAdaptorMetadata",
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
