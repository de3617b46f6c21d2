"""Face boxes and differentiable face crops.

The distributional alignment loss classifies the *face* of each generated image, and its gradient
must reach the image. Detection itself (which pixels hold the face) is a discrete decision and is not
differentiated; the crop is: :func:`crop_faces` samples the box from the grad-carrying image batch
with bilinear interpolation (``torchvision.ops.roi_align``), in one batched call.
"""

from __future__ import annotations

import torch
from torchvision.ops import roi_align


def expand_boxes(boxes: torch.Tensor, factor: float, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Grow ``(B, 4)`` boxes ``(x0, y0, x1, y1)`` about their centres into squares.

    The side of the square is ``factor`` times the longer side of the box, as face classifiers
    are trained on crops with some context around the face. With ``image_size = (H, W)`` the
    square is shifted (not shrunk) to stay inside the image where it fits.
    """
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * factor
    x0, y0 = cx - side / 2, cy - side / 2
    if image_size is not None:
        height, width = image_size
        x0 = torch.minimum(torch.clamp(x0, min=0), torch.clamp(width - side, min=0))
        y0 = torch.minimum(torch.clamp(y0, min=0), torch.clamp(height - side, min=0))
    return torch.stack([x0, y0, x0 + side, y0 + side], dim=1)


def crop_faces(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes`` out of ``images`` and resize each crop to ``size x size``, differentiably.

    Args:
        images: ``(B, C, H, W)`` images (any float dtype); gradients flow back to them.
        boxes: ``(B, 4)`` boxes ``(x0, y0, x1, y1)`` in pixels, one per image.
        size: side of the output crops.

    Returns:
        ``(B, C, size, size)`` crops.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if boxes.shape != (images.shape[0], 4):
        raise ValueError(f"boxes must have shape ({images.shape[0]}, 4), got {tuple(boxes.shape)}")
    index = torch.arange(images.shape[0], device=images.device, dtype=images.dtype)[:, None]
    rois = torch.cat([index, boxes.to(images.dtype)], dim=1)
    # aligned=True: a box (0, 0, W, H) covers the image exactly (pixel centres at +0.5).
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
