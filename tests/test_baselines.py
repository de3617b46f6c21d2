"""The published alternatives (diffusers_fair.baselines): draws, equations, zero strength, direction.

Fast tests use the tiny random pipelines of the toy architecture; the direction on the trained toy
model (a word the base model draws with short hair and pale skin on every image) is marked slow.
"""

import pytest
import torch

from diffusers_fair.baselines import (
    FairDiffusionSettings,
    UCESettings,
    debias_vl,
    ethical_intervention,
    ethical_intervention_phrase,
    fair_diffusion,
    prompt_intervention,
    uce_debias,
)
from diffusers_fair.baselines.debias_vl import end_of_text_embeddings, paired_prompts
from diffusers_fair.baselines.draws import draw_cells, exact_counts, joint_target
from diffusers_fair.baselines.uce import cross_attention_projections, solve
from diffusers_fair.method.targets import TargetDistribution
from helpers.adaptors import tiny_pipeline


HAIR = TargetDistribution.uniform("hair", ["short", "long"])
TONE = TargetDistribution.uniform("tone", ["pale", "tan", "brown", "deep"])
PHRASES = {"hair": {"short": "doctor", "long": "nurse"}, "tone": dict.fromkeys(["pale", "tan", "brown", "deep"], "smiling")}
PROMPT = "a photo of the face of a person"
SAMPLING = dict(num_inference_steps=3, guidance_scale=4.0, output_type="pt")


def latents(n, seed=0):
    return torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(0)


# --------------------------------------------------------------------------- draws
def test_exact_counts_follow_the_ratio_and_break_ties_at_random():
    gen = torch.Generator().manual_seed(0)
    assert exact_counts(torch.tensor([0.75, 0.25]), 32, gen).tolist() == [24, 8]
    assert exact_counts(torch.full((8,), 1 / 8), 32, gen).tolist() == [4] * 8
    # 4 images over 8 equal cells: 4 cells get one each, and which ones varies with the draw
    chosen = {tuple(exact_counts(torch.full((8,), 1 / 8), 4, gen).tolist()) for _ in range(20)}
    assert all(sum(c) == 4 and max(c) == 1 for c in chosen) and len(chosen) > 1


def test_draw_cells_are_balanced_per_call_and_fixed_by_the_latents():
    target = joint_target([HAIR, TONE])
    cells = draw_cells(target, latents(32))
    assert sorted(cells) == sorted(target.cells * 4)
    assert draw_cells(target, latents(32)) == cells
    assert draw_cells(target, latents(32, seed=1)) != cells
    skewed = TargetDistribution("hair", {"short": 0.25, "long": 0.75})
    assert [c[0] for c in draw_cells(skewed, latents(16))].count("long") == 12


def test_unbalanced_draws_follow_the_ratio_on_average():
    skewed = TargetDistribution("hair", {"short": 0.2, "long": 0.8})
    cells = draw_cells(skewed, latents(4000), balanced=False)
    share = [c[0] for c in cells].count("long") / 4000
    assert abs(share - 0.8) < 0.03  # 5 standard errors


# --------------------------------------------------------------------------- zero strength: the stock images, bit for bit
def test_zero_strength_gives_the_stock_images(pipe):
    noise = latents(4)
    stock = pipe([PROMPT] * 4, latents=noise, **SAMPLING).images
    made = [
        prompt_intervention(pipe, [HAIR, TONE], PHRASES, strength=0.0),
        ethical_intervention(pipe, ethical_intervention_phrase("a doctor", ["gender"]), strength=0.0),
        fair_diffusion(pipe, [HAIR, TONE], PHRASES, strength=0.0),
        debias_vl(pipe, ["a photo of the face of a doctor"], [HAIR, TONE], PHRASES, strength=0.0),
    ]
    for baseline in made:
        assert torch.equal(baseline([PROMPT] * 4, latents=noise, **SAMPLING).images, stock), type(baseline).__name__
    strong = fair_diffusion(pipe, [HAIR], PHRASES, settings=FairDiffusionSettings(edit_warmup_steps=0))
    assert not torch.equal(strong([PROMPT] * 4, latents=noise, **SAMPLING).images, stock)


def test_uce_at_zero_strength_leaves_the_weights(pipe):
    before = {n: m.weight.clone() for n, m in cross_attention_projections(pipe.unet).items()}
    result = uce_debias(pipe, HAIR, ["a photo of a doctor"], {"hair": {"short": "doctor", "long": "nurse"}},
                        _AnyReader(), strength=0.0)
    assert result.iterations == 0
    assert all(torch.equal(m.weight, before[n]) for n, m in cross_attention_projections(pipe.unet).items())


