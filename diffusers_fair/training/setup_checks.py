"""Checks of a trainer's inputs against each other, made before any model is touched."""

from __future__ import annotations

import difflib

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


def check_attribute_factors(config: FairTrainingConfig, prompt_sets: list[PromptSet]) -> None:
    """Every key of ``attribute_change_factors`` and ``attribute_face_region_factors`` is a targeted attribute.

    A factor applies to the images whose targeted attribute must change; one for any other name would
    never be used, and is most likely a typo.
    """
    targeted = sorted({a for prompt_set in prompt_sets for target in prompt_set.targets for a in target.attributes})
    for name in ("attribute_change_factors", "attribute_face_region_factors"):
        for attribute in getattr(config, name):
            if attribute not in targeted:
                close = difflib.get_close_matches(attribute, targeted, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"{name} names {attribute!r}, which no target covers ({hint}the targets cover "
                                 f"{targeted})")


def check_lora_modules(pipeline, config: FairTrainingConfig) -> None:
    """Every name in ``text_encoder_lora_modules`` / ``unet_lora_modules`` matches a linear layer of its model.

    Names match as in peft: a layer whose full name is the name or ends in ``.<name>``. A name that matches
    nothing is a typo (peft would silently skip it while another name matches). Fair adaptors hold LoRA
    weights of linear layers only (diffusers' LoRA format), so a LoRA on an embedding or a convolution
    could be trained but not saved: it is refused here, before training.
    """
    for part, enabled, field in (("text_encoder", config.train_text_encoder_lora, "text_encoder_lora_modules"),
                                 ("unet", config.train_unet_lora, "unet_lora_modules")):
        if not enabled:
            continue
        layers = dict(getattr(pipeline, part).named_modules())
        linear = sorted({name.rsplit(".", 1)[-1] for name, layer in layers.items()
                         if isinstance(layer, torch.nn.Linear)})
        for target in getattr(config, field):
            matched = [name for name in layers if name == target or name.endswith(f".{target}")]
            if not matched:
                close = difflib.get_close_matches(target, linear, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"{field} names {target!r}, which matches no layer of the {part} ({hint}its linear "
                                 f"layers are named {', '.join(linear[:12])}{', ...' if len(linear) > 12 else ''})")
            for name in matched:
                layer = getattr(layers[name], "base_layer", layers[name])  # a layer peft wrapped already
                if not isinstance(layer, torch.nn.Linear):
                    raise ValueError(f"{field} names {target!r}, which matches {part} layer {name} "
                                     f"({type(layer).__name__}): fair adaptors hold LoRA weights of linear layers "
                                     "only, so it could not be saved after training; remove it from the list")
