"""The losses that keep finetuned images close to the original ones, their weights, and the total.

Distributional alignment (``alignment.py``) says which class each generated face should move to.
Alone, it would happily change everything about the image. Three ideas keep the change small and
where it belongs; each is one small function here.

Image semantics (:func:`image_semantics_loss`)
    For every image, ``1 - cos`` between an image embedding (CLIP, DINOv2, or a toy embedder) of
    the finetuned model's image and that of the *frozen* model's image generated from the same
    noise and prompt, summed over the embedders.

Face realism (:func:`face_realism_loss`)
    Pushing a classifier's decision can turn a face into an adversarial, unnatural one. So the
    generated face's embedding (a face-recognition network) is pulled toward a real face: the
    nearest face of a reference set of real faces, or, when the original image already shows
    the target class, the original image's own face. It applies to the faces with at least one
    kept target (``face_realism_images="kept_target"``) or to every detected face
    (``"every_face"``, the authors' joint runs). The faces are read from the detector's square
    crops, or aligned to the face template from the detector's landmarks (``method.face_alignment``).

Dynamic weights (:func:`dynamic_image_weights`, :func:`face_region_factors`)
    An image whose target class equals its original class should not change: its semantics
    loss gets the full weight ``lambda_img``. An image that must change gets
    ``lambda_img * factor`` (0.2), and inside its face region the semantics gradient is scaled
    by a further factor (0.2, :func:`scale_region_gradient`), so the face is free to change while
    the rest of the image stays. Both factors can be set per attribute, and with several
    attributes the smallest factor among the attributes that must change applies. An uncertain
    target (confidence below the threshold) counts as "may change". An image without a face only
    gets the semantics loss: at full weight (``faceless_image_weight="full"``), or, as the authors'
    code does in its joint runs, at the smallest change factor of the attributes
    (``"smallest_change_factor"``).

Preservation (:func:`preserve_targets`, :func:`preserve_per_image`)
    Moving the targeted attributes can move the others (balancing hair length turns hair grey). A
    preserved attribute is held where the frozen model has it for the same prompt, with a
    cross-entropy toward a target class per image, like the DAL: the targets are the expected
    optimal-transport targets toward the class frequencies of the frozen model's images of the
    batch (the same noises), so the batch keeps the frozen model's distribution while single images
    may swap classes.

The total (:func:`combined_loss`) is a mean over the images of the batch::

    loss_i = DAL_i + lambda_img * w_i * semantics_i + lambda_face * [realism applies]_i * realism_i
             + lambda_preserve * preserve_i
    loss   = sum_i loss_i / N

where ``N`` is the whole batch over all processes (each process passes its local sum and the
global ``N``; summing the processes' gradients then gives the gradient of the global mean).

Per-attribute quantities are dicts ``{attribute: (N,) tensor}``; a missing class (no face) is -1.

:func:`batch_dynamic_targets` computes the alignment targets of a whole batch in which some images
have no face, for several targets at once, and :func:`preserve_targets` those of the preserved
attributes; :func:`alignment_batch_loss` composes all of the above
for a micro-batch, given its images, faces, logits, targets and the :class:`ReferenceImages`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from .alignment import MAX_EXACT_COUNT_VECTORS, dynamic_targets, kept_cross_entropy
from .boxes import crop_faces
from .face_alignment import align_faces
from .targets import TargetDistribution


__all__ = [
    "FACELESS_IMAGE_WEIGHTS",
    "FACE_REALISM_IMAGES",
    "BatchLoss",
    "LossWeights",
    "ReferenceImages",
    "alignment_batch_loss",
    "already_has_targets",
    "batch_dynamic_targets",
    "box_mask",
    "combined_loss",
    "cosine_distance",
    "dal_per_image",
    "dynamic_image_weights",
    "face_realism_loss",
    "face_realism_plan",
    "face_region_boxes",
    "face_region_factors",
    "image_semantics_loss",
    "nearest_reference",
    "needs_change",
    "preserve_per_image",
    "preserve_targets",
    "scale_region_gradient",
]


# The semantics weight of an image without a face (see "Dynamic weights" above).
FACELESS_IMAGE_WEIGHTS = ("full", "smallest_change_factor")

# The images the face-realism loss applies to (see "Face realism" above).
FACE_REALISM_IMAGES = ("kept_target", "every_face")


# ---------------------------------------------------------------------------- similarity losses
def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x_i, y_i)`` for each row: ``(N, D), (N, D) -> (N,)``, in ``[0, 2]``."""
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"expected two (N, D) tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return 1.0 - F.cosine_similarity(x.float(), y.float(), dim=1, eps=1e-8)


