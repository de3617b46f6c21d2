"""benchmarks/toy_text_probe.py: the ridge probe is exact on linear data; the shipped text encoder carries the skews."""


import numpy as np
import pytest

from helpers.scripts import load_script


@pytest.fixture(scope="module")
def probe_script():
    return load_script("benchmarks", "toy_text_probe")


def test_ridge_fit_without_penalty_recovers_a_linear_map(probe_script):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) * rng.uniform(0.5, 3.0, size=6) + rng.normal(size=6)
    true_w, true_b = rng.normal(size=(6, 3)), rng.normal(size=3)
    y = x @ true_w + true_b
    fit = probe_script.ridge_fit(x, y, ridge=0.0)
    np.testing.assert_allclose(probe_script.ridge_predict(fit, x), y, atol=1e-8)
    # On standardised inputs the weights are the true ones times each input's scale.
    np.testing.assert_allclose(fit[0][:-1], true_w * x.std(0)[:, None], rtol=1e-6)
    weights = fit[0]
    # A penalty shrinks the weights but never the intercept, which stays the mean of y.
    shrunk, _, _ = probe_script.ridge_fit(x, y, ridge=10.0)
    assert np.abs(shrunk[:-1]).sum() < np.abs(weights[:-1]).sum()
    np.testing.assert_allclose(shrunk[-1], y.mean(0), atol=1e-8)


def test_skew_matrix_rows_are_distributions_per_trait(probe_script):
    from diffusers_fair.toy import world
    from diffusers_fair.toy.render import TRAITS

    skews = probe_script.skew_matrix(world.words(split="test"))
    assert skews.shape == (len(world.words(split="test")), sum(len(c) for c in TRAITS.values()))
    assert skews.sum(1) == pytest.approx([len(TRAITS)] * len(skews))


def test_shipped_text_encoder_carries_every_traits_held_out_skews(probe_script):
    result = probe_script.probe(probe_script.model_path(), ridge=1e-2)
    assert set(result) == {"hair_length", "skin_tone", "hair_colour"}
    assert min(result.values()) >= 0.95, result
