"""Tests of FairTrainingConfig (valid from construction, from a dict, through HfArgumentParser) and of
the prompt-set file format."""

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from diffusers_fair.method.targets import TargetDistribution
from diffusers_fair.training.config import FairTrainingConfig
from diffusers_fair.training.prompts import PromptSet, load_prompt_sets


ROOT = Path(__file__).resolve().parents[1]
GENDER = TargetDistribution.parse("gender: male, female")
CHOICES = {
    "mixed_precision": ("no", "fp16", "bf16"),
    "dft_mode": ("two_pass", "one_graph", "naive"),
    "lr_schedule": ("constant", "cosine"),
    "sampler": ("dpmsolver++", "ddim", "euler", "pipeline"),
    "log_with": ("auto", "tensorboard", "wandb", "none"),
    "dft_step_weights": ("unit", "authors"),
    "prompt_padding": ("max_length", "natural"),
    "ot_cost": ("squared", "euclidean"),
    "faceless_image_weight": ("full", "smallest_change_factor"),
    "face_realism_images": ("kept_target", "every_face"),
    "sdxl_text_encoder_lora": ("both", "text_encoder", "text_encoder_2"),
}


def squeeze(text: str) -> str:
    """``text`` without any whitespace (argparse wraps help lines, at spaces and after hyphens)."""
    return "".join(text.split())


# ---------------------------------------------------------------------------- defaults, docs, preset
def test_config_defaults_are_the_papers_sd15_settings():
    c = FairTrainingConfig()
    assert c.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    trained = (c.train_text_encoder_lora, c.text_encoder_lora_rank, c.train_unet_lora, c.num_soft_tokens)
    assert trained == (True, 50, False, 0)
    assert set(c.text_encoder_lora_modules) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert (c.learning_rate, c.weight_decay, c.ema_decay) == (5e-5, 1e-2, 0.996)
    assert (c.min_inference_steps, c.max_inference_steps, c.guidance_scale, c.sampler) == (19, 23, 7.5, "dpmsolver++")
    assert (c.dal_threshold, c.images_per_prompt, c.ot_monte_carlo_samples) == (0.8, 24, 100)
    assert (c.weight_loss_img, c.image_change_factor, c.face_region_factor, c.weight_loss_face) == (8.0, 0.2, 0.2, 1.0)
    assert c.validate() is c


def test_every_config_field_is_explained_here_and_in_the_docs():
    docs = (ROOT / "docs" / "TRAINING.md").read_text(encoding="utf-8")
    text = FairTrainingConfig.help()
    for f in dataclasses.fields(FairTrainingConfig):
        assert len(f.metadata.get("help", "")) > 20, f.name
        assert f"{f.name} = " in text
        assert f"`{f.name}`" in docs, f"docs/TRAINING.md does not describe {f.name}"


def test_the_settings_table_shows_each_default_and_the_toy_presets_changes():
    docs = (ROOT / "docs" / "TRAINING.md").read_text(encoding="utf-8")
    default, toy = FairTrainingConfig(), FairTrainingConfig.toy()
    for f in dataclasses.fields(FairTrainingConfig):
        row = re.search(rf"^\| `{f.name}` \| (.*?) \| (.*?) \| ", docs, re.M)
        assert row, f"docs/TRAINING.md has no settings row for {f.name}"
        value, toy_value = getattr(default, f.name), getattr(toy, f.name)
        assert row.group(1) == f"`{value!r}`", f.name
        assert row.group(2) == (f"`{toy_value!r}`" if toy_value != value else ""), f.name


