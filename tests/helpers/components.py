"""Small inputs for the tests of the real components: a photo's head crop, DINOv2 processor settings."""

import numpy as np
import torch
from PIL import Image

from diffusers_fair.components.dinov2 import IMAGENET_MEAN, IMAGENET_STD


TINY_CLIP = "diffusers-fair-tiny-test-clip"


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 255


def head(astronaut: np.ndarray, side: int) -> np.ndarray:
    """The astronaut's head and shoulders, resized to side x side."""
    return np.asarray(Image.fromarray(astronaut[20:260, 110:350]).resize((side, side), Image.BICUBIC))


def dinov2_processors():
    """facebook/dinov2-base's processor settings, in both of transformers' backends."""
    from transformers import BitImageProcessor
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    settings = {
        "size": {"shortest_edge": 256},
        "crop_size": {"height": 224, "width": 224},
        "resample": 3,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }
    return [BitImageProcessor(**settings), BitImageProcessorPil(**settings)]
