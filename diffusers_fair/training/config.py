"""The settings of a training run.

Every setting of a distributional-alignment run lives in one dataclass. Its defaults are the
paper's Stable Diffusion 1.5 settings (text-encoder LoRA of rank 50, AdamW at 5e-5, EMA 0.996,
19-23 DPM-Solver++ steps, guidance 7.5, 24 images per prompt, image-semantics weight 8 with
factor 0.2 ...); :meth:`FairTrainingConfig.toy` gives the settings for the toy world, whose model
is tiny and trains on a CPU. Each field carries its explanation in ``metadata["help"]``
(``FairTrainingConfig.help()`` prints them all; ``transformers.HfArgumentParser`` shows them as
``--help``). A config is valid from construction: a bad value raises ``ValueError`` naming the
field. Choices are ``Literal`` types, and :meth:`FairTrainingConfig.from_dict` builds a config from
a parsed JSON or YAML file.

Prompt sets (``prompts.py``), the checks of the trainer's inputs (``setup_checks.py``) and the seeded
draws of an iteration (``draws.py``) live beside this module.
"""

import dataclasses
import difflib
import functools
import importlib.util
import math
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


MixedPrecision = Literal["no", "fp16", "bf16"]
DFTMode = Literal["two_pass", "one_graph", "naive"]
DFTStepWeights = Literal["unit", "authors"]
PromptPadding = Literal["max_length", "natural"]
OTCost = Literal["squared", "euclidean"]
FacelessImageWeight = Literal["full", "smallest_change_factor"]
FaceRealismImages = Literal["kept_target", "every_face"]
LRSchedule = Literal["constant", "cosine"]
SDXLTextEncoders = Literal["both", "text_encoder", "text_encoder_2"]
Sampler = Literal["dpmsolver++", "ddim", "euler", "pipeline"]
Tracker = Literal["auto", "tensorboard", "wandb", "none"]
_TOKEN_PATTERN = re.compile(r"^<[A-Za-z0-9_\-]+>$")

