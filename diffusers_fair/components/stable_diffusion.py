"""The Stable Diffusion 1.5 configuration: the real models of the method, built by name in one call.

The trainer takes any bundle with ``classifier``, ``detector``, ``image_embedders``,
``face_embedder``, ``reference_faces`` (and optionally ``crop_factor``); the toy world's
``ToyComponents`` is one. :class:`SD15Components` is the bundle for Stable Diffusion 1.5 as in the
paper:

* **detector**: MediaPipe BlazeFace (:class:`MediaPipeFaceDetector`), largest face, square box 1.5
  times the detected one. The detector's boxes are the final crop boxes, so ``crop_factor`` is 1.
* **image embedders** for the image-semantics loss: open_clip ``ViT-H-14`` / ``laion2b_s32b_b79k``
  (the paper's ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) and DINOv2 ViT-B/14
  (``facebook/dinov2-base``).
* **classifier** guiding the finetuning: MobileNetV3 heads trained on FairFace / CelebA face crops
  (a ``.safetensors`` file from ``examples/train_attribute_classifier.py``), or a CLIP zero-shot
  classifier that defines attributes by text prompts and shares the CLIP model above.
* **eval_classifier**: the classifier of the audits, configured separately; the paper trained a
  second set of classifiers so that the model is not judged by the classifier it was tuned against.
* **face_embedder** and **reference_faces** for the face-realism loss: a
  :class:`TorchvisionFaceEmbedder` and the embeddings of real faces (:class:`ReferenceFaceSet`
  file built with ``examples/build_reference_faces.py``), both safetensors.

:class:`SD15ComponentSettings` names all of them (a dataclass, readable from a JSON dict);
:func:`load_sd15_components` checks the settings and the files, then loads. Every model can instead
be passed already built (a tiny random-weight one in tests, a model shared with other code).

Precision: CLIP and DINOv2 are loaded in ``dtype`` (float16 on a GPU, as the paper's frozen
models); the small MobileNet classifier and face embedder stay in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base import AttributeClassifier, FaceDetector, FaceEmbedder, ImageEmbedder
from .clip import DEFAULT_PROMPTS
from .mediapipe_detector import MediaPipeDetectorConfig


CLASSIFIER_KINDS = ("mobilenet", "clip")
_OPEN_CLIP_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _from_dict(cls, values, what: str):
    """Build the dataclass ``cls`` from a dict; unknown keys are an error naming ``what``."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {type(values).__name__}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}")
    return cls(**values)


@dataclass
class ClassifierSettings:
    """Which attribute classifier to build.

    Attributes:
        kind: ``"mobilenet"``: MobileNetV3 heads loaded from ``path``; ``"clip"``: a CLIP zero-shot
            classifier on the components' CLIP model.
        path: the ``MobileNetAttributeClassifier`` ``.safetensors`` file (``kind="mobilenet"`` only).
        prompts: ``kind="clip"``: attribute -> class -> prompts, e.g.
            ``{"glasses": {"yes": ["a person wearing glasses"], "no": ["a person without glasses"]}}``;
            ``None`` uses ``DEFAULT_PROMPTS`` (the paper's gender, race in 4 groups, age).
        attributes: ``kind="clip"`` with the default prompts: keep only these attributes.
        logit_scale: ``kind="clip"``: temperature of the logits; ``None`` uses the model's own.
    """

    kind: str = "mobilenet"
    path: str | None = None
    prompts: dict | None = None
    attributes: list[str] | None = None
    logit_scale: float | None = None

    def __post_init__(self):
        if self.kind not in CLASSIFIER_KINDS:
            raise ValueError(f"classifier kind must be one of {CLASSIFIER_KINDS}, got {self.kind!r}")
        if self.kind == "mobilenet":
            if not isinstance(self.path, str) or not self.path:
                raise ValueError("a 'mobilenet' classifier needs 'path', its .safetensors file")
            if self.prompts is not None or self.attributes is not None or self.logit_scale is not None:
                raise ValueError("'prompts', 'attributes' and 'logit_scale' apply only to kind 'clip'")
            return
        if self.path is not None:
            raise ValueError("'path' applies only to kind 'mobilenet'")
        if self.prompts is not None and self.attributes is not None:
            raise ValueError("give either 'prompts' or 'attributes' (a subset of the default prompts), not both")
        if self.attributes is not None:
            unknown = sorted(set(self.attributes) - set(DEFAULT_PROMPTS))
            if not self.attributes or unknown:
                raise ValueError(f"'attributes' must be a non-empty subset of {sorted(DEFAULT_PROMPTS)}, got {self.attributes}")
        if self.logit_scale is not None and not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ValueError(f"logit_scale must be a positive number, got {self.logit_scale!r}")

    @classmethod
    def from_dict(cls, values: Mapping, what: str = "classifier") -> ClassifierSettings:
        return _from_dict(cls, values, what)

    def clip_prompts(self) -> dict:
        """The zero-shot prompts (``kind="clip"``): the given ones or the chosen default attributes."""
        if self.prompts is not None:
            return self.prompts
        return {a: p for a, p in DEFAULT_PROMPTS.items() if self.attributes is None or a in self.attributes}

    def attribute_classes(self) -> dict[str, list[str]] | None:
        """attribute -> class names, known without loading a model; ``None`` when the file is missing."""
        if self.kind == "clip":
            return {a: list(classes) for a, classes in self.clip_prompts().items()}
        if not Path(self.path).is_file():
            return None
        import json

        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{self.path} is not a readable safetensors file: {error}") from None
        if "attributes" not in metadata:
            raise ValueError(f"{self.path} is not a MobileNetAttributeClassifier file (no 'attributes' metadata)")
        return json.loads(metadata["attributes"])


