"""Run an audit: generate from seeded noise, read faces, cache per prompt.

:func:`evaluate` audits a text-to-image pipeline on a list of prompts and returns an
:class:`~diffusers_fair.evaluation.results.EvalResult`; the metrics it reports (``bias(P)``, class
frequencies, no-face share, CLIP-T, CLIP-I, DINO) are described in :mod:`diffusers_fair.evaluation.metrics`.

Noise. Image ``i`` of a prompt starts from a latent drawn from its own ``torch.Generator`` on the
CPU, seeded with a SHA-256 digest of ``(seed, prompt text, i)``. It therefore does not depend on
the process, the device, the batch size, the number of images or the prompt's position in the
file, and the reference model gets exactly the same latents as the audited one.

Resuming. With ``out_dir``, each finished prompt is written to ``out_dir/prompts/`` (a JSON file
and the classifier outputs as safetensors). A later call with the same settings reads finished
prompts back instead of generating them again, so an interrupted audit continues where it stopped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .._utils.io import load_safetensors, read_json
from ..components.families import SDXL, family_of
from .metrics import SOURCES
from .results import EvalResult, ImageReadout, PromptResult


NOISE_SCHEME = "sha256(seed|prompt|index)-cpu-randn-v1"  # changing how noise is drawn changes this name
THUMBNAIL_SIZE = 256  # sample images kept for grids are shrunk to at most this side


# --------------------------------------------------------------------------- noise and generation
def noise_seed(seed: int, prompt: str, image_index: int) -> int:
    """The 63-bit seed of image ``image_index`` of ``prompt``: a SHA-256 digest, stable everywhere."""
    digest = hashlib.sha256(f"{int(seed)}\x1f{prompt}\x1f{int(image_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_noise(seed: int, prompt: str, num_images: int, shape: Sequence[int], *, start: int = 0) -> torch.Tensor:
    """Starting latents ``(num_images, *shape)`` float32 on the CPU for images ``start ...`` of ``prompt``.

    Each image draws from its own CPU generator seeded with :func:`noise_seed`, so image ``i``
    is the same whatever the batch, the number of images, the device or the process.
    """
    return torch.stack([
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(noise_seed(seed, prompt, i)))
        for i in range(start, start + num_images)
    ])


def latent_shape(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
    """``(channels, height / f, width / f)`` of ``pipe``'s latents (default: the U-Net's native size)."""
    factor = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * factor
    width = width or pipe.unet.config.sample_size * factor
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    return (pipe.unet.config.in_channels, height // factor, width // factor)


@torch.no_grad()
def generate(pipe, prompt: str, noise: torch.Tensor, *, guidance_scale: float, num_inference_steps: int,
             batch_size: int, negative_prompt: str | None = None) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` float32 in ``[0, 1]`` on the CPU, one per starting latent in ``noise``.

    Prompts are padded as the pipeline's active fair adaptors were trained: a ``FairFinetunePipeline``
    does it itself; for another pipeline whose adaptors were trained with natural padding, the
    prompt and negative prompt are encoded here (``adaptors.prompt_padding.encode_natural``) and
    passed as embeddings (soft tokens are then not added, as a stock pipeline does not add them).
    An SDXL pipeline gets each prompt started with its loaded soft tokens here.

    Raises:
        ValueError: an SDXL pipeline with an adaptor trained with natural padding.
    """
    from ..adaptors.pipeline import FairFinetunePipeline, add_fair_tokens, fair_adaptors
    from ..adaptors.prompt_padding import encode_natural, prompt_padding_of

    natural = not isinstance(pipe, FairFinetunePipeline)
    natural = natural and prompt_padding_of(fair_adaptors(pipe).values()) == "natural"
    if family_of(pipe) is SDXL:
        if natural:
            raise ValueError("an adaptor trained with natural prompt padding cannot be audited on an SDXL pipeline, "
                             "which pads prompts to the tokenizers' maximum length")
        # SDXL has no FairFinetunePipeline: the prompt starts with the loaded soft tokens here.
        prompt = add_fair_tokens(pipe, prompt)
    factor = pipe.vae_scale_factor
    out = []
    for start in range(0, noise.shape[0], batch_size):
        latents = noise[start : start + batch_size]
        n = latents.shape[0]
        negatives = None if negative_prompt is None else [negative_prompt] * n
        common = dict(latents=latents.to(pipe.device, pipe.unet.dtype), height=latents.shape[-2] * factor,
                      width=latents.shape[-1] * factor, guidance_scale=guidance_scale,
                      num_inference_steps=num_inference_steps, output_type="pt")
        if natural:
            # StableDiffusionPipeline's own test for classifier-free guidance
            guided = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
            embeds, negative_embeds = encode_natural(pipe, [prompt] * n, (negatives or [""] * n) if guided else None)
            result = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, **common)
        else:
            result = pipe([prompt] * n, negative_prompt=negatives, **common)
        out.append(result.images.float().cpu())
    return torch.cat(out)


