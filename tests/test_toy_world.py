"""The toy world: renderer, toy components, audit, and the shipped base model (skipped until it ships)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from diffusers_fair.evaluation.metrics import bias_metric
from diffusers_fair.method.boxes import crop_faces, expand_boxes
from diffusers_fair.toy import world
from diffusers_fair.toy.audit import AuditResult, audit_pipeline, per_word_correlation
from diffusers_fair.toy.components import WEIGHTS_DIR, face_crops, load_toy_components
from diffusers_fair.toy.render import (
    SCENE_PARAMETERS,
    SKIN_TONES,
    TRAITS,
    random_traits,
    render,
    scene_vector,
)


# Seeds far from the ones train_components.py renders its pools with (seed * 1000 + 1..4).
FRESH_SEED = 987_654


def traits_of(**values):
    n = len(next(iter(values.values())))
    base = {name: np.zeros(n, dtype=np.int64) for name in TRAITS}
    base.update({k: np.asarray(v, dtype=np.int64) for k, v in values.items()})
    return base


# ------------------------------------------------------------------------------------------------
# Renderer
# ------------------------------------------------------------------------------------------------
def test_render_is_deterministic_per_seed():
    traits = random_traits(16, np.random.default_rng(1))
    a, b, c = render(traits, 5), render(traits, 5), render(traits, 6)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (16, 3, 32, 32) and a.images.dtype == np.float32
    assert a.images.min() >= 0 and a.images.max() <= 1


def test_each_trait_changes_only_the_figure():
    n = 12
    base = render(traits_of(hair_length=np.zeros(n), skin_tone=np.zeros(n), hair_colour=np.zeros(n)), 3)
    for name, value in [("hair_length", 1), ("skin_tone", 3), ("hair_colour", 1)]:
        changed = render(traits_of(**{name: np.full(n, value)}), 3)
        diff = np.abs(changed.images - base.images).max(axis=1)  # (N, H, W)
        union = np.concatenate([np.minimum(changed.boxes[:, :2], base.boxes[:, :2]),
                                np.maximum(changed.boxes[:, 2:], base.boxes[:, 2:])], axis=1)
        for i in range(n):
            assert diff[i].max() > 0.2, f"{name} did not change image {i}"
            x0, y0 = np.floor(union[i, :2]).astype(int) - 1  # one pixel of anti-aliasing around the box
            x1, y1 = np.ceil(union[i, 2:]).astype(int) + 1
            outside = diff[i].copy()
            if name == "skin_tone":
                outside[y0:, x0:x1] = 0  # the neck continues below the head box
            else:
                outside[y0:y1, x0:x1] = 0
            assert outside.max() < 1e-6, f"{name} changed pixels outside the figure in image {i}"


def test_skin_tones_are_ordered_in_the_rendered_head():
    seed = 11
    # One scene (one seed, one image per call), four tones.
    portraits = [render(traits_of(skin_tone=[tone]), seed) for tone in range(4)]
    p = portraits[0]
    cx = int((p.boxes[0, 0] + p.boxes[0, 2]) / 2)
    cy = int(p.scene["head_y"][0, 0] * 32)
    centre = np.stack([q.images[0, :, cy + 1, cx] for q in portraits])  # below the eyes, above the mouth
    assert np.all(np.diff(centre.mean(axis=1)) < -0.05)
    assert np.allclose(centre / centre[:, :1], SKIN_TONES / SKIN_TONES[:, :1], atol=0.08)


def test_empty_scenes_keep_the_background_and_leave_others_unchanged():
    traits = random_traits(20, np.random.default_rng(2))
    figure = np.arange(20) % 2 == 0
    full, mixed = render(traits, 9), render(traits, 9, figure=figure)
    assert np.array_equal(mixed.images[figure], full.images[figure])
    assert np.array_equal(mixed.has_figure, figure)
    assert np.all(mixed.boxes[~figure] == 0) and np.all(mixed.boxes[figure] > 0)
    empty = mixed.images[~figure]
    changed = np.abs(empty - full.images[~figure]).max(axis=1) > 1e-6
    assert 0.1 < changed.mean() < 0.7  # the figure is gone, the rest of the scene is the same
    assert np.array_equal(scene_vector(mixed.scene), scene_vector(full.scene))


def test_scene_vector_layout_and_range():
    p = render(random_traits(200, np.random.default_rng(3)), 4)
    v = scene_vector(p.scene)
    assert v.shape == (200, sum(SCENE_PARAMETERS.values()))
    assert v.min() >= -1e-6 and v.max() <= 1 + 1e-6
    assert (v.std(axis=0) > 0.02).all()  # every parameter varies


# ------------------------------------------------------------------------------------------------
# Toy components
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def components():
    return load_toy_components()


@pytest.fixture(scope="module")
def fresh():
    rng = np.random.default_rng(FRESH_SEED)
    p = render(random_traits(400, rng), rng)
    return torch.from_numpy(p.images), {k: torch.from_numpy(v) for k, v in p.traits.items()}, torch.from_numpy(p.boxes)


def test_weights_are_small_safetensors():
    files = sorted(WEIGHTS_DIR.iterdir())
    names = {f.name for f in files}
    assert "metadata.json" in names and "reference_faces.safetensors" in names
    assert all(f.suffix in (".safetensors", ".json") for f in files)
    assert sum(f.stat().st_size for f in files) < 2 * 1024 * 1024


def test_components_are_frozen_and_in_eval_mode(components):
    modules = [components.classifier, components.detector, components.face_embedder, *components.image_embedders]
    for m in modules:
        assert not m.training
        assert not any(p.requires_grad for p in m.parameters())
    assert components.classifier.attributes == TRAITS


@torch.no_grad()
def test_classifier_reaches_97_percent_on_fresh_renders(components, fresh):
    images, traits, boxes = fresh
    clf = components.classifier
    logits = clf(face_crops(images, boxes, clf.input_size, components.crop_factor))
    for name in TRAITS:
        accuracy = (logits[name].argmax(1) == traits[name]).float().mean().item()
        assert accuracy >= 0.97, f"{name}: {accuracy:.3f}"


@torch.no_grad()
def test_classifier_through_detected_boxes(components, fresh):
    images, traits, _ = fresh
    detection = components.detector.detect(images)
    assert detection.found.all()
    clf = components.classifier
    # The crop path written out with faces.py directly, as the trainer does it.
    crops = crop_faces(images, expand_boxes(detection.boxes, components.crop_factor, (32, 32)), clf.input_size)
    logits = clf(crops)
    for name in TRAITS:
        assert (logits[name].argmax(1) == traits[name]).float().mean().item() >= 0.97


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a, b):
    w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    return w * h / (box_area(a) + box_area(b) - w * h)


@torch.no_grad()
def test_detector_finds_the_figure_and_not_empty_scenes(components, fresh):
    images, _, boxes = fresh
    detection = components.detector.detect(images)
    iou = box_iou(detection.boxes, boxes)
    assert iou.mean() >= 0.85 and (iou > 0.5).float().mean() >= 0.98
    assert (detection.scores[detection.found] >= 0.5).all()
    rng = np.random.default_rng(FRESH_SEED + 1)
    empty = render(random_traits(200, rng), rng, figure=False)
    none = components.detector.detect(torch.from_numpy(empty.images))
    assert none.found.float().mean() <= 0.02
    assert (none.boxes[~none.found] == 0).all() and (none.scores[~none.found] == 0).all()


def test_detector_rescales_boxes_for_larger_images(components, fresh):
    images, _, boxes = fresh
    big = F.interpolate(images[:50], scale_factor=2, mode="nearest")
    detection = components.detector.detect(big)
    assert box_iou(detection.boxes / 2, boxes[:50]).mean() >= 0.8


def _double(module):
    return copy.deepcopy(module).double()


@pytest.mark.parametrize("which", ["classifier", "face_embedder", "scene_embedder", "random_embedder"])
def test_models_are_differentiable_in_their_input(components, fresh, which):
    model = {
        "classifier": components.classifier,
        "face_embedder": components.face_embedder,
        "scene_embedder": components.image_embedders[0],
        "random_embedder": components.image_embedders[1],
    }[which]
    images = fresh[0][:2].double()
    if which in ("classifier", "face_embedder"):
        images = face_crops(images, fresh[2][:2].double(), model.input_size)
    model = _double(model)

    def fn(x):
        out = model(x)
        return torch.cat(list(out.values()), dim=1) if isinstance(out, dict) else out

    x = images.clone().requires_grad_(True)
    # Finite differences along random directions against autograd (fast_mode), in float64.
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-4, fast_mode=True)


def test_gradient_reaches_only_the_face_region(components, fresh):
    images = fresh[0][:4].clone().requires_grad_(True)
    detection = components.detector.detect(images)
    crops = face_crops(images, detection.boxes, components.classifier.input_size, components.crop_factor)
    logits = components.classifier(crops)
    sum(F.log_softmax(v, 1)[:, 0].sum() for v in logits.values()).backward()
    grad = images.grad.abs().sum(1)
    square = expand_boxes(detection.boxes, components.crop_factor, (32, 32))
    for i in range(4):
        x0, y0 = (square[i, :2].floor().int() - 1).clamp(min=0).tolist()
        x1, y1 = (square[i, 2:].ceil().int() + 1).tolist()
        inside = grad[i, y0:y1, x0:x1].sum()
        assert inside > 0 and torch.isclose(inside, grad[i].sum())


@torch.no_grad()
def test_scene_embedder_tracks_the_scene_not_the_traits(components):
    rng = np.random.default_rng(FRESH_SEED + 2)
    seed = int(rng.integers(1 << 30))
    a = render(random_traits(64, rng), seed)
    b = render(random_traits(64, rng), seed)  # the same scenes, other traits
    c = render(random_traits(64, rng), seed + 1)  # other scenes
    for embedder in components.image_embedders:
        ea, eb, ec = (embedder(torch.from_numpy(p.images)) for p in (a, b, c))
        same = F.cosine_similarity(ea, eb).mean()
        other = F.cosine_similarity(ea, ec).mean()
        assert same > other + 0.3, (type(embedder).__name__, float(same), float(other))


@torch.no_grad()
def test_reference_faces_prefer_clean_faces(components, fresh):
    images, _, boxes = fresh
    fe = components.face_embedder
    ref = F.normalize(components.reference_faces, dim=1)
    assert ref.shape[1] == fe(torch.rand(1, 3, fe.input_size, fe.input_size)).shape[1]
    assert set(components.reference_traits) == set(TRAITS)
    faces = face_crops(images[:100], boxes[:100], fe.input_size)
    noisy = (faces + 0.2 * torch.randn(faces.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    nearest_clean = (F.normalize(fe(faces), dim=1) @ ref.T).max(1).values
    nearest_noisy = (F.normalize(fe(noisy), dim=1) @ ref.T).max(1).values
    # The realism loss (1 - cos to the nearest reference) is small on clean faces, several times larger on noisy ones.
    assert (1 - nearest_clean).mean() < 0.05
    assert (1 - nearest_noisy).mean() > 5 * (1 - nearest_clean).mean()


# ------------------------------------------------------------------------------------------------
# Audit (with a stand-in pipeline that renders each word's skew)
# ------------------------------------------------------------------------------------------------
def test_per_word_correlation_matches_numpy():
    rng = np.random.default_rng(0)
    f = rng.dirichlet(np.ones(4), size=10)
    q = rng.dirichlet(np.ones(4), size=10)
    assert per_word_correlation(f, q) == pytest.approx(np.corrcoef(f.ravel(), q.ravel())[0, 1])
    f2, q2 = f[:, :2] / f[:, :2].sum(1, keepdims=True), q[:, :2] / q[:, :2].sum(1, keepdims=True)
    assert per_word_correlation(f2, q2) == pytest.approx(np.corrcoef(f2[:, 1], q2[:, 1])[0, 1])
    with pytest.raises(ValueError):
        per_word_correlation(f, q[:, :2])


class RenderingPipeline:
    """Quacks like a StableDiffusionPipeline: 'generates' renders with traits drawn from the word's skew."""

    class _Unet:
        class config:
            sample_size = 16
            in_channels = 4

        dtype = torch.float32

    def __init__(self):
        self.unet = self._Unet()
        self.device = torch.device("cpu")
        self.by_prompt = {world.prompt(w): w for w in world.words()}
        self.calls = 0

    def set_progress_bar_config(self, **kwargs):
        pass

    vae_scale_factor = 2

    def __call__(self, prompts, latents, guidance_scale, num_inference_steps, output_type, **kwargs):
        assert output_type == "pt" and len(prompts) == len(latents)
        word = self.by_prompt[prompts[0]]
        rng = np.random.default_rng([len(self.by_prompt), self.calls])
        self.calls += 1
        p = render(world.sample_traits(word, len(prompts), rng), rng)

        class Out:
            images = torch.from_numpy(p.images)

        return Out


