"""CLIP for the image-semantics loss and as a zero-shot attribute classifier (open_clip).

Two models live here, both built on an open_clip CLIP model:

* :class:`OpenCLIPImageEmbedder` embeds whole images. The image-semantics loss compares the
  embedding of a finetuned model's image with the embedding of the frozen model's image from the
  same noise and prompt (``1 - cos``). The paper used ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``,
  which open_clip names ``ViT-H-14`` with the pretrained tag ``laion2b_s32b_b79k``; the embedding
  is the projected image embedding (``encode_image``), the same vector ``CLIPVisionModelWithProjection``
  calls ``image_embeds``.
* :class:`CLIPZeroShotClassifier` classifies face crops by comparing their CLIP embedding with the
  embeddings of text prompts, one or more per class. It lets a user debias an attribute for which
  nobody trained a classifier ("a person wearing glasses" / "a person not wearing glasses").

Preprocessing. open_clip preprocesses PIL images: resize the shorter side to the model's image size
(bicubic), center crop, convert to a tensor, normalise with the model's mean and std. Here the same
steps run as tensor operations on the ``(B, 3, H, W)`` batch in ``[0, 1]`` so that gradients flow
back to the generated image: :func:`resize_and_center_crop` uses ``F.interpolate`` with
``antialias=True``, which computes PIL's resampling filter (the same kernel and support) exactly;
the only difference from open_clip's pipeline is that PIL rounds to 8-bit integers along the way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .base import AttributeClassifier, ImageEmbedder


# Interpolation modes :func:`resize_and_center_crop` supports (the ones CLIP-style processors use).
INTERPOLATIONS = ("bicubic", "bilinear")

# Prompts for the attributes of the paper, usable with :class:`CLIPZeroShotClassifier`. Several
# prompts per class are averaged (prompt ensembling); race follows the paper's four groups
# (WMELH = White, Middle Eastern, Latino Hispanic; Asian = East and Southeast Asian).
DEFAULT_PROMPTS: dict[str, dict[str, list[str]]] = {
    "gender": {
        "male": ["a photo of a man", "a photo of the face of a man"],
        "female": ["a photo of a woman", "a photo of the face of a woman"],
    },
    "race": {
        "wmelh": [
            "a photo of a white person",
            "a photo of a middle eastern person",
            "a photo of a latino person",
        ],
        "asian": ["a photo of an east asian person", "a photo of a southeast asian person"],
        "black": ["a photo of a black person"],
        "indian": ["a photo of an indian person"],
    },
    "age": {
        "young": ["a photo of a young person"],
        "old": ["a photo of an old person"],
    },
}


def resized_shape(height: int, width: int, shorter_side: int) -> tuple[int, int]:
    """The ``(height, width)`` after scaling the shorter side to ``shorter_side``.

    The longer side is truncated to an integer, as torchvision's ``Resize(int)`` and transformers'
    ``shortest_edge`` resizing both do.
    """
    if height <= width:
        return shorter_side, int(shorter_side * width / height)
    return int(shorter_side * height / width), shorter_side


def resize_and_center_crop(
    images: torch.Tensor,
    resize: int | tuple[int, int],
    crop: int | None,
    interpolation: str = "bicubic",
    crop_rounding: str = "round",
) -> torch.Tensor:
    """Resize and center-crop a batch the way PIL-based image processors do, differentiably.

    Args:
        images: ``(B, C, H, W)`` float images in ``[0, 1]``.
        resize: an int scales the shorter side to it (keeping the aspect ratio); ``(h, w)`` resizes
            to exactly that shape.
        crop: side of the square center crop, or ``None`` for no crop.
        interpolation: ``"bicubic"`` or ``"bilinear"``, both antialiased like PIL's filters.
        crop_rounding: where an odd margin puts the extra pixel: ``"round"`` (torchvision's
            ``CenterCrop``, Python's round-half-to-even) or ``"floor"`` (transformers' processors).

    Returns:
        The resized (and cropped) images, float32, clamped to ``[0, 1]`` as an 8-bit pipeline
        would clamp them.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if crop_rounding not in ("round", "floor"):
        raise ValueError(f"crop_rounding must be 'round' or 'floor', got {crop_rounding!r}")
    height, width = images.shape[-2:]
    if isinstance(resize, int):
        size = resized_shape(height, width, resize)
    else:
        size = (int(resize[0]), int(resize[1]))
    x = images.float()
    if size != (height, width):
        x = F.interpolate(x, size=size, mode=interpolation, antialias=True, align_corners=False)
        # Bicubic filters overshoot; PIL writes 8-bit pixels, so its values stay within [0, 1].
        x = x.clamp(0.0, 1.0)
    if crop is not None:
        if crop > size[0] or crop > size[1]:
            raise ValueError(f"crop {crop} is larger than the resized image {size}")
        if crop_rounding == "round":
            top, left = round((size[0] - crop) / 2.0), round((size[1] - crop) / 2.0)
        else:
            top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
        x = x[..., top : top + crop, left : left + crop]
    return x


