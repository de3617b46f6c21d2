import itertools
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_fair import bias_metric, mean_std


def pairwise_bias(freqs):
    """bias(P) written out over the class pairs."""
    total = sum(freqs)
    f = [x / total for x in freqs]
    pairs = list(itertools.combinations(range(len(f)), 2))
    return sum(abs(f[i] - f[j]) for i, j in pairs) / len(pairs)


def test_two_classes_is_the_absolute_difference():
    assert bias_metric([0.8, 0.2]).item() == pytest.approx(0.6)
    assert bias_metric(torch.tensor([0.5, 0.5])).item() == 0.0


@pytest.mark.parametrize("k", [2, 4, 8])
def test_extremes(k):
    assert bias_metric(torch.full((k,), 1.0 / k)).item() == pytest.approx(0.0, abs=1e-15)
    one_class = torch.zeros(k)
    one_class[0] = 1
    assert bias_metric(one_class).item() == pytest.approx(2.0 / k)


def test_counts_are_normalised():
    assert bias_metric([45, 15]).item() == pytest.approx(0.5)
    assert bias_metric([3, 1, 0, 0]).item() == pytest.approx(pairwise_bias([3, 1, 0, 0]))


def test_per_prompt_values_for_a_table():
    table = torch.tensor([[10, 10, 0, 0], [5, 5, 5, 5], [40, 0, 0, 0]])
    values = bias_metric(table)
    assert values.shape == (3,)
    assert values.dtype == torch.float64
    for row, value in zip(table.tolist(), values.tolist()):
        assert value == pytest.approx(pairwise_bias(row))
    mean, std = mean_std(values)
    assert mean == pytest.approx(statistics.fmean(values.tolist()))
    assert std == pytest.approx(statistics.pstdev(values.tolist()))
    _, sample_std = mean_std(values, ddof=1)
    assert sample_std == pytest.approx(statistics.stdev(values.tolist()))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=100), min_size=2, max_size=8).filter(lambda c: sum(c) > 0))
def test_matches_pairwise_definition(counts):
    assert bias_metric(counts).item() == pytest.approx(pairwise_bias(counts), abs=1e-12)


@pytest.mark.parametrize(
    "freqs, message",
    [
        ([0.5, -0.1, 0.6], "negative"),
        ([float("nan"), 0.5], "NaN"),
        ([0, 0], "sums to 0"),
        ([[1, 1], [0, 0]], "sums to 0"),
        ([1.0], "at least 2 classes"),
        (torch.ones(2, 2, 2), "shape"),
    ],
)
def test_bad_input_raises(freqs, message):
    with pytest.raises(ValueError, match=message):
        bias_metric(freqs)


def test_mean_std_bad_input():
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])
    with pytest.raises(ValueError, match="ddof=1"):
        mean_std([0.3], ddof=1)
    with pytest.raises(ValueError, match="NaN"):
        mean_std([0.3, float("nan")])
    assert mean_std([0.3]) == (pytest.approx(0.3), 0.0)
