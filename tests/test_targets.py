import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_fair import TargetDistribution


def test_constructors_agree():
    by_dict = TargetDistribution("age", {"young": 0.75, "old": 0.25})
    by_string = TargetDistribution.parse("age: young=0.75, old=0.25")
    assert by_dict == by_string
    assert by_dict.attributes == ("age",)
    assert by_dict.class_names == ["young", "old"]
    assert by_dict.probs.dtype == torch.float64
    assert by_dict.probs.tolist() == [0.75, 0.25]
    assert by_dict.prob("old") == 0.25
    assert not by_dict.is_joint


def test_uniform_and_parse_without_probabilities():
    gender = TargetDistribution.uniform("gender", ["male", "female"])
    assert gender.probs.tolist() == [0.5, 0.5]
    assert TargetDistribution.parse("gender: male, female") == gender
    race = TargetDistribution.uniform("race", ["wmelh", "asian", "black", "indian"])
    assert torch.allclose(race.probs, torch.full((4,), 0.25, dtype=torch.float64))
    assert race.num_classes == 4


def test_string_round_trip():
    age = TargetDistribution("age", {"young": 0.7, "old": 0.3})
    assert TargetDistribution.parse(str(age)) == age
    both = TargetDistribution.uniform("gender", ["male", "female"]) * age
    assert TargetDistribution.parse(str(both)) == both


def test_product_is_row_major_and_independent():
    gender = TargetDistribution("gender", {"male": 0.4, "female": 0.6})
    race = TargetDistribution("race", {"a": 0.1, "b": 0.2, "c": 0.7})
    joint = gender * race
    assert joint.is_joint
    assert joint.attributes == ("gender", "race")
    assert joint.name == "gender x race"
    assert joint.cells[:4] == [("male", "a"), ("male", "b"), ("male", "c"), ("female", "a")]
    assert joint.class_names[0] == "male/a"
    assert joint.shape == (2, 3)
    for g in gender.class_names:
        for r in race.class_names:
            assert math.isclose(joint.prob(g, r), gender.prob(g) * race.prob(r), rel_tol=1e-12)
    assert joint.marginal("gender") == gender
    assert joint.marginal("race") == race
    assert set(joint.marginals()) == {"gender", "race"}
    cells = joint.cell_class_indices()
    assert cells.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    # Three attributes.
    age = TargetDistribution("age", {"young": 0.75, "old": 0.25})
    triple = joint * age
    assert triple.num_classes == 12
    assert math.isclose(triple.prob("female", "c", "old"), 0.6 * 0.7 * 0.25, rel_tol=1e-12)
    assert triple.marginal("race") == race


def test_explicit_joint_table():
    classes = {"gender": ["male", "female"], "age": ["young", "old"]}
    # Correlated: not a product of its marginals.
    joint = TargetDistribution.joint(
        classes, {("male", "young"): 0.5, ("female", "old"): 0.5}
    )
    assert joint.probs.tolist() == [0.5, 0.0, 0.0, 0.5]
    assert joint.marginal("gender") == TargetDistribution.uniform("gender", ["male", "female"])
    assert joint.marginal("age") == TargetDistribution.uniform("age", ["young", "old"])
    assert joint != joint.marginal("gender") * joint.marginal("age")
    from_array = TargetDistribution.joint(classes, [[0.5, 0.0], [0.0, 0.5]])
    assert from_array == joint
    assert torch.equal(from_array.table(), torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64))


@pytest.mark.parametrize(
    "probabilities, message",
    [
        ({"a": -0.1, "b": 1.1}, "negative"),
        ({"a": float("nan"), "b": 0.5}, "NaN"),
        ({"a": float("inf"), "b": 0.5}, "NaN or infinite"),
        ({"a": 0.5, "b": 0.49999}, "sum to"),
        ({"a": 0.6, "b": 0.6}, "sum to"),
        ({}, "at least one class"),
        ({"": 1.0}, "must not be empty"),
        ({" a": 1.0}, "spaces"),
        ({"a=b": 1.0}, "may contain only"),
    ],
)
def test_bad_probabilities_raise(probabilities, message):
    with pytest.raises(ValueError, match=message):
        TargetDistribution("x", probabilities)


def test_sum_tolerance_is_one_in_a_million():
    TargetDistribution("x", {"a": 0.5, "b": 0.5 + 5e-7})
    with pytest.raises(ValueError, match="sum to"):
        TargetDistribution("x", {"a": 0.5, "b": 0.5 + 2e-6})


def test_bad_names_raise():
    with pytest.raises(ValueError, match="attribute name must not be empty"):
        TargetDistribution("", {"a": 1.0})
    with pytest.raises(ValueError, match="duplicate"):
        TargetDistribution.uniform("x", ["a", "b", "a"])
    with pytest.raises(ValueError, match="at least one class"):
        TargetDistribution.uniform("x", [])
    with pytest.raises(ValueError, match="not a string"):
        TargetDistribution.uniform("x", "ab")
    with pytest.raises(ValueError, match="mapping"):
        TargetDistribution("x", [0.5, 0.5])


def test_unknown_class_names_raise():
    classes = {"gender": ["male", "female"], "age": ["young", "old"]}
    with pytest.raises(ValueError, match="unknown class 'teen'"):
        TargetDistribution.joint(classes, {("male", "teen"): 1.0})
    with pytest.raises(ValueError, match="one class per attribute"):
        TargetDistribution.joint(classes, {("male",): 1.0})
    with pytest.raises(ValueError, match="shape"):
        TargetDistribution.joint(classes, [0.25, 0.25, 0.25, 0.25])
    with pytest.raises(ValueError, match="sum to"):
        TargetDistribution.joint(classes, {("male", "young"): 0.5})
    age = TargetDistribution.uniform("age", ["young", "old"])
    with pytest.raises(ValueError, match="unknown class 'teen'"):
        age.prob("teen")
    with pytest.raises(ValueError, match="unknown attribute"):
        age.marginal("gender")
    with pytest.raises(ValueError, match="sharing attributes"):
        age * age


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("age young=0.5, old=0.5", "malformed target"),
        ("age: young: 0.5", "malformed target"),
        ("age: young=0.5, old", "every class or to none"),
        ("age: young=abc, old=1", "malformed probability"),
        ("age: young==0.5, old=0.5", "malformed entry"),
        ("age: young=0.5,, old=0.5", "empty class entry"),
        ("age: young=0.5, young=0.5", "duplicate"),
        ("age: young=0.5, old=0.4", "sum to"),
        (": young=0.5, old=0.5", "attribute name must not be empty"),
        ("age: young, old * age: young, old", "sharing attributes"),
        ("age: young=0.5, old=0.5 *", "malformed target"),
    ],
)
def test_malformed_strings_raise(text, message):
    with pytest.raises(ValueError, match=message):
        TargetDistribution.parse(text)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=6).filter(lambda w: sum(w) > 0))
def test_parse_round_trip_property(weights):
    total = sum(weights)
    target = TargetDistribution("attr", {f"c{i}": w / total for i, w in enumerate(weights)})
    again = TargetDistribution.parse(str(target))
    assert again == target
    assert torch.equal(again.probs, target.probs)
