"""Audits: counts, bias and summaries against hand-computed values; seeded noise; resume; the toy model end to end.

The end-to-end checks regenerate the images and read them again by hand (the pipeline with the same
latents, the toy detector and classifier) and compare with what ``evaluate`` reports.
"""

import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffusers_fair._utils.io import read_prompts
from diffusers_fair.evaluation.audit import (
    PromptCache,
    clip_text_embedder,
    evaluate,
    generate,
    initial_noise,
    latent_shape,
    read_faces,
)
from diffusers_fair.evaluation.metrics import (
    bias_floor,
    bias_metric,
    class_counts,
    joint_classes,
    joint_counts,
)
from diffusers_fair.evaluation.report import short_labels, write_report
from diffusers_fair.evaluation.results import EvalResult, ImageReadout, PromptResult


REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of the face of a banker, a person", "a photo of the face of a welder, a person",
           "a photo of the face of a judge, a person"]
ATTRIBUTES = {"gender": ["male", "female"], "race": ["a", "b", "c"]}


def one_hot_probs(classes, num_classes):
    """Probabilities whose argmax is ``classes`` (not one-hot, to exercise the argmax)."""
    probs = torch.full((len(classes), num_classes), 0.1 / num_classes)
    probs[torch.arange(len(classes)), torch.tensor(classes)] += 0.9
    return probs


def readout(gender, race, found, clip_t=None):
    found = torch.tensor(found, dtype=torch.bool)
    return ImageReadout(found=found, boxes=torch.zeros(len(found), 4), scores=found.float(),
                        probs={"gender": one_hot_probs(gender, 2), "race": one_hot_probs(race, 3)},
                        clip_t=None if clip_t is None else torch.tensor(clip_t))


# --------------------------------------------------------------------------- counting and metrics
def test_class_and_joint_counts_by_hand():
    gender = one_hot_probs([0, 0, 1, 1, 0], 2)
    race = one_hot_probs([2, 0, 2, 1, 1], 3)
    found = torch.tensor([True, True, True, True, False])  # the last image has no face
    assert class_counts(gender, found).tolist() == [2, 2]
    assert class_counts(race, found).tolist() == [1, 1, 2]
    # cells male/a, male/b, male/c, female/a, female/b, female/c
    assert joint_counts([gender, race], found).tolist() == [1, 0, 1, 0, 1, 1]
    assert joint_classes(ATTRIBUTES, ["gender", "race"]) == ["male/a", "male/b", "male/c", "female/a", "female/b", "female/c"]
    assert joint_counts([gender, race], torch.zeros(5, dtype=torch.bool)).tolist() == [0] * 6


def test_prompt_metrics_by_hand():
    groups = {"gender": ATTRIBUTES["gender"], "race": ATTRIBUTES["race"],
              "gender x race": joint_classes(ATTRIBUTES, ["gender", "race"])}
    r = readout([0, 0, 0, 1, 1], [0, 0, 1, 1, 2], [True, True, True, True, False], clip_t=[0.2, 0.3, 0.4, 0.5, 0.6])
    m = r.metrics(groups)
    assert (m["num_images"], m["num_faces"], m["no_face_share"]) == (5, 4, pytest.approx(0.2))
    assert m["counts"]["gender"] == [3, 1] and m["freqs"]["gender"] == [0.75, 0.25]
    assert m["bias"]["gender"] == pytest.approx(0.5)
    assert m["counts"]["race"] == [2, 2, 0]
    assert m["bias"]["race"] == pytest.approx((0 + 0.5 + 0.5) / 3)  # |.5-.5|, |.5-0|, |.5-0|
    # cells: male/a 2, male/b 1, female/b 1 (the female/c image has no face)
    assert m["counts"]["gender x race"] == [2, 1, 0, 0, 1, 0]
    f = [0.5, 0.25, 0, 0, 0.25, 0]
    assert m["bias"]["gender x race"] == pytest.approx(sum(abs(a - b) for a, b in itertools.combinations(f, 2)) / 15)
    assert m["clip_t"] == pytest.approx(0.4)


