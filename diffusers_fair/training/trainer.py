"""DistributionalAlignmentTrainer: finetune a Stable Diffusion pipeline toward target distributions.

One iteration (one optimizer step) of the method, for each of ``gradient_accumulation_steps``
prompts:

1. **Draw** a prompt (prompt sets by weight, then uniformly), a step count and the initial noises
   of the batch, from a generator seeded by ``(config.seed, iteration, index)``: the same on every
   process and after a resume (:func:`draw_iteration`).
2. **Reference images**: the frozen model (adapters disabled, no soft tokens, no gradient) samples
   the same noises. Their faces, classes, image and face embeddings anchor the other losses.
3. **Targets**: the finetuned model's faces are classified and the class probabilities of the whole
   batch (gathered across processes) give the dynamic targets (``alignment.dynamic_targets``).
   With one micro-batch per process this happens inside the loss; with several, a no-grad pass
   over all micro-batches first computes the targets of the whole batch.
4. **Adjusted backward** (``dft.adjusted_backward``) per micro-batch with a loss on ``z_0``: decode
   with the VAE, detect faces on the detached images, crop with gradient, classify; the DAL, the
   dynamically weighted image-semantics loss and the face-realism loss (``losses.py``).
5. **Update**: sum the gradients over processes, skip the step if anything is NaN or infinite,
   clip, AdamW, and update the EMA of the trained weights (the EMA is what gets saved).

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
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpointing, trainable
from ..method import losses
from .config import FairTrainingConfig
from .draws import TrainingDraw, derive_seed, draw_iteration
from .setup_checks import check_components
from .prompts import resolve_prompt_sets
from ..method.dft import adjusted_backward, check_scheduler, sample_latents
from ..method.boxes import crop_faces, expand_boxes

LOG_FILE = "training_log.jsonl"


class _NonFiniteBatch(Exception):
    """Raised inside an iteration whose classifier probabilities are NaN or infinite."""


def learning_rate_at(iteration: int, config: FairTrainingConfig) -> float:
    """The learning rate of iteration ``iteration`` (0-based): a linear warmup over ``lr_warmup_iterations``,
    then constant or (``lr_schedule="cosine"``) a half-cosine decay to ``lr_final_ratio`` x the peak at the last iteration."""
    warmup = config.lr_warmup_iterations
    if iteration < warmup:
        return config.learning_rate * (iteration + 1) / warmup
    if config.lr_schedule == "constant":
        return config.learning_rate
    progress = (iteration - warmup) / max(1, config.num_iterations - 1 - warmup)
    final = config.lr_final_ratio
    return config.learning_rate * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if getattr(pipeline, part, None) is None:
                raise ValueError(f"the pipeline has no {part}")
        self.soft_token_names = trainable.soft_token_names(
            config, pipeline.tokenizer, [p for prompt_set in self.prompt_sets for p in prompt_set.prompts])
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
                             "with `accelerate launch --cpu` (or set ACCELERATE_USE_CPU=1)")
        if config.images_per_prompt % processes:
            raise ValueError(f"images_per_prompt ({config.images_per_prompt}) must be divisible by the "
                             f"number of processes ({processes})")
        if self.accelerator.is_main_process:
            self._check_writable()
        self.pipeline, self.components = pipeline, components
        self.device = self.accelerator.device
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
        self.local_images = config.images_per_prompt // processes
        self.crop_scale = config.face_box_scale if config.face_box_scale is not None else getattr(components, "crop_factor", 1.0)

        self._prepare_modules()
        weights = trainable.add_trainable_weights(pipeline, config, self.soft_token_names, self.device)
        self.params, self.lora_configs, self.soft_token_ids = weights.params, weights.lora_configs, weights.soft_token_ids
        self.ema = {name: p.detach().clone().float() for name, p in self.params.items()}
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon, weight_decay=config.weight_decay,
        )
        self.face_bank = self._reference_face_bank()
        unet_config = pipeline.unet.config
        self.latent_shape = (unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
        self.iteration = 0
        self.ema_updates = 0
        self.nonfinite_steps = 0
        self.windows: dict[str, deque] = {}  # attribute -> class counts of recent iterations
        self.history: list[dict] = []
        self._batch_counts: dict[str, torch.Tensor] = {}

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

    def _prepare_modules(self) -> None:
        """Freeze everything, move to the device; frozen weights in the mixed-precision dtype."""
        pipe, c = self.pipeline, self.components
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, c.classifier, c.detector, c.face_embedder, *c.image_embedders):
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval().to(self.device)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            if module.dtype != self.weight_dtype:
                module.to(dtype=self.weight_dtype)
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
    def _encode(self, text: str, batch: int) -> torch.Tensor:
        tokenizer = self.pipeline.tokenizer
        ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.device)
        return self.pipeline.text_encoder(ids)[0].repeat(batch, 1, 1)

    def _embeddings(self, prompt: str, batch: int, finetuned: bool = True):
        """Prompt and negative-prompt embeddings (the negative one only with guidance)."""
        cond = self._encode(trainable.soft_token_prefix(self.soft_token_names) + prompt if finetuned else prompt, batch)
        guided = self.config.guidance_scale > 1.0
        return cond, (self._encode(self.config.negative_prompt, batch) if guided else None)

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
        cond, neg = self._embeddings(prompt, noise.shape[0], finetuned)
        latents = sample_latents(self.pipeline.unet, self.scheduler, noise.to(self.device, self.weight_dtype), cond,
                                 num_inference_steps=steps, guidance_scale=self.config.guidance_scale,
                                 negative_prompt_embeds=neg)
        return self._decode(latents)

    def _faces(self, images: torch.Tensor):
        """Detect on the detached images; return ``(found (n,), boxes (n, 4))`` (zero boxes where none)."""
        detection = self.components.detector.detect(images.detach())
        found = detection.found.to(self.device).bool()
        boxes = expand_boxes(detection.boxes.to(self.device).float(), self.crop_scale, tuple(images.shape[-2:]))
        return found, torch.where(found[:, None], boxes, torch.zeros_like(boxes))

    def _classify(self, images, found, boxes) -> dict[str, torch.Tensor]:
        """Logits ``(n, K)`` per attribute; rows of images without a face are zeros (and get no loss)."""
        classifier = self.components.classifier
        index = found.nonzero().flatten()
        full = {a: images.new_zeros(images.shape[0], len(c)) for a, c in classifier.attributes.items()}
        if index.numel() == 0:
            return full
        logits = classifier(crop_faces(images[index], boxes[index], classifier.input_size))
        return {a: full[a].index_copy(0, index, logits[a].float()) for a in full}

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.accelerator.num_processes == 1 else self.accelerator.gather(tensor.contiguous())

    def _local(self, tensor: torch.Tensor) -> torch.Tensor:
        start = self.accelerator.process_index * self.local_images
        return tensor[start: start + self.local_images]

    # ------------------------------------------------------------------ the pieces of an iteration
    @torch.no_grad()
    def _reference(self, draw: TrainingDraw, slices) -> losses.ReferenceImages:
        """The frozen model's images from the same noises, and what the losses need of them."""
        noise = self._local(draw.noise)
        with self._frozen_model():
            images = torch.cat([self._sample(noise[s], draw.prompt, draw.num_inference_steps, False) for s in slices])
        found, boxes = self._faces(images)
        logits = self._classify(images, found, boxes)
        classes, confidence = {}, {}
        for attribute, values in logits.items():
            conf, cls = torch.softmax(values, dim=1).max(dim=1)
            classes[attribute] = torch.where(found, cls, torch.full_like(cls, -1))
            confidence[attribute] = torch.where(found, conf, torch.zeros_like(conf))
        face_embeddings = None
        if self.config.weight_loss_face > 0 and found.any():
            embedder = self.components.face_embedder
            index = found.nonzero().flatten()
            embedded = embedder(crop_faces(images[index], boxes[index], embedder.input_size)).float()
            face_embeddings = embedded.new_zeros(images.shape[0], embedded.shape[1]).index_copy(0, index, embedded)
        image_embeddings = [e(images).float() for e in self.components.image_embedders] if self.config.weight_loss_img > 0 else []
        return losses.ReferenceImages(found, boxes, classes, confidence, image_embeddings, face_embeddings)

    def _alignment_targets(self, probs: dict, found: torch.Tensor, draw: TrainingDraw):
        """Dynamic targets ``(labels, keep)`` of the local images, from the whole batch gathered across processes."""
        found_all = self._gather(found.long()).bool()
        probs_all = {a: self._gather(p.float()) for a, p in probs.items()}
        if not all(torch.isfinite(p[found_all]).all() for p in probs_all.values()):
            raise _NonFiniteBatch()
        labels, keep, counts = losses.batch_dynamic_targets(
            probs_all, found_all, self.prompt_sets[draw.prompt_set].targets, threshold=self.config.dal_threshold,
            monte_carlo_samples=self.config.ot_monte_carlo_samples, seed=draw.ot_seed)
        for attribute, count in counts.items():
            self._batch_counts[attribute] = self._batch_counts.get(attribute, 0) + count
        return {a: self._local(x) for a, x in labels.items()}, {a: self._local(x) for a, x in keep.items()}

    @torch.no_grad()
    def _targets_before_backward(self, draw: TrainingDraw, slices):
        """With several micro-batches: sample all of them once without grad and compute the targets."""
        noise = self._local(draw.noise)
        probs, found_all = {}, []
        for s in slices:
            images = self._sample(noise[s], draw.prompt, draw.num_inference_steps, True)
            found, boxes = self._faces(images)
            for attribute, logits in self._classify(images, found, boxes).items():
                probs.setdefault(attribute, []).append(torch.softmax(logits, dim=1))
            found_all.append(found)
        return self._alignment_targets({a: torch.cat(p) for a, p in probs.items()}, torch.cat(found_all), draw)

    def _loss_fn(self, draw, s, reference, targets, stats):
        """The loss of micro-batch ``s`` as a function of its ``z_0`` (``losses.alignment_batch_loss``)."""
        cfg, components = self.config, self.components
        attributes = [a for t in self.prompt_sets[draw.prompt_set].targets for a in t.attributes]
        num_images = cfg.images_per_prompt * cfg.gradient_accumulation_steps

        def loss_fn(z0: torch.Tensor) -> torch.Tensor:
            images = self._decode(z0)
            found, boxes = self._faces(images)
            logits = {a: l for a, l in self._classify(images, found, boxes).items() if a in attributes}
            if targets is None:  # one micro-batch: this is the whole local batch
                labels, keep = self._alignment_targets({a: torch.softmax(l.detach(), 1) for a, l in logits.items()}, found, draw)
            else:
                labels = {a: x[s] for a, x in targets[0].items()}
                keep = {a: x[s] & found for a, x in targets[1].items()}
            result = losses.alignment_batch_loss(
                images, found, boxes, logits, labels, keep, reference[s], image_embedders=components.image_embedders,
                face_embedder=components.face_embedder, face_bank=self.face_bank, config=cfg, num_images=num_images)
            for key, value in {"loss": result.total.detach() * num_images, **result.parts}.items():
                stats[key] = stats.get(key, 0.0) + value
            # Keeps the loss attached to z_0 when no term applies (no face, zero weights): a zero gradient.
            return result.total + 0.0 * z0.float().sum()

        return loss_fn

    def _accumulate(self, iteration: int, index: int, stats: dict) -> TrainingDraw:
        """Add the gradient of prompt ``index`` of ``iteration`` to the trained weights' ``.grad``."""
        cfg = self.config
        draw = draw_iteration(cfg, self.prompt_sets, self.latent_shape, iteration, index)
        slices = [slice(i, min(i + cfg.micro_batch_size, self.local_images))
                  for i in range(0, self.local_images, cfg.micro_batch_size)]
        with self.accelerator.autocast():
            reference = self._reference(draw, slices)
            targets = self._targets_before_backward(draw, slices) if len(slices) > 1 else None
            noise = self._local(draw.noise)
            for s in slices:
                batch = noise[s].shape[0]
                cond, neg = self._embeddings(draw.prompt, batch)
                adjusted_backward(
                    self.pipeline.unet, self.scheduler, noise[s].to(self.device, self.weight_dtype), cond,
                    self._loss_fn(draw, s, reference, targets, stats), num_inference_steps=draw.num_inference_steps,
                    guidance_scale=cfg.guidance_scale, negative_prompt_embeds=neg, mode=cfg.dft_mode,
                    standardize=cfg.standardize_dft,
                )
        return draw

    def _learning_rate(self, iteration: int) -> float:
        return learning_rate_at(iteration, self.config)

    def train_step(self) -> dict:
        """Run one iteration (one optimizer step); return its log record."""
        cfg, params = self.config, list(self.params.values())
        start, iteration = time.time(), self.iteration
        self.optimizer.zero_grad(set_to_none=False)
        stats, draws, finite = {}, [], True
        self._batch_counts = {}  # attribute -> predicted-class counts of this iteration's batches
        try:
            for index in range(cfg.gradient_accumulation_steps):
                draws.append(self._accumulate(iteration, index, stats))
        except _NonFiniteBatch:
            finite = False
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        keys = sorted(stats)
        values = torch.stack([torch.as_tensor(stats[k], device=self.device).float() for k in keys]) if keys else None
        if self.accelerator.num_processes > 1:
            flat = self.accelerator.reduce(flat, reduction="sum")
            values = self.accelerator.reduce(values, reduction="sum") if values is not None else None
        totals = dict(zip(keys, values.tolist())) if values is not None else {}
        finite = finite and bool(torch.isfinite(flat).all()) and math.isfinite(totals.get("loss", 0.0))
        grad_norm = None
        if finite:
            offset = 0
            for p in params:
                p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            if cfg.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            for group in self.optimizer.param_groups:
                group["lr"] = self._learning_rate(iteration)
            self.optimizer.step()
            decay = ema_decay_at(self.ema_updates, cfg.ema_decay, cfg.ema_warmup)
            with torch.no_grad():
                for name, p in self.params.items():
                    self.ema[name].lerp_(p.detach().float(), 1.0 - decay)
            self.ema_updates += 1
        else:
            self.optimizer.zero_grad(set_to_none=False)
            self.nonfinite_steps += 1
        self.iteration += 1
        record = self._record(iteration, draws, totals, finite, grad_norm, time.time() - start)
        if not finite and self.nonfinite_steps > cfg.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self.nonfinite_steps} iterations had NaN or infinite losses or gradients (the last: iteration "
                f"{iteration + 1}); max_nonfinite_steps={cfg.max_nonfinite_steps}. Lower the learning rate, train in "
                "float32 (mixed_precision='no') or check the components' outputs."
            )
        return record

    # ------------------------------------------------------------------ logging
    def _record(self, iteration, draws, totals, finite, grad_norm, seconds) -> dict:
        cfg = self.config
        n = cfg.images_per_prompt * cfg.gradient_accumulation_steps
        record = {"iteration": iteration + 1, "prompts": [d.prompt for d in draws],
                  "num_inference_steps": [d.num_inference_steps for d in draws], "skipped": not finite,
                  "nonfinite_steps": self.nonfinite_steps, "lr": self._learning_rate(iteration), "grad_norm": grad_norm,
                  "seconds": round(seconds, 3)}
        if totals:
            record.update(loss=totals["loss"] / n, dal=totals["dal"] / n, semantics=totals["semantics"] / n,
                          face_realism=totals["face_realism"] / max(totals["realism_images"], 1.0),
                          faces_found=totals["faces"] / n,
                          kept={k[5:]: v / n for k, v in totals.items() if k.startswith("kept/")})
        def frequencies(attribute, counts):
            total = max(float(sum(counts)), 1.0)
            return {c: float(x) / total for c, x in zip(self.components.classifier.attributes[attribute], counts)}

        batch, running = {}, {}
        for attribute, counts in self._batch_counts.items():
            window = self.windows.setdefault(attribute, deque(maxlen=cfg.distribution_window))
            window.append(counts.tolist())
            batch[attribute] = frequencies(attribute, counts.tolist())
            running[attribute] = frequencies(attribute, np.sum(list(window), axis=0).tolist())
        record.update(batch_distribution=batch, running_distribution=running)
        self.history.append(record)
        if self.accelerator.is_main_process:
            with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            scalars = {k: record[k] for k in ("loss", "dal", "semantics", "face_realism", "faces_found", "lr") if k in record}
            scalars.update({f"kept/{a}": v for a, v in record.get("kept", {}).items()})
            scalars.update({f"distribution/{a}/{c}": v for a, d in running.items() for c, v in d.items()})
            self.accelerator.log(scalars, step=iteration + 1)
        return record

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict]:
        """Train until ``config.num_iterations`` (resuming first if ``config.resume_from``); return the log records of this call."""
        cfg, accelerator = self.config, self.accelerator
        saved = None
        if cfg.resume_from is not None:
            saved = checkpointing.resolve_resume(self._checkpoint_dir(), cfg.resume_from)
            if saved is not None:
                self.load_checkpoint(saved)
        if accelerator.is_main_process:
            (self.output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            accelerator.init_trackers("diffusers-fair", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                                for k, v in cfg.to_dict().items()})
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
        accelerator.end_training()
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
                images = torch.cat([self._sample(noise[i], p, cfg.max_inference_steps, True) for i, p in enumerate(prompts)])
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
                        "nonfinite_steps": self.nonfinite_steps, "windows": {a: list(w) for a, w in self.windows.items()}}
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
        self.windows = {a: deque(w, maxlen=self.config.distribution_window) for a, w in counters["windows"].items()}
        if self.accelerator.is_main_process:
            checkpointing.truncate_log(self.output_dir / LOG_FILE, self.iteration)
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
        return FairAdaptorMetadata.for_pipeline(self.pipeline, name=name, base_model=self.config.base_model, **fields)

    def save_adaptor(self, folder: str | Path, *, name: str = "fair-adaptor", overwrite: bool = False, **metadata_fields):
        """Save the EMA weights as a fair adaptor (``adaptors.save_fair_adaptor``).

        Call it on every process: the main process writes, the others wait until the folder is
        complete. Returns the written metadata on the main process, ``None`` on the others.
        """
        written = None
        if self.accelerator.is_main_process:
            written = self._write_adaptor(folder, name, overwrite, metadata_fields)
        self.accelerator.wait_for_everyone()
        return written

    def push_to_hub(self, repo_id: str, *, name: str = "fair-adaptor", **push_kwargs):
        """Save the adaptor to a temporary folder and upload it to the Hub repo ``repo_id``.

        Call it on every process: the main process uploads and returns the commit, the others return ``None``.
        """
        from ..adaptors.hub import push_adaptor

        result = None
        if self.accelerator.is_main_process:
            with tempfile.TemporaryDirectory() as folder:
                self._write_adaptor(folder, name, False, {})
                result = push_adaptor(folder, repo_id, **push_kwargs)
        self.accelerator.wait_for_everyone()
        return result

    def _write_adaptor(self, folder, name: str, overwrite: bool, metadata_fields: dict):
        from ..adaptors.format import save_fair_adaptor

        metadata = self.adaptor_metadata(name, **metadata_fields)
        with self.ema_weights():
            return save_fair_adaptor(
                folder, metadata=metadata, overwrite=overwrite,
                text_encoder_lora=self.pipeline.text_encoder if "text_encoder" in self.lora_configs else None,
                unet_lora=self.pipeline.unet if "unet" in self.lora_configs else None,
                soft_tokens=self.ema["soft_tokens"].cpu() if self.soft_token_names else None,
                soft_token=self.config.soft_token_prefix,
            )


def plot_loss_curve(log_file: str | Path, png_file: str | Path) -> Path | None:
    """Plot each loss part per iteration from a training log (JSONL) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [r for r in records if "loss" in r]
    if not records:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    steps = [r["iteration"] for r in records]
    for key in ("loss", "dal", "semantics", "face_realism"):
        axis.plot(steps, [r[key] for r in records], label=key)
    axis.set_xlabel("iteration")
    axis.set_yscale("symlog", linthresh=1e-3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_file, dpi=100)
    plt.close(figure)
    return Path(png_file)
