"""``diffusers-fair train CONFIG``: the example configs, the config format, overrides, and a real toy-world run.

Config paths are relative to the current folder, so every test runs in the repository root. The
SD 1.5 configs' own settings and an SD 1.5 training run are in ``test_sd15_smoke.py``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import diffusers_fair
from diffusers_fair.cli import main
from diffusers_fair.method.targets import TargetDistribution
from diffusers_fair.toy import world
from diffusers_fair.toy.experiment import toy_config_path
from diffusers_fair.toy.render import TRAITS
from diffusers_fair.training.config import FairTrainingConfig
from diffusers_fair.training.experiment import (
    experiment_from_dict,
    read_config_file,
    read_experiment,
    train_experiment,
)


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
PAPER = ["gender", "gender_race", "gender_race_age", "multi_concept", "race", "soft_tokens_gender"]
SDXL = ["sdxl_gender", "sdxl_gender_race"]  # the paper's experiments on Stable Diffusion XL
# The toy demo's experiments: adaptor name, targets, and the settings that differ from the toy preset
# besides no intermediate checkpoints or sample grids.
TOY = {
    "toy_gender": ("toy-gender", ["hair_length"], {}),
    "toy_race": ("toy-race", ["skin_tone"], {}),
    "toy_gender_race": ("toy-gender-race", ["hair_length", "skin_tone"], {}),
    "toy_gender_race_age": ("toy-gender-race-age", ["hair_length", "skin_tone", "hair_colour"],
                            {"weight_loss_img": 8.0, "lr_schedule": "cosine"}),
    "toy_soft_tokens": ("toy-gender-soft-tokens", ["hair_length"],
                        {"train_text_encoder_lora": False, "num_soft_tokens": 5}),
    "toy_unet_lora": ("toy-gender-unet-lora", ["hair_length"],
                      {"train_text_encoder_lora": False, "train_unet_lora": True}),
}
# A toy run of seconds: 2 images, 2 sampling steps per iteration.
TINY = ["--set", "training.images_per_prompt=2", "--set", "training.micro_batch_size=2",
        "--set", "training.min_inference_steps=2", "--set", "training.max_inference_steps=2",
        "--set", "training.log_with=none", "--set", "training.progress=false"]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


def dry_run(capsys, *argv) -> tuple[int, dict | None, str]:
    """Exit code, the resolved config printed on stdout (parsed), stderr."""
    code = main(["train", *map(str, argv), "--dry-run"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def refused(capsys, *argv) -> str:
    """The one-line error of a refused dry run (exit code 2)."""
    code, _, err = dry_run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffusers-fair train: error: "), err
    return lines[0]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------- the example configs
def test_the_example_configs_are_the_papers_and_the_toy_worlds():
    assert sorted(p.stem for p in CONFIGS.iterdir()) == sorted(PAPER + SDXL + list(TOY))
    assert all(p.suffix == ".yaml" for p in CONFIGS.iterdir())
    for path in CONFIGS.iterdir():
        assert path.read_text().startswith("# "), f"{path.name} has no header comment"
    # The toy configs ship in the package (the demo reads them); the examples link to those files.
    for name in TOY:
        assert (CONFIGS / f"{name}.yaml").resolve() == toy_config_path(name.removeprefix("toy_")).resolve()


@pytest.mark.parametrize("name", PAPER + SDXL + list(TOY))
def test_every_example_config_dry_runs(capsys, name):
    code, resolved, plan = dry_run(capsys, CONFIGS / f"{name}.yaml")
    assert code == 0
    written = read_config_file(CONFIGS / f"{name}.yaml")
    assert resolved["name"] == written["name"] and resolved["prompts"] == written["prompts"]
    # Every training field is resolved, the written ones as written.
    assert sorted(resolved["training"]) == sorted(FairTrainingConfig().to_dict())
    for field, value in written["training"].items():
        assert resolved["training"][field] == ("diffusers-fair/toy" if value == "toy" else value)
    assert resolved["preset"] == ("toy" if name.startswith("toy_") else "sd15")
    assert plan.startswith(f"experiment {written['name']}") and "audit afterwards: diffusers-fair eval" in plan


@pytest.mark.parametrize("name", list(TOY))
def test_toy_configs_hold_the_toy_demos_settings(name):
    adaptor, attributes, trainable = TOY[name]
    experiment = read_experiment(CONFIGS / f"{name}.yaml")
    assert experiment.toy_world and experiment.preset == "toy" and experiment.name == adaptor
    expected = FairTrainingConfig.toy(checkpoint_every=0, sample_every=0, output_dir=f"runs/{adaptor}", **trainable)
    assert experiment.config == expected
    targets = [TargetDistribution.uniform(a, TRAITS[a]) for a in attributes]
    if "hair_colour" in attributes:
        targets[-1] = TargetDistribution("hair_colour", {"dark": 0.75, "grey": 0.25})
    assert experiment.targets == targets
    assert [list(t.attributes) for t in experiment.targets] == [[a] for a in attributes]
    # The demo trains on the training occupations of the toy world, never on the held-out ones.
    (prompt_set,) = experiment.prompt_sets
    assert prompt_set.prompts == [world.prompt(w) for w in world.words("occupation", "train")]
    assert experiment.evaluation == {"prompts": "examples/prompts/toy_heldout.txt", "images_per_prompt": 32}


# --------------------------------------------------------------------------- the config format
def test_yaml_and_json_give_the_same_resolved_config(capsys, tmp_path):
    for name in ("gender_race_age", "multi_concept", "toy_gender_race_age", "toy_soft_tokens"):
        source = CONFIGS / f"{name}.yaml"
        as_json = tmp_path / f"{name}.json"
        as_json.write_text(json.dumps(read_config_file(source)))
        _, from_yaml, _ = dry_run(capsys, source)
        _, from_json, _ = dry_run(capsys, as_json)
        assert from_yaml == from_json
        # The resolved config is a config itself, and resolves to the same.
        resolved = tmp_path / f"{name}-resolved.json"
        resolved.write_text(json.dumps(from_yaml))
        assert dry_run(capsys, resolved)[1] == from_yaml


def test_yaml_numbers_booleans_and_repeated_keys(capsys, tmp_path):
    data = read_config_file(CONFIGS / "toy_gender.yaml")
    text = yaml.safe_dump(data, sort_keys=False).replace("training:\n", "training:\n  learning_rate: 1e-4\n")
    (tmp_path / "a.yaml").write_text(text)
    assert dry_run(capsys, tmp_path / "a.yaml")[1]["training"]["learning_rate"] == 1e-4  # YAML 1.1 would read text
    (tmp_path / "b.yaml").write_text(text.replace("training:\n", "training:\n  progress: no\n"))
    assert "progress must be True or False, got str 'no'" in refused(capsys, tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text(text + "name: again\n")
    assert "is not valid YAML: the key 'name' appears twice (line" in refused(capsys, tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("- a list\n")
    assert "must hold a mapping with the keys" in refused(capsys, tmp_path / "d.yaml")
    (tmp_path / "e.toml").write_text("")
    assert "must be YAML (.yaml, .yml) or JSON (.json)" in refused(capsys, tmp_path / "e.toml")
    assert "does not exist" in refused(capsys, tmp_path / "missing.yaml")


def with_key(data: dict, where: str, key: str) -> dict:
    """``data`` with ``key: 1`` added to the mapping at the dotted path ``where`` ("" for the top)."""
    node = data
    for part in filter(None, where.split(".")):
        node = node[part]
    node[key] = 1
    return data


@pytest.mark.parametrize("config, where, key, message", [
    ("toy_gender", "", "trainig", "has unknown key 'trainig' (did you mean 'training'?)"),
    ("toy_gender", "training", "learning_rat",
     "training: unknown FairTrainingConfig field 'learning_rat' (did you mean 'learning_rate'?)"),
    ("toy_gender", "evaluation", "image_per_prompt",
     "evaluation has unknown key 'image_per_prompt' (did you mean 'images_per_prompt'?)"),
    ("gender", "components", "clip_modle", "components has unknown keys ['clip_modle']"),
    ("gender", "components.classifier", "pth", "components.classifier has unknown keys ['pth']"),
    ("gender", "components.detector", "min_confidense", "components.detector has unknown keys ['min_confidense']"),
])
def test_unknown_keys_are_refused_at_every_level(capsys, tmp_path, config, where, key, message):
    data = with_key(read_config_file(CONFIGS / f"{config}.yaml"), where, key)
    assert message in refused(capsys, write_yaml(tmp_path / "bad.yaml", data))


def test_unknown_keys_of_the_prompt_set_file_are_refused(capsys, tmp_path):
    (tmp_path / "sets.json").write_text(json.dumps([{"name": "jobs", "prompt": ["a photo of a doctor"]}]))
    data = read_config_file(CONFIGS / "toy_gender.yaml")
    data["prompts"] = str(tmp_path / "sets.json")
    assert "entry 0: unknown keys ['prompt']" in refused(capsys, write_yaml(tmp_path / "bad.yaml", data))


def test_toy_world_parts_go_together_and_its_targets_are_its_traits(capsys, tmp_path):
    def error(data: dict) -> str:
        return refused(capsys, write_yaml(tmp_path / "bad.yaml", data))

    toy = read_config_file(CONFIGS / "toy_gender.yaml")
    mixed = dict(toy, training=dict(toy["training"], base_model="stable-diffusion-v1-5/stable-diffusion-v1-5"))
    assert "'components: toy' goes with the toy world's model only: set 'training.base_model: toy'" in error(mixed)
    sd = read_config_file(CONFIGS / "gender.yaml")
    assert "which goes with 'components: toy' only" in error(dict(sd, preset="toy", training={}))
    sd["training"]["base_model"] = "toy"
    assert "which goes with 'components: toy' only" in error(sd)
    assert "'gender' is not a toy-world trait" in error(dict(toy, targets=["gender: male, female"]))
    assert "the toy world's are ['short', 'long']" in error(dict(toy, targets=["hair_length: long, short"]))
    assert "'components' must be a mapping" in error(dict(toy, components="sd15"))
    assert "'preset' must be one of 'sd15', 'toy'" in error(dict(toy, preset="tiny"))
    # Without a preset the toy world's components bring the toy preset; preset: sd15 the paper's defaults.
    del toy["preset"]
    assert dry_run(capsys, write_yaml(tmp_path / "g.yaml", toy))[1]["training"]["text_encoder_lora_rank"] == 8
    sd15 = dict(toy, preset="sd15", training=dict(toy["training"], mixed_precision="no"))
    assert dry_run(capsys, write_yaml(tmp_path / "h.yaml", sd15))[1]["training"]["text_encoder_lora_rank"] == 50


def test_set_overrides_any_value(capsys):
    code, resolved, _ = dry_run(
        capsys, CONFIGS / "gender_race.yaml", "--set", "training.learning_rate=1e-4",
        "--set", "training.attribute_change_factors={race: 0.5, gender: 0.25}",
        "--set", "training.sample_prompts=[a, b c]",
        "--set", "components.dinov2=null", "--set", "evaluation.images_per_prompt=7", "--set", "name=other",
        "--set", "training.num_iterations=20", "--set", "training.num_iterations=30")
    assert code == 0
    assert resolved["training"]["learning_rate"] == 1e-4
    assert resolved["training"]["attribute_change_factors"] == {"race": 0.5, "gender": 0.25}
    assert resolved["training"]["sample_prompts"] == ["a", "b c"]
    assert resolved["training"]["num_iterations"] == 30  # in order: the last one wins
    assert resolved["components"]["dinov2"] is None and resolved["evaluation"]["images_per_prompt"] == 7
    assert resolved["name"] == "other"
    untouched = dry_run(capsys, CONFIGS / "gender_race.yaml")[1]
    assert {k: v for k, v in resolved["training"].items() if untouched["training"][k] != v} == {
        "learning_rate": 1e-4, "attribute_change_factors": {"race": 0.5, "gender": 0.25},
        "sample_prompts": ["a", "b c"], "num_iterations": 30}


@pytest.mark.parametrize("override, message", [
    ("learning_rate=1e-4", "--set learning_rate: a training setting is set as training.learning_rate=VALUE"),
    ("training.learning_rat=1e-4", "unknown FairTrainingConfig field 'learning_rat' (did you mean 'learning_rate'?)"),
    ("trainig.learning_rate=1e-4", "unknown key 'trainig' (did you mean 'training'?)"),
    ("training.num_iterations", "--set expects KEY=VALUE"),
    ("training..seed=1", "--set expects KEY=VALUE"),
    ("training.sample_prompts=[a", "--set training.sample_prompts value '[a' is not valid YAML"),
    ("training.num_iterations=2.5", "num_iterations must be an integer, got float 2.5"),
    ("components.classifier.kind.x=1", "components.classifier.kind is 'mobilenet', not a mapping"),
])
def test_bad_overrides_are_refused(capsys, override, message):
    assert message in refused(capsys, CONFIGS / "gender.yaml", "--set", override)


def test_out_and_resume(capsys, tmp_path):
    _, resolved, plan = dry_run(capsys, CONFIGS / "toy_gender.yaml", "--out", tmp_path / "run",
                                "--set", "training.output_dir=elsewhere", "--resume", "latest")
    assert resolved["training"]["output_dir"] == str(tmp_path / "run")  # --out wins over --set
    assert resolved["training"]["resume_from"] == "latest"
    assert f"the adaptor in {tmp_path / 'run' / 'adaptor'}" in plan and "resuming from latest" in plan
    assert f"--adaptor {tmp_path / 'run' / 'adaptor'}" in plan


def test_help_says_how_values_are_read(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "VALUE is read as YAML" in out and "--resume latest|CHECKPOINT" in out
    assert "--out DIR" in out and "DIR/adaptor" in out


def test_a_toy_experiment_needs_the_toy_parts():
    experiment = read_experiment(CONFIGS / "toy_gender.yaml")
    with pytest.raises(ValueError, match="trains the toy world"):
        train_experiment(experiment)
    with pytest.raises(ValueError, match="needs a 'name'"):
        experiment_from_dict({"prompts": "examples/prompts/toy_train.json"})


# --------------------------------------------------------------------------- a real toy-world run
def train(out: Path, iterations: int, *extra: str) -> int:
    return main(["train", str(CONFIGS / "toy_gender_race.yaml"), "--out", str(out),
                 "--set", f"training.num_iterations={iterations}", *TINY, *extra])


def log(out: Path) -> list[dict]:
    """The training log's records without their timings."""
    records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k != "seconds"} for record in records]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The toy demo's config trained for 2 tiny iterations through the command line."""
    out = tmp_path_factory.mktemp("toy") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        assert train(out, 2) == 0
    return out


