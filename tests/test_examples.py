"""The toy-world example scripts run end to end at a tiny size; the adaptor ship script builds its index entries."""

import json

import pytest

from helpers.scripts import load_script


def load(name: str, folder: str = "examples"):
    return load_script(folder, name)


def test_dft_variants_share_the_first_loss_and_then_differ(tmp_path):
    script = load("toy_dft_variants")
    record = script.main(["--out", str(tmp_path), "--iterations", "2", "--seeds", "1", "--batch", "2",
                          "--steps", "4", "--threads", "1"])
    curves = record["curves"]
    assert set(curves) == {"naive", "adjusted", "adjusted-unstandardised"}
    first = [runs[0][0] for runs in curves.values()]
    # Same initial soft tokens and noise: the first loss is the same; the updates differ.
    assert first == pytest.approx([first[0]] * 3, abs=1e-6)
    second = [runs[0][1] for runs in curves.values()]
    assert len({round(x, 6) for x in second}) == 3
    assert json.loads((tmp_path / "curves.json").read_text())["curves"] == curves
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_smooth_is_a_trailing_mean():
    script = load("toy_dft_variants")
    values = [[1.0, 2.0, 3.0, 4.0]]
    assert script.smooth(__import__("numpy").array(values), width=2).tolist() == [[1.0, 1.5, 2.5, 3.5]]


def test_paper_effects_define_each_experiment():
    script = load("toy_paper_effects")
    runs = script.experiments()
    assert set(runs) == {"gender", "race", "gender-race", "gender-race-age", "soft-tokens", "unet-lora"}
    assert runs["gender-race-age"].debiased == ["hair_length", "skin_tone", "hair_colour"]
    age = runs["gender-race-age"].targets[2]
    assert age.prob("grey") == pytest.approx(0.25)
    # Table 5 keeps the paper's image-semantics weight and decays the learning rate; the rest use the preset's.
    assert runs["gender-race-age"].trainable == {"weight_loss_img": 8.0, "lr_schedule": "cosine"}
    assert all("weight_loss_img" not in runs[name].trainable for name in runs if name != "gender-race-age")
    assert runs["soft-tokens"].trainable == {"train_text_encoder_lora": False, "num_soft_tokens": 5}
    assert runs["unet-lora"].trainable["train_unet_lora"] is True


def test_seed_statistics_average_each_experiment_over_its_seeds():
    script = load("toy_paper_effects")

    def report(experiment, seed, after_hair, after_skin, grey):
        targeted = {"hair_length": {"short": 0.5, "long": 0.5}, "skin_tone": {"pale": 0.5, "deep": 0.5}}
        return {"experiment": experiment, "settings": {"seed": seed}, "debiased": ["hair_length", "skin_tone"],
                "before": {"hair_length": 0.8, "skin_tone": 0.4, "hair_colour": 0.7},
                "after": {"hair_length": after_hair, "skin_tone": after_skin, "hair_colour": 0.5},
                "shares_before": {**targeted, "hair_colour": {"dark": 0.7, "grey": 0.3}},
                "shares_after": {"hair_length": {"short": 0.9, "long": 0.1}, "skin_tone": {"pale": 0.5, "deep": 0.5},
                                 "hair_colour": {"dark": 1 - grey, "grey": grey}}}

    reports = {"gr/seed0": report("toy-gr", 0, 0.2, 0.1, 0.3), "gr/seed1": report("toy-gr", 1, 0.4, 0.2, 0.5),
               "other": report("toy-other", 0, 0.8, 0.4, 0.2)}
    stats = script.seed_statistics(reports)
    assert stats["toy-gr"]["seeds"] == [0, 1]
    assert stats["toy-gr"]["ratio_mean"] == pytest.approx({"hair_length": 0.375, "skin_tone": 0.375})
    # Population standard deviation of (0.25, 0.5) and of (0.25, 0.5): 0.125.
    assert stats["toy-gr"]["ratio_std"] == pytest.approx({"hair_length": 0.125, "skin_tone": 0.125})
    assert stats["toy-gr"]["grey_mean"] == pytest.approx(0.4)
    # Only hair colour is untargeted: grey 0.3 -> 0.3 and 0.3 -> 0.5 (hair length's large change is targeted).
    assert script.untargeted_change(reports["gr/seed1"]) == pytest.approx(0.2)
    assert stats["toy-gr"]["untargeted_change_mean"] == pytest.approx(0.1)
    assert stats["toy-gr"]["untargeted_within_0.05"] == 1
    assert stats["toy-other"]["ratio_std"] == {"hair_length": 0.0, "skin_tone": 0.0}
    table = script.seed_markdown(reports)
    assert "| toy-gr | 0, 1 | hair_length 0.38 ± 0.12, skin_tone 0.38 ± 0.12 | 0.40 ± 0.10 | 0.100 ± 0.100 (1/2) |" in table