def test_a_generator_call_draws_the_stock_latents(pipe):
    stock = pipe(PROMPT, generator=torch.Generator().manual_seed(3), **SAMPLING).images
    same = prompt_intervention(pipe, HAIR, PHRASES, strength=0.0)(PROMPT, generator=torch.Generator().manual_seed(3),
                                                                  **SAMPLING).images
    assert torch.equal(same, stock)


# --------------------------------------------------------------------------- what each one changes
def test_prompt_intervention_names_the_drawn_cells_at_the_ratio(pipe):
    skewed = TargetDistribution("hair", {"short": 0.25, "long": 0.75})
    baseline = prompt_intervention(pipe, skewed, PHRASES, template="{prompt} with {attributes}")
    rewritten = baseline._rewrite([PROMPT] * 16, latents(16))
    assert rewritten.count(f"{PROMPT} with nurse") == 12 and rewritten.count(f"{PROMPT} with doctor") == 4
    half = prompt_intervention(pipe, skewed, PHRASES, strength=0.5)._rewrite([PROMPT] * 400, latents(400))
    assert 150 < sum(p != PROMPT for p in half) < 250
    joint = prompt_intervention(pipe, [HAIR, TONE], PHRASES)._rewrite(["x"] * 8, latents(8))
    assert all(p in ("x, doctor and smiling", "x, nurse and smiling") for p in joint)


def test_ethical_intervention_appends_the_authors_phrase(pipe):
    phrase = ethical_intervention_phrase("a doctor", ["gender"])
    assert phrase == "if all individuals can be a doctor irrespective of their gender"
    baseline = ethical_intervention(pipe, lambda prompt: phrase)
    assert baseline._rewrite(["a photo of a doctor"] * 2, latents(2)) == [f"a photo of a doctor {phrase}"] * 2


def test_fair_diffusion_edits_toward_the_drawn_class_and_away_from_the_others(pipe):
    baseline = fair_diffusion(pipe, [HAIR, TONE], PHRASES, strength=0.5)
    args = baseline.edit_arguments(("long", "tan"))
    assert args["reverse_editing_direction"] == [True, False, True, False, True, True]
    assert args["edit_weights"] == pytest.approx([1, 1, 1 / 3, 1, 1 / 3, 1 / 3])
    assert args["edit_guidance_scale"] == 2.0  # strength x the authors' 4
    assert (args["edit_warmup_steps"], args["edit_threshold"], args["edit_momentum_scale"], args["edit_mom_beta"]) == (
        5, 0.95, 0.5, 0.6)
    with pytest.raises(ValueError, match="set per image"):
        baseline(PROMPT, edit_guidance_scale=3.0)


def test_fair_diffusion_moves_each_image_toward_its_edit_concept(pipe):
    """An image steered toward "nurse" comes closer to the plain "nurse" image from the same noise."""
    noise = latents(8)
    baseline = fair_diffusion(pipe, HAIR, PHRASES, settings=FairDiffusionSettings(edit_warmup_steps=0))
    edited = baseline([PROMPT] * 8, latents=noise, **SAMPLING).images
    stock = pipe([PROMPT] * 8, latents=noise, **SAMPLING).images
    cells = draw_cells(HAIR, noise)
    for i, (cell,) in enumerate(cells):
        concept = pipe(PHRASES["hair"][cell], latents=noise[i:i + 1], **SAMPLING).images[0]
        other = pipe(PHRASES["hair"]["short" if cell == "long" else "long"], latents=noise[i:i + 1], **SAMPLING).images[0]
        gain = (edited[i] - other).norm() - (edited[i] - concept).norm()
        assert gain > (stock[i] - other).norm() - (stock[i] - concept).norm()


