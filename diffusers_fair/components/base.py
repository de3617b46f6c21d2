"""The interfaces between the method and the models it needs.

The trainer and the evaluation never know which concrete model they were given: the toy world
(``diffusers_fair.toy.components``) and Stable Diffusion's real models (MediaPipe, open_clip, DINOv2,
MobileNetV3 heads) implement the same four small interfaces.

Conventions shared by all of them:

* Images are float tensors of shape ``(B, 3, H, W)`` with values in ``[0, 1]`` (what a VAE decode
  gives after ``(x / 2 + 0.5).clamp(0, 1)``). Each model does its own resizing and normalisation
  with differentiable tensor ops, so gradients flow back to the generated image.
* Face boxes are ``(B, 4)`` float tensors ``(x0, y0, x1, y1)`` in pixel coordinates of the image.
* Face landmarks, where a detector gives them, are ``(B, P, 2)`` float tensors of ``(x, y)`` points
  in the same coordinates (pixel ``i`` spans ``[i, i + 1)``), in the order of
  ``method.face_alignment``'s templates: ``P = 5`` for (image-left eye, image-right eye, nose tip,
  left mouth corner, right mouth corner) or ``P = 4`` for (image-left eye, image-right eye, nose
  tip, mouth centre).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class FaceDetection:
    """One face per image (the largest one when several are found).

    Attributes:
        boxes: ``(B, 4)`` float tensor ``(x0, y0, x1, y1)`` in pixels; zeros where no face was found.
        found: ``(B,)`` bool tensor, ``True`` where a face was detected.
        scores: ``(B,)`` float tensor, the detector's confidence (0 where no face was found).
        landmarks: ``(B, P, 2)`` float tensor of the face's landmarks (``P`` = 4 or 5, see the module
            docstring; zeros where no face was found), or ``None`` when the detector gives none.
    """

    boxes: torch.Tensor
    found: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor | None = None

    def __post_init__(self):
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (B, 4), got {tuple(self.boxes.shape)}")
        if self.found.shape != self.boxes.shape[:1] or self.scores.shape != self.boxes.shape[:1]:
            raise ValueError("found and scores must have shape (B,) matching boxes")
        if self.landmarks is not None and (
            self.landmarks.ndim != 3 or self.landmarks.shape[0] != self.boxes.shape[0]
            or self.landmarks.shape[1] not in (4, 5) or self.landmarks.shape[2] != 2
        ):
            raise ValueError(f"landmarks must have shape (B, 4 or 5, 2) matching boxes, "
                             f"got {tuple(self.landmarks.shape)}")


class FaceDetector(ABC):
    """Finds the largest face in each image. Detection is not differentiated through."""

    @abstractmethod
    def detect(self, images: torch.Tensor) -> FaceDetection:
        """Detect faces in ``images`` (``(B, 3, H, W)`` in ``[0, 1]``)."""


class AttributeClassifier(nn.Module, ABC):
    """Predicts protected attributes from face crops, with gradients.

    Attributes:
        attributes: attribute name -> class names, in the order of the logits.
        input_size: side (pixels) of the square face crop the classifier expects.
    """

    attributes: dict[str, list[str]]
    input_size: int

    @abstractmethod
    def forward(self, faces: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return logits ``(B, K)`` per attribute for face crops ``(B, 3, S, S)`` in ``[0, 1]``."""


class ImageEmbedder(nn.Module, ABC):
    """Embeds whole images for the image-semantics loss (CLIP, DINOv2, or a toy embedder)."""

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return embeddings ``(B, D)`` for images ``(B, 3, H, W)`` in ``[0, 1]``."""


class FaceEmbedder(nn.Module, ABC):
    """Embeds face crops for the face-realism loss.

    Attributes:
        input_size: side (pixels) of the square face crop the embedder expects.
    """

    input_size: int

    @abstractmethod
    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """Return embeddings ``(B, D)`` for face crops ``(B, 3, S, S)`` in ``[0, 1]``."""


@dataclass
class EvalComponents:
    """The models an audit needs (the toy world's ``ToyComponents`` also fits).

    Attributes:
        classifier: the evaluation ``AttributeClassifier`` (ideally not the one that guided finetuning).
        detector: the ``FaceDetector``.
        crop_factor: the detector box is grown by this factor into the classifier's square crop.
    """

    classifier: torch.nn.Module
    detector: object
    crop_factor: float = 1.0
