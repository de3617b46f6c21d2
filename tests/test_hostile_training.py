"""Hostile and careless input to targets, training configs and the trainer's set-up.

Every case is refused with a ``ValueError`` naming the input, before anything is touched; a set-up
that fails part-way leaves the pipeline as it was (weights, dtypes, ``requires_grad``, adapters,
vocabulary).
"""

import json
import math

import pytest
import torch

from diffusers_fair.method.targets import MAX_CELLS, TargetDistribution
from diffusers_fair.training import checkpointing
from diffusers_fair.training.config import FairTrainingConfig
from diffusers_fair.training.trainer import LOG_FILE, DistributionalAlignmentTrainer
from helpers.training import GENDER, PROMPTS, RACE, stub_components, tiny_config, tiny_training_pipeline


# ---------------------------------------------------------------------------- targets
def test_a_joint_table_naming_a_cell_twice_is_refused():
    with pytest.raises(ValueError, match=r"cell \('female',\) is given twice"):
        TargetDistribution.joint({"gender": ["male", "female"]}, {"female": 0.5, ("female",): 0.5})
    with pytest.raises(ValueError, match="given twice"):
        TargetDistribution.joint({"gender": ["male", "female"]}, {("male",): 0.5, "male": 0.5, "female": 0.0})


def test_a_product_of_many_attributes_is_refused_before_allocating():
    text = " * ".join(f"a{i}: x, y" for i in range(26))  # 2**26 cells, a 300-character string
    assert len(text) > 250
    with pytest.raises(ValueError, match=f"at most {MAX_CELLS} cells"):
        TargetDistribution.parse(text)
    twelve = TargetDistribution.parse(" * ".join(f"a{i}: x, y" for i in range(12)))  # 4096 cells: allowed
    assert twelve.num_classes == MAX_CELLS == 4096
    with pytest.raises(ValueError, match=f"at most {MAX_CELLS} cells"):
        twelve * TargetDistribution.uniform("b", ["x", "y"])
    with pytest.raises(ValueError, match=f"at most {MAX_CELLS} cells"):
        TargetDistribution.joint({f"a{i}": ["x", "y"] for i in range(13)}, {})
    with pytest.raises(ValueError, match=f"at most {MAX_CELLS} cells"):
        TargetDistribution.uniform("many", [f"c{i}" for i in range(MAX_CELLS + 1)])


def test_the_duplicate_class_check_is_linear():
    # 20000 distinct names: a quadratic check (names.count per name) would take minutes; this one is
    # refused by the size bound right after the linear duplicate check found nothing.
    names = [f"c{i}" for i in range(20000)]
    with pytest.raises(ValueError, match="at most"):
        TargetDistribution.uniform("many", names)
    with pytest.raises(ValueError, match=r"duplicate class names: \['c7'\]"):
        TargetDistribution.uniform("many", names[:100] + ["c7"])


@pytest.mark.parametrize("value", [10**400, -(10**400), 2**1024], ids=["1e400", "-1e400", "2**1024"])
def test_huge_integers_give_value_errors_not_overflow_errors(value):
    with pytest.raises(ValueError, match="not a finite number"):
        TargetDistribution("age", {"young": value, "old": 0.0})
    with pytest.raises(ValueError, match="not a finite number"):
        TargetDistribution.joint({"age": ["young", "old"]}, {"young": value})
    with pytest.raises(ValueError):
        TargetDistribution.joint({"age": ["young", "old"]}, [value, 0])
    with pytest.raises(ValueError, match="infinite"):
        TargetDistribution.parse(f"age: young={value}, old=0")


@pytest.mark.parametrize("field, value", [
    ("learning_rate", 10**400), ("guidance_scale", 10**400), ("dal_threshold", 10**400), ("max_grad_norm", 10**400),
    ("attribute_change_factors", {"race": 10**400}), ("num_iterations", 10**400), ("seed", 2**64),
], ids=lambda value: value if isinstance(value, str) else "huge")
def test_huge_integers_in_the_config_give_value_errors(field, value):
    with pytest.raises(ValueError, match=field):
        FairTrainingConfig.toy(**{field: value})