def test_summary_and_flat_metrics_by_hand():
    prompts = [
        PromptResult(0, "p0", readout([0, 0, 0, 0], [0, 1, 2, 0], [True] * 4, [0.1] * 4), similarity={"clip": torch.tensor([0.9] * 4)}),
        PromptResult(1, "p1", readout([0, 1, 0, 1], [0, 0, 0, 0], [True, True, False, False], [0.3] * 4), similarity={"clip": torch.tensor([0.7] * 4)}),
        PromptResult(2, "p2", readout([0, 1, 0, 1], [0, 0, 0, 0], [False] * 4, [0.5] * 4), similarity={"clip": torch.tensor([0.5] * 4)}),
    ]
    result = EvalResult(prompts, ATTRIBUTES, [("gender", "race")], {})
    s = result.summary()
    # prompt 2 has no face: left out of bias and frequencies, counted in the no-face share
    assert s["no_face_share"] == pytest.approx(6 / 12)
    g = s["groups"]["gender"]
    assert g["prompts_counted"] == 2
    assert (g["bias_mean"], g["bias_std"]) == (pytest.approx(0.5), pytest.approx(0.5))  # biases 1 and 0
    assert g["freqs"] == pytest.approx([0.75, 0.25])  # mean of (1, 0) and (0.5, 0.5)
    race_bias = [float(bias_metric([2, 1, 1])), float(bias_metric([2, 0, 0]))]
    assert s["groups"]["race"]["bias_mean"] == pytest.approx(statistics.fmean(race_bias))
    assert s["groups"]["race"]["bias_std"] == pytest.approx(statistics.pstdev(race_bias))
    assert s["groups"]["gender x race"]["classes"][3] == "female/a"
    assert s["clip_t"]["mean"] == pytest.approx(0.3) and s["clip_t"]["std"] == pytest.approx(statistics.pstdev([0.1, 0.3, 0.5]))
    assert s["similarity"]["clip"]["mean"] == pytest.approx(0.7)
    metrics = result.metrics()
    assert metrics["bias_gender"] == pytest.approx(0.5) and metrics["freq_gender_female"] == pytest.approx(0.25)
    assert "bias_gender_x_race" in metrics and metrics["clip_i"] == pytest.approx(0.7) and metrics["no_face_share"] == 0.5
    rows = result.prompt_metrics()
    assert rows[2]["bias"]["gender"] is None and rows[2]["freqs"]["gender"] == [None, None]
    json.dumps(result.to_dict(), allow_nan=False)  # strict JSON: missing values are null, not NaN
    with pytest.raises(ValueError, match="no reference"):
        result.summary("reference")


def test_bias_floor_matches_the_binomial():
    for n in (2, 8):
        exact = sum(math.comb(n, k) / 2**n * abs(2 * k / n - 1) for k in range(n + 1))
        assert bias_floor(2, n) == pytest.approx(exact, abs=0.01)
    assert bias_floor(4, 1) == pytest.approx(0.5)  # one image: always one class of four, bias 2/K


# --------------------------------------------------------------------------- seeded noise
NOISE_SCRIPT = """
import sys
from safetensors.torch import save_file
from diffusers_fair.evaluation.audit import initial_noise
save_file({"noise": initial_noise(7, "a photo of a judge", 3, (4, 8, 8))}, sys.argv[1])
"""


def test_noise_is_identical_across_processes(tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", NOISE_SCRIPT, str(tmp_path / "noise.safetensors")], env=env, check=True, timeout=120)
    other = load_file(str(tmp_path / "noise.safetensors"))["noise"]
    here = initial_noise(7, "a photo of a judge", 3, (4, 8, 8))
    assert torch.equal(other, here)


def test_noise_depends_on_seed_prompt_and_index_only():
    noise = initial_noise(0, "p", 4, (2, 3, 3))
    assert torch.equal(initial_noise(0, "p", 2, (2, 3, 3), start=2), noise[2:])  # independent of the count
    assert not torch.equal(noise[0], noise[1])
    assert not torch.equal(initial_noise(1, "p", 1, (2, 3, 3))[0], noise[0])
    assert not torch.equal(initial_noise(0, "q", 1, (2, 3, 3))[0], noise[0])


# --------------------------------------------------------------------------- faces with stub models
class StubDetector:
    def __init__(self, found):
        self.found = torch.tensor(found)

    def detect(self, images):
        from diffusers_fair.components.base import FaceDetection

        n = images.shape[0]
        boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0]]).repeat(n, 1)
        return FaceDetection(boxes=boxes, found=self.found[:n], scores=self.found[:n].float())


