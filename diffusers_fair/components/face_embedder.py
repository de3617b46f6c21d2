"""Face embeddings and the reference set of real faces for the face-realism loss.

Distributional alignment can edit a face until it stops looking like a real one. The face-realism
loss keeps it realistic: ``1 - cos(emb(face), emb(F))`` where ``F`` is the real face nearest to the
generated one in a reference set (the paper used CelebA and FairFace faces), or the original
image's own face when that already has the target class.

* :class:`TorchvisionFaceEmbedder` is the embedding network: a torchvision backbone (ResNet-18 by
  default) whose last layer outputs a ``embedding_dim`` vector, L2-normalised, for ``112 x 112``
  face crops, the input size of face-recognition networks. The paper used SFNet-20, a SphereFace-
  family face-recognition network from the opensphere project; its weights are not redistributable
  here, so the user supplies weights for this embedder (a face-recognition model trained with an
  angular-margin loss) as a safetensors file. As in the paper's code, the embedding of a face and of
  its mirror image are averaged (``flip_average``).
* :class:`ReferenceFaceSet` holds the unit embeddings of the reference faces, saves and loads them as
  safetensors and finds each query's nearest reference by cosine similarity in torch (one matrix
  product on the device of the set).
* :func:`embed_faces` detects, crops and embeds the faces of a batch of images; the reference set is
  built with it (``examples/build_reference_faces.py``), so reference faces are read exactly as
  generated faces are during training: the detector's square crops, or, with ``align=True`` (for
  training with ``align_faces=True``), the faces warped onto the face template from the detector's
  landmarks (``method.face_alignment``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..method.boxes import crop_faces
from ..method.face_alignment import align_faces
from .base import FaceDetector, FaceEmbedder


BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large")

EMBEDDER_FORMAT = "diffusers_fair.TorchvisionFaceEmbedder/1"
REFERENCE_FORMAT = "diffusers_fair.ReferenceFaceSet/1"


def _build_backbone(name: str, embedding_dim: int) -> nn.Module:
    """A torchvision network, random weights, whose final layer outputs ``embedding_dim`` values."""
    import torchvision.models as tvm

    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    network = getattr(tvm, name)(weights=None)
    if name.startswith("resnet"):
        network.fc = nn.Linear(network.fc.in_features, embedding_dim)
    else:
        network.classifier[-1] = nn.Linear(network.classifier[-1].in_features, embedding_dim)
    return network


class TorchvisionFaceEmbedder(FaceEmbedder):
    """Unit face embeddings from a torchvision backbone; weights from safetensors.

    A new instance has random weights and is in training mode; :meth:`from_safetensors` returns a
    frozen embedder in eval mode.

    Args:
        backbone: one of :data:`BACKBONES`.
        embedding_dim: length of the embedding (512 for SphereFace/ArcFace-style networks).
        input_size: side of the square face crops (112).
        mean, std: per-channel input normalisation; ``0.5, 0.5`` maps ``[0, 1]`` to ``[-1, 1]``,
            the usual input range of face-recognition networks.
        flip_average: add the embedding of the horizontally mirrored crop before normalising.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        embedding_dim: int = 512,
        input_size: int = 112,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        flip_average: bool = True,
    ):
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        if input_size < 32:
            raise ValueError(f"input_size must be at least 32 pixels, got {input_size}")
        self.backbone_name = backbone
        self.embedding_dim = int(embedding_dim)
        self.input_size = int(input_size)
        self.flip_average = bool(flip_average)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.network = _build_backbone(backbone, self.embedding_dim)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """Unit embeddings ``(B, D)`` (float32) for face crops ``(B, 3, S, S)`` in ``[0, 1]``."""
        if faces.ndim != 4 or faces.shape[1:] != (3, self.input_size, self.input_size):
            raise ValueError(
                f"faces must have shape (B, 3, {self.input_size}, {self.input_size}), got {tuple(faces.shape)}"
            )
        dtype = next(self.network.parameters()).dtype
        x = ((faces.float() - self.mean.float()) / self.std.float()).to(dtype)
        features = self.network(x).float()
        if self.flip_average:
            features = features + self.network(torch.flip(x, dims=[3])).float()
        return F.normalize(features, dim=-1)

    def save_safetensors(self, path: str) -> None:
        """Write the weights and the settings to one ``.safetensors`` file."""
        from safetensors.torch import save_file

        metadata = {
            "format": EMBEDDER_FORMAT,
            "backbone": self.backbone_name,
            "embedding_dim": str(self.embedding_dim),
            "input_size": str(self.input_size),
            "mean": json.dumps(self.mean.flatten().tolist()),
            "std": json.dumps(self.std.flatten().tolist()),
            "flip_average": json.dumps(self.flip_average),
        }
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, path, metadata=metadata)

    @classmethod
    def from_safetensors(cls, path: str, device: str | torch.device = "cpu") -> TorchvisionFaceEmbedder:
        """Load an embedder written by :meth:`save_safetensors`, frozen and in eval mode.

        To use weights trained elsewhere, load them into ``TorchvisionFaceEmbedder(...).network``
        (keys of the torchvision model) and call :meth:`save_safetensors` once.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != EMBEDDER_FORMAT:
            raise ValueError(f"{path} is not a TorchvisionFaceEmbedder file (format={metadata.get('format')!r})")
        model = cls(
            backbone=metadata["backbone"],
            embedding_dim=int(metadata["embedding_dim"]),
            input_size=int(metadata["input_size"]),
            mean=json.loads(metadata["mean"]),
            std=json.loads(metadata["std"]),
            flip_average=json.loads(metadata["flip_average"]),
        )
        missing, unexpected = model.load_state_dict(load_file(path), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} does not match the architecture: missing {missing}, unexpected {unexpected}")
        model.requires_grad_(False)
        return model.to(device).eval()


class ReferenceFaceSet(nn.Module):
    """Unit embeddings of real faces and nearest-neighbour search by cosine similarity.

    Args:
        embeddings: ``(N, D)`` embeddings of the reference faces (normalised here).
    """

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"embeddings must have shape (N, D) with N > 0, got {tuple(embeddings.shape)}")
        if not torch.isfinite(embeddings).all():
            raise ValueError("embeddings contain NaN or infinite values")
        if (embeddings.norm(dim=1) == 0).any():
            raise ValueError("embeddings contain all-zero rows, which have no direction")
        self.register_buffer("embeddings", F.normalize(embeddings.detach().float(), dim=1))

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @torch.no_grad()
    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference embedding most similar (cosine) to each query.

        Args:
            queries: ``(B, D)`` embeddings (need not be unit length).

        Returns:
            ``(references, similarities)``: the ``(B, D)`` unit reference embeddings (constants,
            no gradient) and their ``(B,)`` cosine similarities to the queries.
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (B, {self.dim}), got {tuple(queries.shape)}")
        unit = F.normalize(queries.detach().to(self.embeddings), dim=1)
        similarities, index = (unit @ self.embeddings.T).max(dim=1)
        return self.embeddings[index], similarities

    def save(self, path: str, metadata: dict[str, str] | None = None) -> None:
        """Write the embeddings (and optional string metadata, e.g. the source) to safetensors."""
        from safetensors.torch import save_file

        info = dict(metadata or {})
        info["format"] = REFERENCE_FORMAT
        save_file({"embeddings": self.embeddings.contiguous().cpu()}, path, metadata=info)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> ReferenceFaceSet:
        """Load a set written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != REFERENCE_FORMAT:
                raise ValueError(f"{path} is not a ReferenceFaceSet file (format={metadata.get('format')!r})")
            embeddings = handle.get_tensor("embeddings")
        return cls(embeddings).to(device)