def test_audit_recovers_the_skews_of_a_pipeline_that_follows_them(components):
    words = world.words("occupation", "test")[:8]
    result = audit_pipeline(RenderingPipeline(), words, 48, components, seed=0, batch_size=24)
    assert isinstance(result, AuditResult) and len(result.words) == 8
    for w in result.words:
        assert w.num_faces == 48
        for name in TRAITS:
            assert sum(w.freqs[name]) == pytest.approx(1)
            assert w.bias[name] == pytest.approx(float(bias_metric(torch.tensor(w.freqs[name]))))
    for name, s in result.summary.items():
        assert s.correlation > 0.85, (name, s.correlation)
        assert abs(s.mean_bias - s.mean_skew_bias) < 0.15
    assert "hair_length (gender)" in result.to_markdown()


def test_audit_draws_independent_noise_per_word_and_the_same_noise_per_seed(components):
    from diffusers_fair.evaluation.audit import noise_seed

    class RecordingPipeline(RenderingPipeline):
        def __init__(self):
            super().__init__()
            self.latents = {}

        def __call__(self, prompts, latents, **kwargs):
            self.latents.setdefault(prompts[0], []).append(latents.clone())
            return super().__call__(prompts, latents, **kwargs)

    words = world.words("occupation", "test")[:2]
    first, second = RecordingPipeline(), RecordingPipeline()
    audit_pipeline(first, words, 6, components, seed=3, batch_size=4)
    audit_pipeline(second, words, 6, components, seed=3, batch_size=6)
    prompts = [world.prompt(w) for w in words]
    noise = {p: torch.cat(first.latents[p]) for p in prompts}
    # Image i of a prompt starts from its own generator seeded by (seed, prompt, i), whatever the batch.
    for p in prompts:
        for i in range(6):
            expected = torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(noise_seed(3, p, i)))
            assert torch.equal(noise[p][i], expected)
        assert torch.equal(torch.cat(second.latents[p]), noise[p])
    assert not torch.allclose(noise[prompts[0]], noise[prompts[1]])