def image_semantics_loss(
    images: torch.Tensor,
    reference_embeddings: Sequence[torch.Tensor],
    embedders: Sequence[torch.nn.Module],
) -> torch.Tensor:
    """``sum_e (1 - cos(embedder_e(images_i), reference_e_i))`` per image: ``(N,)``.

    Args:
        images: ``(N, 3, H, W)`` in ``[0, 1]``, carrying gradient.
        reference_embeddings: per embedder, ``(N, D_e)`` embeddings of the frozen model's images
            (computed without gradient).
        embedders: the image embedders, in the same order.
    """
    if len(reference_embeddings) != len(embedders):
        raise ValueError(f"got {len(reference_embeddings)} reference embeddings for {len(embedders)} embedders")
    total = images.new_zeros(images.shape[0], dtype=torch.float32)
    for embedder, reference in zip(embedders, reference_embeddings):
        total = total + cosine_distance(embedder(images), reference.to(images.device))
    return total


def nearest_reference(embeddings: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar row of ``bank`` ``(M, D)`` for each embedding ``(N, D)``."""
    if bank.ndim != 2 or embeddings.ndim != 2 or bank.shape[1] != embeddings.shape[1] or bank.shape[0] == 0:
        raise ValueError(
            f"expected embeddings (N, D) and a non-empty bank (M, D), got {tuple(embeddings.shape)} and {tuple(bank.shape)}"
        )
    with torch.no_grad():
        similarity = F.normalize(embeddings.float(), dim=1) @ F.normalize(bank.float().to(embeddings.device), dim=1).T
        return similarity.argmax(dim=1)


def face_realism_loss(
    face_embeddings: torch.Tensor,
    bank: torch.Tensor | None,
    *,
    own_embeddings: torch.Tensor | None = None,
    use_own: torch.Tensor | None = None,
) -> torch.Tensor:
    """``1 - cos`` between each generated face and its reference face: ``(N,)``.

    The reference is the nearest face of ``bank`` (real faces' embeddings, ``(M, D)``), or
    ``own_embeddings[i]`` (the original image's face) where ``use_own[i]``. The choice of the
    nearest face is not differentiated; the distance to it is.
    """
    references = torch.zeros_like(face_embeddings, dtype=torch.float32)
    use_bank = torch.ones(face_embeddings.shape[0], dtype=torch.bool, device=face_embeddings.device)
    if use_own is not None:
        if own_embeddings is None or own_embeddings.shape != face_embeddings.shape:
            raise ValueError("use_own needs own_embeddings of the same shape as face_embeddings")
        use_own = use_own.to(face_embeddings.device, torch.bool)
        references[use_own] = own_embeddings.to(face_embeddings.device).float()[use_own]
        use_bank = ~use_own
    if use_bank.any():
        if bank is None:
            raise ValueError("faces without their own reference need a bank of reference face embeddings")
        index = nearest_reference(face_embeddings[use_bank], bank)
        references[use_bank] = bank.to(face_embeddings.device).float()[index]
    return cosine_distance(face_embeddings, references)


def dal_per_image(
    logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Distributional alignment loss per image: the sum over attributes of the cross-entropy toward
    the dynamic target, 0 where the target was not kept (uncertain, or no face): ``(N,)``."""
    terms = [kept_cross_entropy(logits[a].float(), labels[a].clamp(min=0), keep[a], reduction="none") for a in logits]
    return torch.stack(terms).sum(dim=0)


def preserve_per_image(
    logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Preservation loss per image: the sum over the preserved attributes of the cross-entropy toward
    their targets (:func:`preserve_targets`), 0 where a target was not kept: ``(N,)``.

    The same cross-entropy as :func:`dal_per_image`; only the targets differ.
    """
    return dal_per_image(logits, labels, keep)


# ---------------------------------------------------------------------------- dynamic weights
def needs_change(
    labels: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor], original: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per attribute, ``True`` where image ``i`` may change: its target is uncertain (not kept) or
    differs from the original image's class (``-1`` when the original has no face)."""
    return {a: ~(keep[a].bool() & (labels[a] == original[a].to(labels[a].device))) for a in labels}


def already_has_targets(change: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``True`` where no attribute needs to change."""
    return ~torch.stack([c.bool() for c in change.values()]).any(dim=0)


def _smallest_changing_factor(
    change: Mapping[str, torch.Tensor], found: torch.Tensor, factor: float, attribute_factors: Mapping[str, float]
) -> torch.Tensor:
    """``(N,)``: the smallest ``attribute_factors.get(a, factor)`` over the attributes ``a`` that must
    change in an image with a face; 1 where none must change or there is no face."""
    factors = torch.ones(found.shape[0], dtype=torch.float32, device=found.device)
    for attribute, mask in change.items():
        f = float(attribute_factors.get(attribute, factor))
        factors = torch.where(mask.bool() & found.bool(), torch.minimum(factors, torch.full_like(factors, f)), factors)
    return factors


def dynamic_image_weights(
    change: Mapping[str, torch.Tensor],
    found: torch.Tensor,
    *,
    factor: float,
    attribute_factors: Mapping[str, float] | None = None,
    faceless: str = "full",
) -> torch.Tensor:
    """Weight ``w_i`` of each image's semantics loss (to be multiplied by ``lambda_img``): ``(N,)``.

    1 where the image already has all its target classes; otherwise the smallest factor among the
    attributes that must change (``attribute_factors[a]``, default ``factor``). An image without a
    face gets 1 (``faceless="full"``) or the smallest factor of all the attributes in ``change``
    (``faceless="smallest_change_factor"``).

    Raises:
        ValueError: on an unknown ``faceless``.
    """
    if faceless not in FACELESS_IMAGE_WEIGHTS:
        raise ValueError(f"faceless must be one of {FACELESS_IMAGE_WEIGHTS}, got {faceless!r}")
    attribute_factors = attribute_factors or {}
    weights = _smallest_changing_factor(change, found, factor, attribute_factors)
    if faceless == "smallest_change_factor":
        smallest = min(float(attribute_factors.get(attribute, factor)) for attribute in change)
        weights = torch.where(found.bool(), weights, torch.full_like(weights, smallest))
    return weights


def face_region_factors(
    change: Mapping[str, torch.Tensor],
    found: torch.Tensor,
    factor: float,
    attribute_factors: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """Factor on the semantics gradient inside each face region: ``(N,)``.

    The smallest factor among the attributes that must change (``attribute_factors[a]``, default
    ``factor``) where a face must change, 1 elsewhere.
    """
    return _smallest_changing_factor(change, found, factor, attribute_factors or {})


def face_realism_plan(
    found: torch.Tensor,
    keep: Mapping[str, torch.Tensor],
    change: Mapping[str, torch.Tensor],
    original_confidence: Mapping[str, torch.Tensor],
    *,
    min_confidence: float,
    images: str = "kept_target",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which images get the face-realism loss, and which use their original face as reference.

    Returns ``(applies, use_own)``: the loss applies to images with a face and at least one kept
    target (``images="kept_target"``), or to every image with a face (``images="every_face"``);
    the original face is the reference where the image already has all its target classes and
    the classifier was confident (``>= min_confidence``) on every attribute of the original face;
    elsewhere the nearest face of the reference set is.

    Raises:
        ValueError: on an unknown ``images``.
    """
    if images not in FACE_REALISM_IMAGES:
        raise ValueError(f"images must be one of {FACE_REALISM_IMAGES}, got {images!r}")
    applies = found.bool()
    if images == "kept_target":
        applies = applies & torch.stack([k.bool() for k in keep.values()]).any(dim=0)
    confident = torch.stack([c >= min_confidence for c in original_confidence.values()]).all(dim=0)
    use_own = applies & already_has_targets(change) & confident.to(applies.device)
    return applies, use_own


# ---------------------------------------------------------------------------- face-region gradient
def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(N, 1, H, W)`` float mask, 1 on the pixels whose centre lies in the box ``[x0, x1) x [y0, y1)``."""
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5
    b = boxes.float()
    inside_x = (xs[None, :] >= b[:, 0:1]) & (xs[None, :] < b[:, 2:3])  # (N, W)
    inside_y = (ys[None, :] >= b[:, 1:2]) & (ys[None, :] < b[:, 3:4])  # (N, H)
    return (inside_y[:, :, None] & inside_x[:, None, :]).unsqueeze(1).float()


def face_region_boxes(
    boxes: torch.Tensor, found: torch.Tensor, original_boxes: torch.Tensor, original_found: torch.Tensor
) -> torch.Tensor:
    """The face region of each image: the generated face's box, intersected with the original
    face's box where the original has one; an all-zero box where the image has no face."""
    original_found = original_found.to(boxes.device).bool()
    original_boxes = original_boxes.to(boxes.device, boxes.dtype)
    lower = torch.where(original_found[:, None], torch.maximum(boxes[:, :2], original_boxes[:, :2]), boxes[:, :2])
    upper = torch.where(original_found[:, None], torch.minimum(boxes[:, 2:], original_boxes[:, 2:]), boxes[:, 2:])
    region = torch.cat([lower, upper], dim=1)
    return torch.where(found.bool()[:, None], region, torch.zeros_like(region))


def scale_region_gradient(images: torch.Tensor, boxes: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Return ``images`` unchanged, but with the gradient inside ``boxes[i]`` multiplied by ``factors[i]``.

    The forward value is exactly ``images``; backward multiplies the incoming gradient by the
    factor on the pixels of the box (:func:`box_mask`) and by 1 elsewhere. Used on the
    image-semantics branch only, so the alignment loss's gradient on the face is untouched.
    """
    mask = box_mask(boxes, images.shape[-2], images.shape[-1]).to(images.device)
    scale = 1.0 + (factors.to(images.device).float().view(-1, 1, 1, 1) - 1.0) * mask
    frozen = images.detach()
    return frozen + scale.to(images.dtype) * (images - frozen)


# ---------------------------------------------------------------------------- the total
def combined_loss(
    dal: torch.Tensor,
    semantics: torch.Tensor,
    realism: torch.Tensor,
    *,
    image_weights: torch.Tensor,
    realism_applies: torch.Tensor,
    weight_loss_img: float,
    weight_loss_face: float,
    num_images: int,
    preserve: torch.Tensor | None = None,
    weight_loss_preserve: float = 0.0,
) -> torch.Tensor:
    """``sum_i (DAL_i + lambda_img w_i semantics_i + lambda_face [applies_i] realism_i
    + lambda_preserve preserve_i) / num_images``.

    All per-image inputs are ``(n,)`` for the ``n`` images at hand; ``num_images`` is the size of
    the whole alignment batch (over micro-batches and processes), so that the partial sums of
    every micro-batch and process add up to the batch mean. ``preserve=None``: no preservation term.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    per_image_inputs = (dal, semantics, realism, image_weights, realism_applies)
    shapes = {tuple(t.shape) for t in per_image_inputs + ((preserve,) if preserve is not None else ())}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"all per-image inputs must have the same shape (n,), got {sorted(shapes)}")
    realism_term = torch.where(realism_applies.bool(), realism, torch.zeros_like(realism))
    per_image = dal + weight_loss_img * image_weights * semantics + weight_loss_face * realism_term
    if preserve is not None:
        per_image = per_image + weight_loss_preserve * preserve
    return per_image.sum() / num_images


# ---------------------------------------------------------------------------- a batch
def batch_dynamic_targets(
    probs: Mapping[str, torch.Tensor],
    found: torch.Tensor,
    targets: Sequence[TargetDistribution],
    *,
    threshold: float,
    monte_carlo_samples: int,
    seed: int,
    cost: str = "squared",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Dynamic targets of a whole batch (all processes' images) for several target distributions.

    Args:
        probs: attribute -> ``(N, K)`` class probabilities (rows of images without a face are ignored).
        found: ``(N,)`` bool, images with a face; only they enter the optimal transport.
        targets: the target distributions (marginal or joint), over disjoint attributes.
        threshold: the confidence ``C`` below which a target is dropped.
        monte_carlo_samples: label draws when the exact expectation is too expensive (it is exact
            for two classes, and for few count vectors).
        seed: seeds the Monte Carlo draws (target ``t`` uses ``seed + t``).
        cost: the transport cost, ``"squared"`` or ``"euclidean"`` (``alignment.expected_ot_targets``).

    Returns:
        ``(labels, keep, counts)``: attribute -> ``(N,)`` target class (-1 without a face),
        attribute -> ``(N,)`` bool kept, attribute -> ``(K,)`` counts of the predicted classes.
    """
    index = found.bool().nonzero().flatten()
    num = found.shape[0]
    labels, keep, counts = {}, {}, {}
    for t, target in enumerate(targets):
        result = None
        if index.numel() > 0:
            if target.is_joint:
                batch = {a: probs[a][index] for a in target.attributes}
            else:
                batch = probs[target.attributes[0]][index]
            generator = torch.Generator().manual_seed(seed + t)
            exact = _exact_targets_are_cheap(index.numel(), target.probs)
            result = dynamic_targets(batch, target, threshold=threshold, generator=generator,
                                     num_samples=None if exact else monte_carlo_samples, cost=cost)
        for attribute in target.attributes:
            device = probs[attribute].device
            labels[attribute] = torch.full((num,), -1, dtype=torch.long, device=device)
            keep[attribute] = torch.zeros(num, dtype=torch.bool, device=device)
            if result is not None:
                labels[attribute][index] = (result[0][attribute] if target.is_joint else result[0]).to(device)
                keep[attribute][index] = (result[2][attribute] if target.is_joint else result[2]).to(device)
            k = probs[attribute].shape[1]
            counts[attribute] = torch.bincount(probs[attribute][index].argmax(dim=1).cpu(), minlength=k)
    return labels, keep, counts


def _exact_targets_are_cheap(num_images: int, probs: torch.Tensor) -> bool:
    """Exact expected-OT targets for ``num_images`` images and a target ``probs``: always for two classes of
    non-zero probability, else when there are few count vectors (``alignment.MAX_EXACT_COUNT_VECTORS``)."""
    support = int((probs > 0).sum())
    return support <= 2 or math.comb(num_images + support - 1, support - 1) <= MAX_EXACT_COUNT_VECTORS


def preserve_targets(
    probs: Mapping[str, torch.Tensor],
    found: torch.Tensor,
    reference_classes: Mapping[str, torch.Tensor],
    *,
    threshold: float,
    monte_carlo_samples: int,
    seed: int,
    cost: str = "squared",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Targets that hold each preserved attribute where the frozen model has it, for a whole batch: the
    expected optimal-transport targets (:func:`~.alignment.dynamic_targets`) of the finetuned faces
    toward the class frequencies of the frozen model's faces. The target distribution of a batch
    whose frozen classes are 3:1 is 3:1; an image keeps its target when its confidence is at least
    ``threshold``.

    Args:
        probs: attribute -> ``(N, K)`` class probabilities of the finetuned model's faces (rows of
            images without a face are ignored), one entry per preserved attribute.
        found: ``(N,)`` bool, the finetuned model's images with a face.
        reference_classes: attribute -> ``(N,)`` class of the frozen model's face from the same noise
            (-1 where it has none).
        threshold, monte_carlo_samples, cost: as in :func:`batch_dynamic_targets`.
        seed: seeds the Monte Carlo draws (the ``j``-th attribute uses ``seed + j``).

    Returns:
        ``(labels, keep)``: attribute -> ``(N,)`` target class (-1 where none), attribute -> ``(N,)``
        bool kept. Nothing is kept for an attribute when no frozen or no finetuned image has a face.
    """
    found = found.bool()
    labels, keep = {}, {}
    for j, (attribute, original) in enumerate(reference_classes.items()):
        device = probs[attribute].device
        original = original.to(device)
        labels[attribute] = torch.full(found.shape, -1, dtype=torch.long, device=device)
        keep[attribute] = torch.zeros(found.shape, dtype=torch.bool, device=device)
        frozen = original[original >= 0]
        index = found.nonzero().flatten()
        if frozen.numel() == 0 or index.numel() == 0:
            continue
        counts = torch.bincount(frozen.cpu(), minlength=probs[attribute].shape[1]).double()
        target = counts / counts.sum()
        generator = torch.Generator().manual_seed(seed + j)
        exact = _exact_targets_are_cheap(index.numel(), target)
        result = dynamic_targets(probs[attribute][index], target, threshold=threshold, generator=generator,
                                 num_samples=None if exact else monte_carlo_samples, cost=cost)
        labels[attribute][index] = result[0].to(device)
        keep[attribute][index] = result[2].to(device)
    return labels, keep


@dataclass(frozen=True)
class LossWeights:
    """The weights and factors of the method's loss (explained in the module docstring).

    The training config has fields of the same names and meanings (``FairTrainingConfig``); build one
    from it with :meth:`from_config`, so that the losses depend on their own numbers only.

    Attributes:
        weight_loss_img: ``lambda_img``, the weight of the image-semantics loss.
        weight_loss_face: ``lambda_face``, the weight of the face-realism loss.
        image_change_factor: the semantics weight's factor for an image that must change.
        attribute_change_factors: per attribute, a factor that replaces ``image_change_factor``.
        face_region_factor: the further factor on the semantics gradient inside a changing face.
        own_face_confidence: the confidence above which the original face is the realism reference.
        attribute_face_region_factors: per attribute, a factor that replaces ``face_region_factor``.
        faceless_image_weight: the semantics weight of an image without a face: ``"full"`` (1) or
            ``"smallest_change_factor"`` (:func:`dynamic_image_weights`).
        face_realism_images: ``"kept_target"`` or ``"every_face"`` (:func:`face_realism_plan`).
        weight_loss_preserve: ``lambda_preserve``, the weight of the preservation loss.
    """

    weight_loss_img: float
    weight_loss_face: float
    image_change_factor: float
    attribute_change_factors: Mapping[str, float]
    face_region_factor: float
    own_face_confidence: float
    attribute_face_region_factors: Mapping[str, float] = field(default_factory=dict)
    faceless_image_weight: str = "full"
    face_realism_images: str = "kept_target"
    weight_loss_preserve: float = 0.0

    def __post_init__(self):
        if self.faceless_image_weight not in FACELESS_IMAGE_WEIGHTS:
            raise ValueError(f"faceless_image_weight must be one of {FACELESS_IMAGE_WEIGHTS}, "
                             f"got {self.faceless_image_weight!r}")
        if self.face_realism_images not in FACE_REALISM_IMAGES:
            raise ValueError(f"face_realism_images must be one of {FACE_REALISM_IMAGES}, "
                             f"got {self.face_realism_images!r}")

    @classmethod
    def from_config(cls, config) -> LossWeights:
        """The weights of any object with fields of these names (a ``FairTrainingConfig``)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


@dataclass
class ReferenceImages:
    """What the losses need of the frozen model's images, one row per image.

    Attributes:
        found: ``(N,)`` bool, the original image has a face.
        boxes: ``(N, 4)`` its face box (zeros where none).
        classes: attribute -> ``(N,)`` predicted class of the original face (-1 where none).
        confidence: attribute -> ``(N,)`` the classifier's probability of that class (0 where none).
        image_embeddings: per image embedder, ``(N, D_e)`` embeddings of the original images.
        face_embeddings: ``(N, D)`` face embeddings of the original faces (zeros where none), or ``None``.
    """

    found: torch.Tensor
    boxes: torch.Tensor
    classes: dict
    confidence: dict
    image_embeddings: list
    face_embeddings: torch.Tensor | None = None

    def __getitem__(self, rows: slice) -> ReferenceImages:
        """The rows of a micro-batch."""
        def cut(value):
            if isinstance(value, dict):
                return {k: v[rows] for k, v in value.items()}
            if isinstance(value, list):
                return [v[rows] for v in value]
            return value[rows] if value is not None else None

        return ReferenceImages(**{f.name: cut(getattr(self, f.name)) for f in fields(self)})


@dataclass
class BatchLoss:
    """The loss of a micro-batch and its parts.

    Attributes:
        total: the scalar to backpropagate (this micro-batch's share of the batch mean).
        parts: detached sums over the micro-batch, for logs: ``dal``, ``semantics`` (unweighted),
            ``face_realism`` (over the images it applies to), ``realism_images``, ``faces``,
            ``kept/<attribute>`` (counts), ``preserve`` (unweighted; 0 without preservation) and
            ``preserve_kept/<attribute>`` (counts, preserved attributes).
    """

    total: torch.Tensor
    parts: dict


def alignment_batch_loss(
    images: torch.Tensor,
    found: torch.Tensor,
    boxes: torch.Tensor,
    logits: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    keep: Mapping[str, torch.Tensor],
    reference: ReferenceImages,
    *,
    image_embedders: Sequence[torch.nn.Module],
    face_embedder: torch.nn.Module | None,
    face_bank: torch.Tensor | None,
    weights: LossWeights,
    num_images: int,
    landmarks: torch.Tensor | None = None,
    preserve_logits: Mapping[str, torch.Tensor] | None = None,
    preserve_labels: Mapping[str, torch.Tensor] | None = None,
    preserve_keep: Mapping[str, torch.Tensor] | None = None,
) -> BatchLoss:
    """The method's loss for the images of one micro-batch (see the module docstring).

    Args:
        images: ``(n, 3, H, W)`` decoded images in ``[0, 1]``, with gradient.
        found, boxes: the detected faces (``(n,)`` bool, ``(n, 4)`` crop boxes, zeros where none).
        logits: attribute -> ``(n, K)`` classifier logits of the face crops (with gradient); only the
            attributes of the targets.
        labels, keep: the dynamic targets of these images (:func:`batch_dynamic_targets`).
        reference: the frozen model's images of the same noises.
        image_embedders, face_embedder: the embedders of the semantics and realism losses.
        face_bank: ``(M, D)`` embeddings of real faces, or ``None`` (then only an original face
            that already has its target classes can serve as a reference).
        weights: the loss weights and factors.
        num_images: size of the whole alignment batch, the mean's denominator.
        landmarks: ``(n, 4 or 5, 2)`` landmarks of the detected faces, or ``None``. With landmarks the
            face-realism loss reads each face aligned to the face template (``method.face_alignment``),
            otherwise the crop of its box; the original faces' embeddings should be read the same way.
        preserve_logits, preserve_labels, preserve_keep: attribute -> ``(n, K)`` logits (with gradient),
            ``(n,)`` targets and ``(n,)`` kept of the preserved attributes (:func:`preserve_targets`), or
            ``None`` (no preservation term). They add to the loss only, not to the dynamic weights.
    """
    original = {a: reference.classes[a] for a in logits}
    change = needs_change(labels, keep, original)
    image_weights = dynamic_image_weights(change, found, factor=weights.image_change_factor,
                                          attribute_factors=weights.attribute_change_factors,
                                          faceless=weights.faceless_image_weight)
    dal = dal_per_image(logits, labels, keep)
    semantics = torch.zeros_like(dal)
    if weights.weight_loss_img > 0:
        region = face_region_boxes(boxes, found, reference.boxes, reference.found)
        region_factors = face_region_factors(change, found, weights.face_region_factor,
                                             weights.attribute_face_region_factors)
        scaled = scale_region_gradient(images, region, region_factors)
        semantics = image_semantics_loss(scaled, reference.image_embeddings, image_embedders)
    realism = torch.zeros_like(dal)
    applies, use_own = face_realism_plan(found, keep, change, {a: reference.confidence[a] for a in logits},
                                         min_confidence=weights.own_face_confidence,
                                         images=weights.face_realism_images)
    use_own = use_own & reference.found
    if weights.weight_loss_face == 0:
        applies = torch.zeros_like(applies)
    elif face_bank is None:
        applies = applies & use_own
    if applies.any():
        index = applies.nonzero().flatten()
        if landmarks is not None:
            crops = align_faces(images[index], landmarks[index].to(images.device), face_embedder.input_size)
        else:
            crops = crop_faces(images[index], boxes[index], face_embedder.input_size)
        faces = face_embedder(crops)
        own = reference.face_embeddings[index] if reference.face_embeddings is not None else torch.zeros_like(faces)
        realism = realism.index_copy(0, index, face_realism_loss(faces, face_bank, own_embeddings=own, use_own=use_own[index]))
    preserve = None
    if preserve_logits:
        preserve = preserve_per_image(preserve_logits, preserve_labels, preserve_keep)
    total = combined_loss(dal, semantics, realism, image_weights=image_weights, realism_applies=applies,
                          weight_loss_img=weights.weight_loss_img, weight_loss_face=weights.weight_loss_face,
                          num_images=num_images, preserve=preserve, weight_loss_preserve=weights.weight_loss_preserve)
    parts = {"dal": dal.sum(), "semantics": semantics.sum(), "face_realism": realism.sum(),
             "realism_images": applies.sum(), "faces": found.sum(), **{f"kept/{a}": keep[a].sum() for a in logits},
             "preserve": preserve.sum() if preserve is not None else dal.new_zeros(()),
             **{f"preserve_kept/{a}": k.sum() for a, k in (preserve_keep or {}).items() if preserve is not None}}
    return BatchLoss(total=total, parts={k: v.detach().float() for k, v in parts.items()})
