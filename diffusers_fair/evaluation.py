"""Measuring fairness: the bias metric of the paper, and audits of text-to-image pipelines.

``bias(P)`` measures how far the class frequencies of one prompt's images are from uniform: the
mean, over every pair of classes ``i < j``, of ``|f_i - f_j|``. It is 0 for a perfectly balanced
prompt and ``2 / K`` when every image falls in one of ``K`` classes (1 for ``K = 2``). The paper
reports it averaged over test prompts.

An *audit* (:func:`evaluate`) measures it for a pipeline. For every prompt it generates ``N``
images from seeded noise, finds the largest face in each image, classifies the face's attributes
with an evaluation classifier and counts the predicted classes. Per prompt and over all prompts it
reports:

* the class frequencies of each attribute (over the images where a face was found) and of joint
  attributes (``gender x race``: one class per cell), and ``bias(P)``'s mean and standard
  deviation over prompts;
* the share of images with no detected face (those images are not counted in the frequencies);
* CLIP-T: the cosine between the CLIP embeddings of the prompt and of the image (needs a text
  embedder);
* with a reference (the base model, when auditing an adapted one): CLIP-I and DINO, the cosines
  between the embeddings of each image and the reference image generated from the *same* noise,
  and the reference's own frequencies and bias, so that one audit gives "before" and "after".

The audit itself (seeded noise, generation, face reading, the per-prompt cache) lives in
:mod:`diffusers_fair.audit`; its public names are re-exported here.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCES = ("model", "reference")


# --------------------------------------------------------------------------- the bias metric
def bias_metric(freqs: torch.Tensor | Sequence) -> torch.Tensor:
    """The paper's ``bias(P) = mean_{i<j} |f_i - f_j|``.

    Args:
        freqs: ``(K,)`` frequencies or counts of the ``K`` classes for one prompt, or
            ``(P, K)`` for ``P`` prompts. Each row is normalised to sum to 1 first, so raw counts
            are fine. Values must be finite and non-negative, and no row may sum to 0.

    Returns:
        A float64 tensor: a scalar for a ``(K,)`` input, ``(P,)`` per-prompt values for ``(P, K)``.
    """
    values = torch.as_tensor(freqs, dtype=torch.float64).detach().cpu()
    if values.ndim not in (1, 2):
        raise ValueError(f"freqs must be (K,) or (P, K), got shape {tuple(values.shape)}")
    num_classes = values.shape[-1]
    if num_classes < 2:
        raise ValueError(f"bias needs at least 2 classes, got {num_classes}")
    if not torch.isfinite(values).all():
        raise ValueError("freqs contains NaN or infinite values")
    if (values < 0).any():
        raise ValueError("freqs contains negative values")
    totals = values.sum(dim=-1, keepdim=True)
    if (totals == 0).any():
        raise ValueError("a row of freqs sums to 0 (no images counted)")
    f = values / totals
    pairwise = (f.unsqueeze(-1) - f.unsqueeze(-2)).abs()  # (..., K, K), each pair counted twice
    num_pairs = num_classes * (num_classes - 1) / 2
    return pairwise.sum(dim=(-1, -2)) / 2 / num_pairs


def mean_std(values: torch.Tensor | Sequence, *, ddof: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of per-prompt values (``ddof=0``: population std).

    ``bias_metric`` of a ``(P, K)`` table gives per-prompt values; this summarises them the way
    the paper's tables do (mean over prompts), with their spread.
    """
    v = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
    if v.numel() == 0:
        raise ValueError("mean_std needs at least one value")
    if v.numel() <= ddof:
        raise ValueError(f"mean_std with ddof={ddof} needs more than {ddof} values, got {v.numel()}")
    if not torch.isfinite(v).all():
        raise ValueError("values contains NaN or infinite entries")
    mean = float(v.mean())
    std = float(((v - mean) ** 2).sum() / (v.numel() - ddof)) ** 0.5
    return mean, std