def test_toy_preset_and_overrides():
    c = FairTrainingConfig.toy(num_iterations=7)
    assert (c.images_per_prompt, c.min_inference_steps, c.max_inference_steps, c.guidance_scale) == (16, 10, 12, 4.0)
    assert c.text_encoder_lora_rank == 8 and 1e-3 <= c.learning_rate <= 5e-3 and c.num_iterations == 7
    assert c.mixed_precision == "no" and c.dal_threshold == 0.5
    # The preset is the demo's run.
    from diffusers_fair.toy.demo import DemoSettings

    demo, preset = DemoSettings(), FairTrainingConfig.toy()
    assert (preset.num_iterations, preset.images_per_prompt, preset.learning_rate, preset.lr_schedule,
            preset.lr_final_ratio) == (demo.iterations, demo.images_per_prompt, demo.learning_rate,
                                       demo.lr_schedule, demo.lr_final_ratio) == (140, 16, 4e-3, "constant", 0.1)
    with pytest.raises(ValueError, match=r"^unknown FairTrainingConfig field 'num_iteratons' "
                                         r"\(did you mean 'num_iterations'\?\)$"):
        FairTrainingConfig.toy(num_iteratons=3)
    with pytest.raises(ValueError, match="^learning_rate must be a positive finite number"):
        FairTrainingConfig.toy(learning_rate=0.0)


# ---------------------------------------------------------------------------- valid from construction
@pytest.mark.parametrize("field, value, message", [
    # out of range
    ("dal_threshold", 1.5, "must be in [0, 1], got 1.5"),
    ("dal_threshold", -0.1, "must be in [0, 1]"),
    ("text_encoder_lora_rank", 0, "must be >= 1, got 0"),
    ("seed", -1, "must be >= 0"),
    ("checkpoints_total_limit", 0, "must be >= 1"),
    ("learning_rate", 0.0, "must be a positive finite number"),
    ("learning_rate", float("inf"), "must be a positive finite number"),
    ("ema_decay", 1.0, "must be in [0, 1), got 1.0"),
    ("min_inference_steps", 0, "must be >= 1"),
    ("max_inference_steps", 10, "must be >= min_inference_steps (19)"),
    ("guidance_scale", 0.5, "must be a finite number >= 1 (1 turns guidance off)"),
    ("images_per_prompt", 0, "must be >= 1"),
    ("image_change_factor", 1.2, "must be in [0, 1]"),
    ("attribute_change_factors", {"race": 2.0}, "['race'] must be in [0, 1], got 2.0"),
    ("weight_loss_img", -1.0, "must be a finite number >= 0"),
    ("lr_final_ratio", 1.5, "must be in [0, 1]"),
    ("max_grad_norm", -1.0, "must be a positive number or None"),
    ("face_box_scale", 0.0, "must be a positive finite number"),
    ("soft_token_prefix", "fair", "must look like '<name>'"),
    ("text_encoder_lora_modules", [], "must be a non-empty list of module names"),
    ("unet_lora_modules", ["to_q", ""], "must be a non-empty list of module names"),
    ("output_dir", "", "must not be empty"),
    ("sample_prompts", ["a doctor", " "], "must be non-empty strings"),
    ("weight_loss_preserve", -0.5, "must be a finite number >= 0"),
    ("preserve", ["age", "age"], "names an attribute twice"),
    ("preserve", ["untargeted", "age"], "'untargeted' stands for every untargeted attribute"),
    ("preserve", [""], "must list attribute names"),
    # not one of the choices
    ("mixed_precision", "fp8", "must be one of 'no', 'fp16', 'bf16', got 'fp8'"),
    ("dft_mode", "exact", "must be one of 'two_pass', 'one_graph', 'naive'"),
    ("sampler", "pndm", "must be one of 'dpmsolver++', 'ddim', 'euler', 'pipeline'"),
    ("lr_schedule", "linear", "must be one of 'constant', 'cosine'"),
    ("log_with", "mlflow", "must be one of 'auto', 'tensorboard', 'wandb', 'none'"),
    ("log_with", None, "must be one of"),
    # of the wrong type
    ("num_iterations", 2.5, "must be an integer, got float 2.5"),
    ("num_iterations", "100", "must be an integer, got str '100'"),
    ("train_unet_lora", 1, "must be True or False, got int 1"),
    ("learning_rate", "1e-4", "must be a number, got str '1e-4'"),
    ("learning_rate", True, "must be a number, got bool True"),
    ("learning_rate", float("nan"), "must be a number, got float nan"),
    ("text_encoder_lora_alpha", "16", "must be a number or None, got str '16'"),
    ("checkpoints_total_limit", 2.0, "must be an integer or None"),
    ("base_model", None, "must be a string, got NoneType None"),
    ("resume_from", 3, "must be a string or None"),
    ("text_encoder_lora_modules", "q_proj", "must be a list of strings, got str 'q_proj'"),
    ("preserve", "untargeted", "must be a list of strings, got str 'untargeted'"),
    ("sample_prompts", ["a", 3], "must be a list of strings"),
    ("attribute_change_factors", [("race", 0.6)], "must be a mapping of attribute names to numbers"),
    ("attribute_change_factors", {"race": "0.6"}, "must be a mapping of attribute names to numbers"),
    ("attribute_change_factors", {"race": True}, "must be a mapping of attribute names to numbers"),
])
def test_construction_rejects_bad_values_naming_the_field(field, value, message):
    overrides = {field: value}
    if field == "soft_token_prefix":
        overrides["num_soft_tokens"] = 2
    with pytest.raises(ValueError) as raised:
        FairTrainingConfig(**overrides)
    text = str(raised.value)
    assert text.startswith(field) and message in text and "\n" not in text, text
    # The same check through the other ways of building a config.
    with pytest.raises(ValueError, match=f"^{re.escape(field)}"):
        FairTrainingConfig.from_dict(overrides)
    with pytest.raises(ValueError, match=f"^{re.escape(field)}"):
        dataclasses.replace(FairTrainingConfig(), **overrides)


