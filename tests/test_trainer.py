"""Tests of FairTrainingConfig and DistributionalAlignmentTrainer on a tiny random-weight pipeline.

The pipeline uses the toy world's tokenizer and text encoder (diffusers_fair/toy/architecture.py)
with a much smaller U-Net and VAE (16x16 images); the components are stubs defined here: a tiny
conv classifier, a detector that returns the whole image as the face, random-feature embedders.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_fair.method.targets import TargetDistribution
from diffusers_fair.training import checkpointing
from diffusers_fair.training.config import FairTrainingConfig
from diffusers_fair.training.draws import derive_seed, draw_iteration
from diffusers_fair.training.prompts import PromptSet
from diffusers_fair.training.trainer import (
    DistributionalAlignmentTrainer,
    ema_decay_at,
    learning_rate_at,
)
from helpers.training import (
    GENDER,
    PROMPTS,
    RACE,
    ROOT,
    make_trainer,
    stub_components,
    tiny_config,
    tiny_training_pipeline,
)


# ---------------------------------------------------------------------------- a tiny world
# ---------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("targets, prompts, match", [
    ([TargetDistribution.uniform("hair", ["x", "y"])], PROMPTS, "not predicted by the classifier"),
    ([TargetDistribution.uniform("gender", ["female", "male"])], PROMPTS, "same names in the same order"),
    ([GENDER], [], "non-empty list"),
    ([GENDER], ["ok", PromptSet(["x"])], "not a mix"),
    ([GENDER, GENDER * RACE], PROMPTS, "several targets"),
    (None, PROMPTS, "no targets"),
])
def test_trainer_rejects_bad_targets_and_prompts_before_touching_the_pipeline(tmp_path, targets, prompts, match):
    pipe = tiny_training_pipeline()
    with pytest.raises(ValueError, match=match):
        DistributionalAlignmentTrainer(tiny_config(tmp_path), pipe, targets, prompts, stub_components())
    assert not getattr(pipe.text_encoder, "_hf_peft_config_loaded", False)
    assert all(p.requires_grad for p in pipe.unet.parameters())  # not even frozen yet


def test_trainer_rejects_bad_setups_before_touching_the_pipeline(tmp_path):
    no_embedders = stub_components()
    no_embedders.image_embedders = []
    bad_bank = stub_components()
    bad_bank.reference_faces = torch.zeros(3, 4, 5)
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        (dict(components=no_embedders), "image embedder"),
        (dict(components=bad_bank), "reference_faces"),
        (dict(output_dir=str(blocker / "out")), "not writable"),
        (dict(prompts=[" ".join(["doctor"] * 40)]), "tokens long"),
        (dict(num_soft_tokens=2, soft_token_init="doctor nurse"), "single token"),
        (dict(num_soft_tokens=2, soft_token_prefix="<taken>"), "already in the tokenizer"),
    ]
    for overrides, match in cases:
        pipe = tiny_training_pipeline()
        pipe.tokenizer.add_tokens(["<taken>_1"])
        vocabulary = len(pipe.tokenizer)
        components = overrides.pop("components", None) or stub_components()
        prompts = overrides.pop("prompts", PROMPTS)
        with pytest.raises(ValueError, match=match):
            DistributionalAlignmentTrainer(tiny_config(tmp_path, **overrides), pipe, [GENDER], prompts, components)
        assert len(pipe.tokenizer) == vocabulary and all(p.requires_grad for p in pipe.text_encoder.parameters())


# ---------------------------------------------------------------------------- one iteration
def snapshot(*modules):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def test_one_iteration_changes_only_the_trained_weights(tmp_path):
    trainer = make_trainer(tmp_path, train_unet_lora=True, num_soft_tokens=2)
    pipe, comps = trainer.pipeline, trainer.components
    frozen = [pipe.vae, comps.classifier, *comps.image_embedders, comps.face_embedder]
    before_frozen = snapshot(*frozen)
    base = {f"{part}.{k}": v.detach().clone() for part in ("unet", "text_encoder")
            for k, v in getattr(pipe, part).state_dict().items() if "lora_" not in k}
    trained = {n: p.detach().clone() for n, p in trainer.params.items()}
    assert any(n.startswith("unet.") for n in trained) and any(n.startswith("text_encoder.") for n in trained)
    assert "soft_tokens" in trained

    record = trainer.train_step()
    assert not record["skipped"] and record["faces_found"] == 1.0 and record["loss"] > 0
    for before, module in zip(before_frozen, frozen):
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    for key, value in base.items():
        part, name = key.split(".", 1)
        assert torch.equal(value, getattr(pipe, part).state_dict()[name]), key
    changed = [n for n, p in trainer.params.items() if not torch.equal(p, trained[n])]
    assert any(n.startswith("text_encoder.") and "lora_B" in n for n in changed)
    assert any(n.startswith("unet.") and "lora_B" in n for n in changed)
    assert "soft_tokens" in changed


def test_soft_tokens_go_into_the_prompt_only_and_the_frozen_model_has_no_adapters(tmp_path):
    trainer = make_trainer(tmp_path, num_soft_tokens=3)
    twin = tiny_training_pipeline()
    assert trainer.soft_token_names == ["<fair>", "<fair>_1", "<fair>_2"]
    with torch.no_grad():
        trainer.params["soft_tokens"].normal_()
        for name, p in trainer.params.items():  # LoRA B away from zero: adapters now change outputs
            if "lora_B" in name:
                p.normal_()
        cond, neg = trainer._embeddings("a photo of the face of a doctor", 1)
        with trainer._frozen_model():
            frozen = trainer._encode("a photo of the face of a doctor", 1).prompt_embeds
        ids = twin.tokenizer(["a photo of the face of a doctor"], padding="max_length",
                             max_length=twin.tokenizer.model_max_length, return_tensors="pt").input_ids
        torch.testing.assert_close(frozen, twin.text_encoder(ids)[0])
        assert not torch.allclose(cond, frozen)
        trainer.params["soft_tokens"].normal_()
        _, neg_again = trainer._embeddings("a photo of the face of a doctor", 1)
        torch.testing.assert_close(neg, neg_again)  # the negative prompt has no soft tokens


def test_ema_follows_the_formula(tmp_path):
    assert ema_decay_at(0, 0.996, True) == 0.0
    assert ema_decay_at(1, 0.996, True) == pytest.approx(2 / 11)
    assert ema_decay_at(10_000, 0.996, True) == 0.996
    assert ema_decay_at(0, 0.9, False) == 0.9
    trainer = make_trainer(tmp_path, ema_decay=0.5, ema_warmup=False)
    start = {n: p.detach().clone() for n, p in trainer.params.items()}
    trainer.train_step()
    first = {n: p.detach().clone() for n, p in trainer.params.items()}
    trainer.train_step()
    for name, p in trainer.params.items():
        expected = 0.5 * (0.5 * start[name] + 0.5 * first[name]) + 0.5 * p.detach()
        torch.testing.assert_close(trainer.ema[name], expected)


def test_learning_rate_schedules():
    constant = FairTrainingConfig(learning_rate=1e-3, lr_warmup_iterations=4, num_iterations=20)
    assert [learning_rate_at(i, constant) for i in (0, 1, 3, 4, 19)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3])
    cosine = FairTrainingConfig(learning_rate=1e-3, lr_warmup_iterations=4, num_iterations=20,
                                lr_schedule="cosine", lr_final_ratio=0.1)
    # warmup as before, then a half cosine from the peak (iteration 4) to 0.1 x peak (iteration 19)
    for i in range(4, 20):
        progress = (i - 4) / 15
        expected = 1e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * progress)) / 2)
        assert learning_rate_at(i, cosine) == pytest.approx(expected)
    assert learning_rate_at(11.5, cosine) == pytest.approx(1e-3 * 0.55)  # halfway: the mean of peak and end
    assert learning_rate_at(19, cosine) == pytest.approx(1e-4)


def test_the_optimizer_uses_the_scheduled_rate(tmp_path):
    trainer = make_trainer(tmp_path, lr_schedule="cosine", lr_final_ratio=0.25, num_iterations=2)
    records = [trainer.train_step() for _ in range(2)]
    assert [r["lr"] for r in records] == pytest.approx([trainer.config.learning_rate, 0.25 * trainer.config.learning_rate])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.25 * trainer.config.learning_rate)


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_bf16_mixed_precision_keeps_trained_weights_in_float32(tmp_path, fresh_accelerate_state):
    trainer = make_trainer(tmp_path, mixed_precision="bf16", num_soft_tokens=2)
    assert trainer.pipeline.unet.dtype == torch.bfloat16 and trainer.pipeline.vae.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.params.values())
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    record = trainer.train_step()
    assert not record["skipped"] and math.isfinite(record["loss"])
    assert any(not torch.equal(p, before[n]) for n, p in trainer.params.items())


def test_micro_batches_give_the_same_step(tmp_path):
    one = make_trainer(tmp_path / "one", micro_batch_size=4)
    two = make_trainer(tmp_path / "two", micro_batch_size=2)
    a, b = one.train_step(), two.train_step()
    for key in ("loss", "dal", "semantics", "face_realism"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    assert a["kept"] == b["kept"]
    # Adam's first step moves a weight by about lr * sign(grad) (lr 1e-2 here); a weight whose gradient is
    # near Adam's eps moves by a part of that which depends on the order of the float sums, so 1e-4 = lr / 100.
    for name, p in one.params.items():
        torch.testing.assert_close(p, two.params[name], rtol=1e-4, atol=1e-4)


def test_several_targets_and_prompt_sets_with_their_own_targets(tmp_path):
    age = TargetDistribution("age", {"young": 0.75, "old": 0.25})
    sets = [PromptSet(PROMPTS[:2], weight=1.0, name="jobs"), PromptSet(PROMPTS[2:], weight=1.0, targets=[age], name="pilots")]
    trainer = make_trainer(tmp_path, targets=[GENDER * RACE], prompts=sets, num_iterations=4)
    records = trainer.train()
    seen = {r["prompts"][0] for r in records}
    assert len(seen) >= 2
    for r in records:
        expected = {"age"} if r["prompts"][0] == PROMPTS[2] else {"gender", "race"}
        assert set(r["kept"]) == expected and set(r["batch_distribution"]) == expected
        for attribute in expected:
            assert sum(r["batch_distribution"][attribute].values()) == pytest.approx(1.0)


def test_gradient_accumulation_uses_several_prompts_per_step(tmp_path):
    trainer = make_trainer(tmp_path, gradient_accumulation_steps=2, guidance_scale=1.0)
    record = trainer.train_step()
    assert len(record["prompts"]) == 2 and len(record["num_inference_steps"]) == 2 and not record["skipped"]
    counts = sum(sum(d.values()) for d in record["batch_distribution"].values())
    assert counts == pytest.approx(2.0)  # each attribute's frequencies sum to 1 over both prompts' images
    assert record["faces_found"] == 1.0


def test_a_batch_without_faces_gets_only_the_semantics_loss(tmp_path):
    trainer = make_trainer(tmp_path, components=stub_components(no_faces=True))
    record = trainer.train_step()
    assert not record["skipped"]
    assert record["faces_found"] == 0 and record["dal"] == 0 and record["face_realism"] == 0
    assert record["batch_distribution"] == {"gender": {"male": 0.0, "female": 0.0},
                                            "race": {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}}


# ---------------------------------------------------------------------------- seeds
DRAW_SCRIPT = """
import json
from diffusers_fair.training.config import FairTrainingConfig
from diffusers_fair.training.draws import draw_iteration
from diffusers_fair.training.prompts import PromptSet