@functools.lru_cache(maxsize=4096)
def bias_floor(num_classes: int, num_images: int, *, draws: int = 20000, seed: int = 0) -> float:
    """Expected ``bias(P)`` of ``num_images`` images drawn from a *perfectly uniform* model.

    Finite samples are never exactly balanced, so even a fair model scores above 0: with 8 images
    and two classes the expected bias is about 0.27; with 60, about 0.10. Estimated by Monte Carlo
    (``draws`` multinomial draws, seeded), to read audits with few images per prompt.
    """
    if num_classes < 2 or num_images < 1 or draws < 1:
        raise ValueError("bias_floor needs num_classes >= 2, num_images >= 1 and draws >= 1")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (draws, num_images), generator=generator)
    counts = F.one_hot(labels, num_classes).sum(dim=1)
    return float(bias_metric(counts).mean())


# --------------------------------------------------------------------------- counting classes
def class_counts(probs: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """How many images with a face fall in each class: ``(K,)`` float64 counts.

    Args:
        probs: ``(N, K)`` class probabilities (or logits) per image; each image counts for its
            most likely class.
        found: ``(N,)`` bool, ``True`` where a face was detected; other images are not counted.
    """
    return joint_counts([probs], found)


def joint_counts(probs: Sequence[torch.Tensor], found: torch.Tensor) -> torch.Tensor:
    """Counts of the cells of joint attributes: ``(K_1 * K_2 * ...,)`` float64.

    Each image with a face counts for the cell of its most likely classes ``(c_1, c_2, ...)``,
    numbered row-major: ``cell = (c_1 * K_2 + c_2) * K_3 + c_3 ...`` (the order of
    :func:`joint_classes`).
    """
    if not probs:
        raise ValueError("joint_counts needs at least one attribute")
    found = torch.as_tensor(found).bool().cpu()
    cell = torch.zeros(found.shape[0], dtype=torch.long)
    num_cells = 1
    for p in probs:
        if p.ndim != 2 or p.shape[0] != found.shape[0]:
            raise ValueError(f"probs must be (N, K) with N = {found.shape[0]}, got {tuple(p.shape)}")
        cell = cell * p.shape[1] + p.detach().cpu().argmax(dim=1)
        num_cells *= p.shape[1]
    return torch.bincount(cell[found], minlength=num_cells).to(torch.float64)


def joint_classes(attributes: Mapping[str, Sequence[str]], names: Sequence[str]) -> list[str]:
    """Class names of the joint attribute ``names``, e.g. ``["male/wmelh", "male/asian", ...]``."""
    return ["/".join(cell) for cell in itertools.product(*(attributes[n] for n in names))]


def frequencies(counts: torch.Tensor) -> torch.Tensor:
    """Counts -> frequencies; all NaN when nothing was counted."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    total = counts.sum()
    return counts / total if total > 0 else torch.full_like(counts, float("nan"))


def _nan_to_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


# --------------------------------------------------------------------------- per-prompt records
@dataclass
class ImageReadout:
    """What the evaluation models read from one prompt's ``N`` images, generated by one model.

    Attributes:
        found: ``(N,)`` bool, ``True`` where a face was detected.
        boxes: ``(N, 4)`` the detector's face boxes (zeros where none).
        scores: ``(N,)`` the detector's confidences.
        probs: attribute -> ``(N, K)`` class probabilities of the face; zero rows where no face.
        clip_t: ``(N,)`` cosine between prompt and image CLIP embeddings, or ``None``.
    """

    found: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    probs: dict[str, torch.Tensor]
    clip_t: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return int(self.found.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.found.sum())

    def counts(self, groups: Mapping[str, Sequence[str]]) -> dict[str, torch.Tensor]:
        """Class counts per group: an attribute name, or a joint name ``"gender x race"``."""
        return {name: joint_counts([self.probs[a] for a in name.split(" x ")], self.found) for name in groups}

    def metrics(self, groups: Mapping[str, Sequence[str]]) -> dict:
        """Counts, frequencies and bias per group, the no-face share and mean CLIP-T (JSON-ready)."""
        counts = self.counts(groups)
        return {
            "num_images": self.num_images,
            "num_faces": self.num_faces,
            "no_face_share": 1 - self.num_faces / self.num_images,
            "counts": {g: [int(x) for x in c.tolist()] for g, c in counts.items()},
            "freqs": {g: [_nan_to_none(x) for x in frequencies(c).tolist()] for g, c in counts.items()},
            "bias": {g: float(bias_metric(c)) if c.sum() > 0 else None for g, c in counts.items()},
            "clip_t": None if self.clip_t is None else float(self.clip_t.double().mean()),
        }


@dataclass
class PromptResult:
    """The audit of one prompt.

    Attributes:
        index: position of the prompt in the audited list.
        prompt: the prompt text.
        model: what was read from the audited model's images.
        reference: the same for the reference model's images (same noise), or ``None``.
        similarity: image embedder name -> ``(N,)`` cosine between each image and its reference image.
        samples: ``(k, 3, h, w)`` uint8, the first images of the model (for grids), or ``None``.
        reference_samples: the same for the reference, or ``None``.
    """

    index: int
    prompt: str
    model: ImageReadout
    reference: ImageReadout | None = None
    similarity: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: torch.Tensor | None = None
    reference_samples: torch.Tensor | None = None


@dataclass
class EvalResult:
    """The result of :func:`evaluate`.

    Attributes:
        prompts: one :class:`PromptResult` per prompt, in the order given.
        attributes: the evaluation classifier's attributes (name -> class names).
        joints: the joint attributes counted, e.g. ``[("gender", "race")]``.
        settings: how the audit was run (seed, steps, guidance, images per prompt, models...).
    """

    prompts: list[PromptResult]
    attributes: dict[str, list[str]]
    joints: list[tuple[str, ...]]
    settings: dict

    @property
    def groups(self) -> dict[str, list[str]]:
        """Every counted attribute and joint attribute (``"gender x race"``) -> class names."""
        out = {name: list(classes) for name, classes in self.attributes.items()}
        out.update({" x ".join(j): joint_classes(self.attributes, j) for j in self.joints})
        return out

    @property
    def has_reference(self) -> bool:
        return bool(self.prompts) and self.prompts[0].reference is not None

    def _readouts(self, source: str) -> list[ImageReadout]:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if source == "reference" and not self.has_reference:
            raise ValueError("this audit has no reference model")
        return [getattr(p, source) for p in self.prompts]

    def prompt_metrics(self, source: str = "model") -> list[dict]:
        """Per prompt: counts, frequencies, bias per group, no-face share, CLIP-T (and similarity)."""
        rows = []
        for p, readout in zip(self.prompts, self._readouts(source)):
            row = {"index": p.index, "prompt": p.prompt, **readout.metrics(self.groups)}
            if source == "model" and p.similarity:
                row["similarity"] = {name: float(s.double().mean()) for name, s in p.similarity.items()}
            rows.append(row)
        return rows

    def summary(self, source: str = "model") -> dict:
        """Over all prompts: per group the mean and std of bias(P) over prompts with a face, the
        class frequencies averaged over those prompts, and ``bias_floor`` (the mean bias a perfectly
        uniform model would score with the same face counts); the no-face share of all images;
        CLIP-T and similarities as mean and std over prompts of the per-prompt means."""
        rows = self.prompt_metrics(source)
        groups = {}
        for name, classes in self.groups.items():
            counted = [r for r in rows if r["bias"][name] is not None]
            entry = {"classes": classes, "prompts_counted": len(counted), "bias_mean": None, "bias_std": None,
                     "bias_floor": None, "freqs": [None] * len(classes)}
            if counted:
                entry["bias_mean"], entry["bias_std"] = mean_std([r["bias"][name] for r in counted])
                entry["freqs"] = torch.tensor([r["freqs"][name] for r in counted], dtype=torch.float64).mean(0).tolist()
                floors = {n: bias_floor(len(classes), n) for n in {r["num_faces"] for r in counted}}
                entry["bias_floor"] = sum(floors[r["num_faces"]] for r in counted) / len(counted)
            groups[name] = entry
        num_images = sum(r["num_images"] for r in rows)
        num_faces = sum(r["num_faces"] for r in rows)
        out = {"num_prompts": len(rows), "num_images": num_images, "num_faces": num_faces,
               "no_face_share": 1 - num_faces / num_images if num_images else None, "groups": groups, "clip_t": None}
        if rows and rows[0]["clip_t"] is not None:
            out["clip_t"] = dict(zip(("mean", "std"), mean_std([r["clip_t"] for r in rows])))
        if source == "model" and rows and "similarity" in rows[0]:
            out["similarity"] = {name: dict(zip(("mean", "std"), mean_std([r["similarity"][name] for r in rows])))
                                 for name in rows[0]["similarity"]}
        return out

    def metrics(self, source: str = "model") -> dict[str, float]:
        """Flat metric name -> value, for model cards (``FairAdaptorMetadata.metrics_before/after``).

        ``bias_<group>`` (joints as ``bias_gender_x_race``), ``freq_<attribute>_<class>``,
        ``no_face_share``, ``clip_t``, and per image embedder ``clip_i`` (``"clip"``), ``dino``
        (``"dino"``) or ``sim_<name>``. Values that could not be measured are left out.
        """
        summary = self.summary(source)
        out = {}
        for name, g in summary["groups"].items():
            key = name.replace(" x ", "_x_")
            if g["bias_mean"] is not None:
                out[f"bias_{key}"] = g["bias_mean"]
            if name in self.attributes and g["bias_mean"] is not None:
                out.update({f"freq_{key}_{c}": f for c, f in zip(g["classes"], g["freqs"])})
        if summary["no_face_share"] is not None:
            out["no_face_share"] = summary["no_face_share"]
        if summary["clip_t"] is not None:
            out["clip_t"] = summary["clip_t"]["mean"]
        for name, s in summary.get("similarity", {}).items():
            out[{"clip": "clip_i", "dino": "dino"}.get(name, f"sim_{name}")] = s["mean"]
        return out

    def to_dict(self) -> dict:
        """Everything but the tensors, as plain JSON data (``results.json``)."""
        out = {"settings": self.settings, "groups": self.groups, "summary": {"model": self.summary("model")},
               "metrics": {"model": self.metrics("model")}, "prompts": {"model": self.prompt_metrics("model")}}
        if self.has_reference:
            out["summary"]["reference"] = self.summary("reference")
            out["metrics"]["reference"] = self.metrics("reference")
            out["prompts"]["reference"] = self.prompt_metrics("reference")
        return out


# --------------------------------------------------------------------------- audit inputs
@dataclass
class EvalComponents:
    """The models an audit needs (the toy world's ``ToyComponents`` also fits).

    Attributes:
        classifier: the evaluation ``AttributeClassifier`` (ideally not the one that guided finetuning).
        detector: the ``FaceDetector``.
        crop_factor: the detector box is grown by this factor into the classifier's square crop.
    """

    classifier: torch.nn.Module
    detector: object
    crop_factor: float = 1.0


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file: one per line; blank lines and lines starting with ``#`` are skipped."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


# The audit runner lives in audit.py, which imports the records above; re-exported here, after them.
from .audit import (  # noqa: F401
    NOISE_SCHEME,
    THUMBNAIL_SIZE,
    PromptCache,
    clip_text_embedder,
    describe_pipeline,
    embed_images,
    evaluate,
    generate,
    initial_noise,
    latent_shape,
    noise_seed,
    read_faces,
    thumbnails,
)