def test_audit_reads_the_same_frequencies_and_bias_as_the_general_audit(components):
    from diffusers_fair.evaluation.audit import evaluate

    words = world.words("occupation", "test")[:3]
    toy = audit_pipeline(RenderingPipeline(), words, 10, components, seed=1, batch_size=4)
    general = evaluate(RenderingPipeline(), [world.prompt(w) for w in words], components, images_per_prompt=10,
                       seed=1, batch_size=4, joints=[], num_samples=0, progress=False)
    for w, row in zip(toy.words, general.prompt_metrics()):
        assert w.prompt == row["prompt"]
        assert (w.num_images, w.num_faces) == (row["num_images"], row["num_faces"])
        for name in TRAITS:
            assert w.freqs[name] == row["freqs"][name]
            assert w.bias[name] == row["bias"][name]


def test_word_audit_counts_only_images_with_a_face():
    from diffusers_fair.evaluation.results import ImageReadout
    from diffusers_fair.toy.audit import word_audit

    word = world.words("occupation", "test")[0]
    found = torch.tensor([True, True, False, True, False])
    # Classes read per image, per trait; the images without a face read class 1 everywhere and must not count.
    read = {name: torch.tensor([0, len(classes) - 1, 1, 0, 1]) for name, classes in TRAITS.items()}
    probs = {name: F.one_hot(read[name], len(classes)).float() for name, classes in TRAITS.items()}
    readout = ImageReadout(found=found, boxes=torch.zeros(5, 4), scores=found.float(), probs=probs)
    audit = word_audit(word, world.prompt(word), readout)
    assert (audit.num_images, audit.num_faces) == (5, 3)
    for name, classes in TRAITS.items():
        expected = np.zeros(len(classes))
        expected[0], expected[-1] = 2 / 3, 1 / 3
        assert audit.freqs[name] == pytest.approx(expected.tolist())
        # bias(P): the mean over class pairs of |f_i - f_j|
        pairs = [abs(a - b) for i, a in enumerate(expected) for b in expected[i + 1:]]
        assert audit.bias[name] == pytest.approx(np.mean(pairs))
        assert audit.skew[name] == pytest.approx([word.traits[name][c] for c in classes])

    nobody = ImageReadout(found=torch.zeros(5, dtype=torch.bool), boxes=torch.zeros(5, 4), scores=torch.zeros(5),
                          probs={name: torch.zeros(5, len(c)) for name, c in TRAITS.items()})
    empty = word_audit(word, world.prompt(word), nobody)
    assert empty.num_faces == 0
    assert all(np.isnan(empty.freqs[name]).all() and np.isnan(empty.bias[name]) for name in TRAITS)