# ---------------------------------------------------------------------------- set-up checks
def _state(pipe):
    """Everything a failed set-up could change: values, dtypes, devices, requires_grad, modes, vocabulary."""
    state = {"vocabulary": len(pipe.tokenizer), "vocab_size": pipe.text_encoder.config.vocab_size}
    for part in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, part)
        state[part] = {name: (tensor.dtype, tensor.device, tensor.requires_grad, tensor.detach().clone())
                       for name, tensor in [*module.named_parameters(), *module.named_buffers()]}
        state[f"{part}.modes"] = {name: m.training for name, m in module.named_modules()}
        state[f"{part}.peft"] = getattr(module, "_hf_peft_config_loaded", False)
        state[f"{part}.checkpointing"] = getattr(module, "is_gradient_checkpointing", False)
    state["hooks"] = len(pipe.text_encoder.get_input_embeddings()._forward_hooks)
    return state


def _assert_same_state(before, after):
    assert before.keys() == after.keys()
    for key in before:
        if isinstance(before[key], dict) and before[key] and isinstance(next(iter(before[key].values())), tuple):
            assert before[key].keys() == after[key].keys(), key
            for name, (dtype, device, grad, value) in before[key].items():
                dtype2, device2, grad2, value2 = after[key][name]
                assert (dtype, device, grad) == (dtype2, device2, grad2), f"{key}.{name}"
                assert torch.equal(value, value2), f"{key}.{name}"
        else:
            assert before[key] == after[key], key


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("overrides, match", [
    (dict(text_encoder_lora_modules=["q_proj", "k_prj"]), r"text_encoder_lora_modules names 'k_prj'"),
    (dict(text_encoder_lora_modules=["q_prj"]), r"'q_prj', which matches no layer of the text_encoder"),
    (dict(train_unet_lora=True, unet_lora_modules=["to_q", "to_kk"]), r"unet_lora_modules names 'to_kk'"),
    (dict(text_encoder_lora_modules=["q_proj", "token_embedding"]), r"'token_embedding'.*Embedding.*linear layers"),
    (dict(train_unet_lora=True, unet_lora_modules=["to_q", "conv_in"]), r"'conv_in'.*Conv2d.*linear layers"),
    (dict(attribute_change_factors={"rase": 0.6}), r"attribute_change_factors names 'rase'.*\['gender', 'race'\]"),
    (dict(attribute_face_region_factors={"gender": 0.3, "age ": 0.3}), r"attribute_face_region_factors names 'age '"),
    (dict(attribute_change_factors={"age": 0.6}), r"names 'age', which no target covers"),
])
def test_set_up_refuses_misspelt_and_unsavable_settings_naming_them(tmp_path, overrides, match, fresh_accelerate_state):
    pipe = tiny_training_pipeline()
    before = _state(pipe)
    with pytest.raises(ValueError, match=match):
        DistributionalAlignmentTrainer(tiny_config(tmp_path, mixed_precision="bf16", **overrides), pipe,
                                       [GENDER * RACE], PROMPTS, stub_components())
    _assert_same_state(before, _state(pipe))


def test_misspelt_factor_keys_are_refused_by_a_dry_run_of_the_experiment(tmp_path):
    from diffusers_fair.training.experiment import experiment_from_dict

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"name": "jobs", "prompts": ["a photo of the face of a doctor"]}]))
    data = {"name": "x", "components": "toy", "targets": ["gender: male, female"], "prompts": str(prompts),
            "training": {"base_model": "toy", "attribute_change_factors": {"gnder": 0.5}}}
    with pytest.raises(ValueError, match=r"attribute_change_factors names 'gnder'"):
        experiment_from_dict(data)


