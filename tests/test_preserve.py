"""Preserving the untargeted attributes: the targets (per batch, per image), the loss term, the trainer's
use of the reference images, its logs and checks, and the demo's drift report."""

import json
import math

import pytest
import torch
from scipy.stats import binom

from diffusers_fair.method import losses
from diffusers_fair.method.alignment import expected_ot_targets
from diffusers_fair.toy.demo import share_drift, write_markdown
from diffusers_fair.training.config import FairTrainingConfig
from diffusers_fair.training.draws import draw_iteration
from helpers.training import GENDER, RACE, make_trainer, stub_components, tiny_config, tiny_training_pipeline


def two_class(grey):
    grey = torch.tensor(grey, dtype=torch.float32)
    return torch.stack([1 - grey, grey], dim=1)


# ---------------------------------------------------------------------------- per-batch targets
def test_batch_targets_keep_the_frozen_batchs_three_to_one():
    # The finetuned faces have all drifted toward grey; the frozen faces of the same noises are 6 dark : 2 grey.
    grey = [0.9, 0.8, 0.7, 0.65, 0.6, 0.55, 0.52, 0.95]
    reference = torch.tensor([0, 0, 0, 1, 0, 0, 1, 0])
    found = torch.ones(8, dtype=torch.bool)
    for threshold in (0.5, 0.8):
        labels, keep = losses.preserve_targets({"age": two_class(grey)}, found, {"age": reference},
                                               threshold=threshold, monte_carlo_samples=10, seed=0)
        labels, keep = labels["age"], keep["age"]
        # By hand: two classes, r = (0.75, 0.25). With m ~ Binomial(8, 0.25) grey labels drawn, the optimal
        # transport gives them to the m greyest faces: the face of ascending rank k is grey when m >= 8 - k.
        rank = torch.tensor(grey).argsort().argsort()
        q_grey = torch.tensor([binom.sf(8 - int(k) - 1, 8, 0.25) for k in rank])
        assert labels.tolist() == (q_grey > 0.5).long().tolist()
        assert keep.tolist() == (torch.maximum(q_grey, 1 - q_grey) >= threshold).tolist()
    assert labels.tolist().count(1) == 2 and labels.tolist().count(0) == 6  # 6:2 is the frozen 3:1
    assert labels[7] == 1 and labels[0] == 1  # the two greyest faces stay grey


def test_batch_targets_ignore_faceless_images_and_never_ask_for_an_absent_class():
    skin = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    reference = torch.tensor([0, 0, -1, 2, 0, -1])  # the frozen faces: 3 of class 0, 1 of class 2, 2 faceless
    found = torch.tensor([True, True, True, True, False, True])
    labels, keep = losses.preserve_targets({"skin": skin}, found, {"skin": reference},
                                           threshold=0.5, monte_carlo_samples=10, seed=0)
    labels, keep = labels["skin"], keep["skin"]
    assert labels[4] == -1 and not keep[4]
    q = expected_ot_targets(skin[found], torch.tensor([0.75, 0.0, 0.25, 0.0], dtype=torch.float64))
    assert labels[found].tolist() == q.argmax(dim=1).tolist()
    assert keep[found].tolist() == (q.max(dim=1).values >= 0.5).tolist()
    assert set(labels[found].tolist()) <= {0, 2}


def test_no_frozen_or_no_finetuned_face_keeps_nothing():
    probs = {"age": two_class([0.2, 0.9])}
    for found, reference in ((torch.tensor([True, True]), torch.tensor([-1, -1])),
                             (torch.tensor([False, False]), torch.tensor([0, 1]))):
        labels, keep = losses.preserve_targets(probs, found, {"age": reference}, threshold=0.5,
                                               monte_carlo_samples=10, seed=0)
        assert labels["age"].tolist() == [-1, -1] and not keep["age"].any()


# ---------------------------------------------------------------------------- the loss term
def hand_cross_entropy(logits, label):
    return -(logits[label] - torch.logsumexp(logits, dim=0)).item()


