"""`diffusers-fair compare` and the comparison files (diffusers_fair.evaluation.comparison)."""

import json
import random
from pathlib import Path

import pytest

from diffusers_fair.cli import build_parser, main
from diffusers_fair.evaluation.comparison import add_pareto, comparison_markdown, pareto_front, write_comparison


def comparison():
    methods = {
        "base": {"bias": {"hair": 0.8, "tone": 0.4, "colour": 0.7}, "similarity": 1.0, "seconds": 0.0},
        "ours": {"bias": {"hair": 0.2, "tone": 0.1, "colour": 0.3}, "similarity": 0.8, "seconds": 400.0},
        "prompt": {"bias": {"hair": 0.3, "tone": 0.05, "colour": 0.7}, "similarity": 0.9, "changes_prompt": True},
        "worse": {"bias": {"hair": 0.5, "tone": 0.3, "colour": 0.6}, "similarity": 0.7},
    }
    return {"targeted": ["hair", "tone"], "methods": methods, "settings": {"seed": 0}}


def test_pareto_front_matches_a_brute_force_check():
    rng = random.Random(0)
    for _ in range(50):
        points = {f"m{i}": (rng.choice([0.1, 0.2, 0.3]), rng.choice([0.7, 0.8, 0.9])) for i in range(6)}
        expected = []
        for name, (b, s) in points.items():
            better = [o for o, (b2, s2) in points.items() if (b2, -s2) < (b, -s) and b2 <= b and s2 >= s]
            if not better:
                expected.append(name)
        assert sorted(pareto_front(points)) == sorted(expected)
    assert pareto_front({"a": (0.1, 0.9), "b": (0.1, 0.9)}) == ["a", "b"]  # equal points dominate neither


def test_the_fronts_of_each_targeted_attribute_are_marked():
    marked = add_pareto(comparison())["methods"]
    assert marked["base"]["pareto"] == ["hair", "tone"]  # similarity 1: nothing beats it on similarity
    assert marked["ours"]["pareto"] == ["hair"]
    assert marked["prompt"]["pareto"] == ["hair", "tone"]
    assert marked["worse"]["pareto"] == []


def test_write_comparison_writes_json_table_and_picture(tmp_path):
    paths = write_comparison(comparison(), tmp_path)
    written = json.loads(paths["json"].read_text())
    assert written["targeted"] == ["hair", "tone"] and set(written["methods"]) == {"base", "ours", "prompt", "worse"}
    table = paths["markdown"].read_text()
    assert "| ours | kept | 0.200 | 0.100 | 0.300 | 0.800 | 400 |" in table
    assert "bias colour (untargeted)" in table and "| prompt | changed |" in table
    assert paths["picture"].stat().st_size > 1000


def test_an_untargeted_attribute_without_faces_shows_a_dash(tmp_path):
    data = comparison()
    data["methods"]["prompt"]["bias"]["colour"] = None  # no face read for that attribute
    table = write_comparison(data, tmp_path)["markdown"].read_text()
    assert [line for line in table.splitlines() if line.startswith("| prompt |")][0].split(" | ")[4] == "-"


def test_a_comparison_without_base_or_bias_is_refused(tmp_path):
    broken = comparison()
    del broken["methods"]["base"]
    with pytest.raises(ValueError, match="base"):
        write_comparison(broken, tmp_path)
    broken = comparison()
    del broken["methods"]["ours"]["bias"]["tone"]
    with pytest.raises(ValueError, match="'ours' lacks the bias of \\['tone'\\]"):
        comparison_markdown(add_pareto(broken))


def test_the_command_parses_and_knows_every_method():
    from diffusers_fair.evaluation.comparison import METHODS

    assert build_parser().parse_args(["compare", "--out", "x", "--methods", *METHODS]).methods == list(METHODS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--out", "x", "--methods", "iti-gen"])
    args = build_parser().parse_args(["compare", "--out", "x", "--methods", "prompt", "uce", "--train"])
    assert (args.methods, args.train, args.uce_concepts, args.uce_iterations) == (["prompt", "uce"], True, "held-out", 10)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--out", "x", "--methods", "nonsense"])


def test_bad_settings_stop_before_anything_runs(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "out"), "--words", "21"]) == 2
    assert "num_words" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_compare_on_the_toy_world_end_to_end(tmp_path):
    out = tmp_path / "compare"
    assert main(["compare", "--out", str(out), "--words", "2", "--images-per-word", "4", "--uce-iterations", "1"]) == 0
    written = json.loads((out / "comparison.json").read_text())
    assert written["targeted"] == ["hair_length", "skin_tone"]
    assert list(written["methods"]) == ["base", "ours", "prompt", "ethical", "fair-diffusion", "uce", "debias-vl"]
    base = written["methods"]["base"]
    assert base["similarity"] == pytest.approx(1.0, abs=1e-5) and set(base["pareto"]) == {"hair_length", "skin_tone"}
    for name, record in written["methods"].items():
        assert set(record["bias"]) == {"hair_length", "skin_tone", "hair_colour"}, name
        assert 0 <= record["similarity"] <= 1 + 1e-5 and record["seconds"] >= 0
        assert record["changes_prompt"] == (name in ("prompt", "ethical"))
    assert written["methods"]["uce"]["iterations"] == 1
    assert (out / "comparison.md").exists() and (out / "comparison.png").exists()


