"""Checks of a trainer's inputs against each other, made before any model is touched."""

from __future__ import annotations

import torch

from .config import FairTrainingConfig
from .prompts import PromptSet


def check_components(components, prompt_sets: list[PromptSet], config: FairTrainingConfig) -> None:
    for name in ("classifier", "detector", "image_embedders", "face_embedder", "reference_faces"):
        if not hasattr(components, name):
            raise ValueError(f"components lacks {name!r} (see diffusers_fair.components.base)")
    classifier = components.classifier
    known = getattr(classifier, "attributes", None)
    if not isinstance(known, dict) or not isinstance(getattr(classifier, "input_size", None), int):
        raise ValueError("components.classifier must have .attributes (name -> class names) and an int .input_size")
    for prompt_set in prompt_sets:
        for target in prompt_set.targets:
            for attribute, classes in target.classes.items():
                if attribute not in known:
                    raise ValueError(f"target attribute {attribute!r} is not predicted by the classifier (it knows {sorted(known)})")
                if tuple(known[attribute]) != tuple(classes):
                    raise ValueError(f"the target of {attribute!r} has {len(classes)} classes {list(classes)}, the classifier "
                                     f"{len(known[attribute])} {list(known[attribute])} (same names in the same order needed)")
    _check_classifier_heads(classifier)
    if config.weight_loss_img > 0 and not components.image_embedders:
        raise ValueError("weight_loss_img > 0 needs at least one image embedder in components.image_embedders")
    if config.weight_loss_face > 0 and components.face_embedder is None:
        raise ValueError("weight_loss_face > 0 needs components.face_embedder")
    bank = components.reference_faces
    if bank is not None and (not isinstance(bank, torch.Tensor) or bank.ndim not in (2, 4) or bank.shape[0] == 0):
        shape = tuple(bank.shape) if isinstance(bank, torch.Tensor) else type(bank).__name__
        raise ValueError(f"components.reference_faces must be (M, D) face embeddings or (M, 3, S, S) face images, got {shape}")


def _check_classifier_heads(classifier) -> None:
    """One no-grad forward pass on a grey face in eval mode: every head gives one logit per declared class."""
    parameter = next(iter(classifier.parameters()), None) if isinstance(classifier, torch.nn.Module) else None
    device = parameter.device if parameter is not None else torch.device("cpu")
    training = bool(getattr(classifier, "training", False))
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if training:
            classifier.eval()
        try:
            logits = classifier(torch.full((1, 3, classifier.input_size, classifier.input_size), 0.5, device=device))
        finally:
            if training:
                classifier.train()
    for attribute, classes in classifier.attributes.items():
        out = logits.get(attribute) if isinstance(logits, dict) else None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, len(classes)):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the classifier's {attribute!r} head gives logits of shape {shape} for one face, expected "
                             f"(1, {len(classes)}) for its classes {list(classes)}")
