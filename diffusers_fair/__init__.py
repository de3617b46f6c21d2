"""diffusers-fair: finetune text-to-image diffusion models for fairness.

Distributional alignment of generated images toward a target distribution of protected
attributes (gender, race, age, and their intersections), with adjusted direct finetuning of the
sampling chain; results ship as small adaptors loadable with Hugging Face diffusers.
"""

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
]
