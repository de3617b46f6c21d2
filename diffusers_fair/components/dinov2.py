"""DINOv2 image embeddings for the image-semantics loss (transformers ``Dinov2Model``).

The paper compares the DINOv2 ViT-B/14 embeddings of a finetuned model's image and of the frozen
model's image from the same noise and prompt (``1 - cos``), beside CLIP: CLIP was trained with text
supervision, DINOv2 with image self-supervision, so together they watch both what an image shows and
how it looks. The embedding is the class token after the final layer norm, which transformers
returns as ``pooler_output`` and the original DINOv2 code as ``x_norm_clstoken`` (its ``forward``).

Preprocessing follows the model's Hugging Face image processor (for ``facebook/dinov2-base``:
resize the shorter side to 256 bicubic, center crop 224, ImageNet mean and std), written as tensor
operations so that gradients reach the generated image. (The authors' training script instead
resized the whole 512-pixel image to 224 without cropping; ``resize_size=224`` gives that.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .base import ImageEmbedder
from .clip import normalize_channels, resize_and_center_crop


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PIL resampling codes in Hugging Face processor configs -> interpolation modes.
_RESAMPLE_TO_INTERPOLATION = {2: "bilinear", 3: "bicubic"}


class DINOv2ImageEmbedder(ImageEmbedder):
    """DINOv2 class-token embeddings with the Hugging Face processor's preprocessing.

    The model is frozen and in eval mode; gradients flow to the input images.

    Args:
        model: a transformers ``Dinov2Model``.
        resize_size: the shorter side is resized to this (256 for the released checkpoints).
        crop_size: side of the center crop fed to the model (224).
        mean, std: per-channel normalisation (ImageNet's).
        interpolation: ``"bicubic"`` (the processors' setting) or ``"bilinear"``.
        normalize: return unit-length embeddings.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        resize_size: int = 256,
        crop_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bicubic",
        normalize: bool = True,
    ):
        super().__init__()
        if crop_size > resize_size:
            raise ValueError(f"crop_size ({crop_size}) must not exceed resize_size ({resize_size})")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std must have 3 values (RGB)")
        self.resize_size = int(resize_size)
        self.crop_size = int(crop_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.interpolation = interpolation
        self.normalize = normalize
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()

    @classmethod
    def from_image_processor(cls, model: torch.nn.Module, processor, normalize: bool = True) -> DINOv2ImageEmbedder:
        """Take the preprocessing settings from a transformers image processor of the model."""
        size = dict(processor.size)
        if not size.get("shortest_edge"):
            raise ValueError(f"the processor must resize by 'shortest_edge', got size={size}")
        crop = dict(processor.crop_size)
        if crop.get("height") != crop.get("width") or not processor.do_center_crop:
            raise ValueError(f"the processor must center-crop a square, got crop_size={crop}")
        resample = int(processor.resample)
        if resample not in _RESAMPLE_TO_INTERPOLATION:
            raise ValueError(f"unsupported resampling filter {resample} (bilinear=2 or bicubic=3 expected)")
        return cls(
            model,
            resize_size=size["shortest_edge"],
            crop_size=crop["height"],
            mean=processor.image_mean,
            std=processor.image_std,
            interpolation=_RESAMPLE_TO_INTERPOLATION[resample],
            normalize=normalize,
        )

    @classmethod
    def from_pretrained(
        cls,
        name: str = "facebook/dinov2-base",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | None = None,
        normalize: bool = True,
    ) -> DINOv2ImageEmbedder:
        """Load the model (safetensors only) and its image processor's settings from the Hub or a folder."""
        from transformers import AutoImageProcessor, Dinov2Model

        model = Dinov2Model.from_pretrained(name, use_safetensors=True, cache_dir=cache_dir, dtype=dtype)
        processor = AutoImageProcessor.from_pretrained(name, cache_dir=cache_dir)
        return cls.from_image_processor(model.to(device), processor, normalize=normalize)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The image processor's steps as tensor ops: ``(B, 3, H, W)`` in ``[0, 1]`` -> model input."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor in [0, 1], got dtype {images.dtype}")
        # transformers crops with the extra pixel of an odd margin at the end (floor).
        x = resize_and_center_crop(images, self.resize_size, self.crop_size, self.interpolation, "floor")
        return normalize_channels(x, self.mean, self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, D)`` (float32) of images ``(B, 3, H, W)`` in ``[0, 1]``."""
        x = self.preprocess(images)
        dtype = next(self.model.parameters()).dtype
        features = self.model(pixel_values=x.to(dtype)).pooler_output.float()
        return F.normalize(features, dim=-1) if self.normalize else features
