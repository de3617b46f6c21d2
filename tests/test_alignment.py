"""Expected optimal-transport targets and the alignment loss, against brute force.

The oracle enumerates every label vector in K^N (not count vectors) and every permutation of the
images (not a solver), and averages the one-hot assignment uniformly over all optimal permutations.
"""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from diffusers_fair import (
    TargetDistribution,
    distributional_alignment_loss,
    dynamic_targets,
    expected_ot_targets,
    kept_cross_entropy,
    marginalize,
)


# --------------------------------------------------------------------------- the oracle
def brute_force_targets(cost: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``q[i, k]`` by enumerating every label vector and every assignment.

    ``cost[i, k]`` is the cost of giving class ``k`` to image ``i``; labels are i.i.d. from ``r``.
    """
    num_images, num_classes = cost.shape
    perms = np.array(list(itertools.permutations(range(num_images))))  # (N!, N)
    q = np.zeros((num_images, num_classes))
    for labels in itertools.product(range(num_classes), repeat=num_images):
        labels = np.array(labels)
        weight = np.prod(r[labels])
        if weight == 0:
            continue
        assigned = labels[perms]  # (N!, N): class given to image i under each permutation
        totals = cost[np.arange(num_images), assigned].sum(axis=1)
        optimal = assigned[totals <= totals.min() + 1e-12]
        for row in optimal:
            q[np.arange(num_images), row] += weight / len(optimal)
    return q


def squared_cost(p: np.ndarray) -> np.ndarray:
    """``cost[i, k] = |p_i - e_k|^2`` written out directly."""
    eye = np.eye(p.shape[1])
    return ((p[:, None, :] - eye[None, :, :]) ** 2).sum(axis=-1)


def random_probs(n, k, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(n, k, generator=gen, dtype=torch.float64), dim=1).to(dtype)


# --------------------------------------------------------------------------- exact: two classes
@pytest.mark.parametrize("r1", [0.5, 0.25, 0.8])
@pytest.mark.parametrize("n", [1, 4, 6])
def test_two_class_closed_form_matches_brute_force(r1, n):
    probs = random_probs(n, 2, seed=n)
    q = expected_ot_targets(probs, torch.tensor([1 - r1, r1], dtype=torch.float64))
    expected = brute_force_targets(squared_cost(probs.numpy()), np.array([1 - r1, r1]))
    np.testing.assert_allclose(q.numpy(), expected, atol=1e-12)


def test_two_class_orientation_follows_the_target():
    # With 80% of class 1 the image most confident in class 1 is almost surely class 1, and
    # the least confident one still gets class 1 with probability P(m = N) = 0.8^N.
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.05, 0.95]], dtype=torch.float64)
    q = expected_ot_targets(probs, TargetDistribution("a", {"x": 0.2, "y": 0.8}))
    assert q[3, 1] == pytest.approx(1 - 0.2**4)
    assert q[0, 1] == pytest.approx(0.8**4)
    assert q[:, 1].sum() == pytest.approx(4 * 0.8)


def test_two_class_closed_form_against_scipy_for_large_batches():
    n, r1 = 4096, 0.3
    probs = random_probs(n, 2, seed=1)
    q = expected_ot_targets(probs, torch.tensor([1 - r1, r1], dtype=torch.float64))
    rank = torch.argsort(torch.argsort(probs[:, 1])).numpy()
    expected = binom.sf(n - rank - 1, n, r1)  # P(m >= N - k)
    np.testing.assert_allclose(q[:, 1].numpy(), expected, atol=1e-12)
    assert q[:, 1].sum().item() == pytest.approx(n * r1, rel=1e-10)


def test_two_class_ties_share_the_average():
    probs = torch.tensor([[0.3, 0.7], [0.3, 0.7], [0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)
    r = np.array([0.5, 0.5])
    q = expected_ot_targets(probs, torch.tensor(r))
    np.testing.assert_allclose(q.numpy(), brute_force_targets(squared_cost(probs.numpy()), r), atol=1e-12)
    assert torch.equal(q[0], q[1]) and torch.equal(q[0], q[3])


def test_degenerate_target_gives_one_hot_rows():
    probs = random_probs(5, 3, seed=0)
    q = expected_ot_targets(probs, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.equal(q, torch.tensor([[0.0, 1.0, 0.0]] * 5, dtype=torch.float64))


# --------------------------------------------------------------------------- exact: enumeration
@pytest.mark.parametrize(
    "n, r",
    [
        (5, [0.2, 0.3, 0.5]),
        (4, [0.25, 0.25, 0.25, 0.25]),
        (4, [0.1, 0.0, 0.6, 0.3]),  # a class of probability 0 is never assigned
        (6, [0.6, 0.3, 0.1]),
    ],
)
def test_enumeration_matches_brute_force(n, r):
    probs = random_probs(n, len(r), seed=len(r) * 10 + n)
    q = expected_ot_targets(probs, torch.tensor(r, dtype=torch.float64))
    expected = brute_force_targets(squared_cost(probs.numpy()), np.array(r))
    np.testing.assert_allclose(q.numpy(), expected, atol=1e-12)


def test_enumeration_with_duplicate_images_matches_brute_force():
    probs = random_probs(5, 3, seed=3)
    probs[2] = probs[0]
    probs[4] = probs[0]
    r = np.array([0.5, 0.3, 0.2])
    q = expected_ot_targets(probs, torch.tensor(r))
    np.testing.assert_allclose(q.numpy(), brute_force_targets(squared_cost(probs.numpy()), r), atol=1e-12)


def test_exact_handles_the_promised_sizes_and_refuses_larger():
    q = expected_ot_targets(random_probs(12, 4, seed=0), TargetDistribution.uniform("r", list("abcd")))
    assert torch.allclose(q.sum(dim=0), torch.full((4,), 3.0, dtype=torch.float64), atol=1e-9)
    with pytest.raises(ValueError, match="num_samples"):
        expected_ot_targets(random_probs(64, 8, seed=0), torch.full((8,), 1 / 8))


# --------------------------------------------------------------------------- joint targets
def test_joint_targets_match_brute_force():
    gender = TargetDistribution("gender", {"male": 0.4, "female": 0.6})
    race = TargetDistribution("race", {"a": 0.5, "b": 0.3, "c": 0.2})
    joint = gender * race
    n = 4
    probs = {"gender": random_probs(n, 2, seed=1), "race": random_probs(n, 3, seed=2)}
    q = expected_ot_targets(probs, joint)
    assert q.shape == (n, 6)

    cost = np.zeros((n, 6))
    for c, (g, rc) in enumerate(itertools.product(range(2), range(3))):
        cost[:, c] = squared_cost(probs["gender"].numpy())[:, g] + squared_cost(probs["race"].numpy())[:, rc]
    expected = brute_force_targets(cost, joint.probs.numpy())
    np.testing.assert_allclose(q.numpy(), expected, atol=1e-12)

    marginal = marginalize(q, joint)
    np.testing.assert_allclose(marginal["gender"].numpy(), expected.reshape(n, 2, 3).sum(axis=2), atol=1e-12)
    np.testing.assert_allclose(marginal["race"].numpy(), expected.reshape(n, 2, 3).sum(axis=1), atol=1e-12)
    assert torch.allclose(marginal["race"].sum(dim=0), torch.tensor([2.0, 1.2, 0.8], dtype=torch.float64))


def test_correlated_joint_table_matches_brute_force():
    joint = TargetDistribution.joint({"g": ["m", "f"], "a": ["y", "o"]}, [[0.4, 0.1], [0.1, 0.4]])
    n = 4
    probs = {"g": random_probs(n, 2, seed=5), "a": random_probs(n, 2, seed=6)}
    q = expected_ot_targets(probs, joint)
    cost = np.zeros((n, 4))
    for c, (g, a) in enumerate(itertools.product(range(2), range(2))):
        cost[:, c] = squared_cost(probs["g"].numpy())[:, g] + squared_cost(probs["a"].numpy())[:, a]
    np.testing.assert_allclose(q.numpy(), brute_force_targets(cost, joint.probs.numpy()), atol=1e-12)


# --------------------------------------------------------------------------- the transport cost
def euclidean_cost(p: np.ndarray) -> np.ndarray:
    """``cost[i, k] = |p_i - e_k|``, the plain distance, written out with numpy's norm."""
    eye = np.eye(p.shape[1])
    return np.linalg.norm(p[:, None, :] - eye[None, :, :], axis=-1)


@pytest.mark.parametrize("n, r", [(4, [0.25, 0.25, 0.25, 0.25]), (5, [0.2, 0.3, 0.5]), (4, [0.1, 0.0, 0.6, 0.3])])
def test_euclidean_cost_matches_brute_force(n, r):
    probs = random_probs(n, len(r), seed=len(r) * 10 + n)
    q = expected_ot_targets(probs, torch.tensor(r, dtype=torch.float64), cost="euclidean")
    expected = brute_force_targets(euclidean_cost(probs.numpy()), np.array(r))
    np.testing.assert_allclose(q.numpy(), expected, atol=1e-12)


def test_the_costs_give_other_targets_for_four_classes():
    # Four images, a uniform four-class target: the plain distance moves one image's target class.
    probs = random_probs(4, 4, seed=4)
    r = np.full(4, 0.25)
    squared = expected_ot_targets(probs, torch.tensor(r))
    euclidean = expected_ot_targets(probs, torch.tensor(r), cost="euclidean")
    np.testing.assert_allclose(squared.numpy(), brute_force_targets(squared_cost(probs.numpy()), r), atol=1e-12)
    np.testing.assert_allclose(euclidean.numpy(), brute_force_targets(euclidean_cost(probs.numpy()), r), atol=1e-12)
    assert squared.argmax(dim=1).tolist() == [3, 1, 2, 0]
    assert euclidean.argmax(dim=1).tolist() == [3, 1, 0, 0]
    # Both are expectations of assignments to labels drawn from the target.
    for q in (squared, euclidean):
        assert torch.allclose(q.mean(dim=0), torch.tensor(r), atol=1e-12)


@pytest.mark.parametrize("r1", [0.5, 0.25, 0.8])
@pytest.mark.parametrize("n", [3, 8, 257])
def test_the_costs_give_the_same_two_class_targets(r1, n):
    probs = random_probs(n, 2, seed=n)
    target = torch.tensor([1 - r1, r1], dtype=torch.float64)
    squared = expected_ot_targets(probs, target)
    assert torch.equal(expected_ot_targets(probs, target, cost="euclidean"), squared)
    if n <= 8:
        expected = brute_force_targets(euclidean_cost(probs.numpy()), np.array([1 - r1, r1]))
        np.testing.assert_allclose(squared.numpy(), expected, atol=1e-12)
    draws = {cost: expected_ot_targets(probs, target, num_samples=20, generator=torch.Generator().manual_seed(3),
                                       cost=cost) for cost in ("squared", "euclidean")}
    assert torch.equal(draws["squared"], draws["euclidean"])


def test_euclidean_joint_cost_is_the_distance_of_the_concatenated_vectors():
    joint = TargetDistribution.uniform("gender", ["m", "f"]) * TargetDistribution.uniform("race", list("abc"))
    n = 4
    probs = {"gender": random_probs(n, 2, seed=11), "race": random_probs(n, 3, seed=12)}
    q = expected_ot_targets(probs, joint, cost="euclidean")
    concatenated = np.concatenate([probs["gender"].numpy(), probs["race"].numpy()], axis=1)
    cost = np.zeros((n, 6))
    for c, (g, rc) in enumerate(itertools.product(range(2), range(3))):
        cell = np.concatenate([np.eye(2)[g], np.eye(3)[rc]])
        cost[:, c] = np.linalg.norm(concatenated - cell, axis=1)
    np.testing.assert_allclose(q.numpy(), brute_force_targets(cost, joint.probs.numpy()), atol=1e-12)
    squared = expected_ot_targets(probs, joint)
    assert not torch.allclose(q, squared)


def test_the_cost_reaches_the_targets_and_the_loss():
    probs = random_probs(4, 4, seed=4)
    target = TargetDistribution.uniform("r", list("abcd"))
    labels, _, _ = dynamic_targets(probs, target, threshold=0.0, cost="euclidean")
    assert labels.tolist() == [3, 1, 0, 0]
    logits = torch.log(probs).requires_grad_(True)
    loss = distributional_alignment_loss(logits, target, threshold=0.0, cost="euclidean")
    expected = torch.nn.functional.cross_entropy(logits.detach(), torch.tensor([3, 1, 0, 0]))
    assert loss.item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="cost must be one of 'squared', 'euclidean', got 'manhattan'"):
        expected_ot_targets(probs, target, cost="manhattan")