# --------------------------------------------------------------------------- Stable Diffusion, from a train config
REPO = Path(__file__).resolve().parents[1]


def sd_config(tmp_path, output_dir) -> Path:
    """An SD experiment config for the tiny pipeline: binary gender, the tiny prompts held out."""
    from diffusers_fair.testing import BASE_MODELS, PROMPTS

    (tmp_path / "train.json").write_text(json.dumps(PROMPTS[:2]))
    (tmp_path / "held_out.txt").write_text("\n".join(PROMPTS) + "\n")
    config = {"name": "tiny-gender", "targets": ["gender: male, female"], "prompts": str(tmp_path / "train.json"),
              "training": {"base_model": BASE_MODELS["sd15"], "output_dir": str(output_dir), "weight_loss_face": 0},
              "components": {"clip_model": "ViT-H-14", "classifier": {"kind": "clip"},
                             "eval_classifier": {"kind": "clip"}},
              "evaluation": {"prompts": str(tmp_path / "held_out.txt"), "images_per_prompt": 4}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from diffusers_fair.testing import tiny_training_run

    run = tmp_path_factory.mktemp("tiny-run")
    tiny_training_run("sd15", run)  # the adaptor in run/adaptor, where the config's output_dir puts it
    return run


@pytest.fixture
def tiny_loaders(monkeypatch):
    """The SD runner's loaders replaced by the tiny random-weight pipeline and components; returns the calls."""
    from diffusers_fair.cli import _compare_sd
    from diffusers_fair.components.stable_diffusion import SD15Components
    from diffusers_fair.testing import tiny_components, tiny_pipeline

    calls = []

    def load_base_pipeline(model, device, dtype):
        calls.append(model)
        return tiny_pipeline("sd15")

    def load_components(experiment, device, dtype):
        tiny = tiny_components()
        return SD15Components(classifier=tiny.classifier, detector=tiny.detector, clip=tiny.image_embedders[0],
                              eval_classifier=tiny.classifier)

    monkeypatch.setattr(_compare_sd, "load_base_pipeline", load_base_pipeline)
    monkeypatch.setattr(_compare_sd, "load_components", load_components)
    return calls


@pytest.fixture
def pipeline_calls(monkeypatch, tiny_loaders):
    """Every Stable Diffusion pipeline call of the SD runner as (who, prompt): "base" for the base model
    (the first pipeline loaded), else the pipeline's class name."""
    from diffusers import StableDiffusionPipeline

    from diffusers_fair.cli import _compare_sd

    loaded, calls = [], []
    load = _compare_sd.load_base_pipeline
    call = StableDiffusionPipeline.__call__

    def load_base_pipeline(model, device, dtype):
        loaded.append(load(model, device, dtype))
        return loaded[-1]

    def counted(self, prompt=None, *args, **kwargs):
        who = "base" if loaded and self is loaded[0] else type(self).__name__
        calls.append((who, prompt[0] if isinstance(prompt, list) else prompt))
        return call(self, prompt, *args, **kwargs)

    monkeypatch.setattr(_compare_sd, "load_base_pipeline", load_base_pipeline)
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counted)
    return calls