def test_a_set_up_failing_part_way_leaves_the_pipeline_as_it_was(tmp_path, fresh_accelerate_state):
    # Reference face images the face embedder cannot read (16x16, it takes 8x8): the failure comes
    # after the pipeline was cast, frozen, and given its LoRA layers and soft tokens.
    components = stub_components()
    components.reference_faces = torch.rand(3, 3, 16, 16)
    pipe = tiny_training_pipeline()
    pipe.unet.enable_gradient_checkpointing()  # a setting of the user's that the set-up must keep
    pipe.vae.train()
    before = _state(pipe)
    config = tiny_config(tmp_path, mixed_precision="bf16", train_unet_lora=True, num_soft_tokens=2)
    with pytest.raises(RuntimeError):
        DistributionalAlignmentTrainer(config, pipe, [GENDER], PROMPTS, components)
    _assert_same_state(before, _state(pipe))
    assert "<fair>" not in pipe.tokenizer.get_vocab()
    # ... and the same pipeline trains afterwards.
    trainer = DistributionalAlignmentTrainer(tiny_config(tmp_path, mixed_precision="bf16", num_soft_tokens=2), pipe,
                                             [GENDER], PROMPTS, stub_components())
    assert not trainer.train_step()["skipped"]


def test_save_adaptor_takes_the_base_model_the_error_suggests(tmp_path):
    from diffusers_fair.adaptors.format import read_fair_adaptor

    trainer = DistributionalAlignmentTrainer(tiny_config(tmp_path, base_model=""), tiny_training_pipeline(),
                                             [GENDER], PROMPTS, stub_components())
    with pytest.raises(ValueError, match="pass base_model= with its Hub id"):
        trainer.save_adaptor(tmp_path / "a")
    trainer.save_adaptor(tmp_path / "a", base_model="someone/my-model")
    assert read_fair_adaptor(tmp_path / "a").metadata.base_model == "someone/my-model"


# ---------------------------------------------------------------------------- the training log
def _records(folder):
    return [json.loads(line) for line in (folder / LOG_FILE).read_text().splitlines()]


def test_each_run_writes_its_own_log(tmp_path):
    for _ in range(2):  # a second fresh run into the same folder: a new log, not the first one's continued
        trainer = DistributionalAlignmentTrainer(tiny_config(tmp_path, num_iterations=2), tiny_training_pipeline(),
                                                 [GENDER], PROMPTS, stub_components())
        trainer.train()
        assert [r["iteration"] for r in _records(tmp_path / "run")] == [1, 2]


def test_resuming_drops_a_torn_last_log_line_and_refuses_a_corrupt_middle_one(tmp_path):
    run = tmp_path / "run"
    trainer = DistributionalAlignmentTrainer(tiny_config(tmp_path, num_iterations=2, checkpoint_every=1),
                                             tiny_training_pipeline(), [GENDER], PROMPTS, stub_components())
    trainer.train()
    lines = (run / LOG_FILE).read_text().splitlines()
    (run / LOG_FILE).write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed mid-write
    checkpointing.truncate_log(run / LOG_FILE, 2)
    assert [r["iteration"] for r in _records(run)] == [1]

    (run / LOG_FILE).write_text(lines[0][:10] + "\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=rf"{LOG_FILE} line 1 is not valid JSON"):
        checkpointing.truncate_log(run / LOG_FILE, 2)

    # The resumed run (the torn line dropped) continues the log without error.
    (run / LOG_FILE).write_text(lines[0] + "\n" + lines[1][:7])
    resumed = DistributionalAlignmentTrainer(tiny_config(tmp_path, num_iterations=3, resume_from="latest"),
                                             tiny_training_pipeline(), [GENDER], PROMPTS, stub_components())
    resumed.train()
    assert [r["iteration"] for r in _records(run)] == [1, 3]
    assert math.isfinite(_records(run)[-1]["loss"])