def test_preserve_loss_is_the_cross_entropy_toward_the_target():
    logits = {"age": torch.tensor([[2.0, -1.0], [0.5, 0.3], [1.0, 1.0]]), "skin": torch.tensor([[0.0, 1.0, 2.0]] * 3)}
    labels = {"age": torch.tensor([1, 0, -1]), "skin": torch.tensor([2, 2, 0])}
    keep = {"age": torch.tensor([True, True, False]), "skin": torch.tensor([True, False, True])}
    per_image = losses.preserve_per_image(logits, labels, keep)
    expected = [hand_cross_entropy(logits["age"][0], 1) + hand_cross_entropy(logits["skin"][0], 2),
                hand_cross_entropy(logits["age"][1], 0),
                hand_cross_entropy(logits["skin"][2], 0)]
    assert per_image.tolist() == pytest.approx(expected, rel=1e-6)


def test_combined_loss_adds_the_weighted_preserve_term_and_none_leaves_it_out():
    dal, semantics, realism = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25]), torch.tensor([0.1, 0.3])
    common = dict(image_weights=torch.tensor([1.0, 0.2]), realism_applies=torch.tensor([True, False]),
                  weight_loss_img=8.0, weight_loss_face=1.0, num_images=4)
    without = losses.combined_loss(dal, semantics, realism, **common)
    assert without.item() == pytest.approx((1.0 + 8 * 0.5 + 0.1 + 2.0 + 8 * 0.2 * 0.25) / 4)
    with_term = losses.combined_loss(dal, semantics, realism, **common, preserve=torch.tensor([0.4, 2.0]),
                                     weight_loss_preserve=0.3)
    assert with_term.item() == pytest.approx(without.item() + 0.3 * 2.4 / 4)
    with pytest.raises(ValueError, match="same shape"):
        losses.combined_loss(dal, semantics, realism, **common, preserve=torch.zeros(3))


def test_the_gradient_reaches_only_the_finetuned_faces_logits():
    n = 4
    images = torch.rand(n, 3, 8, 8, requires_grad=True)
    found, boxes = torch.ones(n, dtype=torch.bool), torch.tensor([[0.0, 0.0, 8.0, 8.0]] * n)
    targeted = {"gender": torch.randn(n, 2, requires_grad=True)}
    preserved = torch.randn(n, 2, requires_grad=True)
    # The targets come from probabilities that carry gradient; the targets themselves must not.
    probs = torch.softmax(preserved, dim=1)
    labels, keep = losses.preserve_targets({"age": probs}, found, {"age": torch.tensor([0, 0, 0, 1])},
                                           threshold=0.5, monte_carlo_samples=10, seed=0)
    assert labels["age"].grad_fn is None and keep["age"].any()
    reference = losses.ReferenceImages(found, boxes, {"gender": torch.zeros(n, dtype=torch.long)},
                                       {"gender": torch.ones(n)}, [], None)
    weights = losses.LossWeights(weight_loss_img=0.0, weight_loss_face=0.0, image_change_factor=0.2,
                                 attribute_change_factors={}, face_region_factor=0.2, own_face_confidence=0.9,
                                 weight_loss_preserve=0.3)
    result = losses.alignment_batch_loss(
        images, found, boxes, targeted, {"gender": torch.zeros(n, dtype=torch.long)},
        {"gender": torch.zeros(n, dtype=torch.bool)}, reference, image_embedders=[], face_embedder=None,
        face_bank=None, weights=weights, num_images=8, preserve_logits={"age": preserved},
        preserve_labels=labels, preserve_keep=keep)
    result.total.backward()
    # d/dlogits of 0.3 * CE / 8: 0.3 / 8 * (softmax - onehot(target)) on the kept rows, 0 elsewhere.
    onehot = torch.nn.functional.one_hot(labels["age"].clamp(min=0), 2).float()
    expected = 0.3 / 8 * (torch.softmax(preserved.detach(), dim=1) - onehot) * keep["age"][:, None]
    torch.testing.assert_close(preserved.grad, expected)
    assert targeted["gender"].grad.abs().sum() == 0  # no kept alignment target: only the preserve term acts
    assert result.parts["preserve"].item() == pytest.approx(
        sum(hand_cross_entropy(preserved[i].detach(), int(labels["age"][i])) for i in range(n) if keep["age"][i]))
    assert result.parts["preserve_kept/age"].item() == keep["age"].sum().item()