def _device_of(module) -> torch.device:
    if isinstance(module, torch.nn.Module):
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def read_faces(images: torch.Tensor, components, *, batch_size: int = 32) -> ImageReadout:
    """Detect the largest face of each image and classify it with ``components.classifier``, in batches.

    Faces are read by :func:`diffusers_fair.components.faces.read_faces`: the detector's box grown
    by ``components.crop_factor`` (1 when absent) into a square, cropped and resized to the
    classifier's ``input_size``. The readout is on the CPU; rows of images without a face have
    zero boxes, scores and probabilities.
    """
    from ..components import faces  # torchvision: imported on first use

    crop_factor = float(getattr(components, "crop_factor", 1.0))
    device = _device_of(components.classifier)  # the readout's arithmetic runs where the classifier runs
    readings = [faces.read_faces(images[start : start + batch_size].to(device), components.detector,
                                 components.classifier, crop_factor=crop_factor)
                for start in range(0, images.shape[0], batch_size)]
    found = torch.cat([r.found for r in readings]).cpu()
    probs = {name: torch.cat([torch.where(r.found[:, None], r.logits[name].softmax(dim=1), 0.0) for r in readings])
             for name in components.classifier.attributes}
    return ImageReadout(found=found, boxes=torch.cat([r.boxes for r in readings]).cpu(),
                        scores=torch.cat([r.scores for r in readings]).cpu(),
                        probs={name: p.cpu() for name, p in probs.items()})


