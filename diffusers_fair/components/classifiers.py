"""Face attribute classifiers for Stable Diffusion images: MobileNetV3-Large with one head per attribute.

The paper's classifiers were torchvision MobileNetV3-Large networks trained on face crops of CelebA
(gender) and FairFace (gender, race, age), with a separate set trained for evaluation. This module
holds the architecture and its safetensors file format; ``examples/train_attribute_classifier.py``
trains one from a Hugging Face ``datasets`` copy of FairFace or CelebA, or from an image folder.

Architecture: MobileNetV3-Large's convolutional trunk and its first classifier layer (960 -> 1280,
Hardswish, dropout), then one linear layer per attribute (1280 -> number of classes). The default
attributes are the paper's: binary gender, race in four groups (WMELH = White, Middle Eastern, Latino
Hispanic; Asian = East and Southeast Asian; Black; Indian), and age young / old.

Input: square face crops ``(B, 3, S, S)`` in ``[0, 1]`` with ``S = input_size`` (224), as
:func:`diffusers_fair.method.boxes.crop_faces` gives them; the network normalises them with ImageNet's mean
and std (the statistics of torchvision's pretrained trunk).

File format: a ``.safetensors`` file holding the state dict, with metadata ``format``,
``attributes`` (JSON: attribute -> class names), ``input_size``, ``mean`` and ``std``. Nothing else
is read: no pickle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .base import AttributeClassifier


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The paper's attributes and classes, in logit order.
FAIRFACE_ATTRIBUTES: dict[str, list[str]] = {
    "gender": ["male", "female"],
    "race": ["wmelh", "asian", "black", "indian"],
    "age": ["young", "old"],
}

FILE_FORMAT = "diffusers_fair.MobileNetAttributeClassifier/1"

# Width of the layer the heads read (MobileNetV3-Large's penultimate layer).
FEATURE_DIM = 1280


def check_attributes(attributes: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Validate attribute -> class names (at least two distinct classes each) and copy them."""
    if not isinstance(attributes, Mapping) or not attributes:
        raise ValueError("attributes must be a non-empty mapping attribute -> class names")
    checked = {}
    for name, classes in attributes.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"attribute name {name!r} must be a non-empty string without '.'")
        if isinstance(classes, str) or len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"attribute {name!r} needs a list of at least two distinct class names")
        checked[name] = [str(c) for c in classes]
    return checked


class MobileNetAttributeClassifier(AttributeClassifier):
    """MobileNetV3-Large trunk with one linear head per attribute.

    A new instance has random weights and is in training mode; :meth:`from_safetensors` returns a
    frozen classifier in eval mode, ready to guide or evaluate generation.

    Args:
        attributes: attribute -> class names, in logit order (default :data:`FAIRFACE_ATTRIBUTES`).
        input_size: side of the square face crops (224).
        mean, std: per-channel input normalisation (ImageNet's).
    """

    def __init__(
        self,
        attributes: Mapping[str, Sequence[str]] = FAIRFACE_ATTRIBUTES,
        input_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        from torchvision.models import mobilenet_v3_large

        if input_size < 32:
            raise ValueError(f"input_size must be at least 32 pixels, got {input_size}")
        self.attributes = check_attributes(attributes)
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        backbone = mobilenet_v3_large(weights=None)
        self.features = backbone.features
        self.pool = backbone.avgpool
        # Linear(960, 1280), Hardswish, Dropout(0.2): everything but torchvision's 1000-way layer.
        self.trunk = backbone.classifier[:3]
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, len(c)) for name, c in self.attributes.items()})

    def load_imagenet_trunk(self) -> None:
        """Initialise the trunk from torchvision's ImageNet weights (downloaded by torchvision)."""
        from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large

        backbone = mobilenet_v3_large(weights=MobileNet_V3_Large_Weights.IMAGENET1K_V2)
        self.features.load_state_dict(backbone.features.state_dict())
        self.trunk.load_state_dict(backbone.classifier[:3].state_dict())

    def embed(self, faces: torch.Tensor) -> torch.Tensor:
        """The ``(B, 1280)`` features the heads read."""
        if faces.ndim != 4 or faces.shape[1:] != (3, self.input_size, self.input_size):
            raise ValueError(
                f"faces must have shape (B, 3, {self.input_size}, {self.input_size}), got {tuple(faces.shape)}"
            )
        dtype = self.heads[next(iter(self.heads))].weight.dtype
        x = ((faces.float() - self.mean.float()) / self.std.float()).to(dtype)
        return self.trunk(torch.flatten(self.pool(self.features(x)), 1))

    def forward(self, faces: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits ``(B, K)`` (float32) per attribute for face crops ``(B, 3, S, S)`` in ``[0, 1]``."""
        features = self.embed(faces)
        return {name: head(features).float() for name, head in self.heads.items()}

    def save_safetensors(self, path: str) -> None:
        """Write the weights and the settings to one ``.safetensors`` file."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        metadata = {
            "format": FILE_FORMAT,
            "attributes": json.dumps(self.attributes),
            "input_size": str(self.input_size),
            "mean": json.dumps(self.mean.flatten().tolist()),
            "std": json.dumps(self.std.flatten().tolist()),
        }
        save_file(state, path, metadata=metadata)

    @classmethod
    def from_safetensors(cls, path: str, device: str | torch.device = "cpu") -> MobileNetAttributeClassifier:
        """Load a classifier written by :meth:`save_safetensors`, frozen and in eval mode."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a MobileNetAttributeClassifier file (format={metadata.get('format')!r})")
        model = cls(
            attributes=json.loads(metadata["attributes"]),
            input_size=int(metadata["input_size"]),
            mean=json.loads(metadata["mean"]),
            std=json.loads(metadata["std"]),
        )
        state = load_file(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} does not match the architecture: missing {missing}, unexpected {unexpected}")
        model.requires_grad_(False)
        return model.to(device).eval()