class BrightnessClassifier(torch.nn.Module):
    """'bright' when the crop's mean is above 0.5."""

    attributes = {"light": ["dark", "bright"]}
    input_size = 4

    def forward(self, faces):
        mean = faces.mean(dim=(1, 2, 3))
        return {"light": torch.stack([0.5 - mean, mean - 0.5], dim=1) * 20}


def test_read_faces_classifies_the_face_crop_only():
    images = torch.zeros(3, 3, 32, 32)
    images[0, :, 8:24, 8:24] = 1  # bright face, dark background
    images[1, :, :, :] = 1
    images[1, :, 8:24, 8:24] = 0  # dark face, bright background
    r = read_faces(images, type("C", (), {"classifier": BrightnessClassifier(), "detector": StubDetector([True, True, False])})())
    assert r.found.tolist() == [True, True, False]
    assert r.probs["light"].argmax(1)[:2].tolist() == [1, 0]
    assert r.probs["light"][2].tolist() == [0, 0]  # no face: a zero row
    assert r.probs["light"][:2].sum(1).tolist() == pytest.approx([1, 1])


def test_bad_input_raises():
    components = type("C", (), {"classifier": BrightnessClassifier(), "detector": StubDetector([True])})()
    kwargs = dict(images_per_prompt=1)
    for prompts, extra, message in [
        (["a", "a"], {}, "duplicate"),
        ("a", {}, "non-empty list"),
        (["a"], {"joints": [("light", "size")]}, "joint"),
        (["a"], {"text_embedder": lambda p: torch.zeros(len(p), 2)}, "CLIP-T"),
        (["a"], {"images_per_prompt": 0}, "positive"),
        (["a"], {"reference_images": {}}, "reference_images"),
    ]:
        with pytest.raises(ValueError, match=message):
            evaluate(None, prompts, components, **{**kwargs, **extra})


# --------------------------------------------------------------------------- the toy model end to end
@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import StableDiffusionPipeline

    from diffusers_fair import toy

    return StableDiffusionPipeline.from_pretrained(toy.model_path())


@pytest.fixture(scope="module")
def toy_components():
    from diffusers_fair.toy.components import load_toy_components

    return load_toy_components()


