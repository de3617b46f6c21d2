"""Models the trainer and the evaluation use, each behind a small interface (see ``base.py``)."""

from .base import AttributeClassifier, FaceDetector, FaceDetection, FaceEmbedder, ImageEmbedder

__all__ = ["AttributeClassifier", "FaceDetector", "FaceDetection", "FaceEmbedder", "ImageEmbedder"]
