"""The Stable Diffusion 1.5 configuration end to end, on tiny random-weight models, nothing downloaded.

Every model of the configuration is a tiny random-weight version of the real architecture: the
U-Net, VAE, CLIP text encoder and tokenizer of a ``StableDiffusionPipeline`` (from
``test_trainer.tiny_pipeline``, with a VAE that upsamples 8x as SD's does and SD 1.5's scheduler
config), an open_clip CLIP and a ``Dinov2Model`` (from ``test_components_real``), MobileNetV3
FairFace heads, a ResNet face embedder and a reference-face set. They are written to files and
loaded by ``load_sd15_components`` through the same code paths as the real ones. The face detector
is the real MediaPipe BlazeFace.

Faces. A random U-Net and VAE draw no faces, and MediaPipe finds none in their images, so the
DAL and face-realism losses would never run. ``BackdropVAE`` makes faces appear honestly: it is a
stock ``AutoencoderKL`` whose decoded image is blended with a photograph,
``decoded = 0.15 * decoder(z) + 0.85 * photo``, the photo being the astronaut's head from
scikit-image's ``data.astronaut()`` (inside its wheel). The face is therefore in the grad-carrying
image batch that the trainer decodes from ``z_0``: MediaPipe finds it there (above its 0.7
confidence threshold), the crops taken from that batch carry gradients through
``0.15 * decoder(z)`` back to the U-Net and the text encoder, and the classifier, DAL and
face-realism loss all run on it. (The random classifier's batch-norm statistics are measured on a
few images, see ``random_classifier``, so that its probabilities differ between faces.) A second
run with a plain random VAE covers images without faces (only the image-semantics loss applies).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler
from diffusers.models.autoencoders.vae import DecoderOutput
from safetensors.torch import save_file

from diffusers_fair._utils.io import read_prompts
from diffusers_fair.adaptors.format import read_fair_adaptor
from diffusers_fair.adaptors.pipeline import load_fair_adaptor
from diffusers_fair.cli import main
from diffusers_fair.components.classifiers import (
    FAIRFACE_ATTRIBUTES,
    MobileNetAttributeClassifier,
)
from diffusers_fair.components.clip import CLIPZeroShotClassifier, OpenCLIPImageEmbedder
from diffusers_fair.components.dinov2 import DINOv2ImageEmbedder
from diffusers_fair.components.face_embedder import (
    ReferenceFaceSet,
    TorchvisionFaceEmbedder,
)
from diffusers_fair.components.mediapipe_detector import MediaPipeFaceDetector
from diffusers_fair.components.stable_diffusion import (
    ClassifierSettings,
    SD15Components,
    SD15ComponentSettings,
    load_sd15_components,
)
from diffusers_fair.method.targets import TargetDistribution
from diffusers_fair.training.experiment import (
    adaptor_folder,
    parse_override,
    read_config_file,
    read_experiment,
    train_experiment,
)
from helpers.components import TINY_CLIP, dinov2_processors, head, to_tensor
from helpers.training import tiny_training_pipeline


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
PAPER_EXPERIMENTS = ["gender", "gender_race", "gender_race_age", "multi_concept", "race", "soft_tokens_gender"]
IMAGE_SIZE = 64  # the tiny pipeline's 8x8 latents, decoded 8x as SD's VAE does
PHOTO_OPACITY = 0.85
# Stable Diffusion 1.5's scheduler config (the trainer builds its DPM-Solver++ from it).
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
TINY_TRAINING = dict(num_iterations=2, images_per_prompt=4, micro_batch_size=4, min_inference_steps=2,
                     max_inference_steps=3, mixed_precision="no", text_encoder_lora_rank=4, learning_rate=1e-2,
                     gradient_checkpointing=False, log_with="none", sample_every=0, checkpoint_every=0, progress=False)


@pytest.fixture
def in_repo(monkeypatch):
    """Config paths are relative to the current folder; the shipped configs to the repository root."""
    monkeypatch.chdir(ROOT)


# --------------------------------------------------------------------------- tiny models and their files
class BackdropVAE(AutoencoderKL):
    """A stock AutoencoderKL whose decoded images are blended with a fixed photograph (see the module doc)."""

    def set_backdrop(self, photo: torch.Tensor, opacity: float) -> None:
        self.register_buffer("backdrop", photo * 2 - 1)  # (1, 3, H, W) in the decoder's [-1, 1] range
        self.opacity = opacity

    def decode(self, z, return_dict: bool = True, **kwargs):
        sample = super().decode(z, return_dict=True, **kwargs).sample
        sample = (1 - self.opacity) * sample + self.opacity * self.backdrop.to(sample.dtype)
        return DecoderOutput(sample=sample) if return_dict else (sample,)


def tiny_sd15_pipeline(photo: torch.Tensor | None, seed: int = 0):
    """``test_trainer``'s tiny pipeline with an 8x VAE (64x64 images) and SD 1.5's scheduler config."""
    pipe = tiny_training_pipeline(seed)
    torch.manual_seed(seed + 1)
    vae_class = AutoencoderKL if photo is None else BackdropVAE
    vae = vae_class(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                    layers_per_block=1, sample_size=IMAGE_SIZE)
    if photo is not None:
        vae.set_backdrop(photo, PHOTO_OPACITY)
    pipe.register_modules(vae=vae, scheduler=PNDMScheduler(**SD15_SCHEDULER))
    return pipe


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return to_tensor(head(data.astronaut(), IMAGE_SIZE))


def random_classifier(seed: int, photo: torch.Tensor) -> MobileNetAttributeClassifier:
    """Random MobileNetV3 FairFace heads whose batch-norm statistics are measured on images.

    With the default statistics (mean 0, variance 1) a random MobileNetV3's activations vanish in
    eval mode (features ~1e-10): every face gets the same logits, and the dynamic targets of equal
    probabilities are never confident. As a trained network's would be, the statistics here are
    averaged over a batch of noise and a batch of photos of varied brightness, after which the
    probabilities differ a little from face to face, as the method needs.
    """
    torch.manual_seed(seed)
    model = MobileNetAttributeClassifier(FAIRFACE_ATTRIBUTES, input_size=IMAGE_SIZE)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches below
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model(torch.rand(16, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator))
        model(photo.repeat(8, 1, 1, 1) * (0.7 + 0.6 * torch.rand(8, 3, 1, 1, generator=generator)))
    return model.eval()


@pytest.fixture(scope="module")
def component_files(tmp_path_factory, tiny_clip, tiny_dinov2, photo):  # noqa: F811
    """Tiny random-weight versions of every component model, written as the loader reads them."""
    folder = tmp_path_factory.mktemp("sd15_components")
    files = {"clip": folder / "clip.safetensors", "dinov2": folder / "dinov2", "classifier": folder / "classifier.safetensors",
             "eval_classifier": folder / "eval_classifier.safetensors", "face_embedder": folder / "face_embedder.safetensors",
             "reference_faces": folder / "reference_faces.safetensors"}
    save_file({k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}, str(files["clip"]))
    tiny_dinov2.save_pretrained(files["dinov2"])
    dinov2_processors()[0].save_pretrained(files["dinov2"])
    for seed, name in [(1, "classifier"), (2, "eval_classifier")]:
        random_classifier(seed, photo).save_safetensors(str(files[name]))
    torch.manual_seed(3)
    TorchvisionFaceEmbedder(embedding_dim=16, input_size=48).save_safetensors(str(files["face_embedder"]))
    ReferenceFaceSet(torch.randn(12, 16, generator=torch.Generator().manual_seed(4))).save(str(files["reference_faces"]))
    return files


def tiny_settings(files, **changes) -> dict:
    """The ``components`` section of a config naming the tiny models."""
    settings = {"clip_model": TINY_CLIP, "clip_pretrained": str(files["clip"]), "dinov2": str(files["dinov2"]),
                "classifier": {"kind": "mobilenet", "path": str(files["classifier"])},
                "eval_classifier": {"kind": "mobilenet", "path": str(files["eval_classifier"])},
                "face_embedder": str(files["face_embedder"]), "reference_faces": str(files["reference_faces"])}
    settings.update(changes)
    return settings


def smoke_config(tmp_path, files, base: str = "gender") -> Path:
    """A shipped config, as JSON, with the tiny components and a 2-iteration, 4-image, float32 training run."""
    data = read_config_file(CONFIGS / f"{base}.yaml")
    data["components"] = tiny_settings(files)
    data["training"].update(TINY_TRAINING, output_dir=str(tmp_path / "run"))
    path = tmp_path / f"{base}-smoke.json"
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------- the shipped configs
def test_the_paper_experiments_are_shipped():
    sd15 = [p.stem for p in CONFIGS.glob("*.yaml") if not p.stem.startswith(("toy_", "sdxl_"))]
    assert sorted(sd15) == PAPER_EXPERIMENTS


@pytest.mark.parametrize("name", PAPER_EXPERIMENTS)
def test_every_shipped_config_dry_runs(in_repo, name, capsys):
    assert main(["train", str(CONFIGS / f"{name}.yaml"), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["training"]["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    plan = captured.err
    assert "base model: stable-diffusion-v1-5/stable-diffusion-v1-5" in plan
    # The user-provided weights are listed; the evaluation classifier is not the training one.
    assert "to provide: classifier weights/fairface_mobilenet.safetensors" in plan
    assert "--classifier weights/fairface_mobilenet_eval.safetensors" in plan


def test_shipped_configs_encode_the_papers_settings(in_repo):
    read = {name: read_experiment(CONFIGS / f"{name}.yaml") for name in PAPER_EXPERIMENTS}
    gender = TargetDistribution.parse("gender: male, female")
    race = TargetDistribution.parse("race: wmelh, asian, black, indian")
    age = TargetDistribution.parse("age: young=0.75, old=0.25")
    assert read["gender"].targets == [gender]
    assert read["race"].targets == [race]
    assert read["gender_race"].targets == read["multi_concept"].targets == [gender * race]
    (joint,) = read["gender_race_age"].targets
    assert joint.num_classes == 16 and joint == gender * race * age
    assert joint.marginal("age").prob("old") == pytest.approx(0.25)
    for name, experiment in read.items():
        c = experiment.config
        assert c.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
        assert (c.learning_rate, c.ema_decay, c.guidance_scale, c.mixed_precision) == (5e-5, 0.996, 7.5, "fp16")
        assert (c.min_inference_steps, c.max_inference_steps, c.sampler) == (19, 23, "dpmsolver++")
        assert 24 <= c.images_per_prompt <= 40 and 10000 <= c.num_iterations <= 15000
        assert experiment.components.classifier.path != experiment.components.eval_classifier.path
        lora = (c.train_text_encoder_lora, c.text_encoder_lora_rank, c.train_unet_lora, c.num_soft_tokens)
        assert lora == ((False, 50, False, 5) if name == "soft_tokens_gender" else (True, 50, False, 0))
        has_race = any("race" in t.attributes for t in experiment.targets)
        assert c.weight_loss_face == (0.1 if has_race else 1.0)
        assert c.attribute_change_factors.get("race") == (0.6 if has_race else None)
    assert read["gender_race_age"].config.attribute_change_factors == {"race": 0.6, "age": 0.6}
    # Multi-concept: four prompt sets drawn equally often, the small ones oversampled relative to their size.
    sets = read["multi_concept"].prompt_sets
    assert [s.name for s in sets] == ["occupations", "occupations with style and context", "sports", "personal descriptors"]
    shares = [s.weight / sum(x.weight for x in sets) for s in sets]
    sizes = [len(s.prompts) / sum(len(x.prompts) for x in sets) for s in sets]
    assert shares == [0.25] * 4
    assert shares[0] < sizes[0] and all(share > size for share, size in zip(shares[1:], sizes[1:]))
    # No training prompt is an evaluation prompt.
    test_prompts = set(read_prompts(ROOT / "examples" / "prompts" / "occupations_test.txt"))
    assert all(not test_prompts & set(s.prompts) for e in read.values() for s in e.prompt_sets)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(targets=["gender: female, male"]), "same names in the same order"),
    (lambda d: d.update(targets=["glasses: yes, no"]), "not predicted by components.classifier"),
    (lambda d: d.update(prompts="examples/prompts/nowhere.json"), "prompt set file examples/prompts/nowhere.json does not exist"),
    (lambda d: d.update(prompts=[{"file": "examples/prompts/occupations_train.txt"}]), "the name of a prompt-set file"),
    (lambda d: d.update(extra=1), "unknown key 'extra'"),
    (lambda d: d["training"].update(learning_rate=-1.0), "learning_rate"),
    (lambda d: d["components"].update(face_embedder=None, reference_faces=None), "weight_loss_face > 0 needs"),
    (lambda d: d["components"].update(clip_model=None), "needs components.clip_model"),
    (lambda d: d["components"]["eval_classifier"].update(kind="clip"), "'path' applies only"),
])
def test_dry_run_rejects_bad_configs(in_repo, tmp_path, capsys, change, message):
    data = read_config_file(CONFIGS / "gender.yaml")
    # A zero-shot classifier: its classes are known without any file, so targets are checked.
    data["components"]["classifier"] = {"kind": "clip", "attributes": ["gender", "age"]}
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert main(["train", str(path), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_training_overrides_on_the_command_line(in_repo):
    overrides = ["training.num_iterations=20", "training.resume_from=latest",
                 "training.attribute_change_factors={\"race\": 0.5}"]
    assert [parse_override(o) for o in overrides] == [(["training", "num_iterations"], 20),
                                                      (["training", "resume_from"], "latest"),
                                                      (["training", "attribute_change_factors"], {"race": 0.5})]
    experiment = read_experiment(CONFIGS / "race.yaml", overrides)
    assert (experiment.config.num_iterations, experiment.config.resume_from) == (20, "latest")
    assert experiment.config.attribute_change_factors == {"race": 0.5}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("training.num_iterations")


# --------------------------------------------------------------------------- the loader
def test_loader_builds_every_model_by_name_from_local_files(component_files, tiny_clip):  # noqa: F811
    settings = tiny_settings(component_files, eval_classifier={"kind": "clip", "attributes": ["gender"]})
    components = load_sd15_components(settings, load_eval_classifier=True)
    assert isinstance(components, SD15Components)
    assert isinstance(components.detector, MediaPipeFaceDetector)
    assert isinstance(components.clip, OpenCLIPImageEmbedder) and isinstance(components.dinov2, DINOv2ImageEmbedder)
    assert components.image_embedders == [components.clip, components.dinov2]
    assert isinstance(components.classifier, MobileNetAttributeClassifier)
    assert components.classifier.attributes == FAIRFACE_ATTRIBUTES and components.classifier.input_size == IMAGE_SIZE
    # The zero-shot evaluation classifier shares the loaded CLIP model.
    assert isinstance(components.eval_classifier, CLIPZeroShotClassifier)
    assert components.eval_classifier.embedder is components.clip
    assert components.eval_classifier.attributes == {"gender": ["male", "female"]}
    assert components.reference_faces.shape == (12, 16) and components.crop_factor == 1.0
    modules = [components.classifier, components.eval_classifier, components.face_embedder, *components.image_embedders]
    assert all(not p.requires_grad for m in modules for p in m.parameters()) and not any(m.training for m in modules)
    image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(components.clip(image), tiny_clip(image), atol=1e-6)  # the saved weights
    evaluation = components.evaluation_components()
    assert evaluation.classifier is components.eval_classifier and evaluation.detector is components.detector
    # The training-only load leaves the evaluation classifier out.
    assert load_sd15_components(settings, detector=components.detector).eval_classifier is None


def test_loader_uses_given_models_and_checks_files_first(component_files, tmp_path):
    built = dict(clip=None, dinov2=torch.nn.Identity(), classifier=MobileNetAttributeClassifier(input_size=IMAGE_SIZE),
                 detector=object(), face_embedder=TorchvisionFaceEmbedder(embedding_dim=8, input_size=32),
                 reference_faces=torch.randn(5, 8))
    settings = SD15ComponentSettings(clip_model=None, dinov2="nowhere/dinov2", face_embedder="nowhere.safetensors",
                                     reference_faces="nowhere-faces.safetensors",
                                     classifier=ClassifierSettings(path="nowhere-classifier.safetensors"))
    components = load_sd15_components(settings, **built)
    for name, model in built.items():
        assert getattr(components, name) is model
    assert components.image_embedders == [built["dinov2"]]
    with pytest.raises(ValueError, match="missing component files: classifier nowhere-classifier.safetensors, "
                                         "face_embedder nowhere.safetensors"):
        load_sd15_components(settings, dinov2=built["dinov2"], reference_faces=built["reference_faces"])
    with pytest.raises(ValueError, match="8-dimensional"):
        load_sd15_components(settings, **{**built, "reference_faces": torch.randn(5, 9)})
    with pytest.raises(ValueError, match="not configured"):
        load_sd15_components(settings, load_eval_classifier=True, **built)
    with pytest.raises(ValueError, match="no evaluation classifier"):
        components.evaluation_components()
    with pytest.raises(ValueError, match="unknown keys \\['min_confidense'\\]"):
        SD15ComponentSettings.from_dict({"detector": {"min_confidense": 0.5}})
    with pytest.raises(ValueError, match="needs 'path'"):
        ClassifierSettings.from_dict({"kind": "mobilenet"})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ClassifierSettings(path=str(bad)).attribute_classes()


# --------------------------------------------------------------------------- end to end
def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def text_states(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_sd15_configuration_trains_end_to_end_with_mediapipe_faces(in_repo, tmp_path, component_files, photo):
    experiment = read_experiment(smoke_config(tmp_path, component_files))
    pipe = tiny_sd15_pipeline(photo)
    frozen = {"unet": snapshot(pipe.unet), "vae": snapshot(pipe.vae)}

    trainer = train_experiment(experiment, pipeline=pipe)

    # The components were loaded from the files by name, with the real MediaPipe detector.
    assert isinstance(trainer.components, SD15Components)
    assert isinstance(trainer.components.detector, MediaPipeFaceDetector)
    assert len(trainer.components.image_embedders) == 2 and trainer.components.reference_faces.shape == (12, 16)
    history = [json.loads(line) for line in (tmp_path / "run" / "training_log.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for record in history:
        assert not record["skipped"] and record["prompts"][0] in experiment.prompt_sets[0].prompts
        # MediaPipe found the face in every grad-carrying image, so every loss term ran; all are finite.
        assert record["faces_found"] == 1.0
        assert all(math.isfinite(record[key]) for key in ("loss", "dal", "semantics", "face_realism", "grad_norm"))
        assert record["dal"] > 0 and record["face_realism"] > 0 and 0 < record["kept"]["gender"] <= 1
        assert record["grad_norm"] > 0
    # The first iteration starts from the original model (LoRA B = 0): the same images, no semantics loss.
    assert history[0]["semantics"] == pytest.approx(0.0, abs=1e-6)
    assert history[1]["semantics"] > 1e-5
    # The LoRA changed; the U-Net and the VAE did not.
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in trainer.params.items())
    for name, before in frozen.items():
        after = getattr(pipe, name).state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items()), name

    folder = adaptor_folder(experiment)
    adaptor = read_fair_adaptor(folder)
    meta = adaptor.metadata
    assert (meta.name, meta.kind, meta.base_model) == ("sd15-gender", "lora", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert meta.target_distributions() == [TargetDistribution.parse("gender: male, female")]
    assert meta.license == "creativeml-openrail-m" and meta.training["iterations_trained"] == 2
    # Reloaded into a fresh copy of the base pipeline, the adaptor gives the trained (EMA) text encoder.
    prompt = experiment.prompt_sets[0].prompts[0]
    with trainer.ema_weights():
        expected = text_states(pipe, prompt)
    fresh = tiny_sd15_pipeline(photo)
    before = text_states(fresh, prompt)
    load_fair_adaptor(fresh, folder)
    reloaded = text_states(fresh, prompt)
    assert not torch.allclose(reloaded, before, atol=1e-6)
    assert torch.allclose(reloaded, expected, atol=1e-5)


def test_the_train_command_runs_a_saved_pipeline_without_faces(in_repo, tmp_path, component_files, capsys):
    """``diffusers-fair train`` alone: the base model loaded from a folder, the components from files.
    A plain random VAE draws no faces, so only the image-semantics loss applies."""
    model = tmp_path / "tiny-sd15"
    tiny_sd15_pipeline(None).save_pretrained(model)
    config = smoke_config(tmp_path, component_files, base="gender_race")
    data = json.loads(config.read_text())
    data["training"]["base_model"] = str(model)
    config.write_text(json.dumps(data))

    assert main(["train", str(config)]) == 0
    assert "saved the adaptor to" in capsys.readouterr().out
    history = [json.loads(line) for line in (tmp_path / "run" / "training_log.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for record in history:
        assert not record["skipped"] and record["faces_found"] == 0.0
        assert record["dal"] == 0 and record["face_realism"] == 0 and record["kept"] == {"gender": 0.0, "race": 0.0}
    # Without faces every image has the config's faceless weight, the smallest change factor of the trained
    # attributes (gender 0.2, race 0.6): loss = weight_loss_img * 0.2 * semantics, and it still has a gradient.
    assert history[1]["loss"] == pytest.approx(8.0 * 0.2 * history[1]["semantics"], rel=1e-4, abs=1e-9)
    assert history[1]["grad_norm"] > 0
    meta = read_fair_adaptor(tmp_path / "run" / "adaptor").metadata
    assert (meta.name, meta.base_model) == ("sd15-gender-race", str(model))
    assert meta.target_distributions() == [TargetDistribution.parse("gender: male, female * race: wmelh, asian, black, indian")]