def center_square_boxes(images: torch.Tensor) -> torch.Tensor:
    """The largest centred square of each image as ``(B, 4)`` boxes (for images that are face crops)."""
    height, width = images.shape[-2:]
    side = min(height, width)
    x0, y0 = (width - side) / 2, (height - side) / 2
    box = torch.tensor([x0, y0, x0 + side, y0 + side], dtype=torch.float32, device=images.device)
    return box.expand(images.shape[0], 4)


@torch.no_grad()
def face_crops(
    images: torch.Tensor, size: int, detector: FaceDetector | None = None, *, align: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop the largest face of each image to ``size x size``.

    Args:
        images: ``(B, 3, H, W)`` float images in ``[0, 1]``.
        size: side of the crops.
        detector: finds the faces; ``None`` treats each image as a face crop already and uses its
            largest centred square.
        align: warp each face onto the face template from the detector's landmarks
            (``method.face_alignment.align_faces``, the template scaled to ``size``) instead of
            cropping the detector's box, as the trainer reads faces with ``align_faces=True``.

    Returns:
        ``(crops, found)``: ``(n, 3, size, size)`` crops of the ``n`` images where a face was found,
        and the ``(B,)`` bool mask of those images.

    Raises:
        ValueError: ``images`` is not ``(B, 3, H, W)``, or ``align=True`` without a detector that gives landmarks.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if align and detector is None:
        raise ValueError("align=True needs a detector: faces are aligned from its landmarks")
    if detector is None:
        boxes = center_square_boxes(images)
        found = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        return crop_faces(images[found], boxes[found], size), found
    detection = detector.detect(images)
    found = detection.found.to(images.device).bool()
    if not align:
        return crop_faces(images[found], detection.boxes.to(images.device)[found], size), found
    if detection.landmarks is None:
        raise ValueError(f"align=True needs face landmarks; {type(detector).__name__} gives none")
    if not found.any():
        return images.new_zeros(0, 3, size, size), found
    return align_faces(images[found], detection.landmarks.to(images.device)[found], size), found


@torch.no_grad()
def embed_faces(
    images: torch.Tensor, embedder: FaceEmbedder, detector: FaceDetector | None = None, *, align: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detect, crop (or align, with ``align=True``) and embed the largest face of each image (see :func:`face_crops`).

    Returns:
        ``(embeddings, found)``: ``(n, D)`` embeddings of the ``n`` images where a face was found,
        and the ``(B,)`` bool mask of those images.

    Raises:
        ValueError: as :func:`face_crops`.
    """
    crops, found = face_crops(images, embedder.input_size, detector, align=align)
    if crops.shape[0] == 0:
        return images.new_zeros(0, getattr(embedder, "embedding_dim", 0)), found
    return embedder(crops), found