# --------------------------------------------------------------------------- Monte Carlo
@pytest.mark.parametrize("n, r", [(8, [0.2, 0.3, 0.5]), (10, [0.7, 0.3])])
def test_monte_carlo_is_within_a_few_standard_errors(n, r):
    probs = random_probs(n, len(r), seed=n)
    target = torch.tensor(r, dtype=torch.float64)
    exact = expected_ot_targets(probs, target)
    samples = 4000
    estimate = expected_ot_targets(
        probs, target, num_samples=samples, generator=torch.Generator().manual_seed(0)
    )
    standard_error = torch.sqrt(exact * (1 - exact) / samples)
    assert ((estimate - exact).abs() <= 5 * standard_error + 1e-12).all()
    assert torch.allclose(estimate.sum(dim=1), torch.ones(n, dtype=torch.float64))


def test_monte_carlo_is_reproducible_from_the_generator():
    probs = random_probs(16, 4, seed=0)
    target = TargetDistribution.uniform("r", list("abcd"))
    a = expected_ot_targets(probs, target, num_samples=50, generator=torch.Generator().manual_seed(7))
    b = expected_ot_targets(probs, target, num_samples=50, generator=torch.Generator().manual_seed(7))
    c = expected_ot_targets(probs, target, num_samples=50, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_monte_carlo_single_sample_is_an_optimal_assignment():
    # One draw gives a one-hot row per image (no duplicates here).
    probs = random_probs(6, 3, seed=2)
    q = expected_ot_targets(probs, torch.full((3,), 1 / 3), num_samples=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(q.max(dim=1).values, torch.ones(6, dtype=torch.float64))


# --------------------------------------------------------------------------- properties
@st.composite
def batches(draw):
    k = draw(st.integers(min_value=2, max_value=4))
    n = draw(st.integers(min_value=1, max_value=7 if k < 4 else 5))
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    weights = draw(st.lists(st.integers(min_value=0, max_value=5), min_size=k, max_size=k).filter(lambda w: sum(w) > 0))
    r = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    probs = random_probs(n, k, seed)
    if n > 2 and draw(st.booleans()):
        probs[1] = probs[0]  # interchangeable images
    return probs, r, seed


@settings(max_examples=40, deadline=None)
@given(batches())
def test_exact_targets_properties(batch):
    probs, r, seed = batch
    n = probs.shape[0]
    q = expected_ot_targets(probs, r)
    assert torch.allclose(q.sum(dim=1), torch.ones(n, dtype=torch.float64), atol=1e-12)
    assert (q >= -1e-15).all()
    assert torch.allclose(q.mean(dim=0), r, atol=1e-12)  # column means equal the target exactly

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    q_perm = expected_ot_targets(probs[perm], r)
    assert torch.allclose(q_perm, q[perm], atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(batches())
def test_monte_carlo_properties(batch):
    probs, r, seed = batch
    q = expected_ot_targets(probs, r, num_samples=30, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(q.sum(dim=1), torch.ones(probs.shape[0], dtype=torch.float64), atol=1e-12)
    assert (q[:, r == 0] == 0).all()


# --------------------------------------------------------------------------- inputs
def test_dtype_and_device_follow_probs():
    probs = random_probs(5, 2, seed=0, dtype=torch.float32)
    q = expected_ot_targets(probs, TargetDistribution.uniform("g", ["m", "f"]))
    assert q.dtype == torch.float32 and q.device == probs.device


def test_bad_inputs_raise():
    target = TargetDistribution.uniform("g", ["m", "f"])
    probs = random_probs(4, 2, seed=0)
    with pytest.raises(ValueError, match="did you pass logits"):
        expected_ot_targets(torch.randn(4, 2) * 3, target)
    with pytest.raises(ValueError, match=r"shape \(N >= 1, 2\)"):
        expected_ot_targets(random_probs(4, 3, seed=0), target)
    with pytest.raises(ValueError, match=r"shape \(N >= 1, 2\)"):
        expected_ot_targets(torch.zeros(0, 2), target)
    with pytest.raises(ValueError, match="NaN"):
        expected_ot_targets(torch.tensor([[float("nan"), 0.5]]), target)
    with pytest.raises(ValueError, match="floating-point"):
        expected_ot_targets(torch.tensor([[1, 0]]), target)
    with pytest.raises(ValueError, match="num_samples"):
        expected_ot_targets(probs, target, num_samples=0)
    with pytest.raises(ValueError, match="num_samples"):
        expected_ot_targets(probs, target, num_samples=True)
    with pytest.raises(ValueError, match="summing to 1"):
        expected_ot_targets(probs, torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="TargetDistribution or a tensor"):
        expected_ot_targets(probs, [0.5, 0.5])
    joint = target * TargetDistribution.uniform("a", ["y", "o"])
    with pytest.raises(ValueError, match="attributes"):
        expected_ot_targets({"g": probs}, joint)
    with pytest.raises(ValueError, match="same number of images"):
        expected_ot_targets({"g": probs, "a": random_probs(3, 2, seed=1)}, joint)
    with pytest.raises(ValueError, match="TargetDistribution naming"):
        expected_ot_targets({"g": probs}, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="threshold"):
        dynamic_targets(probs, target, threshold=1.5)
    with pytest.raises(ValueError, match="reduction"):
        distributional_alignment_loss(torch.randn(4, 2), target, reduction="max")
    with pytest.raises(ValueError, match=r"q_cells must have shape"):
        marginalize(torch.zeros(4, 3), joint)


# --------------------------------------------------------------------------- dynamic targets and loss
def test_dynamic_targets_threshold():
    probs = torch.tensor([[0.99, 0.01], [0.6, 0.4], [0.4, 0.6], [0.01, 0.99]], dtype=torch.float64)
    target = TargetDistribution.uniform("g", ["m", "f"])
    q = expected_ot_targets(probs, target)
    labels, confidence, keep = dynamic_targets(probs, target, threshold=0.8)
    assert torch.equal(labels, q.argmax(dim=1))
    assert torch.equal(confidence, q.max(dim=1).values)
    assert torch.equal(keep, confidence >= 0.8)
    assert keep.tolist() == [True, False, False, True]  # q = 15/16, 11/16, 11/16, 15/16
    assert labels.tolist() == [0, 0, 1, 1]


def test_loss_gradient_is_zero_on_dropped_images_only():
    logits = torch.tensor([[4.0, -4.0], [0.3, 0.0], [0.0, 0.3], [-4.0, 4.0]], requires_grad=True)
    target = TargetDistribution.uniform("g", ["m", "f"])
    loss = distributional_alignment_loss(logits, target, threshold=0.8)
    loss.backward()
    # Kept: images 0 and 3 with labels 0 and 1 (see test_dynamic_targets_threshold).
    manual = torch.nn.functional.cross_entropy(logits[[0, 3]].detach(), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(manual.item())
    grad_norm = logits.grad.abs().sum(dim=1)
    assert grad_norm[1] == 0 and grad_norm[2] == 0
    assert grad_norm[0] > 0 and grad_norm[3] > 0

    per_image = distributional_alignment_loss(logits, target, reduction="none")
    assert per_image[1] == 0 and per_image[2] == 0
    total = distributional_alignment_loss(logits, target, reduction="sum")
    assert total.item() == pytest.approx(per_image.sum().item())


def test_loss_is_zero_with_zero_gradient_when_nothing_is_kept():
    logits = torch.zeros(4, 2, requires_grad=True)  # identical images: q = 0.5 each
    loss = distributional_alignment_loss(logits, TargetDistribution.uniform("g", ["m", "f"]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(4, 2))


def test_loss_gradient_matches_autograd_of_the_written_out_loss():
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, 3, generator=gen)).requires_grad_()
    target = torch.tensor([0.5, 0.25, 0.25])
    loss = distributional_alignment_loss(logits, target, threshold=0.6)
    loss.backward()
    q = expected_ot_targets(torch.softmax(logits.detach(), dim=1), target)
    keep = q.max(dim=1).values >= 0.6
    assert keep.any()
    reference_logits = logits.detach().clone().requires_grad_()
    log_p = torch.log_softmax(reference_logits, dim=1)
    reference = -(log_p[torch.arange(6), q.argmax(dim=1)] * keep).sum() / keep.sum()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(logits.grad, reference_logits.grad, atol=1e-6)


def test_joint_loss_is_the_sum_over_attributes_of_marginal_losses():
    gen = torch.Generator().manual_seed(1)
    logits = {"g": (3 * torch.randn(6, 2, generator=gen)).requires_grad_(),
              "r": (3 * torch.randn(6, 3, generator=gen)).requires_grad_()}
    joint = TargetDistribution.uniform("g", ["m", "f"]) * TargetDistribution.uniform("r", ["a", "b", "c"])
    loss = distributional_alignment_loss(logits, joint, threshold=0.5, num_samples=200,
                                         generator=torch.Generator().manual_seed(0))
    probs = {a: torch.softmax(l.detach(), dim=1) for a, l in logits.items()}
    q = marginalize(expected_ot_targets(probs, joint, num_samples=200, generator=torch.Generator().manual_seed(0)), joint)
    expected = sum(
        kept_cross_entropy(logits[a].detach(), q[a].argmax(dim=1), q[a].max(dim=1).values >= 0.5) for a in q
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    labels, confidence, keep = dynamic_targets(probs, joint, threshold=0.5, num_samples=200,
                                               generator=torch.Generator().manual_seed(0))
    assert set(labels) == {"g", "r"} and set(keep) == {"g", "r"}
    assert torch.equal(labels["r"], q["r"].argmax(dim=1))
    loss.backward()
    assert logits["g"].grad is not None and logits["r"].grad is not None


def test_kept_cross_entropy_validates_shapes():
    with pytest.raises(ValueError, match="expected logits"):
        kept_cross_entropy(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), torch.ones(3, dtype=torch.bool))