@dataclass
class SD15ComponentSettings:
    """Names and files of the models of the Stable Diffusion 1.5 configuration.

    Attributes:
        clip_model: open_clip model name for the CLIP semantics loss and the zero-shot classifier
            (``None``: no CLIP).
        clip_pretrained: open_clip pretrained tag or local weights file (``None``: random weights).
        dinov2: Hub id or folder of the DINOv2 model for the semantics loss (``None``: no DINOv2).
        classifier: the classifier that guides finetuning (:class:`ClassifierSettings`).
        eval_classifier: the classifier of the audits, trained separately (``None``: not configured).
        face_embedder: ``TorchvisionFaceEmbedder`` ``.safetensors`` file (``None``: no face-realism loss).
        reference_faces: ``ReferenceFaceSet`` ``.safetensors`` file of real-face embeddings (``None``:
            only an original image's own face can be the realism reference).
        detector: MediaPipe settings (:class:`MediaPipeDetectorConfig`; JSON: a dict of its fields).
        cache_dir: download cache of open_clip and transformers (``None``: their defaults).
    """

    clip_model: str | None = "ViT-H-14"
    clip_pretrained: str | None = "laion2b_s32b_b79k"
    dinov2: str | None = "facebook/dinov2-base"
    classifier: ClassifierSettings = field(default_factory=lambda: ClassifierSettings(kind="clip"))
    eval_classifier: ClassifierSettings | None = None
    face_embedder: str | None = None
    reference_faces: str | None = None
    detector: MediaPipeDetectorConfig = field(default_factory=MediaPipeDetectorConfig)
    cache_dir: str | None = None

    def __post_init__(self):
        for name in ("clip_model", "clip_pretrained", "dinov2", "face_embedder", "reference_faces", "cache_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"components.{name} must be a non-empty string or null, got {value!r}")
        if isinstance(self.classifier, Mapping):
            self.classifier = ClassifierSettings.from_dict(self.classifier, "components.classifier")
        if isinstance(self.eval_classifier, Mapping):
            self.eval_classifier = ClassifierSettings.from_dict(self.eval_classifier, "components.eval_classifier")
        if isinstance(self.detector, Mapping):
            self.detector = _from_dict(MediaPipeDetectorConfig, self.detector, "components.detector")
        for name in ("classifier", "eval_classifier"):
            spec = getattr(self, name)
            if spec is None and name == "eval_classifier":
                continue
            if not isinstance(spec, ClassifierSettings):
                raise ValueError(f"components.{name} must be a ClassifierSettings or a dict, got {type(spec).__name__}")
            if spec.kind == "clip" and self.clip_model is None:
                raise ValueError(f"components.{name} is a CLIP zero-shot classifier, which needs components.clip_model")
        if self.reference_faces is not None and self.face_embedder is None:
            raise ValueError("components.reference_faces needs components.face_embedder (the embedder that made them)")

    @classmethod
    def from_dict(cls, values: Mapping) -> SD15ComponentSettings:
        """Settings from JSON data: the fields above, with ``classifier``, ``eval_classifier`` and ``detector`` as dicts."""
        return _from_dict(cls, values, "components")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def files(self, evaluation: bool = False) -> dict[str, str]:
        """role -> local file the settings need (the eval classifier's only with ``evaluation``)."""
        needed = {"classifier": self.classifier.path, "face_embedder": self.face_embedder,
                  "reference_faces": self.reference_faces, "detector model": self.detector.model_path}
        if evaluation and self.eval_classifier is not None:
            needed["eval_classifier"] = self.eval_classifier.path
        return {role: path for role, path in needed.items() if path is not None}

    def missing_files(self, evaluation: bool = False) -> dict[str, str]:
        return {role: path for role, path in self.files(evaluation).items() if not Path(path).is_file()}

    def check_targets(self, targets) -> None:
        """Every target attribute must be predicted, with the same classes in the same order, by the
        training classifier and by the evaluation classifier (where known without loading)."""
        for role in ("classifier", "eval_classifier"):
            spec = getattr(self, role)
            known = spec.attribute_classes() if spec is not None else None
            if known is None:
                continue
            for target in targets:
                for attribute, classes in target.classes.items():
                    if attribute not in known:
                        raise ValueError(f"target attribute {attribute!r} is not predicted by components.{role} "
                                         f"(it knows {sorted(known)})")
                    if list(known[attribute]) != list(classes):
                        raise ValueError(f"target classes of {attribute!r} are {list(classes)}, components.{role} has "
                                         f"{list(known[attribute])} (same names in the same order needed)")

    def check_training(self, config) -> None:
        """The losses a ``FairTrainingConfig`` turns on must have their models."""
        if config.weight_loss_img > 0 and self.clip_model is None and self.dinov2 is None:
            raise ValueError("weight_loss_img > 0 needs components.clip_model or components.dinov2")
        if config.weight_loss_face > 0 and self.face_embedder is None:
            raise ValueError("weight_loss_face > 0 needs components.face_embedder (or set weight_loss_face to 0)")


@dataclass
class SD15Components:
    """The models of the Stable Diffusion 1.5 configuration, frozen and in eval mode.

    Attributes:
        classifier: the attribute classifier that guides finetuning.
        detector: the face detector (MediaPipe).
        clip: the CLIP image embedder (semantics loss, zero-shot classifier, CLIP-T / CLIP-I), or ``None``.
        dinov2: the DINOv2 image embedder (semantics loss, DINO similarity), or ``None``.
        face_embedder: the face embedder of the face-realism loss, or ``None``.
        reference_faces: ``(M, D)`` unit embeddings of real faces, or ``None``.
        eval_classifier: the separately trained classifier of the audits, or ``None``.
        crop_factor: growth of the detector's boxes before cropping; 1 because MediaPipe's boxes
            are already the paper's squares (1.5 times the detected face).
    """

    classifier: AttributeClassifier
    detector: FaceDetector
    clip: ImageEmbedder | None = None
    dinov2: ImageEmbedder | None = None
    face_embedder: FaceEmbedder | None = None
    reference_faces: torch.Tensor | None = None
    eval_classifier: AttributeClassifier | None = None
    crop_factor: float = 1.0

    @property
    def image_embedders(self) -> list[ImageEmbedder]:
        """The embedders of the image-semantics loss: CLIP and DINOv2, those that are present."""
        return [e for e in (self.clip, self.dinov2) if e is not None]

    def evaluation_components(self):
        """The audit's inputs (:class:`~diffusers_fair.components.base.EvalComponents`) with the evaluation classifier."""
        from .base import EvalComponents

        if self.eval_classifier is None:
            raise ValueError("no evaluation classifier: configure components.eval_classifier and load it")
        return EvalComponents(classifier=self.eval_classifier, detector=self.detector, crop_factor=self.crop_factor)


def _frozen(module: torch.nn.Module, device) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.to(device).eval()


def _build_classifier(spec: ClassifierSettings, clip, clip_tokenizer, device) -> AttributeClassifier:
    if spec.kind == "mobilenet":
        from .classifiers import MobileNetAttributeClassifier

        return MobileNetAttributeClassifier.from_safetensors(spec.path, device=device)
    from .clip import CLIPZeroShotClassifier

    if clip is None:
        raise ValueError("a CLIP zero-shot classifier needs the CLIP model (components.clip_model, or pass clip=)")
    return _frozen(CLIPZeroShotClassifier(clip, clip_tokenizer, spec.clip_prompts(), spec.logit_scale), device)


def load_sd15_components(
    settings: SD15ComponentSettings | Mapping | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    load_eval_classifier: bool = False,
    clip: ImageEmbedder | None = None,
    clip_tokenizer=None,
    dinov2: ImageEmbedder | None = None,
    classifier: AttributeClassifier | None = None,
    eval_classifier: AttributeClassifier | None = None,
    detector: FaceDetector | None = None,
    face_embedder: FaceEmbedder | None = None,
    reference_faces: torch.Tensor | None = None,
) -> SD15Components:
    """Build the components named by ``settings`` (default: :class:`SD15ComponentSettings`).

    Every model passed as an argument is used as given and the setting for it is ignored: tests
    pass tiny random-weight models, and code that already holds a model shares it. The other models
    are loaded by name (open_clip and transformers download and cache the weights on first use) or
    from their safetensors files, which are all checked to exist before anything is loaded.

    Args:
        settings: what to load; a dict is read with :meth:`SD15ComponentSettings.from_dict`.
        device: where the models go (the trainer moves them to its own device in any case).
        dtype: weights of CLIP and DINOv2 (the paper: float16); the small models stay float32.
        load_eval_classifier: also load ``settings.eval_classifier`` (audits; not needed to train).
        clip: an ``OpenCLIPImageEmbedder``; ``clip_tokenizer`` its open_clip tokenizer (needed with
            a zero-shot classifier; by default ``open_clip.get_tokenizer(settings.clip_model)``).
        dinov2, classifier, eval_classifier, detector, face_embedder: built models.
        reference_faces: ``(M, D)`` embeddings or a :class:`ReferenceFaceSet`.
    """
    if settings is None:
        settings = SD15ComponentSettings()
    elif isinstance(settings, Mapping):
        settings = SD15ComponentSettings.from_dict(settings)
    if dtype not in _OPEN_CLIP_PRECISION:
        raise ValueError(f"dtype must be one of {list(_OPEN_CLIP_PRECISION)}, got {dtype}")
    given = {"classifier": classifier, "face_embedder": face_embedder, "reference_faces": reference_faces,
             "eval_classifier": eval_classifier, "detector model": detector}
    missing = {role: path for role, path in settings.missing_files(load_eval_classifier).items() if given[role] is None}
    if missing:
        raise ValueError("missing component files: " + ", ".join(f"{role} {path}" for role, path in missing.items()))

    to_build = [settings.classifier] if classifier is None else []
    if load_eval_classifier and eval_classifier is None and settings.eval_classifier is not None:
        to_build.append(settings.eval_classifier)
    zero_shot = any(spec.kind == "clip" for spec in to_build)  # these need CLIP's tokenizer
    if clip is None and settings.clip_model is not None:
        from .clip import OpenCLIPImageEmbedder

        clip = _frozen(OpenCLIPImageEmbedder.from_pretrained(
            settings.clip_model, settings.clip_pretrained, device=device, precision=_OPEN_CLIP_PRECISION[dtype],
            cache_dir=settings.cache_dir), device)
    if zero_shot and clip_tokenizer is None:  # settings.clip_model is set: the settings check that
        import open_clip

        clip_tokenizer = open_clip.get_tokenizer(settings.clip_model, cache_dir=settings.cache_dir)
    if dinov2 is None and settings.dinov2 is not None:
        from .dinov2 import DINOv2ImageEmbedder

        dinov2 = _frozen(DINOv2ImageEmbedder.from_pretrained(settings.dinov2, device=device, dtype=dtype,
                                                             cache_dir=settings.cache_dir), device)
    if classifier is None:
        classifier = _build_classifier(settings.classifier, clip, clip_tokenizer, device)
    if eval_classifier is None and load_eval_classifier:
        if settings.eval_classifier is None:
            raise ValueError("load_eval_classifier=True but components.eval_classifier is not configured")
        eval_classifier = _build_classifier(settings.eval_classifier, clip, clip_tokenizer, device)
    if face_embedder is None and settings.face_embedder is not None:
        from .face_embedder import TorchvisionFaceEmbedder

        face_embedder = TorchvisionFaceEmbedder.from_safetensors(settings.face_embedder, device=device)
    if reference_faces is None and settings.reference_faces is not None:
        from .face_embedder import ReferenceFaceSet

        reference_faces = ReferenceFaceSet.load(settings.reference_faces, device=device)
    if isinstance(reference_faces, torch.nn.Module):  # a ReferenceFaceSet
        reference_faces = reference_faces.embeddings
    dim = getattr(face_embedder, "embedding_dim", None)
    if reference_faces is not None and reference_faces.ndim == 2 and dim is not None and reference_faces.shape[1] != dim:
        raise ValueError(f"reference faces have shape {tuple(reference_faces.shape)}; the face embedder gives "
                         f"{dim}-dimensional embeddings")
    if detector is None:
        from .mediapipe_detector import MediaPipeFaceDetector

        detector = MediaPipeFaceDetector(settings.detector)
    return SD15Components(classifier=classifier, detector=detector, clip=clip, dinov2=dinov2,
                          face_embedder=face_embedder, reference_faces=reference_faces,
                          eval_classifier=eval_classifier)