# The entry of ``preserve`` that stands for every attribute the classifier reads that no target covers.
PRESERVE_UNTARGETED = "untargeted"


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    """A dataclass field whose explanation is kept in ``metadata["help"]`` (argparse's ``help``)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class FairTrainingConfig:
    """All settings of a distributional-alignment finetuning run (defaults: the paper's SD 1.5 run, plus
    ``preserve``, which holds the attributes no target covers where the frozen model has them).

    Read each field's explanation with ``FairTrainingConfig.help()`` or in docs/TRAINING.md.
    Build the toy-world settings with :meth:`toy`, a config from a JSON or YAML file with
    :meth:`from_dict`, and one from the command line with
    ``transformers.HfArgumentParser(FairTrainingConfig)``.

    Raises:
        ValueError: on construction, naming the first field of a wrong type or out of range (and
            the fix where there is one). :meth:`validate` checks again after fields were assigned.
    """

    # ------------------------------------------------------------------ what is finetuned
    base_model: str = _help(
        "Hub id or folder of the base model, recorded in the adaptor's metadata.",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
    )
    train_text_encoder_lora: bool = _help("Train a LoRA on the text encoder (the paper's main setting).", True)
    text_encoder_lora_rank: int = _help("Rank of the text-encoder LoRA (the paper: 50).", 50)
    text_encoder_lora_alpha: float | None = _help(
        "LoRA alpha of the text encoder; the LoRA output is scaled by alpha / rank. None means alpha = rank (scale 1).",
        None,
    )
    text_encoder_lora_modules: list[str] = _help(
        "Text-encoder linear layers that get a LoRA: attention q/k/v/out_proj and the MLP's fc1/fc2.",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    )
    sdxl_text_encoder_lora: SDXLTextEncoders = _help(
        "On an SDXL pipeline, which of its two text encoders get the text-encoder LoRA: 'both', 'text_encoder' "
        "(CLIP ViT-L/14) or 'text_encoder_2' (OpenCLIP ViT-bigG/14, which also gives the pooled embedding). "
        "SD 1.x pipelines have one text encoder and ignore it.",
        "both",
    )
    train_unet_lora: bool = _help("Train a LoRA on the U-Net's attention layers.", False)
    unet_lora_rank: int = _help("Rank of the U-Net LoRA (the paper: 50).", 50)
    unet_lora_alpha: float | None = _help("LoRA alpha of the U-Net; None means alpha = rank (scale 1).", None)
    unet_lora_modules: list[str] = _help(
        "U-Net layers that get a LoRA: the attention projections.",
        factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
    )
    num_soft_tokens: int = _help(
        "Number of learnable token embeddings prepended to the prompt (not to the negative prompt); 0 trains none. "
        "The paper's soft-prompt setting uses 5.",
        0,
    )
    soft_token_prefix: str = _help(
        "Name of the soft tokens: the tokens are '<fair>', '<fair>_1', ... as diffusers' textual inversion names "
        "a multi-vector token, and a prompt starting with '<fair>' uses them all. Must not be in the tokenizer.",
        "<fair>",
    )
    soft_token_init: str = _help(
        "Word whose token embedding initialises every soft token.", "a"
    )

    # ------------------------------------------------------------------ sampling
    sampler: Sampler = _help(
        "Sampler used for training: 'dpmsolver++' (the paper's), 'ddim', 'euler' (built from the pipeline's "
        "scheduler config), or 'pipeline' to keep the pipeline's own scheduler.",
        "dpmsolver++",
    )
    resolution: int | None = _help(
        "Side in pixels of the square images drawn in training and in sample grids; a multiple of the VAE's "
        "downsampling factor (8). None: the U-Net's native size (512 for SD 1.5, 1024 for SDXL).",
        None,
    )
    min_inference_steps: int = _help("Fewest sampling steps; each iteration draws its step count uniformly.", 19)
    max_inference_steps: int = _help("Most sampling steps (inclusive).", 23)
    guidance_scale: float = _help("Classifier-free guidance weight (1 turns guidance off).", 7.5)
    negative_prompt: str = _help("Negative prompt for classifier-free guidance (the paper's is empty).", "")
    prompt_padding: PromptPadding = _help(
        "How prompts reach the text encoder: 'max_length' pads them to the tokenizer's maximum length without an "
        "attention mask, as a stock StableDiffusionPipeline does; 'natural' keeps the prompt's own length and passes "
        "an attention mask, the negative prompt padded to the same length (the authors' code). Use an adaptor with "
        "the padding it was trained with.",
        "max_length",
    )
    dft_mode: DFTMode = _help(
        "How the gradient through the sampling chain is computed: 'two_pass' (adjusted DFT, memory flat in the "
        "number of steps), 'one_graph' (adjusted DFT, one graph) or 'naive' (exact gradient, for comparison).",
        "two_pass",
    )
    standardize_dft: bool = _help(
        "Adjusted DFT: give every step's noise prediction the same weight (|A_t| = 1). False keeps the scheduler's coefficients.",
        True,
    )
    dft_step_weights: DFTStepWeights = _help(
        "With standardize_dft: 'unit' weighs every step's noise prediction by the sign of its path to z_0 "
        "(|A_t| = 1, the paper's); 'authors' by the path times sqrt(abar_t) sqrt(1 - abar_t) / (1 - alpha_t), "
        "normalised by its geometric mean over the steps (the authors' code; not constant on DPM-Solver++).",
        "unit",
    )

    # ------------------------------------------------------------------ batch
    images_per_prompt: int = _help(
        "Images generated per prompt and iteration, over all processes: the batch the alignment loss sees.", 24
    )
    micro_batch_size: int = _help(
        "Images per forward/backward pass on one process; smaller values save memory, not results.", 4
    )
    gradient_accumulation_steps: int = _help(
        "Prompts per optimizer step; each prompt is its own alignment batch, and the loss is the mean over all their images.", 1
    )

    # ------------------------------------------------------------------ losses
    dal_threshold: float = _help(
        "Confidence C of the distributional alignment loss: an image's dynamic target is used only when "
        "max_k q[i, k] >= C (the official code's uncertainty threshold 0.2 is C = 0.8).",
        0.8,
    )
    ot_monte_carlo_samples: int = _help(
        "Expected-OT targets are exact where cheap (always for two classes); otherwise a Monte Carlo "
        "estimate from this many label draws, each solved exactly.",
        100,
    )
    ot_cost: OTCost = _help(
        "Transport cost between an image's class probabilities and a label: 'squared' distance (the paper's eq. 4) "
        "or plain 'euclidean' distance (the authors' code for race and joint targets). Two-class targets are the "
        "same with both.",
        "squared",
    )
    weight_loss_img: float = _help(
        "lambda_img: weight of the image-semantics loss (1 - cos of image embeddings against the frozen model's image) "
        "for images that already have their target classes.",
        8.0,
    )
    image_change_factor: float = _help(
        "Factor on weight_loss_img for images whose target class differs from the original image's class (or is uncertain).",
        0.2,
    )
    attribute_change_factors: dict[str, float] = _help(
        "Per-attribute override of image_change_factor (e.g. {'race': 0.6}); an image needing several changes uses the smallest.",
        factory=dict,
    )
    faceless_image_weight: FacelessImageWeight = _help(
        "Image-semantics weight factor of an image without a face: 'full' (1) or 'smallest_change_factor', the "
        "smallest change factor of the trained attributes (the authors' joint runs).",
        "full",
    )
    face_region_factor: float = _help(
        "Extra factor on the image-semantics gradient inside the face region of images that must change, "
        "so the face is freer to change than the rest of the image.",
        0.2,
    )
    attribute_face_region_factors: dict[str, float] = _help(
        "Per-attribute override of face_region_factor (e.g. {'race': 0.3}); an image needing several changes uses the smallest.",
        factory=dict,
    )
    weight_loss_face: float = _help(
        "lambda_face: weight of the face-realism loss (1 - cos of face embeddings against a reference face).", 1.0
    )
    own_face_confidence: float = _help(
        "The original image's own face is the face-realism reference when it already has the target classes and "
        "the classifier's confidence on it is at least this; otherwise the nearest face of the reference set.",
        0.9,
    )
    face_realism_images: FaceRealismImages = _help(
        "Images the face-realism loss applies to: 'kept_target', faces with at least one kept target, or "
        "'every_face', every detected face (the authors' joint runs).",
        "kept_target",
    )
    preserve: list[str] = _help(
        "Attributes held at the frozen model's class distribution for the same prompt while the targets are trained: "
        "names of attributes the classifier reads that no target covers, or ['untargeted'] (the default) for every "
        "such attribute; [] holds none (the paper's loss). The finetuned batch is aligned to the class frequencies "
        "of the frozen model's images of the same noises (expected-OT targets, as the DAL, with dal_threshold).",
        factory=lambda: [PRESERVE_UNTARGETED],
    )
    weight_loss_preserve: float = _help(
        "lambda_preserve: weight of the preservation loss (the cross-entropy toward each preserved attribute's "
        "target, summed over the preserved attributes). On the toy demo's run 0.3 removed most of the untargeted "
        "drift at a small cost in targeted balance; 1.0 cost more of it.",
        0.3,
    )
    face_box_scale: float | None = _help(
        "Detected face boxes are grown into squares of this many times their longer side before cropping; "
        "None uses the components' own crop_factor if they declare one, else 1.",
        None,
    )
    align_faces: bool = _help(
        "The face-realism loss reads faces aligned to the 112x112 five-point face template from the detector's "
        "landmarks (the authors' code) instead of the detector's square crops; detectors without landmarks "
        "(the toy world's) keep the crops. Build the reference faces the same way.",
        False,
    )

    # ------------------------------------------------------------------ optimisation
    num_iterations: int = _help("Iterations (optimizer steps) to train for; the paper trains 10k-15k, most of the effect comes by 2k-4k.", 10000)
    learning_rate: float = _help("Peak learning rate of AdamW (reached after the optional warmup).", 5e-5)
    lr_warmup_iterations: int = _help("Iterations of linear learning-rate warmup from 0 (0: no warmup).", 0)
    lr_schedule: LRSchedule = _help(
        "After the warmup: 'constant' keeps learning_rate; 'cosine' decays it along a half cosine to "
        "lr_final_ratio x learning_rate at the last iteration.",
        "constant",
    )
    lr_final_ratio: float = _help("With lr_schedule='cosine': the final learning rate as a fraction of learning_rate.", 0.0)
    adam_beta1: float = _help("AdamW beta1: decay of the running mean of the gradients.", 0.9)
    adam_beta2: float = _help("AdamW beta2: decay of the running mean of the squared gradients.", 0.999)
    adam_epsilon: float = _help("AdamW epsilon: added to the denominator for numerical stability.", 1e-8)
    weight_decay: float = _help("AdamW (decoupled) weight decay of the trained weights.", 1e-2)
    max_grad_norm: float | None = _help("Gradients are clipped to this total norm; None: no clipping.", 100.0)
    ema_decay: float = _help("Decay of the exponential moving average of the trained weights (the EMA is what is saved).", 0.996)
    ema_warmup: bool = _help(
        "Ramp the EMA decay as min(ema_decay, (1 + s) / (10 + s)) at update s (0 at the first), as diffusers' EMAModel does.",
        True,
    )
    mixed_precision: MixedPrecision = _help(
        "'no', 'fp16' or 'bf16': frozen weights in that precision, trained weights in float32.", "fp16"
    )
    gradient_checkpointing: bool = _help("Recompute U-Net and VAE activations in the backward pass to save memory.", False)
    max_nonfinite_steps: int = _help(
        "Steps with a NaN or infinite loss or gradient are skipped; training stops with an error once more than this many were skipped.",
        10,
    )

    # ------------------------------------------------------------------ bookkeeping
    seed: int = _help("Seed of every random draw (prompts, step counts, noises, LoRA initialisation).", 0)
    output_dir: str = _help("Folder for checkpoints, logs, sample grids and plots.", "fair-diffusion-output")
    log_with: Tracker = _help(
        "Tracker: 'auto' (tensorboard if installed, else none), 'tensorboard', 'wandb' or 'none'. "
        "A JSONL log is always written to output_dir.",
        "auto",
    )
    distribution_window: int = _help(
        "Iterations over which the logged running class distribution of each attribute is counted.", 50
    )
    checkpoint_every: int = _help("Save a resumable checkpoint every this many iterations (0: only at the end).", 200)
    checkpoints_total_limit: int | None = _help("Keep at most this many checkpoints (oldest removed); None keeps all.", 2)
    resume_from: str | None = _help(
        "Resume from a checkpoint folder, or 'latest' for the newest one in output_dir (none there: start fresh).", None
    )
    sample_every: int = _help("Save a grid of sample images every this many iterations (0: never).", 200)
    sample_prompts: list[str] = _help(
        "Prompts of the sample grids; empty: the first four training prompts.", factory=list
    )
    sample_images_per_prompt: int = _help("Images per prompt in a sample grid.", 8)
    progress: bool = _help("Show a tqdm progress bar over the iterations (main process only).", True)

    # ------------------------------------------------------------------ presets and helpers
    @classmethod
    def toy(cls, **overrides) -> "FairTrainingConfig":
        """Settings for the toy world (32x32 images, a ~4M-parameter U-Net, a CPU): the demo's run.

        140 iterations of 16 images per prompt in one micro-batch, 10-12 steps, guidance 4, a rank-8
        text-encoder LoRA at a higher learning rate (a cosine schedule, if chosen, ends at a tenth of
        it), a faster EMA, float32, a DAL confidence of 0.5 and an image-semantics weight of 2. Why
        each differs from the paper's value, with measurements, is in docs/RESULTS.md: 16 images give
        finer batch-level targets; with four skin tones and few images most images' targets are
        spread over several classes, and a confidence of 0.8 keeps only about 40% of them in the loss
        (0.5 keeps over 80%); a semantics weight of 8 held the training words' images in place and
        left hair length at half its base bias. Any field can be overridden:
        ``FairTrainingConfig.toy(num_iterations=50)``; an unknown name is a ``ValueError``.
        """
        settings = dict(
            base_model="diffusers-fair/toy",
            text_encoder_lora_rank=8,
            unet_lora_rank=8,
            min_inference_steps=10,
            max_inference_steps=12,
            guidance_scale=4.0,
            images_per_prompt=16,
            micro_batch_size=16,
            ot_monte_carlo_samples=100,
            dal_threshold=0.5,
            weight_loss_img=2.0,
            num_iterations=140,
            learning_rate=4e-3,
            lr_final_ratio=0.1,
            ema_decay=0.95,
            mixed_precision="no",
            max_grad_norm=10.0,
            checkpoint_every=50,
            sample_every=50,
            sample_images_per_prompt=8,
            distribution_window=20,
            output_dir="fair-toy-output",
        )
        _refuse_unknown_fields(overrides)
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def help(cls) -> str:
        """Every field with its default and explanation, one per line."""
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{f.name} = {default!r}: {f.metadata['help']}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, as JSON types (lists and dicts are copies); ``from_dict(c.to_dict()) == c``."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (list, tuple)):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "FairTrainingConfig":
        """Build a config from field names and values, e.g. a parsed JSON or YAML file or :meth:`to_dict`'s output.

        Missing fields keep their defaults.

        Raises:
            ValueError: ``values`` is not a mapping; a key is not a field (the message names the
                closest field); a value is of the wrong type or out of range (the message names the field).
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"FairTrainingConfig.from_dict needs a mapping of field names to values, "
                             f"got {type(values).__name__}")
        _refuse_unknown_fields(values)
        return cls(**values)

    # ------------------------------------------------------------------ checks
    def __post_init__(self):
        self._check()

    def validate(self) -> "FairTrainingConfig":
        """Check every field again (after some were assigned); return ``self``.

        A new config is checked on construction; this repeats the same checks, so that changing a
        field in place cannot slip a bad value past the trainer (which calls it).

        Raises:
            ValueError: naming the first bad field.
        """
        self._check()
        return self

    def _check(self) -> None:
        """Check each value against its annotation, then the ranges and the fields against each other."""
        annotations = _field_annotations()
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked_value(f.name, annotations[f.name], getattr(self, f.name)))
        if not (self.train_text_encoder_lora or self.train_unet_lora or self.num_soft_tokens > 0):
            raise ValueError("nothing to train: set train_text_encoder_lora=True, train_unet_lora=True "
                             "or num_soft_tokens > 0")
        for name in ("text_encoder_lora_rank", "unet_lora_rank", "min_inference_steps", "images_per_prompt",
                     "micro_batch_size", "gradient_accumulation_steps", "ot_monte_carlo_samples",
                     "num_iterations", "distribution_window", "sample_images_per_prompt"):
            _check_at_least(self, name, 1)
        for name in ("num_soft_tokens", "lr_warmup_iterations", "max_nonfinite_steps", "seed",
                     "checkpoint_every", "sample_every"):
            _check_at_least(self, name, 0)
        if self.checkpoints_total_limit is not None:
            _check_at_least(self, "checkpoints_total_limit", 1)
        if self.resolution is not None:
            _check_at_least(self, "resolution", 8)
        if self.max_inference_steps < self.min_inference_steps:
            raise ValueError(f"max_inference_steps ({self.max_inference_steps}) must be >= "
                             f"min_inference_steps ({self.min_inference_steps})")
        for name in ("text_encoder_lora_alpha", "unet_lora_alpha", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        for name in ("learning_rate", "adam_epsilon"):
            _check_positive(self, name)
        if self.face_box_scale is not None:
            _check_positive(self, "face_box_scale")
        if self.guidance_scale < 1.0 or not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number >= 1 (1 turns guidance off), "
                             f"got {self.guidance_scale!r}")
        for name in ("weight_decay", "weight_loss_img", "weight_loss_face", "weight_loss_preserve"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("dal_threshold", "image_change_factor", "face_region_factor", "own_face_confidence",
                     "lr_final_ratio"):
            _check_unit_interval(name, getattr(self, name))
        for name in ("attribute_change_factors", "attribute_face_region_factors"):
            for attribute, factor in getattr(self, name).items():
                _check_unit_interval(f"{name}[{attribute!r}]", factor)
        _check_preserve(self.preserve)
        if self.dft_step_weights == "authors" and not self.standardize_dft:
            raise ValueError("dft_step_weights='authors' standardises the step weights in its own way; "
                             "it needs standardize_dft=True")
        for name in ("adam_beta1", "adam_beta2", "ema_decay"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.log_with in ("tensorboard", "wandb") and importlib.util.find_spec(self.log_with) is None:
            raise ValueError(f"log_with={self.log_with!r} but {self.log_with} is not installed: "
                             f"pip install {self.log_with}, or choose log_with='none'")
        for name in ("text_encoder_lora_modules", "unet_lora_modules"):
            modules = getattr(self, name)
            if not modules or not all(modules):
                raise ValueError(f"{name} must be a non-empty list of module names, got {modules!r}")
        if self.num_soft_tokens and not _TOKEN_PATTERN.match(self.soft_token_prefix):
            raise ValueError(f"soft_token_prefix must look like '<name>' (letters, digits, '_', '-'), "
                             f"got {self.soft_token_prefix!r}")
        if self.num_soft_tokens and not self.soft_token_init.strip():
            raise ValueError("soft_token_init must be a non-empty word")
        if not self.output_dir:
            raise ValueError("output_dir must not be empty")
        if not all(p.strip() for p in self.sample_prompts):
            raise ValueError(f"sample_prompts must be non-empty strings, got {self.sample_prompts!r}")


@functools.cache
def _field_annotations() -> dict[str, Any]:
    """The annotation of each field, read from the class itself.

    ``Field.type`` is not used: ``transformers.HfArgumentParser`` rewrites it in place (``float | None``
    becomes ``float``), while the class's ``__annotations__`` stay as written.
    """
    return typing.get_type_hints(FairTrainingConfig)


def _refuse_unknown_fields(names: Iterable) -> None:
    """Raise a one-line ``ValueError`` naming each name that is not a field, with the closest field."""
    known = [f.name for f in dataclasses.fields(FairTrainingConfig)]
    unknown = [name for name in names if name not in known]
    if not unknown:
        return
    described = []
    for name in unknown:
        close = difflib.get_close_matches(str(name), known, n=1)
        described.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"unknown FairTrainingConfig field{'s' if len(unknown) > 1 else ''} {', '.join(described)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Integer settings are counts, sizes and seeds: they must fit in 64 bits (torch's seeds and counters do).
_INT_LIMIT = 2**63


def _fits_float(value: int | float) -> bool:
    """Whether ``value`` converts to a float without overflowing (a huge integer does not)."""
    try:
        float(value)
    except OverflowError:
        return False
    return True


_TYPE_NAMES = {bool: "True or False", int: "an integer", float: "a number", str: "a string",
               list[str]: "a list of strings", dict[str, float]: "a mapping of attribute names to numbers"}


def _checked_value(name: str, annotation: Any, value: Any) -> Any:
    """``value`` if it is of the type ``annotation``; lists and tuples come back as new lists, dicts as new dicts.

    A ``bool`` is not a number and NaN is no value. A ``Literal`` annotation lists the allowed values.

    Raises:
        ValueError: naming the field, what it must be and the value given.
    """
    args = typing.get_args(annotation)
    optional = type(None) in args
    if optional:
        if value is None:
            return None
        (annotation,) = [arg for arg in args if arg is not type(None)]
        args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ValueError(f"{name} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not -_INT_LIMIT <= value < _INT_LIMIT:
            raise ValueError(f"{name} must be below 2**63 in size, got an integer of {len(str(abs(value)))} digits")
    elif annotation is float:
        if _is_number(value) and not _fits_float(value):
            raise ValueError(f"{name} must be a finite number, got an integer of {len(str(abs(value)))} digits")
        ok = _is_number(value) and not math.isnan(value)
    elif annotation is str:
        ok = isinstance(value, str)
    elif origin is list:
        ok = isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)
        value = list(value) if ok else value
    elif origin is dict:
        ok = isinstance(value, Mapping) and all(isinstance(k, str) and _is_number(v) for k, v in value.items())
        value = dict(value) if ok else value
        for key, number in value.items() if ok else ():
            if not _fits_float(number):
                raise ValueError(f"{name}[{key!r}] must be a finite number, got an integer of "
                                 f"{len(str(abs(number)))} digits")
    else:  # pragma: no cover - only reached by a new field of a type without a check here
        raise TypeError(f"{name}: no check for the annotation {annotation}")
    if not ok:
        expected = _TYPE_NAMES[annotation] + (" or None" if optional else "")
        raise ValueError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    return value


def _check_at_least(config: FairTrainingConfig, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _check_positive(config: FairTrainingConfig, name: str) -> None:
    value = getattr(config, name)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_preserve(preserve: list[str]) -> None:
    """Attribute names without repeats, or ``['untargeted']`` alone (which attributes exist, the trainer checks)."""
    if not all(isinstance(name, str) and name.strip() for name in preserve):
        raise ValueError(f"preserve must list attribute names, got {preserve!r}")
    if len(set(preserve)) != len(preserve):
        raise ValueError(f"preserve names an attribute twice: {preserve!r}")
    if PRESERVE_UNTARGETED in preserve and len(preserve) > 1:
        raise ValueError(f"preserve={preserve!r}: {PRESERVE_UNTARGETED!r} stands for every untargeted attribute; "
                         "give it alone or list the attributes")


def _check_unit_interval(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
