"""Tests of diffusers_fair.method.losses against hand computations and autograd through explicit formulas."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_fair.method import losses
from diffusers_fair.method.alignment import dynamic_targets
from diffusers_fair.method.boxes import crop_faces
from diffusers_fair.method.face_alignment import align_faces
from diffusers_fair.method.targets import TargetDistribution


def hand_cosine_distance(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return 1 - (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


class LinearEmbedder(torch.nn.Module):
    def __init__(self, pixels, dim, seed):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(dim, pixels, generator=generator), requires_grad=False)

    def forward(self, images):
        return images.flatten(1) @ self.weight.T


class FlatFaceEmbedder(LinearEmbedder):
    input_size = 4


# ---------------------------------------------------------------------------- similarity losses
def test_cosine_distance_matches_hand_computation():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    np.testing.assert_allclose(losses.cosine_distance(x, y).numpy(), hand_cosine_distance(x, y), rtol=1e-5, atol=1e-6)
    assert torch.allclose(losses.cosine_distance(x, 3 * x), torch.zeros(5), atol=1e-6)
    assert torch.allclose(losses.cosine_distance(x, -x), torch.full((5,), 2.0), atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        losses.cosine_distance(x, y[:, :3])


def test_image_semantics_loss_sums_embedders_and_its_gradient_matches_the_formula():
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 4, 4, generator=gen, requires_grad=True)
    embedders = [LinearEmbedder(48, 5, 2), LinearEmbedder(48, 6, 3)]
    references = [torch.randn(3, 5, generator=gen), torch.randn(3, 6, generator=gen)]
    value = losses.image_semantics_loss(images, references, embedders)
    expected = sum(hand_cosine_distance(e(images).detach(), r) for e, r in zip(embedders, references))
    np.testing.assert_allclose(value.detach().numpy(), expected, rtol=1e-5)
    value.sum().backward()
    ours = images.grad.clone()
    images.grad = None
    # The same loss written out with dot products and norms.
    total = 0
    for e, r in zip(embedders, references):
        z = e(images)
        total = total + (1 - (z * r).sum(1) / (z.norm(dim=1) * r.norm(dim=1))).sum()
    total.backward()
    torch.testing.assert_close(ours, images.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="2 embedders"):
        losses.image_semantics_loss(images, references[:1], embedders)


def test_face_realism_uses_the_nearest_bank_face_or_the_own_face():
    gen = torch.Generator().manual_seed(2)
    faces, bank, own = torch.randn(6, 4, generator=gen), torch.randn(9, 4, generator=gen), torch.randn(6, 4, generator=gen)
    use_own = torch.tensor([True, False, True, False, False, True])
    value = losses.face_realism_loss(faces, bank, own_embeddings=own, use_own=use_own)
    for i in range(6):
        if use_own[i]:
            expected = hand_cosine_distance(faces[i : i + 1], own[i : i + 1])[0]
        else:  # brute force: the smallest distance over the bank
            expected = min(hand_cosine_distance(faces[i : i + 1], bank[j : j + 1])[0] for j in range(9))
        assert value[i].item() == pytest.approx(expected, abs=1e-5)
    nearest = losses.nearest_reference(faces, bank)
    assert nearest.tolist() == [int(np.argmin([hand_cosine_distance(faces[i:i+1], bank[j:j+1])[0] for j in range(9)]))
                                for i in range(6)]
    with pytest.raises(ValueError, match="bank"):
        losses.face_realism_loss(faces, None)
    assert torch.allclose(losses.face_realism_loss(faces, None, own_embeddings=own, use_own=torch.ones(6, dtype=torch.bool)),
                          losses.cosine_distance(faces, own))


def test_dal_per_image_is_the_kept_cross_entropy_summed_over_attributes():
    gen = torch.Generator().manual_seed(3)
    logits = {"gender": torch.randn(4, 2, generator=gen), "race": torch.randn(4, 4, generator=gen)}
    labels = {"gender": torch.tensor([0, 1, 1, -1]), "race": torch.tensor([3, 0, 2, -1])}
    keep = {"gender": torch.tensor([True, False, True, False]), "race": torch.tensor([True, True, False, False])}
    value = losses.dal_per_image(logits, labels, keep)
    expected = torch.zeros(4)
    for a in logits:
        for i in range(4):
            if keep[a][i]:
                expected[i] += -torch.log_softmax(logits[a][i], 0)[labels[a][i]]
    torch.testing.assert_close(value, expected)


# ---------------------------------------------------------------------------- dynamic weights
def test_dynamic_weights_follow_the_official_rules_for_one_attribute():
    # images: kept and same as original | kept, different | uncertain | no face | original without a face
    labels = {"gender": torch.tensor([1, 0, 1, -1, 1])}
    keep = {"gender": torch.tensor([True, True, False, False, True])}
    original = {"gender": torch.tensor([1, 1, 1, 0, -1])}
    found = torch.tensor([True, True, True, False, True])
    change = losses.needs_change(labels, keep, original)
    assert change["gender"].tolist() == [False, True, True, True, True]
    weights = losses.dynamic_image_weights(change, found, factor=0.2)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.2, 0.2, 1.0, 0.2]))
    region = losses.face_region_factors(change, found, 0.3)
    torch.testing.assert_close(region, torch.tensor([1.0, 0.3, 0.3, 1.0, 0.3]))
    assert losses.already_has_targets(change).tolist() == [True, False, False, False, False]


def test_dynamic_weights_take_the_smallest_factor_of_the_attributes_that_change():
    labels = {"gender": torch.tensor([0, 0, 1, 1]), "race": torch.tensor([2, 3, 2, 3])}
    keep = {"gender": torch.ones(4, dtype=torch.bool), "race": torch.ones(4, dtype=torch.bool)}
    original = {"gender": torch.tensor([0, 0, 0, 0]), "race": torch.tensor([2, 2, 2, 2])}
    change = losses.needs_change(labels, keep, original)
    weights = losses.dynamic_image_weights(change, torch.ones(4, dtype=torch.bool), factor=0.2,
                                           attribute_factors={"race": 0.6})
    # nothing changes | race changes | gender changes | both change
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.6, 0.2, 0.2]))


def test_face_region_factors_take_the_smallest_factor_of_the_attributes_that_change():
    labels = {"gender": torch.tensor([0, 0, 1, 1, 1]), "race": torch.tensor([2, 3, 2, 3, 3])}
    keep = {"gender": torch.ones(5, dtype=torch.bool), "race": torch.ones(5, dtype=torch.bool)}
    original = {"gender": torch.tensor([0, 0, 0, 0, 0]), "race": torch.tensor([2, 2, 2, 2, 2])}
    found = torch.tensor([True, True, True, True, False])
    change = losses.needs_change(labels, keep, original)
    # nothing changes | race changes | gender changes | both change | no face
    per_attribute = losses.face_region_factors(change, found, 0.2, {"race": 0.3})
    torch.testing.assert_close(per_attribute, torch.tensor([1.0, 0.3, 0.2, 0.2, 1.0]))
    torch.testing.assert_close(losses.face_region_factors(change, found, 0.5, {"race": 0.3, "gender": 0.4}),
                               torch.tensor([1.0, 0.3, 0.4, 0.3, 1.0]))
    # Without per-attribute factors: the one factor wherever a face must change, as before.
    one = losses.face_region_factors(change, found, 0.2)
    torch.testing.assert_close(one, torch.tensor([1.0, 0.2, 0.2, 0.2, 1.0]))
    assert torch.equal(one, losses.face_region_factors(change, found, 0.2, {}))


def test_faceless_images_get_the_full_weight_or_the_smallest_change_factor():
    labels = {"gender": torch.tensor([0, 1, -1]), "race": torch.tensor([2, 2, -1])}
    keep = {"gender": torch.tensor([True, True, False]), "race": torch.tensor([True, True, False])}
    original = {"gender": torch.tensor([0, 0, 1]), "race": torch.tensor([2, 2, 3])}
    found = torch.tensor([True, True, False])
    change = losses.needs_change(labels, keep, original)
    kwargs = dict(factor=0.2, attribute_factors={"race": 0.6})
    full = losses.dynamic_image_weights(change, found, **kwargs)
    smallest = losses.dynamic_image_weights(change, found, faceless="smallest_change_factor", **kwargs)
    torch.testing.assert_close(full, torch.tensor([1.0, 0.2, 1.0]))
    torch.testing.assert_close(smallest, torch.tensor([1.0, 0.2, 0.2]))  # min(gender 0.2, race 0.6)
    race_only = {"race": change["race"]}
    torch.testing.assert_close(losses.dynamic_image_weights(race_only, found, faceless="smallest_change_factor",
                                                            **kwargs), torch.tensor([1.0, 1.0, 0.6]))
    assert torch.equal(full, losses.dynamic_image_weights(change, found, faceless="full", **kwargs))
    with pytest.raises(ValueError, match="faceless must be one of"):
        losses.dynamic_image_weights(change, found, faceless="none", **kwargs)


def test_face_realism_applies_to_faces_with_a_kept_target_or_to_every_face():
    found = torch.tensor([True, True, True, False])
    keep = {"gender": torch.tensor([True, False, False, False]), "race": torch.tensor([True, True, False, False])}
    change = {"gender": torch.tensor([False, True, True, True]), "race": torch.tensor([False, False, True, True])}
    confidence = {"gender": torch.tensor([0.9, 0.9, 0.9, 0.0]), "race": torch.tensor([0.8, 0.9, 0.9, 0.0])}
    kept, kept_own = losses.face_realism_plan(found, keep, change, confidence, min_confidence=0.8)
    every, every_own = losses.face_realism_plan(found, keep, change, confidence, min_confidence=0.8,
                                                images="every_face")
    assert kept.tolist() == [True, True, False, False]
    assert every.tolist() == [True, True, True, False]
    # The original face is the reference under the same condition with both.
    assert kept_own.tolist() == every_own.tolist() == [True, False, False, False]
    _, strict_own = losses.face_realism_plan(found, keep, change, confidence, min_confidence=0.85)
    assert strict_own.tolist() == [False, False, False, False]
    with pytest.raises(ValueError, match="images must be one of"):
        losses.face_realism_plan(found, keep, change, confidence, min_confidence=0.8, images="all")


def test_face_realism_plan():
    found = torch.tensor([True, True, True, False, True])
    keep = {"gender": torch.tensor([True, True, False, False, True])}
    change = {"gender": torch.tensor([False, True, True, True, False])}
    confidence = {"gender": torch.tensor([0.95, 0.99, 0.99, 0.0, 0.5])}
    applies, use_own = losses.face_realism_plan(found, keep, change, confidence, min_confidence=0.9)
    assert applies.tolist() == [True, True, False, False, True]
    # own face: already has its target and the original was classified confidently
    assert use_own.tolist() == [True, False, False, False, False]


# ---------------------------------------------------------------------------- face region gradient
def test_box_mask_uses_pixel_centres():
    mask = losses.box_mask(torch.tensor([[0.4, 1.0, 2.6, 3.5], [0.0, 0.0, 0.0, 0.0]]), 5, 5)
    expected = torch.zeros(5, 5)
    expected[1:3, 0:3] = 1  # x centres 0.5, 1.5, 2.5; y centres 1.5, 2.5
    torch.testing.assert_close(mask[0, 0], expected)
    assert mask[1].sum() == 0
    assert mask.shape == (2, 1, 5, 5)


def test_scale_region_gradient_scales_exactly_inside_the_box():
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 6, 6, generator=gen, requires_grad=True)
    boxes = torch.tensor([[1.0, 2.0, 4.0, 5.0], [0.0, 0.0, 6.0, 3.0]])
    factors = torch.tensor([0.2, 0.5])
    out = losses.scale_region_gradient(images, boxes, factors)
    assert torch.equal(out, images)  # the forward value is untouched, bit for bit
    upstream = torch.randn(2, 3, 6, 6, generator=gen)
    (out * upstream).sum().backward()
    expected = upstream.clone()
    expected[0, :, 2:5, 1:4] *= 0.2
    expected[1, :, 0:3, 0:6] *= 0.5
    torch.testing.assert_close(images.grad, expected, rtol=0, atol=1e-7)


def test_scale_region_gradient_through_an_embedder_equals_the_masked_gradient():
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(1, 3, 4, 4, generator=gen, requires_grad=True)
    embedder, reference = LinearEmbedder(48, 5, 6), [torch.randn(1, 5, generator=gen)]
    boxes, factors = torch.tensor([[1.0, 1.0, 3.0, 3.0]]), torch.tensor([0.2])
    losses.image_semantics_loss(images, reference, [embedder]).sum().backward()
    plain = images.grad.clone()
    images.grad = None
    losses.image_semantics_loss(losses.scale_region_gradient(images, boxes, factors), reference, [embedder]).sum().backward()
    scale = torch.ones(1, 1, 4, 4)
    scale[..., 1:3, 1:3] = 0.2
    torch.testing.assert_close(images.grad, plain * scale, rtol=1e-5, atol=1e-7)


def test_face_region_boxes_intersect_with_the_original_face():
    boxes = torch.tensor([[2.0, 2.0, 10.0, 10.0], [2.0, 2.0, 10.0, 10.0], [1.0, 1.0, 5.0, 5.0]])
    found = torch.tensor([True, True, False])
    original = torch.tensor([[4.0, 0.0, 12.0, 8.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 3.0]])
    original_found = torch.tensor([True, False, True])
    region = losses.face_region_boxes(boxes, found, original, original_found)
    torch.testing.assert_close(region, torch.tensor([[4.0, 2.0, 10.0, 8.0], [2.0, 2.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]]))


# ---------------------------------------------------------------------------- the total
def test_combined_loss_is_the_hand_formula():
    dal = torch.tensor([0.5, 0.0, 1.5])
    semantics = torch.tensor([0.1, 0.2, 0.3])
    realism = torch.tensor([0.4, 0.7, 0.9])
    weights = torch.tensor([1.0, 0.2, 1.0])
    applies = torch.tensor([True, False, True])
    value = losses.combined_loss(dal, semantics, realism, image_weights=weights, realism_applies=applies,
                                 weight_loss_img=8.0, weight_loss_face=0.5, num_images=6)
    expected = ((0.5 + 8 * 0.1 + 0.5 * 0.4) + (0.0 + 8 * 0.2 * 0.2) + (1.5 + 8 * 0.3 + 0.5 * 0.9)) / 6
    assert value.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        losses.combined_loss(dal, semantics[:2], realism, image_weights=weights, realism_applies=applies,
                             weight_loss_img=1, weight_loss_face=1, num_images=3)
    with pytest.raises(ValueError, match="num_images"):
        losses.combined_loss(dal, semantics, realism, image_weights=weights, realism_applies=applies,
                             weight_loss_img=1, weight_loss_face=1, num_images=0)


def test_batch_dynamic_targets_skip_images_without_faces():
    gen = torch.Generator().manual_seed(7)
    probs = {"gender": torch.softmax(torch.randn(7, 2, generator=gen) * 3, 1),
             "race": torch.softmax(torch.randn(7, 4, generator=gen) * 3, 1)}
    found = torch.tensor([True, True, False, True, True, False, True])
    gender = TargetDistribution.uniform("gender", ["male", "female"])
    race = TargetDistribution("race", {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1})
    labels, keep, counts = losses.batch_dynamic_targets(probs, found, [gender, race], threshold=0.6,
                                                         monte_carlo_samples=50, seed=3)
    index = found.nonzero().flatten()
    for attribute, target in (("gender", gender), ("race", race)):
        ref_labels, _, ref_keep = dynamic_targets(probs[attribute][index], target, threshold=0.6)
        assert labels[attribute][index].tolist() == ref_labels.tolist()
        assert keep[attribute][index].tolist() == ref_keep.tolist()
        assert labels[attribute][~found].tolist() == [-1, -1] and not keep[attribute][~found].any()
        assert counts[attribute].tolist() == torch.bincount(probs[attribute][index].argmax(1), minlength=len(target.cells)).tolist()
    # A joint target gives per-attribute results; no face at all gives no kept target.
    labels, keep, _ = losses.batch_dynamic_targets(probs, found, [gender * race], threshold=0.6, monte_carlo_samples=20, seed=3)
    assert set(labels) == {"gender", "race"}
    labels, keep, counts = losses.batch_dynamic_targets(probs, torch.zeros(7, dtype=torch.bool), [gender], threshold=0.6,
                                                        monte_carlo_samples=20, seed=3)
    assert labels["gender"].tolist() == [-1] * 7 and not keep["gender"].any() and counts["gender"].sum() == 0


def test_reference_images_slice_every_field():
    ref = losses.ReferenceImages(found=torch.arange(6) % 2 == 0, boxes=torch.arange(24.0).view(6, 4),
                                 classes={"g": torch.arange(6)}, confidence={"g": torch.linspace(0, 1, 6)},
                                 image_embeddings=[torch.arange(12.0).view(6, 2)], face_embeddings=None)
    part = ref[slice(2, 4)]
    assert part.found.tolist() == [True, False] and part.classes["g"].tolist() == [2, 3]
    assert part.boxes.shape == (2, 4) and part.image_embeddings[0].tolist() == [[4.0, 5.0], [6.0, 7.0]]
    assert part.face_embeddings is None


def test_alignment_batch_loss_against_a_hand_composition():
    """Three 4x4 images: (0) keeps its original class (own face, weight 1), (1) must change
    (nearest bank face, weight 0.2, face-region factor 0.5), (2) has no face (semantics only)."""
    gen = torch.Generator().manual_seed(8)
    images = torch.rand(3, 3, 4, 4, generator=gen, requires_grad=True)
    found = torch.tensor([True, True, False])
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 2.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    logits = {"gender": torch.randn(3, 2, generator=gen, requires_grad=True)}
    labels, keep = {"gender": torch.tensor([1, 0, -1])}, {"gender": torch.tensor([True, True, False])}
    embedders = [LinearEmbedder(48, 5, 9)]
    face_embedder = FlatFaceEmbedder(48, 3, 10)
    bank = torch.randn(4, 3, generator=gen)
    reference = losses.ReferenceImages(
        found=torch.tensor([True, True, True]), boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 3),
        classes={"gender": torch.tensor([1, 1, 0])}, confidence={"gender": torch.tensor([0.95, 0.99, 0.9])},
        image_embeddings=[torch.randn(3, 5, generator=gen)], face_embeddings=torch.randn(3, 3, generator=gen))
    weights = losses.LossWeights(image_change_factor=0.2, attribute_change_factors={}, face_region_factor=0.5,
                                 own_face_confidence=0.9, weight_loss_img=8.0, weight_loss_face=0.7)
    result = losses.alignment_batch_loss(images, found, boxes, logits, labels, keep, reference, image_embedders=embedders,
                                         face_embedder=face_embedder, face_bank=bank, weights=weights, num_images=5)

    ce = [-torch.log_softmax(logits["gender"][i].detach(), 0)[labels["gender"][i]].item() for i in range(2)]
    sem = hand_cosine_distance(embedders[0](images).detach(), reference.image_embeddings[0])
    faces = face_embedder(crop_faces(images.detach(), boxes, 4))
    realism0 = hand_cosine_distance(faces[:1], reference.face_embeddings[:1])[0]
    realism1 = min(hand_cosine_distance(faces[1:2], bank[j : j + 1])[0] for j in range(4))
    expected = (ce[0] + 8 * sem[0] + 0.7 * realism0) + (ce[1] + 8 * 0.2 * sem[1] + 0.7 * realism1) + 8 * sem[2]
    assert result.total.item() == pytest.approx(expected / 5, rel=1e-5)
    assert result.parts["faces"].item() == 2 and result.parts["realism_images"].item() == 2
    assert result.parts["kept/gender"].item() == 2

    # The semantics gradient of image 1 is scaled by 0.5 in its face region (columns 0-1) only.
    result.total.backward()
    grad = images.grad.clone()
    images.grad = None
    crops = crop_faces(images[:2], boxes[:2], 4)
    f = face_embedder(crops)
    s = 1 - F.cosine_similarity(embedders[0](images), reference.image_embeddings[0], dim=1)
    scale = torch.ones(3, 1, 4, 4)
    scale[1, :, :, 0:2] = 0.5
    masked = images.detach() + scale * (images - images.detach())
    s_scaled = 1 - F.cosine_similarity(embedders[0](masked), reference.image_embeddings[0], dim=1)
    r0 = 1 - F.cosine_similarity(f[:1], reference.face_embeddings[:1], dim=1)
    nearest = int(np.argmin([hand_cosine_distance(faces[1:2].detach(), bank[j:j+1])[0] for j in range(4)]))
    r1 = 1 - F.cosine_similarity(f[1:2], bank[nearest : nearest + 1], dim=1)
    manual = (8 * s_scaled[0] + 0.7 * r0.sum() + 8 * 0.2 * s_scaled[1] + 0.7 * r1.sum() + 8 * s_scaled[2]) / 5
    manual.backward()
    torch.testing.assert_close(grad, images.grad, rtol=1e-4, atol=1e-7)
    assert math.isclose(s.sum().item(), s_scaled.sum().item(), rel_tol=1e-6)


def joint_batch():
    """Four 4x4 images with gender and race targets: (0) keeps both classes, (1) must change race,
    (2) has a face without a kept target, (3) has no face."""
    gen = torch.Generator().manual_seed(21)
    images = torch.rand(4, 3, 4, 4, generator=gen, requires_grad=True)
    found = torch.tensor([True, True, True, False])
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 2.0, 4.0], [1.0, 1.0, 4.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    logits = {"gender": torch.randn(4, 2, generator=gen), "race": torch.randn(4, 4, generator=gen)}
    labels = {"gender": torch.tensor([1, 1, 0, -1]), "race": torch.tensor([2, 3, 1, -1])}
    keep = {"gender": torch.tensor([True, True, False, False]), "race": torch.tensor([True, True, False, False])}
    reference = losses.ReferenceImages(
        found=torch.ones(4, dtype=torch.bool), boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 4),
        classes={"gender": torch.tensor([1, 1, 0, 0]), "race": torch.tensor([2, 2, 1, 1])},
        confidence={"gender": torch.tensor([0.95, 0.99, 0.9, 0.9]), "race": torch.tensor([0.9, 0.9, 0.9, 0.9])},
        image_embeddings=[torch.randn(4, 5, generator=gen)], face_embeddings=torch.randn(4, 3, generator=gen))
    inputs = dict(images=images, found=found, boxes=boxes, logits=logits, labels=labels, keep=keep,
                  reference=reference, image_embedders=[LinearEmbedder(48, 5, 9)],
                  face_embedder=FlatFaceEmbedder(48, 3, 10), face_bank=torch.randn(5, 3, generator=gen), num_images=4)
    return inputs


def test_alignment_batch_loss_with_the_joint_run_rules_changes_only_the_faceless_and_targetless_images():
    inputs = joint_batch()
    base = dict(weight_loss_img=8.0, weight_loss_face=0.5, image_change_factor=0.2,
                attribute_change_factors={"race": 0.6}, face_region_factor=0.2, own_face_confidence=0.8)
    plain = losses.alignment_batch_loss(**inputs, weights=losses.LossWeights(**base))
    joint = losses.alignment_batch_loss(**inputs, weights=losses.LossWeights(
        **base, faceless_image_weight="smallest_change_factor", face_realism_images="every_face"))
    assert plain.parts["realism_images"].item() == 2 and joint.parts["realism_images"].item() == 3

    images, reference = inputs["images"].detach(), inputs["reference"]
    semantics = hand_cosine_distance(inputs["image_embedders"][0](images), reference.image_embeddings[0])
    face = inputs["face_embedder"](crop_faces(images[2:3], inputs["boxes"][2:3], 4)).detach()
    realism = min(hand_cosine_distance(face, inputs["face_bank"][j:j + 1])[0] for j in range(5))
    # The no-face image's weight goes from 1 to min(0.2, 0.6); image 2 gets the realism loss.
    expected = (8 * (0.2 - 1.0) * semantics[3] + 0.5 * realism) / 4
    assert joint.total.item() - plain.total.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert joint.parts["dal"].item() == plain.parts["dal"].item()


def test_alignment_batch_loss_takes_the_attributes_face_region_factors():
    inputs = joint_batch()
    base = dict(weight_loss_img=8.0, weight_loss_face=0.0, image_change_factor=0.2,
                attribute_change_factors={"race": 0.6}, face_region_factor=0.2, own_face_confidence=0.8)
    grads = {}
    for name, factors in (("one", {}), ("race", {"race": 0.3})):
        inputs["images"].grad = None
        result = losses.alignment_batch_loss(**inputs, weights=losses.LossWeights(
            **base, attribute_face_region_factors=factors))
        result.total.backward()
        grads[name] = inputs["images"].grad.clone()
    # Only image 1 (race must change) has a different factor in its face region, columns 0-1: 0.3 / 0.2.
    assert torch.equal(grads["one"][[0, 2, 3]], grads["race"][[0, 2, 3]])
    torch.testing.assert_close(grads["race"][1, :, :, 2:], grads["one"][1, :, :, 2:])
    torch.testing.assert_close(grads["race"][1, :, :, :2], grads["one"][1, :, :, :2] * 1.5, rtol=1e-4, atol=1e-7)


def test_alignment_batch_loss_reads_aligned_faces_when_given_landmarks():
    inputs = joint_batch()
    weights = losses.LossWeights(weight_loss_img=0.0, weight_loss_face=1.0, image_change_factor=0.2,
                                 attribute_change_factors={}, face_region_factor=0.2, own_face_confidence=0.8)
    # Four-point landmarks (eyes, nose tip, mouth centre) of small faces inside the 4x4 images.
    template = torch.tensor([[1.2, 1.6], [2.6, 1.5], [2.0, 2.4], [2.0, 3.3]])
    landmarks = torch.stack([template, template + 0.2, template.flip(1), template])
    aligned = losses.alignment_batch_loss(**inputs, weights=weights, landmarks=landmarks)
    unaligned = losses.alignment_batch_loss(**inputs, weights=weights)
    images, reference = inputs["images"].detach(), inputs["reference"]
    faces = inputs["face_embedder"](align_faces(images[:2], landmarks[:2], 4)).detach()
    own = hand_cosine_distance(faces[:1], reference.face_embeddings[:1])[0]
    nearest = min(hand_cosine_distance(faces[1:2], inputs["face_bank"][j:j + 1])[0] for j in range(5))
    assert aligned.parts["face_realism"].item() == pytest.approx(own + nearest, rel=1e-5)
    assert aligned.total.item() == pytest.approx((aligned.parts["dal"].item() + own + nearest) / 4, rel=1e-5)
    assert aligned.parts["dal"].item() == unaligned.parts["dal"].item()
    assert aligned.parts["face_realism"].item() != pytest.approx(unaligned.parts["face_realism"].item(), rel=1e-3)
    aligned.total.backward()
    assert inputs["images"].grad[:2].abs().sum() > 0 and inputs["images"].grad[2:].abs().sum() == 0


def test_loss_weights_refuse_unknown_rules():
    base = dict(weight_loss_img=8.0, weight_loss_face=0.5, image_change_factor=0.2, attribute_change_factors={},
                face_region_factor=0.2, own_face_confidence=0.8)
    with pytest.raises(ValueError, match="faceless_image_weight must be one of"):
        losses.LossWeights(**base, faceless_image_weight="zero")
    with pytest.raises(ValueError, match="face_realism_images must be one of"):
        losses.LossWeights(**base, face_realism_images="all")


def test_loss_weights_come_from_the_configs_fields_of_the_same_names():
    from diffusers_fair.training.config import FairTrainingConfig

    config = FairTrainingConfig.toy(weight_loss_img=3.0, attribute_change_factors={"gender": 0.5}, own_face_confidence=0.8,
                                    weight_loss_preserve=0.3)
    weights = losses.LossWeights.from_config(config)
    assert weights == losses.LossWeights(
        weight_loss_img=3.0, weight_loss_face=config.weight_loss_face, image_change_factor=config.image_change_factor,
        attribute_change_factors={"gender": 0.5}, face_region_factor=config.face_region_factor, own_face_confidence=0.8,
        weight_loss_preserve=0.3)
    joint = FairTrainingConfig.toy(attribute_face_region_factors={"race": 0.3}, face_realism_images="every_face",
                                   faceless_image_weight="smallest_change_factor")
    weights = losses.LossWeights.from_config(joint)
    assert weights.attribute_face_region_factors == {"race": 0.3}
    assert (weights.face_realism_images, weights.faceless_image_weight) == ("every_face", "smallest_change_factor")