@torch.no_grad()
def embed_images(embedder, images: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
    """Embeddings ``(N, D)`` float32 on the CPU of ``images`` by an ``ImageEmbedder``, in batches."""
    device = _device_of(embedder)
    return torch.cat([embedder(images[s : s + batch_size].to(device)).float().cpu() for s in range(0, images.shape[0], batch_size)])


def clip_text_embedder(embedder, tokenizer) -> Callable[[Sequence[str]], torch.Tensor]:
    """A ``text_embedder`` for CLIP-T from an ``OpenCLIPImageEmbedder`` and open_clip's tokenizer.

    It returns ``(P, D)`` text embeddings (``model.encode_text``) in the space of the embedder's
    image embeddings; pair it with the same embedder as ``image_embedders["clip"]``.
    """
    model = embedder.model

    @torch.no_grad()
    def embed_text(prompts: Sequence[str]) -> torch.Tensor:
        tokens = tokenizer(list(prompts)).to(_device_of(model))
        return model.encode_text(tokens).float().cpu()

    return embed_text


def thumbnails(images: torch.Tensor, size: int = THUMBNAIL_SIZE) -> torch.Tensor:
    """``images`` in ``[0, 1]`` as uint8, shrunk (antialiased) so that the longer side is at most ``size``."""
    height, width = images.shape[-2:]
    if max(height, width) > size:
        scale = size / max(height, width)
        images = F.interpolate(images, size=(max(1, round(height * scale)), max(1, round(width * scale))),
                               mode="bilinear", antialias=True, align_corners=False)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


# --------------------------------------------------------------------------- the resumable cache
class PromptCache:
    """Finished prompts in ``folder``: ``<key>.json`` (prompt, settings) + ``<key>.safetensors`` (tensors).

    ``key`` is a digest of the prompt text, so the cache survives reordering the prompt file.
    Files are written under a temporary name and renamed, the JSON last: a prompt interrupted
    half-way is simply absent. A cached prompt written with other settings, or a truncated or
    corrupt cached file, raises ``ValueError`` naming the file.
    """

    # What a cached prompt's ``<key>.json`` record holds.
    RECORD_KEYS = frozenset({"prompt", "settings", "tensors", "similarity"})

    def __init__(self, folder: str | Path, settings: dict):
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings))  # as it reads back from JSON
        self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(prompt: str) -> str:
        return hashlib.sha256(prompt.encode()).hexdigest()[:20]

    def load(self, index: int, prompt: str) -> PromptResult | None:
        path = self.folder / f"{self.key(prompt)}.json"
        if not path.exists():
            return None
        fix = "remove it to compute that prompt again"
        try:
            record = read_json(path, "the cached prompt record")
        except ValueError as error:
            raise ValueError(f"{error}; {fix}") from None
        if not (isinstance(record, dict) and self.RECORD_KEYS <= set(record)):
            raise ValueError(f"the cached prompt record {path} is not one: {fix}")
        if record["prompt"] != prompt:
            raise ValueError(f"{path} holds another prompt ({record['prompt']!r}); remove it")
        if record["settings"] != self.settings:
            changed = sorted(k for k in set(record["settings"]) | set(self.settings)
                             if record["settings"].get(k) != self.settings.get(k))
            raise ValueError(f"{self.folder} holds results computed with other settings ({', '.join(changed)}); "
                             "use another output folder, or remove it to start over")
        tensors = self.folder / Path(record["tensors"]).name  # the record names a file of this folder only
        try:
            t = load_safetensors(tensors, f"the cached prompt {tensors}")
        except (ValueError, OSError) as error:
            raise ValueError(f"{' '.join(str(error).split())}; {fix}") from None
        attributes = list(self.settings["attributes"])

        def readout(source: str) -> ImageReadout | None:
            if f"{source}/found" not in t:
                return None
            return ImageReadout(found=t[f"{source}/found"].bool(), boxes=t[f"{source}/boxes"], scores=t[f"{source}/scores"],
                                probs={a: t[f"{source}/probs/{i}"] for i, a in enumerate(attributes)},
                                clip_t=t.get(f"{source}/clip_t"))

        return PromptResult(index=index, prompt=prompt, model=readout("model"), reference=readout("reference"),
                            similarity={name: t[f"similarity/{name}"] for name in record["similarity"]},
                            samples=t.get("samples/model"), reference_samples=t.get("samples/reference"))

    def save(self, result: PromptResult) -> None:
        from safetensors.torch import save_file

        key = self.key(result.prompt)
        tensors = {}
        for source in SOURCES:
            readout = getattr(result, source)
            if readout is None:
                continue
            tensors.update({f"{source}/found": readout.found.to(torch.uint8), f"{source}/boxes": readout.boxes,
                            f"{source}/scores": readout.scores})
            tensors.update({f"{source}/probs/{i}": readout.probs[a] for i, a in enumerate(self.settings["attributes"])})
            if readout.clip_t is not None:
                tensors[f"{source}/clip_t"] = readout.clip_t
        tensors.update({f"similarity/{name}": s for name, s in result.similarity.items()})
        for name, samples in (("samples/model", result.samples), ("samples/reference", result.reference_samples)):
            if samples is not None:
                tensors[name] = samples
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        record = {"prompt": result.prompt, "settings": self.settings, "tensors": f"{key}.safetensors",
                  "similarity": sorted(result.similarity)}
        save_file(tensors, str(self.folder / f"{key}.safetensors.tmp"), metadata={"prompt": result.prompt})
        os.replace(self.folder / f"{key}.safetensors.tmp", self.folder / f"{key}.safetensors")
        (self.folder / f"{key}.json.tmp").write_text(json.dumps(record, indent=1) + "\n")
        os.replace(self.folder / f"{key}.json.tmp", self.folder / f"{key}.json")


# --------------------------------------------------------------------------- the audit
def describe_pipeline(pipe) -> dict:
    """What identifies a pipeline in the settings: its class, source and loaded fair adaptors."""
    from ..adaptors.pipeline import fair_adaptors

    adaptors = [{"source": a.source, "weight": a.weight} for a in fair_adaptors(pipe).values()]
    return {"class": type(pipe).__name__, "name_or_path": str(getattr(pipe, "name_or_path", "") or ""), "adaptors": adaptors}


