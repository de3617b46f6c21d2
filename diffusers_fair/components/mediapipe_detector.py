"""Face detection with MediaPipe's BlazeFace, for Stable Diffusion images.

The paper's code found faces with insightface (falling back to dlib), kept the largest face of each
image, and grew its box into a square 1.5 times the box's longer side (``expand_coef=0.5``) before
cropping and resizing the face for the attribute classifier. This detector does the same with
MediaPipe's BlazeFace, which installs from PyPI as a wheel, needs no GPU and no download.

Which MediaPipe API. MediaPipe has two Python APIs:

* the Tasks API (``mediapipe.tasks.python.vision.FaceDetector``), the only one left in mediapipe
  1.x. It runs the **short-range** BlazeFace model from a ``.tflite`` file; newer mediapipe wheels
  no longer bundle that file, so diffusers-fair ships it (Apache-2.0, see
  ``components/models/NOTICE.md``) and works offline with any mediapipe that has the Tasks API.
  This is the default (``model="short_range"``).
* the legacy solutions API (``mediapipe.solutions.face_detection``), present up to the 0.10 series,
  which also offers the **full-range** model (faces up to about 5 m away, i.e. smaller in the frame).
  The Tasks graph rejects that model file, so ``model="full_range"`` uses the legacy API and raises
  a clear error where it is missing.

The short-range model sees a 128 x 128 version of the image: it finds faces that fill a good part
of the frame (a face about 95 pixels wide in a 512-pixel image is found with score 0.92; one half
that size is not). Portrait prompts such as "a photo of the face of a doctor" give such faces;
for prompts with small faces use ``model="full_range"``.

Detection runs on 8-bit copies of the images without gradients; the differentiable part is the
crop, :func:`diffusers_fair.method.boxes.crop_faces`, which samples the returned boxes from the
grad-carrying batch in one batched call.

Landmarks. BlazeFace gives six keypoints per face: the two eyes, the nose tip, the mouth centre and
the two ear tragions (its "right eye" is the subject's, on the image's left). ``detect`` returns
the first four as ``FaceDetection.landmarks`` in the order of the four-point face template
(image-left eye, image-right eye, nose tip, mouth centre; ``method.face_alignment``), which the
face-realism loss can align faces to; the ear tragions are left out, as the five-point template of
face-recognition crops has no ears.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..method.boxes import expand_boxes
from .base import FaceDetection, FaceDetector


SHIPPED_MODEL = os.path.join(os.path.dirname(__file__), "models", "face_detection_short_range.tflite")

MODELS = ("short_range", "full_range")


@dataclass
class MediaPipeDetectorConfig:
    """Settings of :class:`MediaPipeFaceDetector`.

    Attributes:
        model: ``"short_range"`` (Tasks API, shipped model file; faces that fill a good part of the
            image) or ``"full_range"`` (legacy solutions API of mediapipe <= 0.10; smaller faces).
        min_confidence: detections scoring below this are dropped. MediaPipe's own default, 0.5,
            lets BlazeFace "find" faces in 13-15% of pure-noise images (noise scores 0.23-0.68 over
            600 images), while clear faces score about 0.9; 0.7 rejected all of those noise images.
        box_expansion: the returned box is a square this many times the detected box's longer side,
            about the same centre (1.5 as in the paper's code; 1.0 returns BlazeFace's own box).
        shift_inside: move a square that crosses the image border back inside the image (where it
            fits), as :func:`~diffusers_fair.method.boxes.expand_boxes` does with ``image_size``; the
            crop then holds only image pixels, with the face off-centre. ``False`` keeps the square
            centred on the face and :func:`~diffusers_fair.method.boxes.crop_faces` reads zeros outside
            the image, as the paper's code padded with black.
        model_path: another short-range ``.tflite`` file to use instead of the shipped one.
    """

    model: str = "short_range"
    min_confidence: float = 0.7
    box_expansion: float = 1.5
    shift_inside: bool = True
    model_path: str | None = None

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")
        if self.box_expansion <= 0:
            raise ValueError(f"box_expansion must be positive, got {self.box_expansion}")
        if self.model_path is not None and self.model != "short_range":
            raise ValueError("model_path applies only to model='short_range'")


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` floats in ``[0, 1]`` -> ``(B, H, W, 3)`` uint8 RGB numpy (rounded, detached)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1], got dtype {images.dtype}")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(pixels.permute(0, 2, 3, 1).cpu().numpy())


class MediaPipeFaceDetector(FaceDetector):
    """Largest face per image with MediaPipe BlazeFace; boxes expanded as in the paper.

    Example::

        detector = MediaPipeFaceDetector()
        found = detector.detect(images)                       # images: (B, 3, H, W) in [0, 1]
        faces = crop_faces(images, found.boxes, size=224)     # differentiable
    """

    def __init__(self, config: MediaPipeDetectorConfig | None = None):
        self.config = config or MediaPipeDetectorConfig()
        import mediapipe as mp

        self._mp = mp
        if self.config.model == "short_range":
            from mediapipe.tasks.python import BaseOptions, vision

            path = self.config.model_path or SHIPPED_MODEL
            if not os.path.isfile(path):
                raise ValueError(f"face detection model file not found: {path}")
            options = vision.FaceDetectorOptions(
                base_options=BaseOptions(model_asset_path=path),
                running_mode=vision.RunningMode.IMAGE,
                min_detection_confidence=self.config.min_confidence,
            )
            self._detector = vision.FaceDetector.create_from_options(options)
        else:
            solutions = getattr(mp, "solutions", None)
            if solutions is None:
                raise ValueError(
                    f"model='full_range' needs mediapipe's legacy solutions API, which mediapipe "
                    f"{mp.__version__} lacks; install mediapipe==0.10.14 or use model='short_range'"
                )
            self._detector = solutions.face_detection.FaceDetection(
                model_selection=1, min_detection_confidence=self.config.min_confidence
            )

    def faces_in(self, image: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        """All faces in one ``(H, W, 3)`` uint8 RGB image as ``(x0, y0, x1, y1, score)`` in pixels."""
        return [face for face, _ in self.faces_and_landmarks_in(image)]

    def faces_and_landmarks_in(self, image: np.ndarray) -> list[tuple[tuple[float, ...], np.ndarray]]:
        """All faces in one ``(H, W, 3)`` uint8 RGB image: ``((x0, y0, x1, y1, score), landmarks)``.

        ``landmarks`` is a ``(4, 2)`` float array in pixels: image-left eye, image-right eye, nose tip,
        mouth centre (see the module docstring).
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        image = np.ascontiguousarray(image)
        height, width = image.shape[:2]
        faces = []
        if self.config.model == "short_range":
            result = self._detector.detect(self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=image))
            for detection in result.detections:
                box = detection.bounding_box
                score = detection.categories[0].score if detection.categories else 0.0
                x0, y0 = float(box.origin_x), float(box.origin_y)
                points = [(k.x, k.y) for k in detection.keypoints or []]
                faces.append(((x0, y0, x0 + box.width, y0 + box.height, float(score)),
                              _landmarks(points, width, height)))
        else:
            result = self._detector.process(image)
            for detection in result.detections or []:
                box = detection.location_data.relative_bounding_box
                x0, y0 = box.xmin * width, box.ymin * height
                points = [(k.x, k.y) for k in detection.location_data.relative_keypoints]
                faces.append(((x0, y0, x0 + box.width * width, y0 + box.height * height, float(detection.score[0])),
                              _landmarks(points, width, height)))
        return faces

    def detect(self, images: torch.Tensor) -> FaceDetection:
        """The largest face of each image, its box grown by ``config.box_expansion`` into a square.

        Args:
            images: ``(B, 3, H, W)`` float tensor in ``[0, 1]``; may carry gradients (not used).

        Returns:
            :class:`FaceDetection` on the images' device; boxes are zeros where no face was found.
        """
        pixels = images_to_uint8(images)
        per_image = [self.faces_and_landmarks_in(image) for image in pixels]
        detection = largest([[face for face, _ in faces] for faces in per_image], device=images.device,
                            landmarks=[[points for _, points in faces] for faces in per_image])
        image_size = tuple(images.shape[-2:]) if self.config.shift_inside else None
        boxes = expand_boxes(detection.boxes, self.config.box_expansion, image_size)
        boxes = torch.where(detection.found[:, None], boxes, torch.zeros_like(boxes))
        return FaceDetection(boxes=boxes, found=detection.found, scores=detection.scores,
                             landmarks=detection.landmarks)

    def close(self) -> None:
        """Release MediaPipe's graph (also done when the detector is garbage collected)."""
        detector, self._detector = getattr(self, "_detector", None), None
        if detector is not None:
            detector.close()

    def __enter__(self) -> MediaPipeFaceDetector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _landmarks(points: list[tuple[float, float]], width: int, height: int) -> np.ndarray:
    """The four-point landmarks in pixels from BlazeFace's relative keypoints (the first four of six)."""
    if len(points) < 4:
        raise ValueError(f"BlazeFace gave {len(points)} keypoints for a face; at least 4 are needed")
    return np.array(points[:4], dtype=np.float64) * np.array([width, height], dtype=np.float64)