class CountingPipe:
    """Wraps a pipeline and records the prompt of every call."""

    def __init__(self, pipe):
        self.__dict__.update(pipe=pipe, calls=[])

    def __call__(self, prompt, **kwargs):
        self.calls.append(prompt[0])
        return self.pipe(prompt, **kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


SETTINGS = dict(images_per_prompt=4, seed=3, batch_size=8, guidance_scale=4.0, num_inference_steps=3, progress=False)


def test_toy_end_to_end_matches_a_hand_audit(toy_pipe, toy_components, tmp_path):
    from diffusers_fair.toy.components import face_crops

    scene, features = toy_components.image_embedders
    text = {p: torch.randn(96, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(PROMPTS[:2])}
    result = evaluate(toy_pipe, PROMPTS[:2], toy_components, **SETTINGS, reference_pipe=toy_pipe, num_samples=2,
                      text_embedder=lambda prompts: torch.stack([text[p] for p in prompts]),
                      image_embedders={"clip": scene, "dino": features}, joints=[("hair_length", "skin_tone")])
    for p, prompt in zip(result.prompts, PROMPTS[:2]):
        # by hand: the same latents, the toy detector and classifier
        noise = initial_noise(3, prompt, 4, (4, 16, 16))
        images = toy_pipe([prompt] * 4, latents=noise, guidance_scale=4.0, num_inference_steps=3, output_type="pt").images
        detection = toy_components.detector.detect(images)
        logits = toy_components.classifier(face_crops(images, detection.boxes, 24)[detection.found])
        assert torch.equal(p.model.found, detection.found)
        for name, classes in toy_components.classifier.attributes.items():
            expected = torch.bincount(logits[name].argmax(1), minlength=len(classes))
            assert class_counts(p.model.probs[name], p.model.found).tolist() == expected.tolist()
        cos = F.cosine_similarity(scene(images), text[prompt][None], dim=1)
        assert p.model.clip_t.tolist() == pytest.approx(cos.tolist(), abs=1e-5)
        # the reference ran on the same noise: identical images, identical readout
        assert p.similarity["clip"].tolist() == pytest.approx([1.0] * 4, abs=1e-5)
        assert torch.equal(p.reference.found, p.model.found) and torch.equal(p.samples, p.reference_samples)
        assert p.samples.shape == (2, 3, 32, 32) and p.samples.dtype == torch.uint8
    assert result.metrics("model") == pytest.approx(result.metrics("reference") | {"clip_i": 1.0, "dino": 1.0}, abs=1e-5)
    paths = write_report(result, tmp_path)
    saved = json.loads(paths["results"].read_text())
    assert saved["summary"]["model"]["groups"]["hair_length"]["bias_mean"] == pytest.approx(result.summary()["groups"]["hair_length"]["bias_mean"])
    report = paths["report"].read_text()
    assert "| bias hair_length x skin_tone |" in report and "CLIP-I" in report and "welder" in report
    assert paths["overall"].exists() and (tmp_path / "grids" / "grid_00.png").exists()


def test_resume_reuses_finished_prompts(toy_pipe, toy_components, tmp_path):
    first = CountingPipe(toy_pipe)
    done = evaluate(first, PROMPTS[:2], toy_components, **SETTINGS, out_dir=tmp_path)
    assert first.calls == PROMPTS[:2]
    # an interrupted prompt left no JSON record: it is recomputed, not read half-written
    (tmp_path / "prompts" / "stray.safetensors.tmp").write_bytes(b"")
    second = CountingPipe(toy_pipe)
    resumed = evaluate(second, PROMPTS[:3], toy_components, **SETTINGS, out_dir=tmp_path)
    assert second.calls == [PROMPTS[2]]  # the first two were read back, not generated
    for a, b in zip(done.prompts, resumed.prompts):
        assert torch.equal(a.model.found, b.model.found) and torch.equal(a.samples, b.samples)
        assert all(torch.equal(a.model.probs[k], b.model.probs[k]) for k in a.model.probs)
    assert [p.index for p in resumed.prompts] == [0, 1, 2]
    with pytest.raises(ValueError, match="num_inference_steps"):
        evaluate(second, PROMPTS[:1], toy_components, **{**SETTINGS, "num_inference_steps": 4}, out_dir=tmp_path)
    # a truncated or corrupt cached file is named, with the fix
    key = PromptCache.key(PROMPTS[1])
    tensors = tmp_path / "prompts" / f"{key}.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"cached prompt .*{key}.safetensors.*; remove it to compute that prompt"):
        evaluate(second, PROMPTS[:2], toy_components, **SETTINGS, out_dir=tmp_path)
    (tmp_path / "prompts" / f"{key}.json").write_text('{"prompt": ')
    with pytest.raises(ValueError, match=f"{key}.json is not valid JSON.*; remove it to compute that prompt"):
        evaluate(second, PROMPTS[:2], toy_components, **SETTINGS, out_dir=tmp_path)


def test_cli_eval_with_an_adaptor_writes_the_report(toy_pipe, tmp_path):
    from diffusers_fair.cli import main
    from helpers.adaptors import save_random_adaptor

    save_random_adaptor(tmp_path / "adaptor", toy_pipe, seed=1, name="toy-test")
    (tmp_path / "prompts.txt").write_text("# two toy prompts\n" + "\n".join(PROMPTS[:2]) + "\n\n")
    code = main(["eval", "--model", "toy", "--adaptor", str(tmp_path / "adaptor"), "--prompts", str(tmp_path / "prompts.txt"),
                 "--images-per-prompt", "2", "--steps", "2", "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu",
                 "--joint", "hair_length,skin_tone"])
    assert code == 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["settings"]["model"]["adaptors"][0]["source"].endswith("adaptor")
    assert saved["settings"]["reference"]["adaptors"] == [] and saved["settings"]["num_inference_steps"] == 2
    assert set(saved["summary"]) == {"model", "reference"} and "dino" in saved["metrics"]["model"]
    assert list(saved["groups"]) == ["hair_length", "skin_tone", "hair_colour", "hair_length x skin_tone"]
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "charts" / "prompts_hair_length_x_skin_tone.png").exists()


def test_generation_pads_prompts_as_the_loaded_adaptors_were_trained(tmp_path):
    from diffusers_fair.adaptors.pipeline import FairFinetunePipeline, load_fair_adaptor
    from helpers.adaptors import save_random_adaptor, tiny_pipeline

    prompt, negative = "a photo of the face of a doctor", "a smiling person"
    save_random_adaptor(tmp_path / "natural", tiny_pipeline(0), seed=1, name="natural",
                        training={"prompt_padding": "natural"})
    save_random_adaptor(tmp_path / "unrecorded", tiny_pipeline(0), seed=1, name="unrecorded")  # the same weights
    stock, fair, unrecorded = tiny_pipeline(0), tiny_pipeline(0, cls=FairFinetunePipeline), tiny_pipeline(0)
    load_fair_adaptor(stock, tmp_path / "natural")
    load_fair_adaptor(fair, tmp_path / "natural")
    load_fair_adaptor(unrecorded, tmp_path / "unrecorded")
    noise = initial_noise(0, prompt, 3, latent_shape(stock))
    settings = dict(guidance_scale=4.0, num_inference_steps=3, batch_size=3, negative_prompt=negative)
    common = dict(latents=noise, height=32, width=32, guidance_scale=4.0, num_inference_steps=3, output_type="pt")

    # By hand: both texts padded to the longer natural length, with their attention masks.
    tokenizer = stock.tokenizer
    length = max(len(tokenizer(prompt).input_ids), len(tokenizer(negative).input_ids))
    assert length < tokenizer.model_max_length

    def encoded(text):
        tokens = tokenizer(text, padding="max_length", max_length=length, return_tensors="pt")
        with torch.no_grad():
            return stock.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0].repeat(3, 1, 1)

    by_hand = stock(prompt_embeds=encoded(prompt), negative_prompt_embeds=encoded(negative), **common).images.float()
    images = generate(stock, prompt, noise, **settings)
    assert torch.equal(images, by_hand)
    assert torch.equal(generate(fair, prompt, noise, **settings), images)  # FairFinetunePipeline pads itself
    # An adaptor that records no padding was trained with the stock pipeline's: generation is the stock call.
    padded = generate(unrecorded, prompt, noise, **settings)
    assert torch.equal(padded, unrecorded([prompt] * 3, negative_prompt=[negative] * 3, **common).images.float())
    assert not torch.allclose(images, padded, atol=1e-3)