def test_uce_solve_minimises_its_objective():
    """The closed form zeroes the gradient of λ|W−W₀|² + s_e Σ|Wc−v*|² + s_p Σ|Wc−W₀c|² (autograd, float64)."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    edits = [(torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64))
             for _ in range(3)]
    keep = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(2)]
    settings = UCESettings(lamb=0.5, edit_scale=1.0, preserve_scale=0.3)
    w = solve(w0, edits, keep, settings).requires_grad_(True)
    loss = settings.lamb * ((w - w0) ** 2).sum()
    loss = loss + settings.edit_scale * sum(((w @ c - v) ** 2).sum() for c, v in edits)
    loss = loss + settings.preserve_scale * sum(((w @ c - w0 @ c) ** 2).sum() for c in keep)
    loss.backward()
    assert w.grad.abs().max() < 1e-9
    # with v* = W₀c the edit asks for nothing: the weight stays
    assert torch.allclose(solve(w0, [(c, w0 @ c) for c, _ in edits], keep, settings), w0, atol=1e-12)


def test_debias_vl_projects_every_prompt_token_and_shrinks_the_paired_difference(pipe):
    baseline = debias_vl(pipe, ["a photo of the face of a person"], HAIR, PHRASES, lam=50.0)
    plain, plain_negative = pipe.encode_prompt(PROMPT, "cpu", 1, True, "")
    projected, negative = baseline.encode_prompt(PROMPT, "cpu", 1, True, "")
    assert torch.allclose(projected, plain @ baseline.projection.T)
    assert torch.equal(negative, plain_negative)
    assert not torch.allclose(projected[0, -1], plain[0, -1])  # padding positions are projected too
    (a, b), = paired_prompts(["a photo of the face of a person"], HAIR, PHRASES)
    z = end_of_text_embeddings(pipe, [a, b]).float()
    difference = z[0] - z[1]
    assert (baseline.projection @ difference).norm() < 0.5 * difference.norm()


def test_invalid_inputs_are_refused_before_anything_runs(pipe):
    with pytest.raises(ValueError, match="no phrase for hair"):
        prompt_intervention(pipe, HAIR, {"hair": {"short": "doctor"}})
    with pytest.raises(ValueError, match="strength"):
        prompt_intervention(pipe, HAIR, PHRASES, strength=1.5)
    with pytest.raises(ValueError, match="template"):
        prompt_intervention(pipe, HAIR, PHRASES, template="{prompt}")
    with pytest.raises(ValueError, match="prompts is empty"):
        debias_vl(pipe, [], HAIR, PHRASES)
    with pytest.raises(ValueError, match="does not read"):
        uce_debias(pipe, TONE, ["a doctor"], {"tone": dict.fromkeys(TONE.classes["tone"], "smiling")}, _AnyReader())
    with pytest.raises(ValueError, match="sharing attributes"):
        joint_target([HAIR, HAIR])


class _AnyReader:
    """Components whose classifier reads hair length only (for checks that stop before generating)."""

    class classifier:
        attributes = {"hair": ["short", "long"]}


# --------------------------------------------------------------------------- the trained toy model
@pytest.fixture(scope="module")
def toy():
    from diffusers_fair.toy import world
    from diffusers_fair.toy.compare import explicit_prompts, phrases
    from diffusers_fair.toy.components import load_toy_components
    from diffusers_fair.toy.demo import load_toy_pipeline, targets

    # drawn with short hair and pale skin on every image by the base model (90% and 86% in its data)
    paramedic = next(w for w in world.words("occupation", "test") if w.name == "paramedic")
    attributes = ["hair_length", "skin_tone"]
    return dict(pipe=load_toy_pipeline(), components=load_toy_components(), word=paramedic, targets=targets(),
                phrases=phrases(attributes), concepts=explicit_prompts(attributes),
                train=[world.prompt(w) for w in world.words("occupation", "train")], prompt=world.prompt(paramedic))


def _minority_shares(pipe, toy):
    from diffusers_fair.toy.audit import audit_pipeline

    result = audit_pipeline(pipe, [toy["word"]], 16, toy["components"], seed=0, guidance_scale=4.0,
                            num_inference_steps=12, batch_size=16)
    shares = result.words[0].freqs
    return shares["hair_length"][1], 1 - shares["skin_tone"][0]  # long hair, not pale


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt", "fair-diffusion", "uce", "debias-vl"])
def test_each_baseline_moves_a_skewed_word_toward_uniform_on_the_toy_model(toy, method):
    import copy

    from diffusers import StableDiffusionPipeline

    if "base_shares" not in toy:  # audited once for the four methods
        toy["base_shares"] = _minority_shares(toy["pipe"], toy)
    base_long, base_other = toy["base_shares"]
    assert base_long <= 0.1 and base_other <= 0.1
    if method == "prompt":
        pipe = prompt_intervention(toy["pipe"], toy["targets"], toy["phrases"], template="{prompt} with {attributes}")
    elif method == "fair-diffusion":
        pipe = fair_diffusion(toy["pipe"], toy["targets"], toy["concepts"],
                              settings=FairDiffusionSettings(edit_warmup_steps=1))
    elif method == "uce":
        pipe = StableDiffusionPipeline.from_pipe(toy["pipe"], unet=copy.deepcopy(toy["pipe"].unet))
        uce_debias(pipe, toy["targets"], [toy["prompt"]], toy["concepts"], toy["components"],
                   settings=UCESettings(max_iterations=4, num_inference_steps=12, guidance_scale=4.0), progress=False)
    else:
        pipe = debias_vl(toy["pipe"], toy["train"], toy["targets"], toy["phrases"], template="{prompt} with {attributes}")
    long_share, other_share = _minority_shares(pipe, toy)
    assert long_share >= base_long + 0.15 or other_share >= base_other + 0.15, (long_share, other_share)
    assert long_share >= base_long and other_share >= base_other
