"""A tiny training world: a 16x16 random-weight pipeline with the toy vocabulary, stub components, small configs.

The pipeline uses the toy world's tokenizer and text encoder (diffusers_fair/toy/architecture.py) with
a much smaller U-Net and VAE; the components are a tiny conv classifier, a detector that returns the
whole image as the face, and random-feature embedders.
"""

import copy
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

from diffusers_fair.components.base import FaceDetection, FaceDetector
from diffusers_fair.method.targets import TargetDistribution
from diffusers_fair.testing import TinyAttributeClassifier, TinyComponents, TinyFaceEmbedder, TinyImageEmbedder
from diffusers_fair.toy import architecture, world
from diffusers_fair.toy.tokenizer import build_tokenizer
from diffusers_fair.training.config import FairTrainingConfig
from diffusers_fair.training.trainer import DistributionalAlignmentTrainer


ROOT = Path(__file__).resolve().parents[2]
ATTRIBUTES = {"gender": ["male", "female"], "race": ["a", "b", "c", "d"], "age": ["young", "old"]}
GENDER = TargetDistribution.uniform("gender", ATTRIBUTES["gender"])
RACE = TargetDistribution.uniform("race", ATTRIBUTES["race"])
PROMPTS = ["a photo of the face of a doctor", "a photo of the face of a nurse", "a photo of the face of a pilot"]
_TOKENIZER = []


def tiny_training_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """16x16 images, the toy vocabulary; random weights drawn from ``seed``."""
    if not _TOKENIZER:
        _TOKENIZER.append(build_tokenizer(world.vocabulary()))
    tokenizer = copy.deepcopy(_TOKENIZER[0])
    torch.manual_seed(seed)
    text_encoder = architecture.make_text_encoder(tokenizer)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        cross_attention_dim=architecture.TEXT_HIDDEN, attention_head_dim=2, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=16)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=architecture.make_sampler(), safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)


class TinyClassifier(TinyAttributeClassifier):
    """The public tiny classifier over gender, race and age, able to return NaN logits."""

    def __init__(self, input_size: int = 8):
        super().__init__(ATTRIBUTES, input_size)
        self.poison = False  # return NaN logits (tests of the NaN handling)

    def forward(self, faces):
        logits = super().forward(faces)
        return {a: l * float("nan") for a, l in logits.items()} if self.poison else logits


class WholeImageDetector(FaceDetector):
    """Every image is a face filling the frame (or no image is, with ``none=True``)."""

    def __init__(self, none: bool = False):
        self.none = none

    def detect(self, images):
        n, _, h, w = images.shape
        found = torch.full((n,), not self.none)
        boxes = torch.tensor([0.0, 0.0, w, h]).repeat(n, 1) * found[:, None]
        return FaceDetection(boxes=boxes, found=found, scores=found.float())


class RandomEmbedder(TinyImageEmbedder):
    """The public tiny image embedder, able to return NaN embeddings."""

    def __init__(self, dim: int = 16):
        super().__init__(dim)
        self.poison = False

    def forward(self, images):
        out = super().forward(images)
        return out * float("nan") if self.poison else out


def stub_components(seed: int = 0, no_faces: bool = False) -> TinyComponents:
    torch.manual_seed(seed)
    return TinyComponents(TinyClassifier(), WholeImageDetector(no_faces), [RandomEmbedder(), RandomEmbedder(8)],
                          TinyFaceEmbedder(), torch.randn(10, 12))


def tiny_config(tmp_path, **overrides) -> FairTrainingConfig:
    settings = dict(output_dir=str(tmp_path / "run"), num_iterations=2, images_per_prompt=4, micro_batch_size=4,
                    min_inference_steps=2, max_inference_steps=3, guidance_scale=2.0, log_with="none", sample_every=0,
                    checkpoint_every=0, progress=False, text_encoder_lora_rank=2, unet_lora_rank=2, learning_rate=1e-2)
    settings.update(overrides)
    return FairTrainingConfig.toy(**settings)


def make_trainer(tmp_path, targets=(GENDER * RACE,), prompts=PROMPTS, components=None, accelerator=None, **overrides):
    return DistributionalAlignmentTrainer(tiny_config(tmp_path, **overrides), tiny_training_pipeline(), list(targets), prompts,
                                          components or stub_components(), accelerator=accelerator)
