"""The toy world's models behind the interfaces of ``diffusers_fair.components.base``.

Small convolutional networks trained on rendered portraits (``train_components.py`` trains them
all, seeded, in a few minutes on one CPU thread) stand in for the real models of the method:

* :class:`ToyAttributeClassifier` reads the three traits (hair length, skin tone, hair colour) from a
  face crop, like the paper's gender / race / age classifiers;
* :class:`ToyFaceDetector` regresses the figure's box and says whether there is a figure at all;
* :class:`ToyImageEmbedder` (trained to regress the scene: background, object, head position, size and
  pose, shirt, lighting) and :class:`ToyRandomImageEmbedder` (fixed random convolutional features) are
  the two image embedders of the image-semantics loss, as CLIP and DINOv2 are for Stable Diffusion;
* :class:`ToyFaceEmbedder` embeds face crops for the face-realism loss, and a set of embeddings of
  rendered faces serves as the reference faces.

Face crops are taken the way the trainer and the audit read faces
(``diffusers_fair.components.faces.read_faces``): the detector's box, grown into a square by
``method.boxes.expand_boxes(boxes, FACE_CROP_FACTOR, (H, W))``, then
``method.boxes.crop_faces(images, boxes, S)`` with ``S`` the model's ``input_size``
(:func:`face_crops`). The classifier was trained with random crop factors and box jitter around
that, so small detector errors do not matter.

All models take images in ``[0, 1]`` and are differentiable with respect to their input;
:func:`load_toy_components` returns them in eval mode with frozen parameters, loaded from the
safetensors files in ``diffusers_fair/toy/weights``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..components.base import AttributeClassifier, FaceDetection, FaceDetector, FaceEmbedder, ImageEmbedder
from ..method.boxes import crop_faces, expand_boxes
from .render import SCENE_PARAMETERS, TRAITS


WEIGHTS_DIR = Path(__file__).parent / "weights"

# The square crop around a detected face box that the classifier and the face embedder expect:
# side = FACE_CROP_FACTOR * the box's longer side (``method.boxes.expand_boxes``).
FACE_CROP_FACTOR = 1.1
IMAGE_SIZE = 32  # the toy world's image side; image embedders and the detector resize other sizes to it
FACE_SIZE = 24  # the side of the face crops the classifier and the face embedder read
SCENE_DIM = sum(SCENE_PARAMETERS.values())


def conv_trunk(channels: list[int], strides: list[int]) -> nn.Sequential:
    """3x3 convolutions with ReLU; ``channels[0]`` is the input's channel count."""
    if len(channels) != len(strides) + 1:
        raise ValueError("conv_trunk needs one stride per convolution")
    layers: list[nn.Module] = []
    for c_in, c_out, stride in zip(channels[:-1], channels[1:], strides):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def _check_images(images: torch.Tensor, what: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} must have shape (B, 3, H, W), got {tuple(images.shape)}")


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to ``size x size`` (differentiable); a no-op at the right size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return images * 2 - 1


class ToyAttributeClassifier(AttributeClassifier):
    """Reads hair length (2 classes), skin tone (4) and hair colour (2) from a face crop.

    A four-layer CNN on ``input_size`` crops, global average pooling, one linear head per trait.
    Its attributes and class order are ``render.TRAITS``; ``crop_factor`` is the expansion of the
    detector box the crops should be taken with (``FACE_CROP_FACTOR``).
    """

    def __init__(self, input_size: int = FACE_SIZE, width: int = 32):
        super().__init__()
        self.attributes = {name: list(classes) for name, classes in TRAITS.items()}
        self.input_size = input_size
        self.crop_factor = FACE_CROP_FACTOR
        self.trunk = conv_trunk([3, width, 2 * width, 2 * width, 2 * width], [1, 2, 2, 1])
        self.heads = nn.ModuleDict({name: nn.Linear(2 * width, len(c)) for name, c in self.attributes.items()})

    def forward(self, faces: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_images(faces, "faces")
        features = self.trunk(_normalise(_resize(faces, self.input_size))).mean(dim=(2, 3))
        return {name: head(features) for name, head in self.heads.items()}


class DetectorNet(nn.Module):
    """Image -> (box, presence logit). The box is ``(cx, cy, w, h)`` as fractions of the image side."""

    def __init__(self, width: int = 16, hidden: int = 64):
        super().__init__()
        self.trunk = conv_trunk([3, width, 2 * width, 4 * width, 4 * width], [1, 2, 2, 2])  # 32 -> 4
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, hidden), nn.ReLU(), nn.Linear(hidden, 5))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.trunk(_normalise(_resize(images, IMAGE_SIZE))))
        return torch.sigmoid(out[:, :4]), out[:, 4]


