"""Tiny random-weight pipelines and a smoke training run: check an install in seconds, without downloads.

::

    from diffusers_fair.testing import tiny_pipeline, tiny_training_run

    folder = tiny_training_run("sdxl", "out/tiny-sdxl")    # trains a fair adaptor on tiny_pipeline("sdxl")
    pipe = tiny_pipeline("sdxl")                            # the same random weights (same seed)
    pipe.load_fair_adaptor(folder)                          # or pipe.load_lora_weights(folder)
    image = pipe("a photo of the face of a doctor", num_inference_steps=3).images[0]

:func:`tiny_pipeline` builds, in code, a diffusers pipeline of the real family's architecture with
tiny random weights: ``"sd15"`` a ``StableDiffusionPipeline`` (a CLIP text encoder, a U-Net with
cross-attention, a VAE) and ``"sdxl"`` a ``StableDiffusionXLPipeline`` (two text encoders of
different widths, the second with a projection, a U-Net that takes SDXL's pooled text embeddings
and time ids, a VAE that asks to be upcast in float16). Both draw 16x16 images; the vocabulary is
the few words of :data:`PROMPTS`. The same seed gives the same weights.

:func:`tiny_training_run` trains a fair adaptor on that pipeline with the package's trainer (the
adjusted backward through the sampling chain, the distributional alignment loss) and tiny
random-weight components behind the package's interfaces (an attribute classifier, a detector that
sees the whole image as the face, image and face embedders), and returns the adaptor's folder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .components.base import AttributeClassifier, FaceDetection, FaceDetector, FaceEmbedder, ImageEmbedder
from .method.targets import TargetDistribution


__all__ = ["KINDS", "PROMPTS", "TinyComponents", "tiny_components", "tiny_pipeline", "tiny_training_run"]

KINDS = ("sd15", "sdxl")
PROMPTS = ["a photo of the face of a doctor", "a photo of the face of a nurse", "a photo of the face of a pilot"]
WORDS = ["a", "photo", "of", "the", "face", "doctor", "nurse", "pilot", "person", "smiling"]
ATTRIBUTES = {"gender": ["male", "female"]}
IMAGE_SIZE = 16
# The base-model ids the tiny runs record in their adaptors' metadata.
BASE_MODELS = {"sd15": "diffusers-fair/tiny-sd15", "sdxl": "diffusers-fair/tiny-sdxl"}
# Stable Diffusion's noise schedule (SD 1.5 and SDXL share it).
_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=1)


def _tokenizer():
    from .toy.tokenizer import build_tokenizer

    return build_tokenizer(WORDS, model_max_length=16)


def _text_encoder(tokenizer, hidden: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, projection_dim=32, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(force_upcast: bool, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1, sample_size=IMAGE_SIZE, force_upcast=force_upcast,
                         scaling_factor=scaling_factor)


def _sd15(tokenizer):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    text_encoder = _text_encoder(tokenizer, 32, projection=False)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4,
    )
    return StableDiffusionPipeline(
        vae=_vae(False, 0.18215), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler(**_SCHEDULE), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )


def _sdxl(tokenizer):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    text_encoder = _text_encoder(tokenizer, 32, projection=False)  # SDXL: CLIP ViT-L/14 (768)
    text_encoder_2 = _text_encoder(copy.deepcopy(tokenizer), 48, projection=True)  # OpenCLIP bigG (1280), projected
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 48, attention_head_dim=(2, 4), norm_num_groups=4, use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(True, 0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=copy.deepcopy(tokenizer), unet=unet, scheduler=EulerDiscreteScheduler(**_SCHEDULE),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def tiny_pipeline(kind: str, seed: int = 0):
    """A tiny random-weight pipeline of the family ``kind`` (``"sd15"`` or ``"sdxl"``); same seed, same weights.

    16x16 images, progress bars off; the global random state is left as it was.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = (_sd15 if kind == "sd15" else _sdxl)(_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- tiny components
class TinyAttributeClassifier(AttributeClassifier):
    """A random convolution and one linear head per attribute, on 8x8 face crops."""

    def __init__(self, attributes: dict[str, list[str]] = ATTRIBUTES, input_size: int = 8):
        super().__init__()
        self.attributes = {a: list(c) for a, c in attributes.items()}
        self.input_size = input_size
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.heads = nn.ModuleDict({a: nn.Linear(8, len(c)) for a, c in attributes.items()})

    def forward(self, faces):
        features = torch.tanh(self.conv(faces * 2 - 1)).mean(dim=(2, 3))
        return {a: 3 * head(features) for a, head in self.heads.items()}


class WholeImageDetector(FaceDetector):
    """Every image is one face filling the frame."""

    def detect(self, images):
        n, _, h, w = images.shape
        found = torch.ones(n, dtype=torch.bool)
        boxes = torch.tensor([0.0, 0.0, w, h]).repeat(n, 1)
        return FaceDetection(boxes=boxes, found=found, scores=found.float())


class TinyImageEmbedder(ImageEmbedder):
    """A random strided convolution, averaged over the image."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, dim, 4, stride=4)

    def forward(self, images):
        return torch.tanh(self.conv(images)).mean(dim=(2, 3))


class TinyFaceEmbedder(FaceEmbedder):
    """A random linear map of 8x8 face crops."""

    def __init__(self, input_size: int = 8, dim: int = 12):
        super().__init__()
        self.input_size = input_size
        self.linear = nn.Linear(3 * input_size * input_size, dim)

    def forward(self, faces):
        return self.linear(faces.flatten(1))


@dataclass
class TinyComponents:
    """The components bundle the trainer reads (see ``components/base.py``)."""

    classifier: AttributeClassifier
    detector: FaceDetector
    image_embedders: list = field(default_factory=list)
    face_embedder: FaceEmbedder | None = None
    reference_faces: torch.Tensor | None = None


def tiny_components(seed: int = 0) -> TinyComponents:
    """Tiny random components for :data:`ATTRIBUTES` (binary gender); same seed, same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyComponents(TinyAttributeClassifier(), WholeImageDetector(), [TinyImageEmbedder()],
                              TinyFaceEmbedder(), torch.randn(10, 12))


# --------------------------------------------------------------------------- the smoke run
def tiny_training_run(kind: str, out: str | Path, iterations: int = 2, seed: int = 0, **config_fields) -> Path:
    """Train a fair adaptor (uniform binary gender) on ``tiny_pipeline(kind, seed)``; return its folder.

    A text-encoder LoRA of rank 2 (on SDXL both text encoders), 4 images of 2-3 sampling steps per
    iteration with guidance 2, float32 on the CPU; ``config_fields`` change any
    ``FairTrainingConfig`` field (e.g. ``num_soft_tokens=2, train_text_encoder_lora=False`` for soft
    tokens). Checkpoints and logs go to ``out/run``, the adaptor to ``out/adaptor`` (replaced if
    there). The adaptor loads into ``tiny_pipeline(kind, seed)`` with ``pipe.load_fair_adaptor`` and
    with diffusers' own loaders, and changes what it draws.

    Raises:
        ValueError: an unknown ``kind``, or a field the trainer refuses.
    """
    from .training.config import FairTrainingConfig
    from .training.trainer import DistributionalAlignmentTrainer

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out = Path(out)
    settings = dict(base_model=BASE_MODELS[kind], output_dir=str(out / "run"), num_iterations=iterations, seed=seed,
                    images_per_prompt=4, micro_batch_size=4, min_inference_steps=2, max_inference_steps=3,
                    guidance_scale=2.0, log_with="none", sample_every=0, checkpoint_every=0, progress=False,
                    text_encoder_lora_rank=2, unet_lora_rank=2, learning_rate=1e-2, mixed_precision="no")
    settings.update(config_fields)
    config = FairTrainingConfig.toy(**settings)
    targets = [TargetDistribution.uniform("gender", ATTRIBUTES["gender"])]
    trainer = DistributionalAlignmentTrainer(config, tiny_pipeline(kind, seed), targets, PROMPTS, tiny_components(seed))
    trainer.train()
    folder = out / "adaptor"
    trainer.save_adaptor(folder, name=f"tiny-{kind}-gender", overwrite=True, license="unknown",
                         description=f"A smoke-test adaptor for the tiny random-weight {kind} pipeline.")
    return folder