def _check_inputs(prompts, components, images_per_prompt, batch_size, num_samples, joints, text_embedder,
                  image_embedders, reference_pipe, reference_images) -> list[tuple[str, ...]]:
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    duplicates = sorted({p for p in prompts if prompts.count(p) > 1})
    if duplicates:
        raise ValueError(f"duplicate prompts: {duplicates[:3]}")
    if images_per_prompt < 1 or batch_size < 1 or num_samples < 0:
        raise ValueError("images_per_prompt and batch_size must be positive and num_samples non-negative")
    for name in ("classifier", "detector"):
        if getattr(components, name, None) is None:
            raise ValueError(f"components lacks {name!r} (see diffusers_fair.components.base)")
    attributes = getattr(components.classifier, "attributes", None)
    if not isinstance(attributes, dict) or not attributes:
        raise ValueError("components.classifier must have .attributes (name -> class names)")
    if joints is None:
        joints = list(itertools.combinations(attributes, 2))
    joints = [tuple(j) for j in joints]
    for joint in joints:
        if len(joint) < 2 or len(set(joint)) != len(joint) or any(a not in attributes for a in joint):
            raise ValueError(f"joint {joint} must name two or more distinct attributes of {sorted(attributes)}")
    if text_embedder is not None and "clip" not in image_embedders:
        raise ValueError('CLIP-T needs image_embedders["clip"], the image side of the text_embedder\'s CLIP model')
    if reference_pipe is not None and reference_images is not None:
        raise ValueError("give reference_pipe or reference_images, not both")
    if reference_images is not None:
        for p in prompts:
            images = reference_images.get(p)
            if images is None or images.ndim != 4 or images.shape[0] != images_per_prompt:
                raise ValueError(f"reference_images must hold ({images_per_prompt}, 3, H, W) images for every prompt; bad: {p!r}")
    return joints


def _read_images(images, components, image_embedders, text, batch_size) -> tuple[ImageReadout, dict[str, torch.Tensor]]:
    """Faces and attributes, embeddings per image embedder, and CLIP-T (with a ``(1, D)`` prompt embedding)."""
    readout = read_faces(images, components, batch_size=batch_size)
    embeddings = {name: embed_images(e, images, batch_size=batch_size) for name, e in image_embedders.items()}
    if text is not None:
        readout.clip_t = F.cosine_similarity(embeddings["clip"], text.expand_as(embeddings["clip"]), dim=1)
    return readout, embeddings


