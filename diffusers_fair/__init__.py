"""diffusers-fair: finetune text-to-image diffusion models for fairness.

Distributional alignment of generated images toward a target distribution of protected
attributes (gender, race, age, and their intersections), with adjusted direct finetuning of the
sampling chain; results ship as small adaptors loadable with Hugging Face diffusers.

The method's names (targets, alignment, the adjusted backward, the bias metric) are imported
here; the training, pipeline and adaptor names (``DistributionalAlignmentTrainer``,
``FairFinetunePipeline``, ``save_fair_adaptor``, ...) are loaded lazily from their subpackages on
first use, so that ``import diffusers_fair`` stays fast.
"""

import importlib
from typing import TYPE_CHECKING

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
    "FairFinetunePipeline": "adaptors.pipeline",
    "load_fair_adaptor": "adaptors.pipeline",
    "unload_fair_adaptor": "adaptors.pipeline",
    "save_fair_adaptor": "adaptors.format",
    "FairAdaptorMetadata": "adaptors.format",
}

if TYPE_CHECKING:
    from .adaptors.metadata import FairAdaptorMetadata
    from .adaptors.format import save_fair_adaptor
    from .adaptors.pipeline import FairFinetunePipeline, load_fair_adaptor, unload_fair_adaptor
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
