"""Reading the faces of a batch of images: detect, crop with gradient, classify (and embed).

The trainer (on the finetuned model's images, with gradient, and on the frozen model's), the audit
(``evaluation.audit.read_faces``) and the toy world read faces with this one routine:

1. **Detect** the largest face of each image on the *detached* images: which pixels hold the face
   is a discrete decision and is not differentiated.
2. **Square** each detector box about its centre, ``crop_factor`` times its longer side, shifted
   inside the image (``method.boxes.expand_boxes``): classifiers are trained on crops with some
   context around the face.
3. **Crop** the squares out of the images, resized to the model's ``input_size``
   (``method.boxes.crop_faces``). The crop is differentiable, so a loss on the classifier's logits
   reaches the pixels of the image, and only through the crop.
4. **Classify** the crops; with a face embedder, **embed** them too (the face-realism loss). With
   ``align_faces=True`` the face embedder reads each face warped onto the five-point face template
   from the detector's landmarks instead (``method.face_alignment``), as face-recognition networks
   are trained on aligned faces. A detector that gives no landmarks (the toy world's) leaves the
   embedder's crops unaligned.

Images without a face get zero rows, and no gradient reaches them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..method.boxes import crop_faces, expand_boxes
from ..method.face_alignment import align_faces as align_to_template


__all__ = ["FaceReading", "read_faces"]


@dataclass
class FaceReading:
    """The faces of a batch of ``B`` images, one row per image, on the images' device.

    Attributes:
        found: ``(B,)`` bool, the image has a face.
        boxes: ``(B, 4)`` float32, the detector's boxes ``(x0, y0, x1, y1)`` in pixels (zeros where none).
        scores: ``(B,)`` float32, the detector's confidence (0 where none).
        crop_boxes: ``(B, 4)`` float32, the square crops the models read (zeros where none).
        logits: attribute -> ``(B, K)`` float32 classifier logits, zeros where no face; they carry
            the images' gradient through the crop.
        face_embeddings: ``(B, D)`` float32 face embeddings (zeros where no face), or ``None`` when
            no face embedder was given or no image has a face.
        landmarks: ``(B, P, 2)`` float32, the detector's face landmarks (zeros where none), or ``None``
            when the detector gives none.
    """

    found: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    crop_boxes: torch.Tensor
    logits: dict[str, torch.Tensor]
    face_embeddings: torch.Tensor | None = None
    landmarks: torch.Tensor | None = None


def _device_of(model, default: torch.device) -> torch.device:
    """The device of a module's first parameter or buffer; ``default`` for anything else."""
    if isinstance(model, torch.nn.Module):
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            return tensor.device
    return default


def _read_crops(model, images: torch.Tensor, crop_boxes: torch.Tensor, index: torch.Tensor):
    """``model`` on the crops of rows ``index``, run on the model's device (``model.input_size`` crops)."""
    device = _device_of(model, images.device)
    return model(crop_faces(images[index].to(device), crop_boxes[index].to(device), model.input_size))


def _read_aligned(model, images: torch.Tensor, landmarks: torch.Tensor, index: torch.Tensor):
    """``model`` on the faces of rows ``index`` aligned to the face template (``model.input_size``)."""
    device = _device_of(model, images.device)
    return model(align_to_template(images[index].to(device), landmarks[index].to(device), model.input_size))


def _scatter(rows: torch.Tensor, index: torch.Tensor, num_images: int, device: torch.device) -> torch.Tensor:
    """``(num_images, D)`` float32 zeros with ``rows`` at ``index`` (differentiable in ``rows``)."""
    full = torch.zeros(num_images, rows.shape[1], dtype=torch.float32, device=device)
    return full.index_copy(0, index, rows.float().to(device))


def read_faces(images: torch.Tensor, detector, classifier, *, crop_factor: float = 1.0,
               face_embedder=None, align_faces: bool = False) -> FaceReading:
    """Detect the largest face of each image, crop it with gradient and classify it (see the module doc).

    Runs under the caller's grad mode (detection never has gradient). The detector, the classifier
    and the face embedder each run on their own device (that of their first parameter, else the
    images'); the results are on the images' device.

    Args:
        images: ``(B, 3, H, W)`` float images in ``[0, 1]``; may carry gradient.
        detector: a ``FaceDetector`` (``detect(images) -> FaceDetection``).
        classifier: an ``AttributeClassifier`` (``attributes``, ``input_size``; crops -> logits per attribute).
        crop_factor: the side of the square crop in units of the detector box's longer side.
        face_embedder: a ``FaceEmbedder`` (``input_size``; crops -> ``(n, D)``), or ``None``.
        align_faces: the face embedder reads faces aligned to the face template from the detector's
            landmarks; without landmarks it reads the square crops, as with ``False``.

    Returns:
        A :class:`FaceReading`.

    Raises:
        ValueError: if ``images`` is not ``(B, 3, H, W)`` or ``crop_factor`` is not positive.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if crop_factor <= 0:
        raise ValueError(f"crop_factor must be positive, got {crop_factor}")
    device, num_images = images.device, images.shape[0]
    with torch.no_grad():
        detection = detector.detect(images.detach().to(_device_of(detector, device)))
    found = detection.found.to(device).bool()
    boxes = detection.boxes.to(device).float()
    crop_boxes = expand_boxes(boxes, crop_factor, tuple(images.shape[-2:]))
    crop_boxes = torch.where(found[:, None], crop_boxes, torch.zeros_like(crop_boxes))
    index = found.nonzero().flatten()

    logits = {name: torch.zeros(num_images, len(classes), dtype=torch.float32, device=device)
              for name, classes in classifier.attributes.items()}
    landmarks = None
    if detection.landmarks is not None:
        landmarks = torch.where(found[:, None, None], detection.landmarks.to(device).float(), 0.0)
    face_embeddings = None
    if index.numel() > 0:
        read = _read_crops(classifier, images, crop_boxes, index)
        logits = {name: _scatter(read[name], index, num_images, device) for name in logits}
        if face_embedder is not None:
            if align_faces and landmarks is not None:
                embedded = _read_aligned(face_embedder, images, landmarks, index)
            else:
                embedded = _read_crops(face_embedder, images, crop_boxes, index)
            face_embeddings = _scatter(embedded, index, num_images, device)
    return FaceReading(found=found, boxes=boxes, scores=detection.scores.to(device).float(), crop_boxes=crop_boxes,
                       logits=logits, face_embeddings=face_embeddings, landmarks=landmarks)