def evaluate(pipe, prompts: Sequence[str], components, *, images_per_prompt: int, seed: int = 0, batch_size: int = 8,
             guidance_scale: float = 7.5, num_inference_steps: int = 25, height: int | None = None, width: int | None = None,
             negative_prompt: str | None = None, reference_pipe=None, reference_images: Mapping[str, torch.Tensor] | None = None,
             text_embedder: Callable[[Sequence[str]], torch.Tensor] | None = None,
             image_embedders: Mapping[str, torch.nn.Module] | None = None, joints: Sequence[Sequence[str]] | None = None,
             num_samples: int = 4, out_dir: str | Path | None = None, progress: bool = True) -> EvalResult:
    """Audit ``pipe`` on ``prompts``: attribute frequencies, bias(P), no-face share, CLIP-T, CLIP-I, DINO.

    Args:
        pipe: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (any subclass; with fair
            adaptors loaded or not).
        prompts: the prompts, distinct.
        components: ``classifier`` (evaluation ``AttributeClassifier``), ``detector`` (``FaceDetector``)
            and optionally ``crop_factor``: an :class:`~diffusers_fair.components.base.EvalComponents` or the toy world's components.
        images_per_prompt: images generated per prompt (the paper: 60 for gender, 80 for race, 160
            for gender x race).
        seed: the noise seed (see the module doc: per prompt text and image index).
        batch_size: images per pipeline call and per classifier / embedder batch.
        guidance_scale, num_inference_steps, height, width, negative_prompt: passed to the pipeline.
        reference_pipe: the model to compare with (the base model), run on the same noise; its
            images give CLIP-I / DINO and its own frequencies ("before"). Or ``reference_images``:
            prompt -> ``(images_per_prompt, 3, H, W)`` images in ``[0, 1]``.
        text_embedder: ``prompts -> (P, D)`` CLIP text embeddings, for CLIP-T (with
            ``image_embedders["clip"]`` embedding the images; :func:`clip_text_embedder`).
        image_embedders: name -> ``ImageEmbedder``; with a reference each gives a similarity
            (``"clip"`` -> CLIP-I, ``"dino"`` -> DINO).
        joints: joint attributes to count, e.g. ``[("gender", "race")]``; default: every pair.
        num_samples: first images per prompt kept (as small uint8 thumbnails) for image grids.
        out_dir: cache finished prompts in ``out_dir/prompts`` and reuse them (resume).
        progress: show a progress bar over prompts.

    Returns:
        An :class:`~diffusers_fair.evaluation.results.EvalResult`.
    """
    from tqdm.auto import tqdm

    if isinstance(prompts, str):
        raise ValueError("prompts must be a non-empty list of non-empty strings, not one string")
    prompts = list(prompts)
    image_embedders = dict(image_embedders or {})
    joints = _check_inputs(prompts, components, images_per_prompt, batch_size, num_samples, joints, text_embedder,
                           image_embedders, reference_pipe, reference_images)
    attributes = {name: list(classes) for name, classes in components.classifier.attributes.items()}
    shape = latent_shape(pipe, height, width)
    settings = {
        "seed": int(seed), "images_per_prompt": int(images_per_prompt), "guidance_scale": float(guidance_scale),
        "num_inference_steps": int(num_inference_steps), "height": shape[1] * pipe.vae_scale_factor,
        "width": shape[2] * pipe.vae_scale_factor, "negative_prompt": negative_prompt, "noise": NOISE_SCHEME,
        "model": describe_pipeline(pipe),
        "reference": describe_pipeline(reference_pipe) if reference_pipe is not None else ("images" if reference_images is not None else None),
        "attributes": attributes, "joints": [list(j) for j in joints],
        "crop_factor": float(getattr(components, "crop_factor", 1.0)), "text_embedder": text_embedder is not None,
        "image_embedders": sorted(image_embedders), "num_samples": int(num_samples),
    }
    cache = PromptCache(Path(out_dir) / "prompts", settings) if out_dir is not None else None
    gen_kwargs = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, batch_size=batch_size,
                      negative_prompt=negative_prompt)
    pipes = [p for p in (pipe, reference_pipe) if p is not None]
    saved_bars = [dict(getattr(p, "_progress_bar_config", {})) for p in pipes]
    results, reused = [], 0
    bar = tqdm(prompts, desc="eval", unit="prompt", disable=not progress)
    try:
        for p in pipes:
            p.set_progress_bar_config(disable=True)
        for index, prompt in enumerate(bar):
            cached = cache.load(index, prompt) if cache is not None else None
            if cached is not None:
                results.append(cached)
                reused += 1
                bar.set_postfix(cached=reused)
                continue
            noise = initial_noise(seed, prompt, images_per_prompt, shape)
            text = text_embedder([prompt]).float().cpu() if text_embedder is not None else None
            images = generate(pipe, prompt, noise, **gen_kwargs)
            model, embeddings = _read_images(images, components, image_embedders, text, batch_size)
            result = PromptResult(index=index, prompt=prompt, model=model,
                                  samples=thumbnails(images[:num_samples]) if num_samples else None)
            if reference_pipe is not None or reference_images is not None:
                ref_images = (generate(reference_pipe, prompt, noise, **gen_kwargs) if reference_pipe is not None
                              else reference_images[prompt].float().cpu())
                result.reference, ref_embeddings = _read_images(ref_images, components, image_embedders, text, batch_size)
                result.similarity = {name: F.cosine_similarity(embeddings[name], ref_embeddings[name], dim=1) for name in embeddings}
                result.reference_samples = thumbnails(ref_images[:num_samples]) if num_samples else None
            if cache is not None:
                cache.save(result)
            results.append(result)
    finally:
        bar.close()
        for p, config in zip(pipes, saved_bars):
            p.set_progress_bar_config(**config)
    return EvalResult(prompts=results, attributes=attributes, joints=joints, settings=settings)