# ---------------------------------------------------------------------------- the trainer
def test_by_default_every_untargeted_attribute_is_held(tmp_path):
    trainer = make_trainer(tmp_path, targets=[GENDER])  # the classifier reads gender, race and age
    assert FairTrainingConfig().preserve == ["untargeted"] == trainer.config.preserve
    assert trainer.preserved == [["race", "age"]]
    record = trainer.train_step()
    assert record["preserve"] > 0 and set(record["preserve_kept"]) == {"race", "age"}


def test_preserve_off_leaves_the_numbers_and_weight_zero_changes_nothing(tmp_path):
    off = make_trainer(tmp_path / "off", preserve=[])
    zero = make_trainer(tmp_path / "zero", preserve=["untargeted"], weight_loss_preserve=0.0)
    on = make_trainer(tmp_path / "on", preserve=["untargeted"], weight_loss_preserve=1.0)
    a, b, c = off.train_step(), zero.train_step(), on.train_step()
    assert off.preserved == [[]] and on.preserved == [["age"]]
    assert a["preserve"] == 0.0 and a["preserve_kept"] == {}
    assert (a["loss"], a["dal"], a["semantics"]) == (b["loss"], b["dal"], b["semantics"])
    for name, p in off.params.items():
        assert torch.equal(p, zero.params[name]), name
    assert c["preserve"] > 0 and set(c["preserve_kept"]) == {"age"}
    assert c["loss"] == pytest.approx(a["loss"] + c["preserve"], rel=1e-5)  # the same images, one more term
    assert any(not torch.equal(p, off.params[name]) for name, p in on.params.items())


def test_the_trainer_logs_the_untargeted_shares_and_the_reference_images_shares(tmp_path):
    trainer = make_trainer(tmp_path, targets=[GENDER], preserve=["untargeted"], num_iterations=2)
    # The reference images of iteration 0, computed here the way the trainer makes them.
    draw = draw_iteration(trainer.config, trainer.prompt_sets, trainer.latent_shape, 0, 0)
    reference = trainer._reference(draw, draw.noise, [slice(0, 4)])
    records = trainer.train()
    first = records[0]
    assert set(first["batch_distribution"]) == {"gender"}
    assert set(first["untargeted_batch_distribution"]) == set(first["base_running_distribution"]) == {"race", "age"}
    for attribute, classes in (("race", ["a", "b", "c", "d"]), ("age", ["young", "old"])):
        counts = torch.bincount(reference.classes[attribute], minlength=len(classes)).tolist()
        assert first["base_running_distribution"][attribute] == {c: x / 4 for c, x in zip(classes, counts)}
        assert sum(first["untargeted_batch_distribution"][attribute].values()) == pytest.approx(1.0)
    assert set(first["preserve_kept"]) == {"race", "age"}
    log = [json.loads(line) for line in (tmp_path / "run" / "training_log.jsonl").read_text().splitlines()]
    assert log[1]["untargeted_running_distribution"] == records[1]["untargeted_running_distribution"]


@pytest.mark.parametrize("preserve, match", [
    (["hair"], "preserve names 'hair', which the classifier does not read"),
    (["gender"], "'gender' is both targeted and preserved"),
])
def test_preserving_an_unknown_or_targeted_attribute_is_refused(tmp_path, preserve, match):
    from diffusers_fair.training.trainer import DistributionalAlignmentTrainer

    pipe = tiny_training_pipeline()
    with pytest.raises(ValueError, match=match):
        DistributionalAlignmentTrainer(tiny_config(tmp_path, preserve=preserve), pipe, [GENDER], ["a doctor"],
                                       stub_components())
    assert all(p.requires_grad for p in pipe.unet.parameters())  # refused before the pipeline was touched


