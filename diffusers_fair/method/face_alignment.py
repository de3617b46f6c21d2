"""Faces aligned to the five-point template of face-recognition networks, differentiably.

Face-recognition networks (SphereFace, ArcFace and their kin) are trained on faces warped so that
the eyes, the nose tip and the mouth corners land on fixed points of a 112 x 112 image; a crop that
is merely boxed (tilted, off-centre, at another scale) is not the input they were trained on. With
``align_faces=True`` the face-realism loss reads aligned faces where the detector gives landmarks.

The template (:data:`FIVE_POINT_TEMPLATE`) is the usual one of 112 x 112 face-recognition crops,
the one the authors' code aligns its faces to (``image_pipeline`` in
``exp-1-debias-gender/1-main-debias.py``, lines 292-311, from insightface's five keypoints).
Detectors that give four points instead of five (MediaPipe BlazeFace gives the eyes, the nose tip,
the mouth centre and the two ear tragions) use :data:`FOUR_POINT_TEMPLATE`: the eyes and the nose
tip of the five-point template and the midpoint of its mouth corners; the ears are not used.

:func:`similarity_to_template` finds the least-squares similarity (rotation, uniform scale,
translation; no reflection) that takes a face's landmarks onto the template, in closed form;
:func:`align_faces` samples the ``size x size`` aligned face from the grad-carrying images with
bilinear interpolation (zeros outside the image), so a loss on the aligned face reaches the pixels.
The landmarks themselves are not differentiated, as boxes are not.

Coordinates. Landmarks are in the images' pixel coordinates with pixel ``i`` spanning
``[i, i + 1)`` (as ``method.boxes`` boxes are). The template's numbers are in pixel-index
coordinates (the centre of pixel ``i`` at ``i``), so they are shifted by half a pixel here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


__all__ = ["FIVE_POINT_TEMPLATE", "FOUR_POINT_TEMPLATE", "TEMPLATE_SIZE", "align_faces", "similarity_to_template"]

TEMPLATE_SIZE = 112

# (image-left eye, image-right eye, nose tip, left mouth corner, right mouth corner) in a 112 x 112
# crop, pixel-index coordinates.
FIVE_POINT_TEMPLATE = torch.tensor(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=torch.float64,
)

# (image-left eye, image-right eye, nose tip, mouth centre): the mouth centre is the midpoint of
# the five-point template's mouth corners.
FOUR_POINT_TEMPLATE = torch.cat([FIVE_POINT_TEMPLATE[:3], FIVE_POINT_TEMPLATE[3:].mean(dim=0, keepdim=True)])


def _template(num_points: int, size: int) -> torch.Tensor:
    """The template for ``num_points`` landmarks in continuous coordinates of a ``size x size`` crop."""
    if num_points == 5:
        points = FIVE_POINT_TEMPLATE
    elif num_points == 4:
        points = FOUR_POINT_TEMPLATE
    else:
        raise ValueError(f"landmarks must hold 4 or 5 points per face, got {num_points}")
    return (points + 0.5) * (size / TEMPLATE_SIZE)


def similarity_to_template(landmarks: torch.Tensor, size: int = TEMPLATE_SIZE) -> torch.Tensor:
    """The ``(B, 2, 3)`` similarities taking each face's landmarks onto the template of a ``size`` crop.

    Each is the least-squares fit ``[a -b; b a] x + t`` (Umeyama's closed form without reflection)
    of the ``(B, P, 2)`` landmarks (``P`` = 4 or 5, see the module docstring) to the template
    scaled to ``size``; float64, on the landmarks' device.

    Raises:
        ValueError: if ``landmarks`` is not ``(B, 4 or 5, 2)`` or a face's points all coincide.
    """
    if landmarks.ndim != 3 or landmarks.shape[2] != 2:
        raise ValueError(f"landmarks must have shape (B, 4 or 5, 2), got {tuple(landmarks.shape)}")
    source = landmarks.detach().to(torch.float64)
    target = _template(landmarks.shape[1], size).to(source.device)
    source_centre = source.mean(dim=1, keepdim=True)
    target_centre = target.mean(dim=0, keepdim=True)
    s, d = source - source_centre, target - target_centre  # (B, P, 2), (P, 2)
    spread = (s * s).sum(dim=(1, 2))
    if bool((spread <= 1e-12).any()):
        raise ValueError("a face's landmarks all lie on one point; it cannot be aligned")
    a = (s * d).sum(dim=(1, 2)) / spread
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(dim=1) / spread
    rotation = torch.stack([torch.stack([a, -b], dim=1), torch.stack([b, a], dim=1)], dim=1)  # (B, 2, 2)
    translation = target_centre.T - rotation @ source_centre.transpose(1, 2)  # (B, 2, 1)
    return torch.cat([rotation, translation], dim=2)


def align_faces(images: torch.Tensor, landmarks: torch.Tensor, size: int = TEMPLATE_SIZE) -> torch.Tensor:
    """The ``(B, C, size, size)`` faces of ``images``, warped so that their landmarks sit on the template.

    Args:
        images: ``(B, C, H, W)`` images (any float dtype); gradients flow back to them.
        landmarks: ``(B, P, 2)`` landmarks of one face per image (``P`` = 4 or 5), in pixels.
        size: side of the aligned faces (the template is scaled from 112 to it).

    Returns:
        The aligned faces, bilinearly sampled; pixels that map outside the image are zeros.

    Raises:
        ValueError: on shapes that do not match, or landmarks that cannot be aligned.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if landmarks.shape[:1] != images.shape[:1]:
        raise ValueError(f"landmarks must have one face per image ({images.shape[0]}), got {tuple(landmarks.shape)}")
    height, width = images.shape[-2:]
    transform = similarity_to_template(landmarks, size)
    rotation, translation = transform[:, :, :2], transform[:, :, 2:]
    # The centre of every output pixel, taken back into the image by the inverse similarity.
    centres = torch.arange(size, dtype=torch.float64, device=transform.device) + 0.5
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    output_points = torch.stack([xs.flatten(), ys.flatten()])  # (2, size * size)
    source_points = torch.linalg.solve(rotation, output_points - translation)  # (B, 2, size * size)
    # grid_sample with align_corners=False: -1 and 1 are the outer edges of the image.
    grid = torch.stack([2 * source_points[:, 0] / width - 1, 2 * source_points[:, 1] / height - 1], dim=-1)
    grid = grid.view(-1, size, size, 2).to(images.device, images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