def test_compare_on_stable_diffusion_from_a_train_config(tmp_path, tiny_run, tiny_loaders, pipeline_calls):
    from diffusers_fair.evaluation.audit import evaluate
    from diffusers_fair.testing import PROMPTS, tiny_components, tiny_pipeline

    config = sd_config(tmp_path, tiny_run)
    out = tmp_path / "compare"
    assert main(["compare", "--config", str(config), "--out", str(out), "--uce-iterations", "1"]) == 0
    written = json.loads((out / "comparison.json").read_text())
    assert written["targeted"] == ["gender"]
    assert list(written["methods"]) == ["base", "ours", "prompt", "ethical", "fair-diffusion", "uce", "debias-vl"]
    for name, record in written["methods"].items():
        assert set(record["bias"]) == {"gender"} and 0 <= record["bias"]["gender"] <= 1, name
        assert record["changes_prompt"] == (name in ("prompt", "ethical"))
    methods = written["methods"]
    assert methods["ours"]["adaptor"] == str(tiny_run / "adaptor") and methods["uce"]["iterations"] == 1
    assert methods["base"]["similarity"] == 1.0
    assert methods["ours"]["similarity"] < 0.9999  # the adaptor changes the images
    assert written["settings"]["held_out_prompts"] == PROMPTS and written["settings"]["images_per_prompt"] == 4
    assert tiny_loaders == ["diffusers-fair/tiny-sd15"] * 2  # the base model, and a fresh copy for the adaptor
    # The base model's bias is that of an audit of the stock pipeline run on its own.
    tiny = tiny_components()
    alone = evaluate(tiny_pipeline("sd15"), PROMPTS, tiny, images_per_prompt=4, batch_size=4, guidance_scale=7.5,
                     num_inference_steps=25, num_samples=0, progress=False)
    assert methods["base"]["bias"]["gender"] == pytest.approx(alone.summary()["groups"]["gender"]["bias_mean"])
    assert (out / "comparison.md").exists() and (out / "comparison.png").exists()
    # The base model drew each prompt's images once, kept for every method's audit.
    assert sorted(p for who, p in pipeline_calls if who == "base") == sorted(PROMPTS)
    assert len(list((out / "base_images").glob("*.safetensors"))) == len(PROMPTS)


def test_the_stored_base_images_give_the_numbers_of_generating_them_again(tmp_path, tiny_run, tiny_loaders):
    from diffusers_fair.adaptors.pipeline import FairFinetunePipeline, load_fair_adaptor
    from diffusers_fair.baselines import prompt_intervention
    from diffusers_fair.cli._compare_sd import class_words
    from diffusers_fair.evaluation.audit import evaluate
    from diffusers_fair.method.targets import TargetDistribution
    from diffusers_fair.testing import PROMPTS, tiny_components, tiny_pipeline

    out = tmp_path / "compare"
    assert main(["compare", "--config", str(sd_config(tmp_path, tiny_run)), "--out", str(out),
                 "--methods", "ours", "prompt"]) == 0
    methods = json.loads((out / "comparison.json").read_text())["methods"]
    # Each method audited against the stock pipeline run again on the same noise, as evaluate does it.
    ours = FairFinetunePipeline.from_pipe(tiny_pipeline("sd15"))
    load_fair_adaptor(ours, str(tiny_run / "adaptor"))
    target = TargetDistribution.parse("gender: male, female")
    prompt = prompt_intervention(tiny_pipeline("sd15"), [target], class_words({"gender": ["male", "female"]}))
    tiny = tiny_components()
    for name, pipe in (("ours", ours), ("prompt", prompt)):
        expected = evaluate(pipe, PROMPTS, tiny, images_per_prompt=4, batch_size=4, guidance_scale=7.5,
                            num_inference_steps=25, reference_pipe=tiny_pipeline("sd15"),
                            image_embedders={"clip": tiny.image_embedders[0]}, num_samples=0, progress=False)
        summary = expected.summary()
        assert methods[name]["similarity"] == pytest.approx(summary["similarity"]["clip"]["mean"], rel=1e-6), name
        assert methods[name]["bias"]["gender"] == pytest.approx(summary["groups"]["gender"]["bias_mean"]), name
        base = expected.summary("reference")
        assert methods["base"]["shares"]["gender"] == pytest.approx(base["groups"]["gender"]["freqs"])
    assert methods["ours"]["similarity"] != pytest.approx(methods["prompt"]["similarity"], rel=1e-6)


