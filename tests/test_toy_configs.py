"""The toy experiment configs are the one definition of the toy runs: the demo, ``examples/toy_paper_effects.py``
and ``diffusers-fair train`` read the same files and resolve them to the same settings."""

import dataclasses
from pathlib import Path

import pytest

from diffusers_fair.method.targets import TargetDistribution
from diffusers_fair.toy.demo import DemoSettings, ToyExperiment, demo_experiment, targets, training_config
from diffusers_fair.toy.experiment import CONFIG_FOLDER, toy_config_path
from diffusers_fair.training.config import FairTrainingConfig
from diffusers_fair.training.experiment import read_experiment
from helpers.scripts import load_script


ROOT = Path(__file__).resolve().parents[1]
HAIR = TargetDistribution("hair_length", {"short": 0.5, "long": 0.5})
SKIN = TargetDistribution("skin_tone", {"pale": 0.25, "tan": 0.25, "brown": 0.25, "deep": 0.25})
AGE = TargetDistribution("hair_colour", {"dark": 0.75, "grey": 0.25})
# The runs of examples/toy_paper_effects.py as they were written in Python: the run, its shipped
# config, the adaptor's name, the targets, and the training fields it sets over the demo's settings.
RUNS = {
    "gender": ("gender", "toy-gender", [HAIR], {}),
    "race": ("race", "toy-race", [SKIN], {}),
    "gender-race": ("gender_race", "toy-gender-race", [HAIR, SKIN], {}),
    "gender-race-age": ("gender_race_age", "toy-gender-race-age", [HAIR, SKIN, AGE],
                        {"weight_loss_img": 8.0, "lr_schedule": "cosine"}),
    "soft-tokens": ("soft_tokens", "toy-gender-soft-tokens", [HAIR],
                    {"train_text_encoder_lora": False, "num_soft_tokens": 5}),
    "unet-lora": ("unet_lora", "toy-gender-unet-lora", [HAIR],
                  {"train_text_encoder_lora": False, "train_unet_lora": True}),
}


def changed_fields(config: FairTrainingConfig) -> dict:
    """The training fields whose values differ from the toy preset's."""
    preset = FairTrainingConfig.toy()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(preset, f.name)}


def test_the_paper_effects_runs_are_the_shipped_configs():
    runs = load_script("examples", "toy_paper_effects").experiments()
    assert list(runs) == list(RUNS)  # the order the runs go in
    for run, (_, name, expected_targets, trainable) in RUNS.items():
        experiment = runs[run]
        assert experiment.name == name, run
        assert experiment.targets == expected_targets, run
        assert [str(t) for t in experiment.targets] == [str(t) for t in expected_targets], run  # class order too
        assert experiment.trainable == trainable, run


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("settings", [DemoSettings(), DemoSettings.quick()], ids=["full", "quick"])
def test_a_run_trains_with_the_settings_it_had(run, settings):
    config, _, _, trainable = RUNS[run]
    experiment = ToyExperiment.from_config(toy_config_path(config))
    got = training_config(experiment, settings, "out/training")
    # The demo's procedure: its folder, no checkpoints or sample grids, its iterations (12 with --quick).
    expected = {"output_dir": "out/training", "checkpoint_every": 0, "sample_every": 0}
    if settings.iterations != 140:
        expected["num_iterations"] = 12
    assert changed_fields(got) == {**expected, **trainable}


def test_the_demo_is_the_gender_race_config():
    experiment = demo_experiment()
    assert (experiment.name, experiment.targets, experiment.trainable) == ("toy-gender-race", [HAIR, SKIN], {})
    assert experiment.debiased == ["hair_length", "skin_tone"]
    assert targets() == [HAIR, SKIN]
    assert changed_fields(training_config(experiment, DemoSettings(), "d")) == {
        "output_dir": "d", "checkpoint_every": 0, "sample_every": 0}


@pytest.mark.parametrize("run", list(RUNS))
def test_train_and_the_demo_read_a_config_the_same_way(run, monkeypatch):
    """``diffusers-fair train examples/configs/toy_<config>.yaml`` trains the demo's settings of that run."""
    monkeypatch.chdir(ROOT)  # the configs' prompt files are relative to the repository
    config = RUNS[run][0]
    example = ROOT / "examples" / "configs" / f"toy_{config}.yaml"
    assert example.is_symlink() and example.resolve() == toy_config_path(config).resolve()
    trained = read_experiment(example)
    demo = ToyExperiment.from_config(example)
    assert (trained.name, trained.targets, trained.description) == (demo.name, demo.targets, demo.title)
    assert trained.config == dataclasses.replace(training_config(demo, DemoSettings(), "x"),
                                                 output_dir=trained.config.output_dir)


def test_every_shipped_config_has_a_run_and_an_example_link():
    shipped = sorted(p.stem for p in CONFIG_FOLDER.glob("*.yaml"))
    assert shipped == sorted(config for config, *_ in RUNS.values())
    links = sorted(p.name for p in (ROOT / "examples" / "configs").glob("toy_*.yaml"))
    assert links == [f"toy_{name}.yaml" for name in shipped]


def test_unknown_and_non_toy_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no toy experiment config named 'gendr'; the package ships gender, "):
        toy_config_path("gendr")
    with pytest.raises(ValueError, match="is not a toy-world experiment"):
        ToyExperiment.from_config(ROOT / "examples" / "configs" / "gender.yaml")
    for config, old, new, message in [
        ("soft_tokens", "num_soft_tokens", "num_soft_token", "unknown FairTrainingConfig field 'num_soft_token'"),
        ("gender", '"hair_length: short, long"', '"gender: male, female"', "'gender' is not a toy-world trait"),
        ("gender", "preset: toy", "preset: sd15", "is not a toy-world experiment"),
        ("gender", "base_model: toy", "base_model: stable-diffusion-v1-5/stable-diffusion-v1-5",
         "is not a toy-world experiment"),
        ("gender", "name: toy-gender\n", "", "needs a 'name'"),
    ]:
        text = toy_config_path(config).read_text()
        assert old in text
        path = tmp_path / "bad.yaml"
        path.write_text(text.replace(old, new))
        with pytest.raises(ValueError, match=message):
            ToyExperiment.from_config(path)
