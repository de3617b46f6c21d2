"""The public API: the names importable from ``diffusers_fair``, the toy model's path, the command line."""

import subprocess
import sys
from pathlib import Path

import diffusers_fair


ROOT = Path(__file__).resolve().parents[1]
PUBLIC = [
    "__version__", "TargetDistribution", "expected_ot_targets", "marginalize", "dynamic_targets",
    "distributional_alignment_loss", "kept_cross_entropy", "adjusted_backward", "bias_metric", "mean_std",
    "DistributionalAlignmentTrainer", "FairTrainingConfig", "PromptSet", "load_prompt_sets", "FairFinetunePipeline",
    "load_fair_adaptor", "unload_fair_adaptor", "register_pipeline_methods", "save_fair_adaptor", "FairAdaptorMetadata",
]


def test_every_public_name_is_importable_and_listed():
    assert sorted(diffusers_fair.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(diffusers_fair, name) is not None, name
    from diffusers_fair.method.dft import adjusted_backward
    from diffusers_fair.training.trainer import DistributionalAlignmentTrainer

    assert diffusers_fair.adjusted_backward is adjusted_backward
    assert diffusers_fair.DistributionalAlignmentTrainer is DistributionalAlignmentTrainer


def test_the_toy_model_path_holds_a_pipeline():
    from diffusers_fair import toy

    assert (Path(toy.model_path()) / "model_index.json").is_file()


def test_python_dash_m_cli_prints_help_and_version():
    done = subprocess.run([sys.executable, "-m", "diffusers_fair.cli", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0 and "usage: diffusers-fair" in done.stdout
    for command in ("demo", "train", "eval", "convert", "push", "pull", "version"):
        assert command in done.stdout, command
    done = subprocess.run([sys.executable, "-m", "diffusers_fair.cli", "version"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == f"diffusers-fair {diffusers_fair.__version__}"
