"""Models the trainer and the evaluation use, each behind a small interface (see ``base.py``).

The real models (MediaPipe, open_clip, DINOv2, torchvision backbones) are imported lazily: importing
``diffusers_fair.components`` stays fast, and a name is loaded from its module on first use.
"""

import importlib

from .base import AttributeClassifier, FaceDetection, FaceDetector, FaceEmbedder, ImageEmbedder


_LAZY = {
    "MediaPipeFaceDetector": "mediapipe_detector",
    "MediaPipeDetectorConfig": "mediapipe_detector",
    "OpenCLIPImageEmbedder": "clip",
    "CLIPZeroShotClassifier": "clip",
    "DEFAULT_PROMPTS": "clip",
    "DINOv2ImageEmbedder": "dinov2",
    "MobileNetAttributeClassifier": "classifiers",
    "FAIRFACE_ATTRIBUTES": "classifiers",
    "TorchvisionFaceEmbedder": "face_embedder",
    "ReferenceFaceSet": "face_embedder",
    "embed_faces": "face_embedder",
    "ClassifierSettings": "stable_diffusion",
    "SD15ComponentSettings": "stable_diffusion",
    "SD15Components": "stable_diffusion",
    "load_sd15_components": "stable_diffusion",
}

__all__ = ["AttributeClassifier", "FaceDetector", "FaceDetection", "FaceEmbedder", "ImageEmbedder", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