# --------------------------------------------------------------------------- helpers
def test_read_prompts_and_labels(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\n\n  a photo of a judge \nb\n")
    assert read_prompts(tmp_path / "p.txt") == ["a photo of a judge", "b"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    assert short_labels(PROMPTS) == ["banker", "welder", "judge"]
    assert short_labels(["only one prompt"]) == ["only one prompt"]
    assert len(read_prompts(REPO / "examples" / "prompts" / "occupations_test.txt")) == 50
    assert len(read_prompts(REPO / "examples" / "prompts" / "toy_audit50.txt")) == 50


def test_clip_text_embedder_is_encode_text(tmp_path):
    import open_clip

    from diffusers_fair.components.clip import OpenCLIPImageEmbedder

    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "diffusers-fair-eval-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "diffusers-fair-eval-tiny-clip.json")
    torch.manual_seed(0)
    embedder = OpenCLIPImageEmbedder.from_pretrained("diffusers-fair-eval-tiny-clip", pretrained=None)
    tokenizer = open_clip.get_tokenizer("diffusers-fair-eval-tiny-clip")
    embed = clip_text_embedder(embedder, tokenizer)
    out = embed(["a photo of a judge", "a dog"])
    with torch.no_grad():
        expected = embedder.model.encode_text(tokenizer(["a photo of a judge", "a dog"]))
    assert out.shape == (2, 16) and torch.allclose(out, expected)