def test_paper_effects_pass_the_overridden_settings_to_each_run(tmp_path, monkeypatch):
    script = load("toy_paper_effects")
    seen, seen_experiments = [], []

    def fake_run(folder, experiment, settings, before):
        seen.append((folder.relative_to(tmp_path).as_posix(), experiment.name, settings))
        seen_experiments.append(experiment)
        return {"settings": {"seed": settings.seed}}

    monkeypatch.setattr(script, "audit_base_model", lambda settings, components: {"seed": settings.seed})
    monkeypatch.setattr(script, "load_toy_components", lambda: None)
    monkeypatch.setattr(script, "run_experiment", fake_run)
    monkeypatch.setattr(script, "write_summary", lambda reports, out: (out / "summary.md").write_text("table\n"))
    script.main(["--out", str(tmp_path), "--only", "gender-race-age", "gender", "--lr-schedule", "cosine",
                 "--iterations", "5", "--seeds", "3"])
    assert [(folder, name) for folder, name, _ in seen] == [
        ("gender-race-age/seed3", "toy-gender-race-age"), ("gender/seed3", "toy-gender")]
    for _, _, settings in seen:
        assert (settings.lr_schedule, settings.iterations, settings.seed) == ("cosine", 5, 3)
        assert settings.images_per_prompt == 16  # the rest stay the demo's
    assert set(json.loads((tmp_path / "summary.json").read_text())) == {"gender-race-age/seed3", "gender/seed3"}
    assert all("preserve" not in experiment.trainable for experiment in seen_experiments)  # the default: on

    seen.clear()
    seen_experiments.clear()
    script.main(["--out", str(tmp_path / "off"), "--only", "gender-race-age", "--no-preserve"])
    assert seen_experiments[0].trainable == {"weight_loss_img": 8.0, "lr_schedule": "cosine", "preserve": []}


def test_ship_script_builds_the_index_entry_from_the_run(tmp_path):
    script = load("ship_toy_adaptors", "scripts")
    run = tmp_path / "gender"
    (run / "adaptor").mkdir(parents=True)
    (run / "adaptor" / "fair_adaptor.json").write_text(json.dumps({
        "name": "toy-gender", "base_model": "diffusers-fair/toy", "kind": "lora",
        "targets": [{"text": "hair_length: short=0.5, long=0.5"}],
        "training": {"weight_loss_img": 2.0, "num_iterations": 140, "lr_schedule": "cosine"}}))
    (run / "adaptor" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (run / "report.json").write_text(json.dumps({
        "title": "uniform hair length",
        "before": {"hair_length": 0.77549}, "after": {"hair_length": 0.38251},
        "shares_before": {"hair_colour": {"grey": 0.2701}}, "shares_after": {"hair_colour": {"grey": 0.2864}},
        "similarity": 0.92849, "held_out_words": ["a", "b"],
        # The settings the demo was given; the experiment overrode two of them (the adaptor has the trained ones).
        "settings": {"images_per_word": 32, "iterations": 70, "lr_schedule": "constant"}}))
    index = {"adaptors": {"toy-gender": {"description": "kept", "status": "remote", "metrics": {"old": 1}}}}
    name, entry = script.entry_for(run, index)
    assert name == "toy-gender"
    assert entry["description"] == "kept" and entry["status"] == "local"
    assert entry["targets"] == ["hair_length: short=0.5, long=0.5"]
    assert entry["files"] == ["fair_adaptor.json", "pytorch_lora_weights.safetensors"]
    assert entry["metrics"] == {
        "held_out_bias_before": {"hair_length": 0.775}, "held_out_bias_after": {"hair_length": 0.383},
        "grey_share_before": 0.27, "grey_share_after": 0.286, "similarity_to_base_images": 0.928,
        "held_out_words": 2, "images_per_word": 32, "iterations": 140, "lr_schedule": "cosine",
        "weight_loss_img": 2.0}