def test_preserve_names_an_attribute_and_trains(tmp_path):
    trainer = make_trainer(tmp_path, targets=[GENDER], preserve=["age"])
    assert trainer.preserved == [["age"]] and trainer.untargeted == [["race", "age"]]
    record = trainer.train_step()
    assert not record["skipped"] and record["preserve"] > 0 and set(record["preserve_kept"]) == {"age"}
    assert record["preserve_kept"]["age"] == 1.0  # every image has a face in both models


def test_micro_batches_give_the_same_step_with_preservation(tmp_path):
    one = make_trainer(tmp_path / "one", targets=[RACE], preserve=["untargeted"], micro_batch_size=4)
    two = make_trainer(tmp_path / "two", targets=[RACE], preserve=["untargeted"], micro_batch_size=2)
    a, b = one.train_step(), two.train_step()
    for key in ("loss", "dal", "preserve"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    assert a["preserve_kept"] == b["preserve_kept"] and a["base_running_distribution"] == b["base_running_distribution"]
    # Adam's first step moves a weight by about lr * sign(grad) (lr 1e-2 here); a weight whose gradient is
    # near Adam's eps moves by a part of that which depends on the order of the float sums, so 1e-4 = lr / 100.
    for name, p in one.params.items():
        torch.testing.assert_close(p, two.params[name], rtol=1e-4, atol=1e-4)


def test_a_resumed_run_restores_the_untargeted_windows(tmp_path):
    full = make_trainer(tmp_path, preserve=["untargeted"], num_iterations=3, checkpoint_every=2,
                        checkpoints_total_limit=None, distribution_window=5)
    records = full.train()
    resumed = make_trainer(tmp_path, preserve=["untargeted"], num_iterations=3, distribution_window=5)
    resumed.load_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint-000002")
    again = resumed.train_step()
    for key in ("loss", "preserve", "untargeted_running_distribution", "base_running_distribution"):
        assert again[key] == records[2][key], key


# ---------------------------------------------------------------------------- the demo's report
def test_share_drift_is_the_total_variation_distance():
    assert share_drift({"dark": 0.73, "grey": 0.27}, {"dark": 0.34, "grey": 0.66}) == pytest.approx(0.39)
    skin = {"pale": 0.6, "tan": 0.23, "brown": 0.05, "deep": 0.12}
    assert share_drift(skin, skin) == 0.0
    assert share_drift(skin, {"pale": 0.6, "tan": 0.03, "brown": 0.05, "deep": 0.32}) == pytest.approx(0.2)


def test_the_demo_report_puts_the_drift_next_to_the_bias(tmp_path):
    shares_before = {"hair_length": {"short": 0.64, "long": 0.36}, "hair_colour": {"dark": 0.73, "grey": 0.27},
                     "skin_tone": {"pale": 0.6, "tan": 0.23, "brown": 0.05, "deep": 0.12}}
    shares_after = {"hair_length": {"short": 0.5, "long": 0.5}, "hair_colour": {"dark": 0.34, "grey": 0.66},
                    "skin_tone": {"pale": 0.6, "tan": 0.23, "brown": 0.05, "deep": 0.12}}
    report = {"title": "t", "targets": ["hair_length: short=0.5, long=0.5"], "held_out_words": ["judge"],
              "before": {"hair_length": 0.775, "skin_tone": 0.417, "hair_colour": 0.722},
              "after": {"hair_length": 0.2, "skin_tone": 0.417, "hair_colour": 0.341}, "debiased": ["hair_length"],
              "shares_before": shares_before, "shares_after": shares_after, "similarity": 0.8}
    text = write_markdown(tmp_path, report).read_text()
    assert "| hair_length | gender | 0.775 | 0.200 | yes | 0.140 |" in text
    assert "| hair_colour | age | 0.722 | 0.341 | no | 0.390 |" in text
    assert "| skin_tone | race | 0.417 | 0.417 | no | 0.000 |" in text
    assert math.isclose(share_drift(shares_before["hair_colour"], shares_after["hair_colour"]), 0.39)