def normalize_channels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1], got dtype {images.dtype}")


class OpenCLIPImageEmbedder(ImageEmbedder):
    """Projected CLIP image embeddings of an open_clip model, with open_clip's preprocessing.

    The model is frozen (no parameter takes gradients) and in eval mode; gradients flow to the
    input images.

    Args:
        model: an open_clip ``CLIP`` model (anything with ``encode_image`` and ``visual``).
        preprocess_cfg: open_clip's preprocessing settings (keys ``size``, ``mean``, ``std``,
            ``interpolation``, ``resize_mode``); defaults to ``model.visual.preprocess_cfg``, which
            ``open_clip.create_model`` attaches.
        normalize: return unit-length embeddings (the loss only needs their direction).
    """

    def __init__(self, model: torch.nn.Module, preprocess_cfg: Mapping | None = None, normalize: bool = True):
        super().__init__()
        if preprocess_cfg is None:
            preprocess_cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None)
            if preprocess_cfg is None:
                raise ValueError(
                    "model has no visual.preprocess_cfg (build it with open_clip.create_model) "
                    "and no preprocess_cfg was given"
                )
        size = preprocess_cfg["size"]
        if isinstance(size, (tuple, list)):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"only square image sizes are supported, got {size}")
            size = size[0]
        resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        if resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode must be 'shortest' or 'squash', got {resize_mode!r}")
        interpolation = preprocess_cfg.get("interpolation", "bicubic")
        # open_clip treats 'random' as bicubic at inference.
        self.interpolation = "bilinear" if interpolation == "bilinear" else "bicubic"
        self.image_size = int(size)
        self.resize_mode = resize_mode
        self.mean = tuple(float(v) for v in preprocess_cfg["mean"])
        self.std = tuple(float(v) for v in preprocess_cfg["std"])
        self.normalize = normalize
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()

    @classmethod
    def from_pretrained(
        cls,
        model_name: str = "ViT-H-14",
        pretrained: str | None = "laion2b_s32b_b79k",
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        cache_dir: str | None = None,
        normalize: bool = True,
    ) -> OpenCLIPImageEmbedder:
        """Build an open_clip model by name (the paper's default: ViT-H-14, laion2b_s32b_b79k).

        open_clip downloads the weights from the Hugging Face Hub on first use (safetensors when
        the repository has them, otherwise ``torch.load(weights_only=True)``) and caches them.
        ``pretrained=None`` builds the architecture with random weights.
        """
        import open_clip

        model = open_clip.create_model(
            model_name, pretrained=pretrained, device=device, precision=precision, cache_dir=cache_dir
        )
        return cls(model, normalize=normalize)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the vision transformer's activations in the backward pass (less memory)."""
        self.model.set_grad_checkpointing(True)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """open_clip's inference transform as tensor ops: ``(B, 3, H, W)`` in ``[0, 1]`` -> model input."""
        _check_images(images)
        if self.resize_mode == "shortest":
            x = resize_and_center_crop(images, self.image_size, self.image_size, self.interpolation, "round")
        else:
            x = resize_and_center_crop(images, (self.image_size, self.image_size), None, self.interpolation)
        return normalize_channels(x, self.mean, self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, D)`` (float32) of images ``(B, 3, H, W)`` in ``[0, 1]``."""
        x = self.preprocess(images)
        dtype = next(self.model.visual.parameters()).dtype
        features = self.model.encode_image(x.to(dtype)).float()
        return F.normalize(features, dim=-1) if self.normalize else features


class CLIPZeroShotClassifier(AttributeClassifier):
    """Attribute classifier defined by text prompts: CLIP zero-shot classification.

    Each class of each attribute is described by one or more prompts. The class's text embedding is
    the mean of its prompts' unit text embeddings, renormalised (prompt ensembling). For a face crop
    with unit image embedding ``v``, the logit of class ``k`` is ``logit_scale * cos(v, t_k)``; a
    softmax over an attribute's classes gives its class probabilities, with gradients to the crop.

    Args:
        embedder: the CLIP image embedder; its model also encodes the prompts (once, here). Sharing
            one embedder with the image-semantics loss keeps one copy of the weights in memory.
        tokenizer: open_clip's tokenizer for that model (``open_clip.get_tokenizer(model_name)``):
            a callable from a list of strings to a ``(N, context_length)`` token tensor.
        prompts: attribute -> class -> prompts, e.g.
            ``{"gender": {"male": ["a photo of a man"], "female": ["a photo of a woman"]}}``.
            Class order is the order of the logits.
        logit_scale: temperature of the logits; ``None`` uses the model's learned one
            (``exp(model.logit_scale)``, 100 for the LAION models).
    """

    def __init__(
        self,
        embedder: OpenCLIPImageEmbedder,
        tokenizer: Callable[[list[str]], torch.Tensor],
        prompts: Mapping[str, Mapping[str, Sequence[str]]],
        logit_scale: float | None = None,
    ):
        super().__init__()
        if not isinstance(embedder, OpenCLIPImageEmbedder):
            raise ValueError(f"embedder must be an OpenCLIPImageEmbedder, got {type(embedder).__name__}")
        _check_prompts(prompts)
        self.embedder = embedder
        self.attributes = {name: list(classes) for name, classes in prompts.items()}
        self.prompts = {name: {c: list(p) for c, p in classes.items()} for name, classes in prompts.items()}
        self.input_size = embedder.image_size
        model = embedder.model
        if logit_scale is None:
            logit_scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
        if logit_scale <= 0:
            raise ValueError(f"logit_scale must be positive, got {logit_scale}")
        self.logit_scale = float(logit_scale)
        device = next(model.parameters()).device
        with torch.no_grad():
            for index, classes in enumerate(self.prompts.values()):
                class_embeddings = []
                for class_prompts in classes.values():
                    tokens = tokenizer(list(class_prompts)).to(device)
                    text = F.normalize(model.encode_text(tokens).float(), dim=-1)
                    class_embeddings.append(F.normalize(text.mean(dim=0), dim=-1))
                # Buffers are named by position: attribute names need not be Python identifiers.
                self.register_buffer(f"text_embeddings_{index}", torch.stack(class_embeddings))

    @classmethod
    def from_pretrained(
        cls,
        prompts: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        model_name: str = "ViT-H-14",
        pretrained: str | None = "laion2b_s32b_b79k",
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        cache_dir: str | None = None,
        logit_scale: float | None = None,
    ) -> CLIPZeroShotClassifier:
        """Load the open_clip model and tokenizer by name; ``prompts`` defaults to :data:`DEFAULT_PROMPTS`."""
        import open_clip

        embedder = OpenCLIPImageEmbedder.from_pretrained(model_name, pretrained, device, precision, cache_dir)
        tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        return cls(embedder, tokenizer, DEFAULT_PROMPTS if prompts is None else prompts, logit_scale)

    def text_embeddings(self, attribute: str) -> torch.Tensor:
        """The ``(K, D)`` unit class embeddings of ``attribute``."""
        if attribute not in self.attributes:
            raise ValueError(f"unknown attribute {attribute!r}; known: {sorted(self.attributes)}")
        return getattr(self, f"text_embeddings_{list(self.attributes).index(attribute)}")

    def forward(self, faces: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits ``(B, K)`` per attribute for face crops ``(B, 3, S, S)`` in ``[0, 1]``.

        The crops go through CLIP's own preprocessing, so any crop size works; ``input_size`` (the
        model's image size) avoids a resize.
        """
        image = self.embedder(faces)
        if not self.embedder.normalize:
            image = F.normalize(image, dim=-1)
        return {name: self.logit_scale * image @ self.text_embeddings(name).T for name in self.attributes}


def _check_prompts(prompts: Mapping[str, Mapping[str, Sequence[str]]]) -> None:
    if not isinstance(prompts, Mapping) or not prompts:
        raise ValueError("prompts must be a non-empty mapping attribute -> class -> list of prompts")
    for name, classes in prompts.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"attribute name {name!r} must be a non-empty string")
        if not isinstance(classes, Mapping) or len(classes) < 2:
            raise ValueError(f"attribute {name!r} needs a mapping with at least two classes")
        for class_name, class_prompts in classes.items():
            if isinstance(class_prompts, str):
                raise ValueError(f"prompts of {name}/{class_name} must be a list of strings, not a string")
            if not class_prompts or not all(isinstance(p, str) and p.strip() for p in class_prompts):
                raise ValueError(f"prompts of {name}/{class_name} must be a non-empty list of non-empty strings")
