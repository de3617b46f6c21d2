"""The toy-world demo end to end, at a tiny size (the full run is the README's main job)."""

import json

import pytest
import torch

from diffusers_fair.cli import main
from diffusers_fair.demo import DemoSettings, load_toy_pipeline, run_demo


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