def test_construction_needs_something_to_train():
    with pytest.raises(ValueError, match="^nothing to train: set train_text_encoder_lora=True"):
        FairTrainingConfig(train_text_encoder_lora=False)
    soft = FairTrainingConfig(train_text_encoder_lora=False, num_soft_tokens=5)
    assert (soft.train_text_encoder_lora, soft.num_soft_tokens) == (False, 5)


def test_a_tracker_that_is_not_installed_is_refused():
    for tracker in ("tensorboard", "wandb"):
        if importlib.util.find_spec(tracker) is None:
            with pytest.raises(ValueError, match=f"^log_with='{tracker}' but {tracker} is not installed: pip install"):
                FairTrainingConfig(log_with=tracker)
        else:
            assert FairTrainingConfig(log_with=tracker).log_with == tracker


def test_lists_are_copied_and_tuples_become_lists():
    modules = ("q_proj", "v_proj")
    c = FairTrainingConfig(text_encoder_lora_modules=modules, sample_prompts=("a doctor",))
    assert c.text_encoder_lora_modules == ["q_proj", "v_proj"] and c.sample_prompts == ["a doctor"]
    factors = {"race": 0.6}
    other = dataclasses.replace(c, attribute_change_factors=factors)
    other.text_encoder_lora_modules.append("k_proj")
    factors["age"] = 0.3
    assert c.text_encoder_lora_modules == ["q_proj", "v_proj"] and other.attribute_change_factors == {"race": 0.6}
    # A mutable default is never shared between configs.
    first, second = FairTrainingConfig(), FairTrainingConfig()
    first.unet_lora_modules.append("proj_in")
    assert second.unet_lora_modules == ["to_q", "to_k", "to_v", "to_out.0"]


def test_validate_rechecks_fields_changed_after_construction():
    c = FairTrainingConfig.toy()
    c.learning_rate = -1.0
    with pytest.raises(ValueError, match="^learning_rate must be a positive finite number, got -1.0"):
        c.validate()
    c.learning_rate = 1e-3
    c.mixed_precision = "fp8"
    with pytest.raises(ValueError, match="^mixed_precision must be one of"):
        c.validate()
    c.mixed_precision = "bf16"
    c.sample_prompts = ("a doctor", "a nurse")
    assert c.validate() is c and c.sample_prompts == ["a doctor", "a nurse"]