def test_a_stopped_comparison_resumes_where_it_stopped(tmp_path, monkeypatch, capsys, tiny_run, tiny_loaders,
                                                      pipeline_calls):
    from diffusers_fair.cli import _compare_sd
    from diffusers_fair.testing import PROMPTS

    config = sd_config(tmp_path, tiny_run)
    argv = ["compare", "--config", str(config), "--methods", "ours", "prompt", "ethical", "debias-vl",
            "--set", "evaluation.images_per_prompt=2"]
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "comparison.json").read_text())

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "compare"
    with monkeypatch.context() as patch:
        patch.setattr(_compare_sd, "ethical_intervention", stop)  # the third method
        assert main(argv + ["--out", str(out)]) == 130
    assert list(json.loads((out / "comparison.json").read_text())["methods"]) == ["base", "ours", "prompt"]
    assert main(argv + ["--out", str(out), "--seed", "1"]) == 2  # other settings are refused
    assert "holds a comparison started with other settings (seed)" in capsys.readouterr().err

    pipeline_calls.clear()
    tiny_loaders.clear()
    assert main(argv + ["--out", str(out)]) == 0
    assert "resuming: ours, prompt audited already" in capsys.readouterr().out
    who = {w for w, _ in pipeline_calls}
    assert "base" not in who and "FairFinetunePipeline" not in who and "PromptInterventionPipeline" not in who
    assert [w for w, _ in pipeline_calls].count("EthicalInterventionPipeline") == len(PROMPTS)  # one call a prompt
    assert tiny_loaders == ["diffusers-fair/tiny-sd15"]  # "ours" is not loaded again
    resumed = json.loads((out / "comparison.json").read_text())
    for comparison in (whole, resumed):
        for record in comparison["methods"].values():
            del record["seconds"], record["audit_seconds"]
    assert resumed == whole

    assert main(argv + ["--out", str(out)]) == 2  # a finished comparison is kept
    assert "holds the results of an earlier comparison" in capsys.readouterr().err


def test_compare_on_stable_diffusion_takes_overrides_and_an_adaptor(tmp_path, tiny_run, tiny_loaders):
    config = sd_config(tmp_path, tmp_path / "elsewhere")  # no adaptor where the config trains
    out = tmp_path / "compare"
    assert main(["compare", "--config", str(config), "--out", str(out), "--methods", "ours", "prompt",
                 "--adaptor", str(tiny_run / "adaptor"), "--set", "evaluation.images_per_prompt=2"]) == 0
    written = json.loads((out / "comparison.json").read_text())
    assert list(written["methods"]) == ["base", "ours", "prompt"]
    assert written["settings"]["images_per_prompt"] == 2


@pytest.mark.parametrize("case", ["no adaptor", "toy config", "train", "unknown method"])
def test_the_stable_diffusion_path_refuses_in_one_line_before_loading(tmp_path, monkeypatch, capsys, tiny_loaders,
                                                                      case):
    monkeypatch.chdir(REPO)  # the toy config's paths are relative to the repository
    config = sd_config(tmp_path, tmp_path / "untrained")
    argv = ["compare", "--config", str(config), "--out", str(tmp_path / "out")]
    expected = {"no adaptor": f"no adaptor at {tmp_path / 'untrained' / 'adaptor'}",
                "toy config": "is a toy-world config", "train": "--train runs on the toy world only",
                "unknown method": "invalid choice: 'nonsense'"}[case]
    if case == "toy config":
        argv[2] = str(REPO / "examples" / "configs" / "toy_gender.yaml")
    elif case == "train":
        argv.append("--train")
    elif case == "unknown method":
        argv += ["--methods", "nonsense"]
    if case == "unknown method":
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2
    else:
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert "--train" in err or case != "no adaptor"  # the missing adaptor says training here is not offered
    assert tiny_loaders == [] and not (tmp_path / "out").exists()


def test_the_stable_diffusion_runner_refuses_an_unknown_method(tmp_path, tiny_run, tiny_loaders):
    from diffusers_fair.cli._compare_sd import run_sd_comparison

    with pytest.raises(ValueError, match=r"unknown methods \['nonsense'\]"):
        run_sd_comparison(sd_config(tmp_path, tiny_run), tmp_path / "out", ["ours", "nonsense"])
    with pytest.raises(ValueError, match="no methods to compare with the base model"):
        run_sd_comparison(sd_config(tmp_path, tiny_run), tmp_path / "out", [])
    assert tiny_loaders == [] and not (tmp_path / "out").exists()


def test_an_earlier_comparison_is_kept_unless_overwrite_is_given(tmp_path, capsys, tiny_run, tiny_loaders):
    config = sd_config(tmp_path, tiny_run)
    out = tmp_path / "compare"
    out.mkdir()
    (out / "comparison.json").write_text('{"earlier": true}')
    (out / "notes.txt").write_text("mine")
    argv = ["compare", "--config", str(config), "--out", str(out), "--methods", "prompt",
            "--set", "evaluation.images_per_prompt=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds the results of an earlier comparison (comparison.json)" in err and err.count("\n") == 1, err
    assert tiny_loaders == [] and (out / "comparison.json").read_text() == '{"earlier": true}'

    assert main(argv + ["--overwrite"]) == 0
    written = json.loads((out / "comparison.json").read_text())
    assert list(written["methods"]) == ["base", "prompt"]
    assert not (out / "notes.txt").exists()  # the folder is replaced whole, as eval's and demo's
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".compare")] == []  # no staging left behind
