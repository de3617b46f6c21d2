"""fp16 training with loss scaling: gradients that underflow to zero in fp16 without it still train the weights.

The tiny pipeline runs in float16 on the CPU. The classifier's logits are scaled by 1e-5 and the other
losses are off, so that dL/dz_0, carried back through the fp16 VAE decoder, lies below fp16's smallest
number: without loss scaling every gradient is zero and the weights stay where they are; with the
trainer's scaler (initial scale 2**16) they move, and the scale is logged and checkpointed.
"""

import math

import pytest
import torch

from diffusers_fair.training import checkpointing
from helpers.training import TinyClassifier, make_trainer, stub_components


class WhisperingClassifier(TinyClassifier):
    """TinyClassifier with logits scaled down: the gradients it sends back are tiny."""

    def forward(self, faces):
        return {a: 1e-5 * logits for a, logits in super().forward(faces).items()}


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def fp16_trainer(tmp_path, scaled: bool, **overrides):
    components = stub_components()
    torch.manual_seed(0)
    components.classifier = WhisperingClassifier()
    settings = dict(mixed_precision="fp16", weight_loss_img=0.0, weight_loss_face=0.0, weight_decay=0.0,
                    dal_threshold=0.0, max_grad_norm=None)
    trainer = make_trainer(tmp_path, components=components, **{**settings, **overrides})
    if not scaled:
        trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    return trainer


def test_without_loss_scaling_fp16_gradients_underflow_and_with_it_the_weights_move(tmp_path, fresh_accelerate_state):
    plain = fp16_trainer(tmp_path / "plain", scaled=False)
    assert plain.pipeline.vae.dtype == torch.float16
    before = {n: p.detach().clone() for n, p in plain.params.items()}
    record = plain.train_step()
    assert not record["skipped"] and math.isfinite(record["loss"]) and record["dal"] > 0
    assert "loss_scale" not in record
    assert all(torch.equal(p, before[n]) for n, p in plain.params.items())  # every gradient was zero

    scaled = fp16_trainer(tmp_path / "scaled", scaled=True)
    assert scaled.scaler.is_enabled()
    record = scaled.train_step()
    assert not record["skipped"] and record["loss_scale"] == 2.0**16
    assert any(not torch.equal(p, before[n]) for n, p in scaled.params.items())
    assert all(torch.isfinite(p).all() for p in scaled.params.values())


def test_the_loss_scale_is_checkpointed(tmp_path, fresh_accelerate_state):
    trainer = fp16_trainer(tmp_path, scaled=True, num_iterations=1)
    trainer.train_step()
    trainer.scaler.update(1024.0)  # as after several overflows
    path = trainer.save_checkpoint()
    _, state = checkpointing.load_checkpoint(path)
    assert state["counters"]["grad_scaler"]["scale"] == 1024.0
    resumed = fp16_trainer(tmp_path, scaled=True, num_iterations=1)
    resumed.load_checkpoint(path)
    assert resumed.scaler.get_scale() == 1024.0


def test_an_overflowing_scale_skips_the_step_without_counting_it_and_halves(tmp_path, fresh_accelerate_state):
    trainer = make_trainer(tmp_path, mixed_precision="fp16")
    trainer.scaler.scale(torch.ones(()))  # the scale exists once a loss was scaled
    trainer.scaler.update(2.0**40)  # far beyond fp16's range: the fp16 backward overflows
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    record = trainer.train_step()
    assert record["skipped"] and record["nonfinite_steps"] == 0 and math.isfinite(record["loss"])
    assert record["loss_scale"] == 2.0**39
    assert all(torch.equal(p, before[n]) for n, p in trainer.params.items())