def test_choices_are_the_literal_annotations():
    hints = typing.get_type_hints(FairTrainingConfig)
    literal = {name: typing.get_args(hint) for name, hint in hints.items()
               if typing.get_origin(hint) is typing.Literal}
    assert literal == CHOICES
    for name, choices in CHOICES.items():
        for choice in choices:
            if name == "log_with" and choice in ("tensorboard", "wandb") and importlib.util.find_spec(choice) is None:
                continue  # refused for another reason (see above)
            assert getattr(FairTrainingConfig(**{name: choice}), name) == choice


# ---------------------------------------------------------------------------- from a dict, to a dict
def test_from_dict_refuses_unknown_keys_in_one_line_naming_the_closest_field():
    with pytest.raises(ValueError, match=r"^unknown FairTrainingConfig field 'learning_rat' "
                                         r"\(did you mean 'learning_rate'\?\)$"):
        FairTrainingConfig.from_dict({"learning_rat": 1e-4, "seed": 3})
    with pytest.raises(ValueError) as raised:
        FairTrainingConfig.from_dict({"mixed_precison": "bf16", "zzz": 1, "seed": 3})
    assert str(raised.value) == ("unknown FairTrainingConfig fields 'mixed_precison' (did you mean "
                                 "'mixed_precision'?), 'zzz'")
    with pytest.raises(ValueError, match="needs a mapping of field names to values, got list"):
        FairTrainingConfig.from_dict([("seed", 3)])


def test_from_dict_keeps_the_defaults_of_missing_fields():
    c = FairTrainingConfig.from_dict({"learning_rate": 1e-4, "mixed_precision": "bf16",
                                      "attribute_change_factors": {"race": 0.6}})
    assert c == dataclasses.replace(FairTrainingConfig(), learning_rate=1e-4, mixed_precision="bf16",
                                    attribute_change_factors={"race": 0.6})
    assert FairTrainingConfig.from_dict({}) == FairTrainingConfig()


def test_config_dict_round_trip():
    c = FairTrainingConfig.toy(attribute_change_factors={"race": 0.6}, sample_prompts=("a", "b"), face_box_scale=1.5,
                               checkpoints_total_limit=None, text_encoder_lora_alpha=4.0, lr_schedule="cosine")
    data = c.to_dict()
    assert list(data) == [f.name for f in dataclasses.fields(FairTrainingConfig)]
    assert data["sample_prompts"] == ["a", "b"] and data["checkpoints_total_limit"] is None
    again = FairTrainingConfig.from_dict(json.loads(json.dumps(data)))
    assert again == c and again.to_dict() == data
    # The dict holds copies: changing it leaves the config alone.
    data["text_encoder_lora_modules"].append("proj")
    data["attribute_change_factors"]["age"] = 0.3
    assert "proj" not in c.text_encoder_lora_modules and c.attribute_change_factors == {"race": 0.6}


# ---------------------------------------------------------------------------- the command line
def parse(*args: str) -> FairTrainingConfig:
    (config,) = HfArgumentParser(FairTrainingConfig).parse_args_into_dataclasses(args=list(args),
                                                                                look_for_args_file=False)
    return config


def test_hf_argument_parser_gives_the_defaults_and_the_overrides():
    assert parse() == FairTrainingConfig()
    c = parse("--learning_rate", "1e-4", "--mixed_precision", "bf16", "--num_iterations", "2000",
              "--text_encoder_lora_alpha", "16", "--text_encoder_lora_modules", "q_proj", "v_proj",
              "--sample_prompts", "a photo of a doctor", "a photo of a nurse", "--resume_from", "latest",
              "--no_progress", "--gradient_checkpointing", "--dft-mode", "naive")
    expected = dataclasses.replace(FairTrainingConfig(), learning_rate=1e-4, mixed_precision="bf16",
                                   num_iterations=2000, text_encoder_lora_alpha=16.0,
                                   text_encoder_lora_modules=["q_proj", "v_proj"],
                                   sample_prompts=["a photo of a doctor", "a photo of a nurse"], resume_from="latest",
                                   progress=False, gradient_checkpointing=True, dft_mode="naive")
    assert c == expected
    assert isinstance(c.learning_rate, float) and isinstance(c.num_iterations, int)
    soft = parse("--no_train_text_encoder_lora", "--num_soft_tokens", "5")
    assert (soft.train_text_encoder_lora, soft.num_soft_tokens) == (False, 5)
    # The parser rewrites the dataclass fields' ``type`` in place; the config's own checks are not misled.
    assert FairTrainingConfig().validate().text_encoder_lora_alpha is None
    assert FairTrainingConfig(max_grad_norm=None).max_grad_norm is None


