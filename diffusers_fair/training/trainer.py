"""DistributionalAlignmentTrainer: finetune a Stable Diffusion pipeline toward target distributions.

One iteration (one optimizer step) of the method, for each of ``gradient_accumulation_steps``
prompts:

1. **Draw** a prompt (prompt sets by weight, then uniformly), a step count and the initial noises
   of the batch, from a generator seeded by ``(config.seed, iteration, index)``: the same on every
   process and after a resume (:func:`draw_iteration`).
2. **Reference images**: the frozen model (adapters disabled, no soft tokens, no gradient) samples
   the same noises. Their faces, classes, image and face embeddings anchor the other losses.
3. **Targets**: the finetuned model's faces are classified and the class probabilities of the whole
   batch (gathered across processes) give the dynamic targets (``alignment.dynamic_targets``), and
   the targets that hold the preserved attributes at the reference images' classes
   (``losses.preserve_targets``). With one micro-batch per process this happens inside the loss;
   with several, a no-grad pass over all micro-batches first computes the targets of the whole batch.
4. **Adjusted backward** (``dft.adjusted_backward``) per micro-batch with a loss on ``z_0``: decode
   with the VAE, detect faces on the detached images, crop with gradient, classify; the DAL, the
   dynamically weighted image-semantics loss, the face-realism loss and the preservation loss
   (``losses.py``).
5. **Update**: sum the gradients over processes, skip the step if anything is NaN or infinite,
   clip, AdamW, and update the EMA of the trained weights (the EMA is what gets saved).

A batch whose class probabilities are NaN or infinite has no targets: :class:`BatchTargets` says
so, and the iteration stops there and is logged as skipped (``max_nonfinite_steps`` of them end the
run). Faces are read by one routine, ``components.faces.read_faces``.

Everything a run needs to continue exactly is checkpointed (``checkpointing.py``); logs go to a
tracker and to ``output_dir/training_log.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .._utils.plotting import pyplot
from ..components.faces import FaceReading, read_faces
from ..components.families import SDXL, Conditioning, encode_prompt, family_of, vae_dtype
from ..method import losses
from ..method.dft import adjusted_backward, check_scheduler, sample_latents
from . import checkpointing, trainable
from .config import PRESERVE_UNTARGETED, FairTrainingConfig
from .draws import TrainingDraw, derive_seed, draw_iteration
from .prompts import resolve_prompt_sets
from .rollback import SetupSnapshot
from .setup_checks import check_attribute_factors, check_components, check_lora_modules


LOG_FILE = "training_log.jsonl"


@dataclass
class BatchTargets:
    """The targets of this process's images, computed from the whole batch (all processes).

    Attributes:
        finite: ``False`` when a classifier probability of the batch is NaN or infinite; there are no
            targets then, and the iteration is skipped.
        labels: attribute -> ``(n,)`` target class of each local image (-1 without a face).
        keep: attribute -> ``(n,)`` bool, the target is confident enough to train on.
        class_counts: attribute -> ``(K,)`` counts of the batch's predicted classes (the same on every process).
        preserve_labels, preserve_keep: the same as ``labels`` and ``keep``, for the preserved attributes.
        untargeted_counts: untargeted attribute -> ``(K,)`` counts of the batch's predicted classes.
        base_counts: untargeted attribute -> ``(K,)`` counts of the reference images' classes.
    """

    finite: bool
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    keep: dict[str, torch.Tensor] = field(default_factory=dict)
    class_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    preserve_labels: dict[str, torch.Tensor] = field(default_factory=dict)
    preserve_keep: dict[str, torch.Tensor] = field(default_factory=dict)
    untargeted_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    base_counts: dict[str, torch.Tensor] = field(default_factory=dict)


def learning_rate_at(iteration: int, config: FairTrainingConfig) -> float:
    """The learning rate of iteration ``iteration`` (0-based): a linear warmup over ``lr_warmup_iterations``,
    then constant or (``lr_schedule="cosine"``) a half-cosine decay to ``lr_final_ratio`` x the peak at the
    last iteration."""
    warmup = config.lr_warmup_iterations
    if iteration < warmup:
        return config.learning_rate * (iteration + 1) / warmup
    if config.lr_schedule == "constant":
        return config.learning_rate
    progress = (iteration - warmup) / max(1, config.num_iterations - 1 - warmup)
    final = config.lr_final_ratio
    return config.learning_rate * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def preserved_attributes(preserve: list[str], known: dict, targeted: list[str]) -> list[str]:
    """The attributes ``preserve`` holds for a prompt set whose targets cover ``targeted``, in the order of
    ``known`` (the classifier's attributes): every untargeted one for ``['untargeted']``, else those named.

    Raises:
        ValueError: naming an attribute the classifier does not read, or one that a target covers.
    """
    if preserve == [PRESERVE_UNTARGETED]:
        return [a for a in known if a not in targeted]
    for name in preserve:
        if name not in known:
            raise ValueError(f"preserve names {name!r}, which the classifier does not read (it reads {sorted(known)})")
        if name in targeted:
            raise ValueError(f"{name!r} is both targeted and preserved: remove it from preserve or from the targets")
    return [a for a in known if a in preserve]


def _class_counts(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K,)`` counts of a batch's classes, ``-1`` (no face) left out."""
    return torch.bincount(classes[classes >= 0].cpu(), minlength=num_classes)


def ema_decay_at(update: int, decay: float, warmup: bool) -> float:
    """EMA decay of update number ``update`` (0 for the first): ``min(decay, (1 + s) / (10 + s))``
    with warmup (0 at the first update, which copies the weights), else ``decay``."""
    if not warmup:
        return decay
    return 0.0 if update == 0 else min(decay, (1 + update) / (10 + update))


# ---------------------------------------------------------------------------- the trainer
class DistributionalAlignmentTrainer:
    """Finetune ``pipeline`` so that each prompt's images follow the target distributions.

    Args:
        config: a :class:`FairTrainingConfig` (validated here).
        pipeline: a ``StableDiffusionPipeline`` (or one with the same parts). It is modified in
            place: LoRA layers and soft tokens (``trainable.py``) are added to its text encoder / U-Net / tokenizer.
        targets: :class:`TargetDistribution` s (several attributes, joint targets); each attribute
            must be predicted by ``components.classifier`` with the same classes. May be ``None`` when
            every prompt set carries its own targets.
        prompts: a list of prompts, or of :class:`PromptSet` (sampling weights, own targets).
        components: an object with ``classifier``, ``detector``, ``image_embedders`` (list),
            ``face_embedder`` and ``reference_faces`` (``(M, D)`` embeddings or ``(M, 3, S, S)`` face
            images, or ``None``), e.g. ``diffusers_fair.toy.components.load_toy_components()``.
        accelerator: an ``accelerate.Accelerator``; by default one is built from the config.
    """

    def __init__(self, config: FairTrainingConfig, pipeline, targets, prompts, components, *, accelerator=None):
        if not isinstance(config, FairTrainingConfig):
            raise ValueError(f"config must be a FairTrainingConfig, got {type(config).__name__}")
        self.config = config.validate()
        self.prompt_sets = resolve_prompt_sets(prompts, targets)
        check_components(components, self.prompt_sets, config)
        check_attribute_factors(config, self.prompt_sets)
        # Per prompt set: the attributes the classifier reads that no target covers, and those held in place.
        known = components.classifier.attributes
        targeted = [[a for t in prompt_set.targets for a in t.attributes] for prompt_set in self.prompt_sets]
        self.untargeted = [[a for a in known if a not in covered] for covered in targeted]
        self.preserved = [preserved_attributes(config.preserve, known, covered) for covered in targeted]
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if getattr(pipeline, part, None) is None:
                raise ValueError(f"the pipeline has no {part}")
        check_lora_modules(pipeline, config)
        # SD 1.x or SDXL (components/families.py): the text encoders, the U-Net's conditioning, the adaptor's files.
        self.family = family_of(pipeline)
        if self.family is SDXL and config.prompt_padding == "natural":
            raise ValueError("prompt_padding='natural' is for SD 1.x pipelines; SDXL pipelines pad prompts to the "
                             "tokenizers' maximum length: use prompt_padding='max_length'")
        factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)  # the VAE's downsampling
        if config.resolution is not None and config.resolution % factor:
            raise ValueError(f"resolution must be a multiple of the VAE's downsampling factor {factor}, "
                             f"got {config.resolution}")
        side = pipeline.unet.config.sample_size if config.resolution is None else config.resolution // factor
        self.latent_shape = (pipeline.unet.config.in_channels, side, side)
        self.image_size = side * factor  # pixels: SDXL's time_ids
        self.soft_token_names = trainable.soft_token_names(
            config, [getattr(pipeline, name) for name in self.family.tokenizers],
            [p for prompt_set in self.prompt_sets for p in prompt_set.prompts])
        self.scheduler = self._training_scheduler(pipeline.scheduler)
        self.output_dir = Path(config.output_dir)
        self.accelerator = accelerator if accelerator is not None else self._make_accelerator()
        if self.accelerator.mixed_precision != config.mixed_precision:
            raise ValueError(f"the accelerator uses mixed_precision={self.accelerator.mixed_precision!r}, "
                             f"the config {config.mixed_precision!r}")
        processes = self.accelerator.num_processes
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != processes:
            raise ValueError(f"{launched} processes were launched but accelerate runs {processes}; on CPUs launch "
                             "with `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N ...` (`accelerate launch --cpu` "
                             "starts one process)")
        if config.images_per_prompt % processes:
            raise ValueError(f"images_per_prompt ({config.images_per_prompt}) must be divisible by the "
                             f"number of processes ({processes})")
        if self.accelerator.is_main_process:
            self._check_writable()
        self.pipeline, self.components = pipeline, components
        self.device = self.accelerator.device
        dtypes = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        self.weight_dtype = dtypes[config.mixed_precision]
        self.local_images = config.images_per_prompt // processes
        self.crop_scale = config.face_box_scale
        if self.crop_scale is None:
            self.crop_scale = getattr(components, "crop_factor", 1.0)

        # From here on the pipeline (and the components) change in place; a failure puts them back as they were.
        snapshot = SetupSnapshot([getattr(pipeline, part) for part in ("unet", "vae", *self.family.text_encoders)]
                                 + [components.classifier, components.detector, components.face_embedder,
                                    *components.image_embedders],
                                 tokenizers=[getattr(pipeline, name) for name in self.family.tokenizers]
                                 if self.soft_token_names else [])
        try:
            self._set_up_pipeline()
        except BaseException:
            snapshot.restore()
            raise
        self.loss_weights = losses.LossWeights.from_config(config)
        # In fp16, small gradients underflow to zero. The scaler multiplies the loss (so dL/dz_0 and every
        # step's gradient in the adjusted backward), divides the summed gradients before the update and
        # skips a step that overflowed, lowering the scale; it does nothing in float32 or bf16.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        self.iteration = 0
        self.ema_updates = 0
        self.nonfinite_steps = 0
        self.windows: dict[str, deque] = {}  # attribute -> class counts of recent iterations
        self.untargeted_windows: dict[str, deque] = {}  # the same for the untargeted attributes
        self.base_windows: dict[str, deque] = {}  # ... and for the reference images' untargeted attributes
        self.history: list[dict] = []
        # A fresh run starts its own training log; a resumed one continues the log of its checkpoint.
        self._log_mode = "w"

    # ------------------------------------------------------------------ setup
    def _make_accelerator(self):
        from accelerate import Accelerator

        tracker = self.config.log_with
        if tracker == "auto":
            import importlib.util

            tracker = "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "none"
        return Accelerator(mixed_precision=self.config.mixed_precision,
                           log_with=None if tracker == "none" else tracker, project_dir=str(self.output_dir))

    def _training_scheduler(self, scheduler):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

        sampler = self.config.sampler
        if sampler == "dpmsolver++":
            scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="dpmsolver++")
        elif sampler == "ddim":
            scheduler = DDIMScheduler.from_config(scheduler.config)
        elif sampler == "euler":
            scheduler = EulerDiscreteScheduler.from_config(scheduler.config)
        check_scheduler(scheduler)
        return scheduler

    def _check_writable(self) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.output_dir):
                pass
        except OSError as error:
            raise ValueError(f"output_dir {self.output_dir} is not writable: {error}") from None

    def _set_up_pipeline(self) -> None:
        """Freeze and cast the pipeline, add the trained weights, build the optimizer and the face bank."""
        config = self.config
        self._prepare_modules()
        weights = trainable.add_trainable_weights(self.pipeline, config, self.soft_token_names, self.device)
        self.params, self.lora_configs = weights.params, weights.lora_configs
        self.soft_token_ids = weights.soft_token_ids
        self.ema = {name: p.detach().clone().float() for name, p in self.params.items()}
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon, weight_decay=config.weight_decay,
        )
        self.face_bank = self._reference_face_bank()

    def _prepare_modules(self) -> None:
        """Freeze everything, move to the device; frozen weights in the mixed-precision dtype."""
        pipe, c = self.pipeline, self.components
        encoders = [getattr(pipe, name) for name in self.family.text_encoders]
        for module in (pipe.unet, pipe.vae, *encoders, c.classifier, c.detector, c.face_embedder,
                       *c.image_embedders):
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval().to(self.device)
        for module in (pipe.unet, pipe.vae, *encoders):
            dtype = vae_dtype(pipe, self.weight_dtype) if module is pipe.vae else self.weight_dtype
            if module.dtype != dtype:
                module.to(dtype=dtype)
        if self.config.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            pipe.vae.enable_gradient_checkpointing()

    def _reference_face_bank(self) -> torch.Tensor | None:
        bank = self.components.reference_faces
        if bank is None or self.config.weight_loss_face == 0:
            return None
        bank = bank.to(self.device).float()
        if bank.ndim == 4:
            with torch.no_grad():
                bank = self.components.face_embedder(bank).float()
        return bank

    # ------------------------------------------------------------------ model helpers
    def _encode(self, text: str, batch: int, length: int | None = None, negative: bool = False) -> Conditioning:
        """``text``'s conditioning of the U-Net, repeated ``batch`` times (``families.encode_prompt``).

        ``length=None``: padded to the tokenizer's maximum length without an attention mask, as
        the stock pipelines encode prompts. Otherwise padded (or cut) to ``length`` tokens, with an
        attention mask that hides the padding (``prompt_padding="natural"``, SD 1.x). SDXL adds its
        pooled text embeddings and the time ids of the training images.
        """
        conditioning = encode_prompt(self.pipeline, text, height=self.image_size, width=self.image_size,
                                     length=length, negative=negative, device=self.device)
        return conditioning.repeat(batch)

    def _natural_length(self, text: str) -> int:
        """The number of tokens of ``text`` (start and end tokens included), at most the tokenizer's maximum."""
        tokenizer = self.pipeline.tokenizer
        return len(tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids)

    def _embeddings(self, prompt: str, batch: int, finetuned: bool = True):
        """Prompt and negative-prompt embeddings (the negative one only with guidance): the
        ``prompt_embeds`` of :meth:`_conditioning`."""
        cond, neg = self._conditioning(prompt, batch, finetuned)
        return cond.prompt_embeds, (neg.prompt_embeds if neg is not None else None)

    def _conditioning(self, prompt: str, batch: int, finetuned: bool = True):
        """The U-Net's conditioning for the prompt and the negative prompt (the negative one only with guidance).

        With ``prompt_padding="natural"`` both are padded to the longer of their natural lengths (the
        U-Net's guidance batch needs one length), each with its attention mask.
        """
        prefix = trainable.soft_token_prefix(self.soft_token_names) if finetuned else ""
        guided = self.config.guidance_scale > 1.0
        texts = [prefix + prompt] + ([self.config.negative_prompt] if guided else [])
        length = None
        if self.config.prompt_padding == "natural":
            length = max(self._natural_length(text) for text in texts)
        cond = self._encode(texts[0], batch, length)
        return cond, (self._encode(texts[1], batch, length, negative=True) if guided else None)

    @staticmethod
    def _sampler_kwargs(cond: Conditioning, neg: Conditioning | None) -> dict:
        """The conditioning arguments of ``sample_latents`` and ``adjusted_backward``."""
        return dict(negative_prompt_embeds=neg.prompt_embeds if neg is not None else None,
                    added_cond_kwargs=cond.added_cond_kwargs,
                    negative_added_cond_kwargs=neg.added_cond_kwargs if neg is not None else None)

    def _frozen_model(self):
        """The original model: LoRA adapters disabled (soft tokens are simply left out of the prompt)."""
        return trainable.disabled_adapters([getattr(self.pipeline, part) for part in self.lora_configs])

    def ema_weights(self):
        """Temporarily put the EMA weights into the model (for samples and saving); a context manager."""
        return trainable.swapped_weights(self.params, self.ema)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def _sample(self, noise: torch.Tensor, prompt: str, steps: int, finetuned: bool) -> torch.Tensor:
        cond, neg = self._conditioning(prompt, noise.shape[0], finetuned)
        latents = sample_latents(self.pipeline.unet, self.scheduler, noise.to(self.device, self.weight_dtype),
                                 cond.prompt_embeds, num_inference_steps=steps,
                                 guidance_scale=self.config.guidance_scale, **self._sampler_kwargs(cond, neg))
        return self._decode(latents)

    def _read_faces(self, images: torch.Tensor, *, embed_faces: bool = False) -> FaceReading:
        """The faces of ``images`` (``components.faces.read_faces``), with face embeddings if ``embed_faces``."""
        c = self.components
        return read_faces(images, c.detector, c.classifier, crop_factor=self.crop_scale,
                          face_embedder=c.face_embedder if embed_faces else None, align_faces=self.config.align_faces)

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.accelerator.num_processes == 1 else self.accelerator.gather(tensor.contiguous())

    def _local(self, tensor: torch.Tensor) -> torch.Tensor:
        start = self.accelerator.process_index * self.local_images
        return tensor[start: start + self.local_images]

    # ------------------------------------------------------------------ the stages of an iteration
    @torch.no_grad()
    def _reference(self, draw: TrainingDraw, noise: torch.Tensor, micro_batches: list[slice]):
        """The frozen model's images from the same noises, and what the losses need of them."""
        with self._frozen_model():
            images = torch.cat([self._sample(noise[rows], draw.prompt, draw.num_inference_steps, False)
                                for rows in micro_batches])
        faces = self._read_faces(images, embed_faces=self.config.weight_loss_face > 0)
        classes, confidence = {}, {}
        for attribute, logits in faces.logits.items():
            conf, cls = torch.softmax(logits, dim=1).max(dim=1)
            classes[attribute] = torch.where(faces.found, cls, torch.full_like(cls, -1))
            confidence[attribute] = torch.where(faces.found, conf, torch.zeros_like(conf))
        image_embeddings = []
        if self.config.weight_loss_img > 0:
            image_embeddings = [embedder(images).float() for embedder in self.components.image_embedders]
        return losses.ReferenceImages(faces.found, faces.crop_boxes, classes, confidence, image_embeddings,
                                      faces.face_embeddings)

    def _alignment_targets(self, draw: TrainingDraw, probs: dict, found: torch.Tensor,
                           reference: losses.ReferenceImages) -> BatchTargets:
        """The targets of the local images, from the whole batch gathered across processes: the dynamic
        targets and those of the preserved attributes (from ``reference``, the local reference images)."""
        cfg, prompt_set = self.config, self.prompt_sets[draw.prompt_set]
        preserved, untargeted = self.preserved[draw.prompt_set], self.untargeted[draw.prompt_set]
        found_all = self._gather(found.long()).bool()
        probs_all = {a: self._gather(p.float()) for a, p in probs.items()}
        trained = [a for t in prompt_set.targets for a in t.attributes] + preserved
        if not all(torch.isfinite(probs_all[a][found_all]).all() for a in trained):
            return BatchTargets(finite=False)
        labels, keep, counts = losses.batch_dynamic_targets(
            probs_all, found_all, prompt_set.targets, threshold=cfg.dal_threshold,
            monte_carlo_samples=cfg.ot_monte_carlo_samples, seed=draw.ot_seed, cost=cfg.ot_cost)
        original = {a: self._gather(reference.classes[a]) for a in untargeted}
        preserve_labels, preserve_keep = losses.preserve_targets(
            {a: probs_all[a] for a in preserved}, found_all, {a: original[a] for a in preserved},
            threshold=cfg.dal_threshold, monte_carlo_samples=cfg.ot_monte_carlo_samples,
            seed=draw.ot_seed + len(prompt_set.targets), cost=cfg.ot_cost)
        classes = {a: torch.where(found_all, probs_all[a].argmax(dim=1), -1) for a in untargeted}
        sizes = {a: probs_all[a].shape[1] for a in untargeted}
        return BatchTargets(
            finite=True, labels={a: self._local(x) for a, x in labels.items()},
            keep={a: self._local(x) for a, x in keep.items()}, class_counts=counts,
            preserve_labels={a: self._local(x) for a, x in preserve_labels.items()},
            preserve_keep={a: self._local(x) for a, x in preserve_keep.items()},
            untargeted_counts={a: _class_counts(classes[a], sizes[a]) for a in untargeted},
            base_counts={a: _class_counts(original[a], sizes[a]) for a in untargeted})

    @torch.no_grad()
    def _targets_before_backward(self, draw: TrainingDraw, noise: torch.Tensor, micro_batches: list[slice],
                                 reference: losses.ReferenceImages):
        """With several micro-batches: sample each once without grad, read its faces, compute the batch's targets."""
        probs, found = {}, []
        for rows in micro_batches:
            faces = self._read_faces(self._sample(noise[rows], draw.prompt, draw.num_inference_steps, True))
            for attribute, logits in faces.logits.items():
                probs.setdefault(attribute, []).append(torch.softmax(logits, dim=1))
            found.append(faces.found)
        return self._alignment_targets(draw, {a: torch.cat(p) for a, p in probs.items()}, torch.cat(found), reference)

    def _loss_fn(self, draw: TrainingDraw, rows: slice, reference: losses.ReferenceImages, targets):
        """The loss of micro-batch ``rows`` as a function of its ``z_0`` (``losses.alignment_batch_loss``).

        The function returns ``(loss, (targets, parts))``: the batch's :class:`BatchTargets` (``targets``,
        or, when ``targets`` is ``None``, those computed from these very images, then the whole local
        batch) and the detached sums of the micro-batch's loss parts. Without finite targets the loss
        is a zero attached to ``z_0`` (the backward adds nothing) and ``parts`` is empty. ``reference``
        holds the reference images of the whole local batch.
        """
        cfg, components = self.config, self.components
        attributes = [a for t in self.prompt_sets[draw.prompt_set].targets for a in t.attributes]
        num_images = cfg.images_per_prompt * cfg.gradient_accumulation_steps

        def loss_fn(z0: torch.Tensor):
            # Keeps the loss attached to z_0 when no term applies (no face, zero weights): a zero gradient.
            zero = 0.0 * z0.float().sum()
            images = self._decode(z0)
            faces = self._read_faces(images)
            logits = {a: l for a, l in faces.logits.items() if a in attributes}
            batch = targets
            if batch is None:
                probs = {a: torch.softmax(l.detach(), dim=1) for a, l in faces.logits.items()}
                batch = self._alignment_targets(draw, probs, faces.found, reference)
            if not batch.finite:
                return zero, (batch, {})
            labels = {a: x[rows] for a, x in batch.labels.items()}
            keep = {a: x[rows] & faces.found for a, x in batch.keep.items()}
            preserve_labels = {a: x[rows] for a, x in batch.preserve_labels.items()}
            preserve_keep = {a: x[rows] & faces.found for a, x in batch.preserve_keep.items()}
            result = losses.alignment_batch_loss(
                images, faces.found, faces.crop_boxes, logits, labels, keep, reference[rows],
                image_embedders=components.image_embedders, face_embedder=components.face_embedder,
                face_bank=self.face_bank, weights=self.loss_weights, num_images=num_images,
                landmarks=faces.landmarks if cfg.align_faces else None,
                preserve_logits={a: faces.logits[a] for a in preserve_labels}, preserve_labels=preserve_labels,
                preserve_keep=preserve_keep)
            loss = self.scaler.scale(result.total)  # unchanged unless fp16
            return loss + zero, (batch, {"loss": result.total.detach() * num_images, **result.parts})

        return loss_fn

    # ------------------------------------------------------------------ one iteration
    def train_step(self) -> dict:
        """Run one iteration (one optimizer step); return its log record (``"skipped"`` when non-finite)."""
        cfg, iteration, start = self.config, self.iteration, time.time()
        params = list(self.params.values())
        micro_batches = [slice(i, min(i + cfg.micro_batch_size, self.local_images))
                         for i in range(0, self.local_images, cfg.micro_batch_size)]
        self.optimizer.zero_grad(set_to_none=False)
        draws, sums, finite = [], {}, True
        counts = {"targeted": {}, "untargeted": {}, "base": {}}  # kind -> attribute -> class counts
        for index in range(cfg.gradient_accumulation_steps):
            # 1. Draw the prompt, the step count and the initial noises of the batch: the same on every
            #    process and after a resume. This process takes its share of the noises.
            draw = draw_iteration(cfg, self.prompt_sets, self.latent_shape, iteration, index)
            noise = self._local(draw.noise).to(self.device, self.weight_dtype)
            with self.accelerator.autocast():
                # 2. Reference images: the frozen model samples the same noises; their faces, classes and
                #    embeddings anchor the losses.
                reference = self._reference(draw, noise, micro_batches)

                # 3. Alignment and preservation targets of the whole batch (all processes). With one micro-batch
                #    the loss computes them from the very images it reads; with several, a no-grad pass comes first.
                targets = None
                if len(micro_batches) > 1:
                    targets = self._targets_before_backward(draw, noise, micro_batches, reference)

                # 4. Adjusted backward: each micro-batch adds the gradient of its share of the batch loss
                #    to .grad; its loss hands back the batch's targets and the sums of its loss parts.
                if targets is None or targets.finite:
                    for rows in micro_batches:
                        cond, neg = self._conditioning(draw.prompt, noise[rows].shape[0])
                        loss_fn = self._loss_fn(draw, rows, reference, targets)
                        result = adjusted_backward(
                            self.pipeline.unet, self.scheduler, noise[rows], cond.prompt_embeds, loss_fn,
                            num_inference_steps=draw.num_inference_steps, guidance_scale=cfg.guidance_scale,
                            mode=cfg.dft_mode, standardize=cfg.standardize_dft,
                            step_weights=cfg.dft_step_weights, **self._sampler_kwargs(cond, neg))
                        targets, parts = result.stats  # with one micro-batch: the targets the loss computed
                        for key, value in parts.items():
                            sums[key] = sums.get(key, 0.0) + value
            if not targets.finite:  # NaN or infinite class probabilities: skip the step, draw no further prompt
                finite = False
                break
            draws.append(draw)
            for kind, batch_counts in (("targeted", targets.class_counts), ("untargeted", targets.untargeted_counts),
                                       ("base", targets.base_counts)):
                for attribute, count in batch_counts.items():
                    counts[kind][attribute] = counts[kind].get(attribute, 0) + count

        # 5. Update: sum the gradients and the loss parts over the processes, skip the step if anything is
        #    NaN or infinite, clip, AdamW, EMA. The sum is taken here, once per iteration, instead of by
        #    DDP in accelerator.backward: the adjusted backward calls backward once per sampling step (and
        #    once for the text encoder), and the trained weights are peft layers inside the pipeline's
        #    modules, which accelerator.prepare does not wrap.
        grads = self.accelerator.reduce([p.grad if p.grad is not None else torch.zeros_like(p) for p in params],
                                        reduction="sum")
        sums = {key: torch.as_tensor(sums[key], device=self.device).float() for key in sorted(sums)}
        sums = self.accelerator.reduce(sums, reduction="sum")
        totals = {key: float(value) for key, value in sums.items()}
        loss_finite = finite and math.isfinite(totals.get("loss", 0.0))
        for p, grad in zip(params, grads):
            p.grad = grad
        if loss_finite and self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)  # fp16: divide by the loss scale
        finite = loss_finite and all(bool(torch.isfinite(p.grad).all()) for p in params)
        overflow = loss_finite and not finite and self.scaler.is_enabled()  # the scale was too large
        grad_norm = None
        if finite:
            if cfg.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate_at(iteration, cfg)
            self.scaler.step(self.optimizer)  # optimizer.step(), after the scaler's own overflow check
            decay = ema_decay_at(self.ema_updates, cfg.ema_decay, cfg.ema_warmup)
            with torch.no_grad():
                for name, p in self.params.items():
                    self.ema[name].lerp_(p.detach().float(), 1.0 - decay)
            self.ema_updates += 1
        else:
            self.optimizer.zero_grad(set_to_none=False)
            self.nonfinite_steps += 0 if overflow else 1
        if loss_finite and self.scaler.is_enabled():
            self.scaler.update()  # halve the scale after an overflow, grow it after a run of good steps
        self.iteration += 1

        record = self._record(iteration, draws, totals, counts, finite, grad_norm, time.time() - start)
        if not finite and self.nonfinite_steps > cfg.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self.nonfinite_steps} iterations had NaN or infinite losses or gradients (the last: iteration "
                f"{iteration + 1}); max_nonfinite_steps={cfg.max_nonfinite_steps}. Lower the learning rate, train in "
                "float32 (mixed_precision='no') or check the components' outputs."
            )
        return record

    # ------------------------------------------------------------------ logging
    def _record(self, iteration, draws, totals, counts, finite, grad_norm, seconds) -> dict:
        cfg = self.config
        n = cfg.images_per_prompt * cfg.gradient_accumulation_steps
        record = {"iteration": iteration + 1, "prompts": [d.prompt for d in draws],
                  "num_inference_steps": [d.num_inference_steps for d in draws], "skipped": not finite,
                  "nonfinite_steps": self.nonfinite_steps, "lr": learning_rate_at(iteration, cfg),
                  "grad_norm": grad_norm,
                  "seconds": round(seconds, 3)}
        if self.scaler.is_enabled():
            record["loss_scale"] = self.scaler.get_scale()
        if totals:
            record.update(loss=totals["loss"] / n, dal=totals["dal"] / n, semantics=totals["semantics"] / n,
                          face_realism=totals["face_realism"] / max(totals["realism_images"], 1.0),
                          faces_found=totals["faces"] / n, preserve=totals["preserve"] / n,
                          kept={k[5:]: v / n for k, v in totals.items() if k.startswith("kept/")},
                          preserve_kept={k[14:]: v / n for k, v in totals.items() if k.startswith("preserve_kept/")})
        batch, running = self._distributions(self.windows, counts["targeted"])
        record.update(batch_distribution=batch, running_distribution=running)
        # The attributes no target covers: where the finetuned model's images have them, and where the
        # reference images of the same noises do (their difference is the drift).
        batch, running = self._distributions(self.untargeted_windows, counts["untargeted"])
        record.update(untargeted_batch_distribution=batch, untargeted_running_distribution=running)
        _, base = self._distributions(self.base_windows, counts["base"])
        record.update(base_running_distribution=base)
        self.history.append(record)
        if self.accelerator.is_main_process:
            with open(self.output_dir / LOG_FILE, self._log_mode, encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            self._log_mode = "a"
            names = ("loss", "dal", "semantics", "face_realism", "preserve", "faces_found", "lr")
            scalars = {k: record[k] for k in names if k in record}
            scalars.update({f"kept/{a}": v for a, v in record.get("kept", {}).items()})
            scalars.update({f"preserve_kept/{a}": v for a, v in record.get("preserve_kept", {}).items()})
            for prefix, key in (("distribution", "running_distribution"),
                                ("distribution", "untargeted_running_distribution"),
                                ("base_distribution", "base_running_distribution")):
                scalars.update({f"{prefix}/{a}/{c}": v for a, d in record[key].items() for c, v in d.items()})
            self.accelerator.log(scalars, step=iteration + 1)
        return record

    def _distributions(self, windows: dict, counts: dict) -> tuple[dict, dict]:
        """Per attribute, the class frequencies of ``counts`` (this iteration) and of the counts of the last
        ``distribution_window`` iterations, after adding ``counts`` to ``windows``."""
        def frequencies(attribute, values):
            total = max(float(sum(values)), 1.0)
            return {c: float(x) / total for c, x in zip(self.components.classifier.attributes[attribute], values)}

        batch, running = {}, {}
        for attribute, count in counts.items():
            window = windows.setdefault(attribute, deque(maxlen=self.config.distribution_window))
            window.append(count.tolist())
            batch[attribute] = frequencies(attribute, count.tolist())
            running[attribute] = frequencies(attribute, np.sum(list(window), axis=0).tolist())
        return batch, running

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict]:
        """Train until ``config.num_iterations`` (resuming first if ``config.resume_from``); return the log records
        of this call."""
        cfg, accelerator = self.config, self.accelerator
        saved = None
        if cfg.resume_from is not None:
            saved = checkpointing.resolve_resume(self._checkpoint_dir(), cfg.resume_from)
            if saved is not None:
                self.load_checkpoint(saved)
        if accelerator.is_main_process:
            (self.output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            tracked = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.to_dict().items()}
            accelerator.init_trackers("diffusers-fair", config=tracked)
        if cfg.sample_every and self.iteration == 0:
            self.save_samples()
        first = len(self.history)
        bar = tqdm(total=cfg.num_iterations, initial=self.iteration, desc="fair finetuning",
                   disable=not (cfg.progress and accelerator.is_local_main_process))
        while self.iteration < cfg.num_iterations:
            record = self.train_step()
            bar.update(1)
            if "loss" in record:
                bar.set_postfix(loss=f"{record['loss']:.4f}", dal=f"{record['dal']:.4f}")
            if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                saved = self.save_checkpoint()
            if cfg.sample_every and self.iteration % cfg.sample_every == 0:
                self.save_samples()
        bar.close()
        if saved is None or saved.name != checkpointing.checkpoint_name(self.iteration):
            self.save_checkpoint()
        if accelerator.is_main_process:
            plot_loss_curve(self.output_dir / LOG_FILE, self.output_dir / "loss_curve.png")
        # The trackers' end, not accelerator.end_training(): that also destroys the process group, which
        # save_adaptor and push_to_hub still need on every process after training.
        for tracker in accelerator.trackers:
            tracker.finish()
        return self.history[first:]

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        """A grid of EMA-model samples (one row per sample prompt) in ``output_dir/samples``."""
        from torchvision.utils import save_image

        cfg, path = self.config, None
        if self.accelerator.is_main_process:
            prompts = list(cfg.sample_prompts) or [p for s in self.prompt_sets for p in s.prompts][:4]
            generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "samples"))
            noise = torch.randn((len(prompts), cfg.sample_images_per_prompt, *self.latent_shape), generator=generator)
            with self.ema_weights(), self.accelerator.autocast():
                images = torch.cat([self._sample(noise[i], prompt, cfg.max_inference_steps, True)
                                    for i, prompt in enumerate(prompts)])
            path = self.output_dir / "samples" / f"step-{self.iteration:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(images.cpu(), path, nrow=cfg.sample_images_per_prompt, padding=1)
        self.accelerator.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the full training state (main process; atomic)."""
        path = self._checkpoint_dir() / checkpointing.checkpoint_name(self.iteration)
        if self.accelerator.is_main_process:
            counters = {"iteration": self.iteration, "ema_updates": self.ema_updates,
                        "nonfinite_steps": self.nonfinite_steps,
                        "windows": {a: list(w) for a, w in self.windows.items()},
                        "untargeted_windows": {a: list(w) for a, w in self.untargeted_windows.items()},
                        "base_windows": {a: list(w) for a, w in self.base_windows.items()},
                        "grad_scaler": self.scaler.state_dict()}
            tensors, state = checkpointing.pack_training_state(self.params, self.ema, self.optimizer, counters)
            state["config"] = self.config.to_dict()
            path = checkpointing.save_checkpoint(self._checkpoint_dir(), self.iteration, tensors, state)
            checkpointing.prune_checkpoints(self._checkpoint_dir(), self.config.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the full training state; the run then continues exactly as if never stopped."""
        counters = checkpointing.restore_training_state(path, self.params, self.ema, self.optimizer)
        self.iteration, self.ema_updates = counters["iteration"], counters["ema_updates"]
        self.nonfinite_steps = counters["nonfinite_steps"]
        self.windows, self.untargeted_windows, self.base_windows = (
            {a: deque(w, maxlen=self.config.distribution_window) for a, w in counters.get(name, {}).items()}
            for name in ("windows", "untargeted_windows", "base_windows"))
        if counters.get("grad_scaler"):
            self.scaler.load_state_dict(counters["grad_scaler"])
        if self.accelerator.is_main_process:
            checkpointing.truncate_log(self.output_dir / LOG_FILE, self.iteration)
        self._log_mode = "a"
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ results
    def adaptor_metadata(self, name: str, **fields):
        """The :class:`~diffusers_fair.adaptors.metadata.FairAdaptorMetadata` of the trained adaptor."""
        from ..adaptors.metadata import FairAdaptorMetadata

        targets = list({repr(t): t for s in self.prompt_sets for t in s.targets}.values())
        training = {k: v for k, v in self.config.to_dict().items() if k not in ("output_dir", "resume_from")}
        training.update(iterations_trained=self.iteration, num_prompts=sum(len(s.prompts) for s in self.prompt_sets))
        fields.setdefault("targets", targets)
        fields.setdefault("training", json.loads(json.dumps(training)))
        base_model = fields.pop("base_model", None) or self.config.base_model
        return FairAdaptorMetadata.for_pipeline(self.pipeline, name=name, base_model=base_model, **fields)

    def save_adaptor(self, folder: str | Path, *, name: str = "fair-adaptor", overwrite: bool = False,
                     **metadata_fields):
        """Save the EMA weights as a fair adaptor (``adaptors.save_fair_adaptor``).

        ``metadata_fields`` are :class:`~diffusers_fair.adaptors.metadata.FairAdaptorMetadata` fields, e.g.
        ``description=``, ``license=`` or ``base_model=`` (default: ``config.base_model``, else the
        pipeline's Hub id). Call it on every process: the main process writes, the others wait until the folder is
        complete. Returns the written metadata on the main process, ``None`` on the others.
        """
        written = None
        if self.accelerator.is_main_process:
            written = self._write_adaptor(folder, name, overwrite, metadata_fields)
        self.accelerator.wait_for_everyone()
        return written

    def push_to_hub(self, repo_id: str, *, name: str = "fair-adaptor", base_model: str | None = None, **push_kwargs):
        """Save the adaptor to a temporary folder and upload it to the Hub repo ``repo_id``.

        ``base_model`` as in :meth:`save_adaptor`; ``push_kwargs`` go to ``adaptors.hub.push_adaptor``.

        Call it on every process: the main process uploads and returns the commit, the others return ``None``.
        """
        from ..adaptors.hub import push_adaptor

        result = None
        if self.accelerator.is_main_process:
            with tempfile.TemporaryDirectory() as folder:
                self._write_adaptor(folder, name, False, {"base_model": base_model})
                result = push_adaptor(folder, repo_id, **push_kwargs)
        self.accelerator.wait_for_everyone()
        return result

    def _write_adaptor(self, folder, name: str, overwrite: bool, metadata_fields: dict):
        from ..adaptors.format import save_fair_adaptor

        metadata = self.adaptor_metadata(name, **metadata_fields)
        soft_tokens = None
        if self.soft_token_names:  # SDXL: one vector set per text encoder
            vectors = [self.ema[key].cpu() for key in ("soft_tokens", "soft_tokens_2") if key in self.ema]
            soft_tokens = vectors[0] if len(vectors) == 1 else dict(zip(self.family.text_encoders, vectors))
        loras = {f"{part}_lora": getattr(self.pipeline, part) for part in self.lora_configs}
        with self.ema_weights():
            return save_fair_adaptor(folder, metadata=metadata, overwrite=overwrite, soft_tokens=soft_tokens,
                                     soft_token=self.config.soft_token_prefix, **loras)


def plot_loss_curve(log_file: str | Path, png_file: str | Path) -> Path | None:
    """Plot each loss part per iteration from a training log (JSONL) into a PNG."""
    plt = pyplot()

    records = [json.loads(line) for line in Path(log_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [r for r in records if "loss" in r]
    if not records:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    steps = [r["iteration"] for r in records]
    keys = ["loss", "dal", "semantics", "face_realism"]
    if any(r.get("preserve") for r in records):  # a run that preserves attributes
        keys.append("preserve")
    for key in keys:
        axis.plot(steps, [r[key] for r in records], label=key)
    axis.set_xlabel("iteration")
    axis.set_yscale("symlog", linthresh=1e-3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_file, dpi=100)
    plt.close(figure)
    return Path(png_file)