# ------------------------------------------------------------------------------------------------
# The shipped base model
# ------------------------------------------------------------------------------------------------
def shipped_pipeline():
    from diffusers_fair.toy import MODEL_DIR, model_path

    if not (Path(MODEL_DIR) / "model_index.json").exists():
        pytest.skip("the toy model is not shipped yet (diffusers_fair/toy/model)")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return shipped_pipeline()


def test_shipped_model_generates_with_a_stock_pipeline(pipe):
    gen = torch.Generator().manual_seed(0)
    out = pipe(["a photo of the face of a doctor, a person"] * 2, num_inference_steps=8, guidance_scale=4.0,
               generator=gen, output_type="pt").images
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert out.std() > 0.05


def test_shipped_model_is_biased_on_held_out_words_quick(pipe, components):
    # Eight held-out words, four images each, eight steps: a coarse but fast look (the slow test below is the real one).
    words = world.words("occupation", "test")[:8]
    result = audit_pipeline(pipe, words, 4, components, seed=0, guidance_scale=4.0, num_inference_steps=8, batch_size=4)
    slots = world.load_world()["slots"]
    assert result.summary[slots["gender"]].mean_bias >= 0.5
    assert np.mean([w.num_faces / w.num_images for w in result.words]) >= 0.9
    for slot in ("gender", "age"):  # the binary slots follow the skews even at this size
        assert result.summary[slots[slot]].correlation >= 0.5


