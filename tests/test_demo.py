"""The toy-world demo end to end, at a tiny size (the full run is the README's main job)."""

import json

import pytest
import torch

from diffusers_fair.cli import main
from diffusers_fair.toy.demo import DemoSettings, load_toy_pipeline, run_demo


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, DemoSettings(iterations=2, images_per_prompt=4, images_per_word=2, num_words=2))
    return out


def test_demo_writes_the_report_and_pictures(demo_out):
    report = json.loads((demo_out / "report.json").read_text())
    assert report["debiased"] == ["hair_length", "skin_tone"]
    assert set(report["before"]) == set(report["after"]) == {"hair_length", "skin_tone", "hair_colour"}
    for value in list(report["before"].values()) + list(report["after"].values()):
        assert 0.0 <= value <= 1.0
    assert len(report["held_out_words"]) == 2
    assert report["targets"] == ["hair_length: short=0.5, long=0.5",
                                 "skin_tone: pale=0.25, tan=0.25, brown=0.25, deep=0.25"]
    assert 0.0 < report["similarity"] <= 1.0 + 1e-6
    for name in ("report.md", "bias.png", "shares.png", "images.png", "adaptor/fair_adaptor.json"):
        assert (demo_out / name).stat().st_size > 0, name
    assert "| hair_length | gender |" in (demo_out / "report.md").read_text()


def test_demo_adaptor_loads_with_stock_diffusers(demo_out):
    base = load_toy_pipeline()
    ids = base.tokenizer(["a photo of the face of a judge, a person"], padding="max_length",
                         max_length=base.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        before = base.text_encoder(ids)[0]
        base.load_lora_weights(demo_out / "adaptor")
        after = base.text_encoder(ids)[0]
    # Two iterations at the demo's learning rate move the text encoder's output, but only a little.
    assert not torch.equal(before, after)
    assert (after - before).abs().max() < 1.0


def test_demo_is_registered_in_the_cli(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_demo_records_the_measured_bias_in_the_adaptor(demo_out):
    metadata = json.loads((demo_out / "adaptor" / "fair_adaptor.json").read_text())
    report = json.loads((demo_out / "report.json").read_text())
    assert metadata["metrics_after"]["held_out_bias/hair_length"] == pytest.approx(report["after"]["hair_length"])
    assert metadata["metrics_before"]["held_out_bias/skin_tone"] == pytest.approx(report["before"]["skin_tone"])


def test_shipped_toy_adaptor_loads_by_name():
    from diffusers_fair import load_fair_adaptor

    pipe = load_toy_pipeline()
    ids = pipe.tokenizer(["a photo of the face of a judge, a person"], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        loaded = load_fair_adaptor(pipe, "toy-gender-race")
        after = pipe.text_encoder(ids)[0]
    assert loaded.has_lora
    assert [t["text"].split(":")[0] for t in loaded.metadata.targets] == ["hair_length", "skin_tone"]
    assert (after - before).abs().max() > 1e-3


def test_experiment_lists_the_attributes_its_targets_cover():
    from diffusers_fair.method.targets import TargetDistribution
    from diffusers_fair.toy.demo import ToyExperiment

    joint = TargetDistribution.parse("hair_colour: dark, grey * hair_length: short, long")
    experiment = ToyExperiment("x", "x", [joint])
    assert experiment.debiased == ["hair_length", "hair_colour"]  # trait order, not target order


def test_image_similarity_is_one_for_the_same_images_and_lower_for_others():
    import numpy as np

    from diffusers_fair.toy.components import load_toy_components
    from diffusers_fair.toy.demo import image_similarity
    from diffusers_fair.toy.render import random_traits, render

    components = load_toy_components()
    rng = np.random.default_rng(0)
    a = torch.from_numpy(render(random_traits(6, rng), 1).images)
    b = torch.from_numpy(render(random_traits(6, rng), 2).images)
    assert image_similarity(a, a, components) == pytest.approx(1.0, abs=1e-5)
    embed = components.image_embedders[0]
    expected = torch.nn.functional.cosine_similarity(embed(a), embed(b), dim=1).mean()
    assert image_similarity(a, b, components) == pytest.approx(float(expected), abs=1e-6)
    assert image_similarity(a, b, components) < 0.99


def test_a_soft_token_experiment_is_audited_with_its_tokens(tmp_path):
    from diffusers_fair.method.targets import TargetDistribution
    from diffusers_fair.toy.demo import ToyExperiment, run_experiment

    experiment = ToyExperiment("toy-soft", "soft tokens", [TargetDistribution.uniform("hair_length", ["short", "long"])],
                               trainable={"train_text_encoder_lora": False, "num_soft_tokens": 2})
    settings = DemoSettings(iterations=2, images_per_prompt=4, images_per_word=2, num_words=1, learning_rate=0.05)
    report = run_experiment(tmp_path, experiment, settings)
    # The trained tokens change the prompt's embedding, so the audited images change too: an audit
    # that left the tokens out of the prompt would give the base model's images (similarity 1).
    assert report["similarity"] < 1.0 - 1e-4
    metadata = json.loads((tmp_path / "adaptor" / "fair_adaptor.json").read_text())
    assert metadata["kind"] == "soft_tokens"


def test_every_shipped_toy_adaptor_loads_and_matches_its_index_entry():
    from diffusers_fair import load_fair_adaptor
    from diffusers_fair.adaptors import hub

    local = {name: e for name, e in hub.load_index().items() if e.status == "local"}
    assert {"toy-gender", "toy-gender-race", "toy-gender-race-age", "toy-gender-soft-tokens"} <= set(local)
    for name, entry in local.items():
        pipe = load_toy_pipeline(fair=True)
        loaded = load_fair_adaptor(pipe, name)
        assert [t["text"] for t in loaded.metadata.targets] == list(entry.targets), name
        assert loaded.metadata.kind == entry.kind, name
        after = entry.metrics["held_out_bias_after"]
        assert set(after) == {"hair_length", "skin_tone", "hair_colour"}, name


@pytest.mark.slow
def test_the_full_demo_reaches_its_goal(tmp_path):
    """The README's main job (about 7 minutes): each debiased attribute ends at most a third of its base bias,
    and the untargeted one (hair colour, held by the default preservation) keeps its shares within 0.05."""
    report = run_demo(tmp_path)
    for attribute in report["debiased"]:
        assert report["after"][attribute] <= report["before"][attribute] / 3, (attribute, report["before"], report["after"])
    assert report["debiased"] == ["hair_length", "skin_tone"]
    assert report["drift"]["hair_colour"] <= 0.05, report["shares_before"]["hair_colour"]