def centre_size_to_corners(box: torch.Tensor, size: float) -> torch.Tensor:
    """``(cx, cy, w, h)`` fractions -> ``(x0, y0, x1, y1)`` pixels of an image of side ``size``."""
    cx, cy, w, h = box.unbind(dim=1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1) * size


class ToyFaceDetector(nn.Module, FaceDetector):
    """Finds the figure's head (face and hair) box and whether a figure is there at all.

    ``detect`` runs without gradient; a face counts as found where the presence probability is at
    least ``threshold``. Images of another size are resized to 32x32 and the boxes scaled back.
    """

    def __init__(self, width: int = 16, hidden: int = 64, threshold: float = 0.5):
        super().__init__()
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.net = DetectorNet(width, hidden)
        self.threshold = threshold

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(boxes (B, 4) in pixels of the input, presence probabilities (B,))``, with gradient."""
        _check_images(images, "images")
        height, width = images.shape[-2:]
        if height != width:
            raise ValueError(f"the toy detector needs square images, got {height}x{width}")
        box, logit = self.net(images)
        return centre_size_to_corners(box, float(width)), torch.sigmoid(logit)

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> FaceDetection:
        boxes, probs = self(images.float())
        found = probs >= self.threshold
        boxes = torch.where(found[:, None], boxes, torch.zeros_like(boxes))
        return FaceDetection(boxes=boxes, found=found, scores=torch.where(found, probs, torch.zeros_like(probs)))


class ToyImageEmbedder(ImageEmbedder):
    """The scene embedder (the CLIP of the toy world): what the image shows besides the traits.

    A CNN trained to regress the scene parameters (``render.SCENE_PARAMETERS``: background colours,
    object, head position / size / pose, shirt, lighting); its embedding is the 96-d hidden layer
    before the regression output, minus the mean embedding of rendered images (so that the cosine
    between two embeddings compares scenes rather than the shared positive offset of ReLU features).
    """

    def __init__(self, width: int = 16, dim: int = 96):
        super().__init__()
        self.trunk = conv_trunk([3, width, 2 * width, 4 * width, 4 * width], [1, 2, 2, 2])
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, dim), nn.ReLU())
        self.regressor = nn.Linear(dim, SCENE_DIM)  # predicts standardised scene parameters
        self.register_buffer("scene_mean", torch.zeros(SCENE_DIM))
        self.register_buffer("scene_std", torch.ones(SCENE_DIM))
        self.register_buffer("feature_mean", torch.zeros(dim))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, "images")
        return self.hidden(self.trunk(_normalise(_resize(images, IMAGE_SIZE))))

    def predict_scene(self, images: torch.Tensor) -> torch.Tensor:
        """The regressed scene parameters ``(B, SCENE_DIM)`` (``render.scene_vector`` order)."""
        return self.regressor(self.features(images)) * self.scene_std + self.scene_mean

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images) - self.feature_mean


class ToyRandomImageEmbedder(ImageEmbedder):
    """The second image embedder (the DINOv2 of the toy world): fixed random convolutional features.

    Two random convolutions (seeded, never trained) with ReLU, average-pooled to a 4x4 grid and
    centred by their mean over rendered images: a cheap descriptor of colours, edges and layout that
    sees everything in the image, the figure included.
    """

    def __init__(self, width: int = 24):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 5, stride=2, padding=2), nn.ReLU(), nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU()
        )
        self.register_buffer("feature_mean", torch.zeros(width * 16))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, "images")
        return F.adaptive_avg_pool2d(self.trunk(_normalise(_resize(images, IMAGE_SIZE))), 4).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images) - self.feature_mean


class ToyFaceEmbedder(FaceEmbedder):
    """Embeds face crops for the face-realism loss (the face-recognition network of the toy world).

    A CNN trained on face crops to read the traits and the pose and to tell clean faces from
    corrupted ones (noise, blur, two faces blended, scrambled patches), so that its 64-d embedding
    (centred like the image embedders') moves when a face stops looking like a rendered face.
    """

    def __init__(self, input_size: int = FACE_SIZE, width: int = 32, dim: int = 64):
        super().__init__()
        self.input_size = input_size
        self.crop_factor = FACE_CROP_FACTOR
        self.trunk = conv_trunk([3, width, 2 * width, 2 * width], [1, 2, 2])  # 24 -> 6
        self.hidden = nn.Sequential(nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(2 * width * 9, dim), nn.ReLU())
        self.heads = nn.ModuleDict(
            {name: nn.Linear(dim, len(c)) for name, c in TRAITS.items()} | {"yaw": nn.Linear(dim, 1), "corrupted": nn.Linear(dim, 1)}
        )
        self.register_buffer("feature_mean", torch.zeros(dim))

    def features(self, faces: torch.Tensor) -> torch.Tensor:
        _check_images(faces, "faces")
        return self.hidden(self.trunk(_normalise(_resize(faces, self.input_size))))

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return self.features(faces) - self.feature_mean


def face_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, factor: float = FACE_CROP_FACTOR) -> torch.Tensor:
    """The square face crops the toy classifier and face embedder read, for given boxes (differentiable in ``images``).

    The crop step of ``components.faces.read_faces`` without the detection: training the toy models
    crops around known (jittered) boxes.
    """
    return crop_faces(images, expand_boxes(boxes, factor, tuple(images.shape[-2:])), size)


@dataclass
class ToyComponents:
    """Everything the method needs from the toy world, frozen and in eval mode.

    Attributes:
        classifier: the attribute classifier (three traits).
        detector: the face detector.
        image_embedders: ``[scene embedder, random-feature embedder]`` for the image-semantics loss.
        face_embedder: the face embedder for the face-realism loss.
        reference_faces: ``(N, D)`` face-embedder embeddings of rendered faces (uniform traits).
        reference_traits: trait -> ``(N,)`` class indices of the reference faces.
        crop_factor: the box expansion for face crops (``method.boxes.expand_boxes``).
        metadata: the training record of the weights (seed, accuracies, timings).
    """

    classifier: ToyAttributeClassifier
    detector: ToyFaceDetector
    image_embedders: list[ImageEmbedder]
    face_embedder: ToyFaceEmbedder
    reference_faces: torch.Tensor
    reference_traits: dict[str, torch.Tensor]
    crop_factor: float
    metadata: dict


def build_models(config: dict) -> dict[str, nn.Module]:
    """Fresh (untrained) models from the architecture settings stored in the weights' metadata."""
    return {
        "classifier": ToyAttributeClassifier(config["face_size"], config["classifier_width"]),
        "detector": ToyFaceDetector(config["detector_width"], config["detector_hidden"]),
        "scene_embedder": ToyImageEmbedder(config["scene_width"], config["scene_dim"]),
        "random_embedder": ToyRandomImageEmbedder(config["random_width"]),
        "face_embedder": ToyFaceEmbedder(config["face_size"], config["face_width"], config["face_dim"]),
    }


def _freeze(module: nn.Module, device) -> nn.Module:
    module.to(device).eval()
    module.requires_grad_(False)
    return module


def load_toy_components(device: str | torch.device = "cpu", weights_dir: str | Path | None = None) -> ToyComponents:
    """Load the shipped toy models (safetensors only) on ``device``, frozen and in eval mode."""
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    meta_file = folder / "metadata.json"
    if not meta_file.exists():
        raise FileNotFoundError(
            f"no toy component weights in {folder}; train them with `python -m diffusers_fair.toy.train_components`"
        )
    metadata = json.loads(meta_file.read_text())
    if abs(metadata["config"]["crop_factor"] - FACE_CROP_FACTOR) > 1e-9:
        raise ValueError(f"weights in {folder} were trained with crop factor {metadata['config']['crop_factor']}, code uses {FACE_CROP_FACTOR}")
    models = build_models(metadata["config"])
    for name, module in models.items():
        module.load_state_dict(load_file(folder / f"{name}.safetensors"))
        _freeze(module, device)
    reference = load_file(folder / "reference_faces.safetensors")
    return ToyComponents(
        classifier=models["classifier"],
        detector=models["detector"],
        image_embedders=[models["scene_embedder"], models["random_embedder"]],
        face_embedder=models["face_embedder"],
        reference_faces=reference["embeddings"].to(device),
        reference_traits={name: reference[name].to(device) for name in TRAITS},
        crop_factor=metadata["config"]["crop_factor"],
        metadata=metadata,
    )