@pytest.mark.slow
def test_shipped_model_follows_the_training_skews(pipe, components):
    # The audit of the documentation (docs/TOY_WORLD.md): all 20 held-out words, 32 images each.
    result = audit_pipeline(pipe, world.words("occupation", "test"), 32, components, seed=0,
                            guidance_scale=4.0, num_inference_steps=15, batch_size=32)
    slots = world.load_world()["slots"]
    assert result.summary[slots["gender"]].mean_bias >= 0.5
    # The gate for a base model: every slot follows its per-word skews (0.958 / 0.937 / 0.974 measured).
    for s in result.summary.values():
        assert s.correlation >= 0.9


def test_base_training_weights_the_face_box():
    from diffusers_fair.toy.train_base import face_weights

    portraits = render(random_traits(4, np.random.default_rng(0)), np.random.default_rng(1))
    weights = face_weights(portraits.boxes, 16, 3.0)
    assert weights.shape == (4, 1, 16, 16)
    torch.testing.assert_close(weights.mean(dim=(1, 2, 3)), torch.ones(4))
    for n, (x0, y0, x1, y1) in enumerate(portraits.boxes):
        for i in range(16):
            for j in range(16):  # latent cell (i, j) covers image pixels [2j, 2j + 2) x [2i, 2i + 2)
                inside = x0 <= 2 * j + 1 <= x1 and y0 <= 2 * i + 1 <= y1
                assert (weights[n, 0, i, j] > weights[n, 0].min()) == inside
        inside = weights[n, 0] > weights[n, 0].min()
        assert weights[n, 0][inside].max() / weights[n, 0].min() == pytest.approx(4.0)
    torch.testing.assert_close(face_weights(portraits.boxes, 16, 0.0), torch.ones(4, 1, 16, 16))