def text_states(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_a_toy_config_trains_and_its_adaptor_loads_into_the_toy_pipeline(toy_run):
    from diffusers import StableDiffusionPipeline

    records = log(toy_run)
    assert len(records) == 2 and all(not r["skipped"] for r in records)
    train_prompts = {world.prompt(w) for w in world.words("occupation", "train")}
    assert all(set(r["prompts"]) <= train_prompts for r in records)
    pipe = StableDiffusionPipeline.from_pretrained(diffusers_fair.toy.model_path())
    prompt = world.prompt(world.words("occupation", "test")[0])
    before = text_states(pipe, prompt)
    meta = diffusers_fair.load_fair_adaptor(pipe, toy_run / "adaptor").metadata
    assert (meta.name, meta.kind, meta.base_model) == ("toy-gender-race", "lora", "diffusers-fair/toy")
    assert meta.target_distributions() == read_experiment(CONFIGS / "toy_gender_race.yaml").targets
    assert meta.training["iterations_trained"] == 2 and meta.license == ""
    assert meta.description.startswith("Toy model, text-encoder LoRA (rank 8)")
    # The trained LoRA changes the text encoder's output, also for a held-out word.
    assert not torch.allclose(text_states(pipe, prompt), before, atol=1e-5)


def lora_weights(out: Path) -> dict:
    return load_file(str(out / "adaptor" / "pytorch_lora_weights.safetensors"))


def test_resume_latest_continues_a_run_as_if_uninterrupted(toy_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(toy_run, resumed)
    # A mark in the first record's timing: a resumed run keeps the records up to its checkpoint.
    lines = (resumed / "training_log.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "seconds": -1.0})
    (resumed / "training_log.jsonl").write_text("\n".join(lines) + "\n")
    assert train(resumed, 3, "--resume", "latest") == 0
    assert json.loads((resumed / "training_log.jsonl").read_text().splitlines()[0])["seconds"] == -1.0
    records = log(resumed)
    assert len(records) == 3 and records[:2] == log(toy_run)
    straight = tmp_path / "straight"
    assert train(straight, 3) == 0
    assert records == log(straight)
    expected, got = lora_weights(straight), lora_weights(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not all(torch.equal(got[k], lora_weights(toy_run)[k]) for k in got)


@pytest.mark.slow
def test_two_cpu_processes_train_the_same_adaptor_as_one(toy_run, tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo on CPUs): each process samples half of the batch; the
    gathered targets and summed gradients make the run equal the one-process run, up to float rounding."""
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29573",
               "-m", "diffusers_fair.cli", "train", str(CONFIGS / "toy_gender_race.yaml"), "--out", str(out),
               "--set", "training.num_iterations=2", *TINY]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("adaptor") >= 1  # only the process that wrote the adaptor prints
    one, two = log(toy_run), log(out)
    assert [r["prompts"] for r in one] == [r["prompts"] for r in two]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    expected, got = lora_weights(toy_run), lora_weights(out)
    assert expected.keys() == got.keys()
    for key in expected:
        # Adam divides by the gradients' magnitude, so round-off in near-zero gradients can move a weight
        # by a small fraction of the learning rate (4e-3); measured: at most 8e-6.
        torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=5e-5)