def test_a_parser_built_before_any_config_does_not_mislead_the_checks():
    code = ("from transformers import HfArgumentParser\n"
            "from diffusers_fair.training.config import FairTrainingConfig\n"
            "HfArgumentParser(FairTrainingConfig)\n"
            "print(FairTrainingConfig().validate().text_encoder_lora_alpha,\n"
            "      FairTrainingConfig(max_grad_norm=None).max_grad_norm)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["None", "None"]


def test_hf_argument_parser_shows_each_fields_help():
    text = squeeze(HfArgumentParser(FairTrainingConfig).format_help())
    for f in dataclasses.fields(FairTrainingConfig):
        assert f"--{f.name}" in text
        assert squeeze(f.metadata["help"]) in text, f.name
    assert squeeze("{no,fp16,bf16}") in text


@pytest.mark.parametrize("args, message", [
    (["--mixed_precision", "fp8"], "argument --mixed_precision/--mixed-precision: invalid choice: 'fp8'"),
    (["--sampler", "pndm"], "invalid choice: 'pndm'"),
    (["--num_iterations", "2.5"], "invalid int value: '2.5'"),
    (["--train_unet_lora", "maybe"], "Truthy value expected: got maybe"),
])
def test_hf_argument_parser_refuses_a_bad_choice_or_type(args, message, capsys):
    with pytest.raises(SystemExit) as raised:
        parse(*args)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_hf_argument_parser_values_out_of_range_or_unknown_are_errors():
    with pytest.raises(ValueError, match="^learning_rate must be a positive finite number, got -1.0"):
        parse("--learning_rate", "-1")
    with pytest.raises(ValueError, match=r"^max_inference_steps \(5\) must be >= min_inference_steps \(19\)"):
        parse("--max_inference_steps", "5")
    with pytest.raises(ValueError, match=re.escape("not used by the HfArgumentParser: ['--learning_rte', '1e-4']")):
        parse("--learning_rte", "1e-4")


# ---------------------------------------------------------------------------- prompt sets
def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def test_prompt_sets_and_their_file(tmp_path):
    with pytest.raises(ValueError, match="no prompts"):
        PromptSet(prompts=[])
    with pytest.raises(ValueError, match="weight"):
        PromptSet(prompts=["x"], weight=0)
    good = write(tmp_path / "sets.json", [{"name": "jobs", "prompts": ["a", "b"], "weight": 2,
                                           "targets": ["gender: male, female"]}, {"prompts": ["c"]}])
    sets = load_prompt_sets(good)
    assert [s.name for s in sets] == ["jobs", "set-1"] and sets[0].weight == 2 and sets[0].targets == [GENDER]
    assert [s.prompts for s in sets] == [["a", "b"], ["c"]] and sets[1].targets is None and sets[1].weight == 1.0
    plain = load_prompt_sets(write(tmp_path / "doctors.json", ["a doctor", "a surgeon"]))
    assert [(s.name, s.prompts, s.weight) for s in plain] == [("doctors", ["a doctor", "a surgeon"], 1.0)]
    bad = tmp_path / "bad.json"
    for content, message in [
        ("{not json", f"prompt set file {bad} is not valid JSON"),
        ("[]", f"prompt set file {bad} must hold a non-empty JSON list"),
        ('["a", " "]', f"prompt set file {bad}: prompt set 'bad': every prompt must be a non-empty string"),
        ('[{"prompts": ["a"]}, {"prompt": ["a"]}]', f"prompt set file {bad}: entry 1: unknown keys ['prompt']"),
        ('[{"prompts": ["a"], "targets": ["gender male"]}]', f"prompt set file {bad}: entry 0: malformed"),
        ('[{"prompts": ["a"], "targets": "gender: male, female"}]', "entry 0: 'targets' must be a list of strings"),
        ('[{"prompts": ["a"], "weight": 0}]', "entry 0: prompt set 'set-0': weight must be a positive number"),
        ('[{"name": "jobs", "prompts": []}]', "entry 0: prompt set 'jobs' has no prompts"),
        ('[{"prompts": ["a"]}, 3]', f"prompt set file {bad}: entry 1: must be an object, got int"),
        ('[{"name": "jobs"}]', "entry 0: needs exactly one of 'prompts' (a list) and 'file'"),
    ]:
        write(bad, content)
        with pytest.raises(ValueError) as raised:
            load_prompt_sets(bad)
        assert message in str(raised.value), str(raised.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_prompt_sets(tmp_path / "missing.json")


def test_a_prompt_set_names_a_text_file_relative_to_the_json_file(tmp_path, monkeypatch):
    folder = tmp_path / "experiment"
    write(folder / "prompts" / "jobs.txt", "# occupations\na photo of a doctor\n\n  a photo of a nurse \n#a comment\n")
    write(folder / "sports.txt", "a photo of a runner\n")
    sets_file = write(folder / "sets.json", [
        {"file": "prompts/jobs.txt", "weight": 3, "targets": ["gender: male, female"]},
        {"name": "sport", "file": "sports.txt"},
    ])
    monkeypatch.chdir(tmp_path)  # not the JSON file's folder: the text files are found all the same
    sets = load_prompt_sets(Path("experiment") / "sets.json")
    assert [(s.name, s.prompts, s.weight) for s in sets] == [
        ("jobs", ["a photo of a doctor", "a photo of a nurse"], 3), ("sport", ["a photo of a runner"], 1.0)]
    assert sets[0].targets == [GENDER] and sets[1].targets is None
    for entry, message in [
        ({"file": "nowhere.txt"}, f"entry 0: prompt file {folder / 'nowhere.txt'} does not exist"),
        ({"file": "prompts"}, f"entry 0: prompt file {folder / 'prompts'} cannot be read"),
        ({"file": 3}, "entry 0: 'file' must be a file name, got 3"),
        ({"file": "sports.txt", "prompts": ["a"]}, "entry 0: needs exactly one of 'prompts' (a list) and 'file'"),
    ]:
        write(sets_file, [entry])
        with pytest.raises(ValueError) as raised:
            load_prompt_sets(sets_file)
        assert str(raised.value).startswith(f"prompt set file {sets_file}: ") and message in str(raised.value)
    write(folder / "empty.txt", "# nothing but a comment\n\n")
    write(sets_file, [{"prompts": ["a"]}, {"file": "empty.txt"}])
    with pytest.raises(ValueError, match=re.escape(f"entry 1: prompt file {folder / 'empty.txt'} holds no prompts")):
        load_prompt_sets(sets_file)


def test_the_shipped_prompt_set_files_read_their_text_files():
    prompts = ROOT / "examples" / "prompts"

    def lines(name: str) -> list[str]:  # an independent reading of a prompt text file
        return [line.strip() for line in (prompts / name).read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.strip().startswith("#")]

    (occupations,) = load_prompt_sets(prompts / "occupations_train.json")
    assert (occupations.name, occupations.weight, occupations.targets) == ("occupations", 1.0, None)
    assert occupations.prompts == lines("occupations_train.txt") and len(occupations.prompts) == 230
    multi = load_prompt_sets(prompts / "multi_concept_train.json")
    assert [(s.name, s.weight) for s in multi] == [("occupations", 1.0), ("occupations with style and context", 1.0),
                                                   ("sports", 1.0), ("personal descriptors", 1.0)]
    files = ["occupations_train.txt", "occupations_style_context_train.txt", "sports.txt", "personal_descriptors.txt"]
    assert [s.prompts for s in multi] == [lines(name) for name in files]