def test_trait_head_loss_is_the_sum_of_per_trait_cross_entropies_and_is_smallest_at_the_word_distribution():
    from diffusers_fair.toy.train_base import make_trait_head, trait_head_loss

    head = make_trait_head()
    assert head.out_features == sum(len(c) for c in TRAITS.values()) == 8
    rng = np.random.default_rng(0)
    traits = {t: rng.integers(len(c), size=6) for t, c in TRAITS.items()}
    logits = torch.randn(6, 8, dtype=torch.float64)
    expected, start = 0.0, 0
    for t, classes in TRAITS.items():
        log_p = logits[:, start : start + len(classes)].log_softmax(-1)
        expected += -np.mean([log_p[i, traits[t][i]].item() for i in range(6)])
        start += len(classes)
    assert trait_head_loss(logits, traits).item() == pytest.approx(expected, rel=1e-12)

    # Ten images of one word (one prompt, so one row of logits for all): the loss is lowest when the
    # softmax equals the word's distribution.
    probs = {"hair_length": [0.8, 0.2], "skin_tone": [0.1, 0.6, 0.2, 0.1], "hair_colour": [0.7, 0.3]}
    drawn = {t: np.repeat(np.arange(len(p)), np.round(np.array(p) * 10).astype(int)) for t, p in probs.items()}
    exact = torch.log(torch.tensor([x for p in probs.values() for x in p], dtype=torch.float64)).expand(10, 8)
    best = trait_head_loss(exact, drawn).item()
    for _ in range(20):
        assert trait_head_loss(exact + 0.3 * torch.randn(1, 8, dtype=torch.float64), drawn).item() > best


def test_base_training_continues_from_a_pipeline_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffusers_fair.toy import model_path
    from diffusers_fair.toy.train_base import main

    out = tmp_path / "run"
    main(["--out", str(out), "--init-from", str(model_path()), "--steps", "1", "--batch", "4",
          "--trait-head-weight", "0.1", "--checkpoint-every", "1"])
    assert json.loads((out / "state.json").read_text()) == {"step": 1}
    state = safetensors.torch.load_file(out / "state.safetensors")
    assert {k.split(".")[0] for k in state} == {"unet", "text", "ema_unet", "ema_text", "head"}
    shipped = safetensors.torch.load_file(Path(model_path()) / "unet" / "diffusion_pytorch_model.safetensors")
    name = next(iter(shipped))
    # One optimizer step at a warm-up learning rate moves the weights a little from the shipped ones.
    assert not torch.equal(state["unet." + name], shipped[name])
    torch.testing.assert_close(state["unet." + name], shipped[name], atol=1e-3, rtol=0)
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert pipe.vae.config.scaling_factor == pytest.approx(
        json.loads((Path(model_path()) / "vae" / "config.json").read_text())["scaling_factor"])