def largest(detections: list[list[tuple[float, float, float, float, float]]], device=None,
            landmarks: list[list[np.ndarray]] | None = None) -> FaceDetection:
    """Keep the largest box of each image.

    Args:
        detections: per image, a list of ``(x0, y0, x1, y1, score)`` (possibly empty).
        landmarks: per image, the ``(P, 2)`` landmarks of each face of ``detections``, or ``None``.

    Returns:
        A :class:`FaceDetection` with one box per image (and the kept face's landmarks, zeros where
        no face was found, when ``landmarks`` is given).
    """
    boxes = torch.zeros(len(detections), 4)
    scores = torch.zeros(len(detections))
    found = torch.zeros(len(detections), dtype=torch.bool)
    points = None
    if landmarks is not None:
        num_points = next((len(p) for faces in landmarks for p in faces), 4)
        points = torch.zeros(len(detections), num_points, 2)
    for i, faces in enumerate(detections):
        if not faces:
            continue
        kept = max(range(len(faces)), key=lambda j: (faces[j][2] - faces[j][0]) * (faces[j][3] - faces[j][1]))
        x0, y0, x1, y1, score = faces[kept]
        boxes[i] = torch.tensor([x0, y0, x1, y1])
        scores[i] = score
        found[i] = True
        if points is not None:
            points[i] = torch.as_tensor(landmarks[i][kept], dtype=torch.float32)
    return FaceDetection(boxes=boxes.to(device), found=found.to(device), scores=scores.to(device),
                         landmarks=points.to(device) if points is not None else None)