config = FairTrainingConfig.toy(seed=11, images_per_prompt=4)
sets = [PromptSet(["doctor", "nurse"], weight=3.0), PromptSet(["pilot"], weight=1.0)]
out = []
for iteration in range(6):
    d = draw_iteration(config, sets, (4, 8, 8), iteration)
    out.append([d.prompt, d.num_inference_steps, d.noise.flatten()[:5].tolist(), float(d.noise.sum()), d.ot_seed])
print(json.dumps(out))
"""


def test_draws_are_reproducible_in_another_process():
    namespace = {}
    exec(compile(DRAW_SCRIPT.replace("print(", "result = ("), "draws", "exec"), namespace)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", DRAW_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == json.loads(namespace["result"])


def test_draws_depend_on_seed_and_iteration_and_follow_the_set_weights():
    config = FairTrainingConfig.toy(seed=1, images_per_prompt=2)
    sets = [PromptSet(["a"], weight=3.0), PromptSet(["b"], weight=1.0)]
    a, b = draw_iteration(config, sets, (4, 8, 8), 0), draw_iteration(config, sets, (4, 8, 8), 1)
    assert not torch.equal(a.noise, b.noise) and a.ot_seed != b.ot_seed
    other = draw_iteration(FairTrainingConfig.toy(seed=2, images_per_prompt=2), sets, (4, 8, 8), 0)
    assert not torch.equal(a.noise, other.noise)
    assert torch.equal(a.noise, draw_iteration(config, sets, (4, 8, 8), 0).noise)
    share = sum(draw_iteration(config, sets, (1, 1, 1), i).prompt == "a" for i in range(400)) / 400
    assert abs(share - 0.75) < 0.07
    assert derive_seed(1, "x") == derive_seed(1, "x") != derive_seed(1, "y")


# ---------------------------------------------------------------------------- resume, failures
def test_resumed_run_equals_an_uninterrupted_run(tmp_path):
    full = make_trainer(tmp_path / "full", num_iterations=4, checkpoint_every=2, checkpoints_total_limit=None)
    records = full.train()
    run = tmp_path / "full" / "run"
    assert [c.name for c in checkpointing.list_checkpoints(run / "checkpoints")] == ["checkpoint-000002", "checkpoint-000004"]
    # As if the process died after logging iteration 4 but before its checkpoint: resume from "latest".
    shutil.rmtree(run / "checkpoints" / "checkpoint-000004")
    resumed = make_trainer(tmp_path / "full", num_iterations=4, resume_from="latest")
    again = resumed.train()
    assert [r["iteration"] for r in again] == [3, 4]
    for a, b in zip(records[2:], again):
        for key in ("loss", "dal", "semantics", "face_realism", "prompts", "num_inference_steps", "running_distribution"):
            assert a[key] == b[key], key
    for name, p in full.params.items():
        assert torch.equal(p, resumed.params[name]), name
        assert torch.equal(full.ema[name], resumed.ema[name]), name
    log = [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2, 3, 4]  # the records after the checkpoint were replaced
    with pytest.raises(ValueError, match="different LoRA"):
        make_trainer(tmp_path / "other", train_unet_lora=True).load_checkpoint(run / "checkpoints" / "checkpoint-000002")


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    trainer = make_trainer(tmp_path, max_nonfinite_steps=1)
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    trainer.components.classifier.poison = True  # NaN probabilities
    record = trainer.train_step()
    assert record["skipped"] and trainer.nonfinite_steps == 1 and trainer.iteration == 1
    assert all(torch.equal(p, before[n]) for n, p in trainer.params.items())
    assert all(torch.equal(trainer.ema[n], before[n]) for n in before)
    trainer.components.classifier.poison = False
    trainer.components.image_embedders[0].poison = True  # NaN loss, NaN gradients
    with pytest.raises(FloatingPointError, match="max_nonfinite_steps=1"):
        trainer.train_step()
    assert trainer.nonfinite_steps == 2
    assert all(torch.equal(p, before[n]) for n, p in trainer.params.items())
    trainer.components.image_embedders[0].poison = False
    assert not trainer.train_step()["skipped"]


def test_a_failed_checkpoint_write_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, num_iterations=2, checkpoint_every=1)
    trainer.train_step()
    first = trainer.save_checkpoint()
    trainer.train_step()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing, "save_file", full_disk)
    with pytest.raises(OSError, match="checkpoint-000002.*last complete checkpoint is .*checkpoint-000001"):
        trainer.save_checkpoint()
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-000001"]
    tensors, state = checkpointing.load_checkpoint(first)
    assert state["counters"]["iteration"] == 1
    monkeypatch.undo()
    assert trainer.save_checkpoint().name == "checkpoint-000002"
    trainer.save_checkpoint()  # the same iteration again replaces it
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-000001", "checkpoint-000002"]
    weights = folder / "checkpoint-000002" / checkpointing.TENSORS_FILE
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="corrupt"):
        trainer.load_checkpoint(folder / "checkpoint-000002")


def test_logs_sample_grids_and_loss_curve(tmp_path):
    trainer = make_trainer(tmp_path, num_iterations=2, sample_every=1, sample_images_per_prompt=3,
                           sample_prompts=("a photo of the face of a doctor", "a photo of the face of a nurse"))
    trainer.train()
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2]
    for key in ("loss", "dal", "semantics", "face_realism", "faces_found", "kept", "lr", "running_distribution"):
        assert key in log[0]
    assert set(log[1]["running_distribution"]) == {"gender", "race"}
    from PIL import Image

    grids = sorted(p.name for p in (run / "samples").iterdir())
    assert grids == ["step-000000.png", "step-000001.png", "step-000002.png"]
    width, height = Image.open(run / "samples" / "step-000002.png").size
    assert (width, height) == (3 * 17 + 1, 2 * 17 + 1)  # 16x16 images, 1-pixel padding
    assert (run / "loss_curve.png").stat().st_size > 0
    assert FairTrainingConfig.from_dict(json.loads((run / "config.json").read_text())) == trainer.config
    assert [c.name for c in checkpointing.list_checkpoints(run / "checkpoints")] == ["checkpoint-000002"]


def test_save_adaptor_writes_the_ema_weights(tmp_path, monkeypatch):
    from diffusers_fair.adaptors import format as adaptors
    from diffusers_fair.adaptors import hub

    trainer = make_trainer(tmp_path, num_soft_tokens=2, ema_decay=0.5)
    trainer.train_step()
    trainer.train_step()
    live = {n: p.detach().clone() for n, p in trainer.params.items()}
    metadata = trainer.save_adaptor(tmp_path / "adaptor", name="test")
    assert metadata.kind == "lora+soft_tokens" and metadata.base_model == "diffusers-fair/toy"
    assert all(torch.equal(p, live[n]) for n, p in trainer.params.items())  # live weights restored
    saved = adaptors.read_fair_adaptor(tmp_path / "adaptor")
    token, vectors = saved.soft_tokens()
    assert token == "<fair>" and torch.equal(vectors, trainer.ema["soft_tokens"])
    state = saved.lora_state_dict()
    ema_lora = {n.split(".", 1)[1].replace(".default", ""): v for n, v in trainer.ema.items() if n.startswith("text_encoder.")}
    for key, value in ema_lora.items():
        match = [v for k, v in state.items() if k.endswith(key)]
        assert len(match) == 1 and torch.equal(match[0], value), key
    assert not torch.equal(trainer.ema["soft_tokens"], live["soft_tokens"])

    pushed = {}
    monkeypatch.setattr(hub, "push_adaptor", lambda folder, repo_id, **kw: pushed.update(
        files=sorted(p.name for p in Path(folder).iterdir()), repo=repo_id, kw=kw) or "sha")
    assert trainer.push_to_hub("me/fair-test", private=True) == "sha"
    assert pushed["repo"] == "me/fair-test" and pushed["kw"] == {"private": True}
    assert "fair_adaptor.json" in pushed["files"]
