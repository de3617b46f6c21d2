"""``diffusers-fair eval``: audit a pipeline and write the report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._outputs import (
    check_output_folder,
    earlier_results,
    guidance_scale,
    non_negative_int,
    positive_int,
    staged_folder,
)


NAME = "eval"
HELP = "audit a pipeline's attribute distributions (bias, no-face share, CLIP-T, CLIP-I, DINO) and write a report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help='a Stable Diffusion Hub id or folder, or "toy" (the shipped toy model)')
    parser.add_argument("--adaptor", action="append", default=[], metavar="NAME_OR_DIR",
                        help="a fair adaptor to audit (index name, Hub id or folder); repeat to combine. The model "
                             "without adaptors is then the reference (CLIP-I, DINO, 'before' numbers)")
    parser.add_argument("--prompts", required=True, type=Path, help="text file, one prompt per line (# comments)")
    parser.add_argument("--images-per-prompt", required=True, type=positive_int)
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder; rerun with the same folder to resume an interrupted audit")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier audit in --out: the new audit is written to a "
                             "temporary folder beside it and swapped in when complete")
    parser.add_argument("--toy", action="store_true", help="use the toy world's components (default for --model toy)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: 15 toy, 25 otherwise)")
    parser.add_argument("--guidance-scale", type=guidance_scale, default=None,
                        help="a finite number >= 1 (default: 4 toy, 7.5 otherwise)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--no-reference", action="store_true", help="with --adaptor: skip the base model's images")
    parser.add_argument("--joint", action="append", default=None, metavar="A,B",
                        help="joint attribute to count, e.g. gender,race (repeatable; default: every pair)")
    parser.add_argument("--samples", type=non_negative_int, default=4, help="images per prompt shown in the grids")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="pipeline weights (default: float16 on cuda, float32 on cpu)")
    parser.add_argument("--classifier", default=None,
                        help='Stable Diffusion: evaluation classifier, a MobileNetAttributeClassifier .safetensors file or "clip" (zero-shot)')
    parser.add_argument("--clip", default="ViT-H-14/laion2b_s32b_b79k",
                        help='Stable Diffusion: open_clip MODEL/PRETRAINED for CLIP-T and CLIP-I, or "none"')
    parser.add_argument("--dino", default="facebook/dinov2-base", help='Stable Diffusion: DINOv2 model for DINO, or "none"')
    parser.add_argument("--no-progress", action="store_true")


# The files of a finished audit; a folder holding them is not written over without --overwrite.
REPORT_FILES = ("results.json", "report.md")


def check_cache(folder: Path) -> None:
    """Every prompt cached in ``folder`` (``<out>/prompts``) is readable, so the audit cannot stop on it half-way.

    Raises:
        ValueError: naming a cached file that is truncated or corrupt, and the fix.
    """
    from .._utils.io import load_safetensors, read_json
    from ..evaluation.audit import PromptCache

    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".json":
                record = read_json(path, "record")
                if not isinstance(record, dict) or not PromptCache.RECORD_KEYS <= set(record):
                    raise ValueError("not a cached prompt record")
            elif path.suffix == ".safetensors":
                load_safetensors(path, "tensors")
        except Exception as error:  # JSON, OS and safetensors errors alike mean an unusable cache entry
            raise ValueError(f"the cached prompt {path} is truncated or corrupt ({' '.join(str(error).split())}); "
                             "remove it to compute that prompt again") from None


def _is_toy(model: str) -> bool:
    from .. import toy

    return model == "toy" or (Path(model).is_dir() and Path(model).resolve() == toy.MODEL_DIR.resolve())


def _toy_components(device):
    from ..toy.components import load_toy_components

    components = load_toy_components(device)
    scene, features = components.image_embedders
    # The toy world's stand-ins: the scene embedder for CLIP, the random-feature embedder for DINO.
    return components, None, {"clip": scene, "dino": features}


def _real_components(args, device):
    from ..components.base import EvalComponents
    from ..components.mediapipe_detector import MediaPipeFaceDetector
    from ..evaluation.audit import clip_text_embedder

    if args.classifier is None:
        raise ValueError('--classifier is needed outside the toy world (a MobileNetAttributeClassifier file or "clip")')
    embedders, text_embedder, clip, tokenizer = {}, None, None, None
    if args.clip != "none":
        import open_clip

        from ..components.clip import OpenCLIPImageEmbedder

        name, _, pretrained = args.clip.partition("/")
        clip = OpenCLIPImageEmbedder.from_pretrained(name, pretrained or None, device=device)
        tokenizer = open_clip.get_tokenizer(name)
        embedders["clip"], text_embedder = clip, clip_text_embedder(clip, tokenizer)
    if args.dino != "none":
        from ..components.dinov2 import DINOv2ImageEmbedder

        embedders["dino"] = DINOv2ImageEmbedder.from_pretrained(args.dino, device=device)
    if args.classifier == "clip":
        if clip is None:
            raise ValueError('--classifier clip needs --clip')
        from ..components.clip import DEFAULT_PROMPTS, CLIPZeroShotClassifier

        classifier = CLIPZeroShotClassifier(clip, tokenizer, DEFAULT_PROMPTS)
    else:
        from ..components.classifiers import MobileNetAttributeClassifier

        classifier = MobileNetAttributeClassifier.from_safetensors(args.classifier, device=device)
    return EvalComponents(classifier=classifier, detector=MediaPipeFaceDetector()), text_embedder, embedders


def run(args: argparse.Namespace) -> int:
    """``diffusers-fair eval``: load the pipelines and components, audit, write the report."""
    import torch

    from .. import toy
    from .._utils.io import read_prompts
    from ..adaptors.pipeline import FairFinetunePipeline, load_fair_adaptor
    from ..components.families import SD1, family_of, load_pipeline
    from ..evaluation.audit import evaluate
    from ..evaluation.report import write_report

    prompts = read_prompts(args.prompts)
    check_output_folder(args.out, "--out")
    earlier = earlier_results(args.out, REPORT_FILES)
    if earlier and not args.overwrite:
        raise ValueError(f"--out {args.out} holds the results of an earlier audit ({', '.join(earlier)}): pass "
                         "--overwrite to replace them, or choose another folder")
    if not args.overwrite:
        check_cache(args.out / "prompts")
    is_toy = args.toy or _is_toy(args.model)
    model = toy.model_path() if args.model == "toy" else args.model
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    joints = [tuple(j.split(",")) for j in args.joint] if args.joint else None
    components, text_embedder, image_embedders = _toy_components(device) if is_toy else _real_components(args, device)
    base = load_pipeline(model, dtype=dtype).to(device)  # SD 1.x or SDXL, from the model's model_index.json
    pipe, reference = base, None
    if args.adaptor:
        # SD 1.x: FairFinetunePipeline adds the soft tokens and pads as trained; on SDXL the audit adds them.
        adapted = FairFinetunePipeline if family_of(base) is SD1 else type(base)
        pipe = adapted.from_pretrained(model, dtype=dtype).to(device)
        for adaptor in args.adaptor:
            load_fair_adaptor(pipe, adaptor)
        reference = None if args.no_reference else base

    def audit(out: Path):
        result = evaluate(pipe, prompts, components, images_per_prompt=args.images_per_prompt, seed=args.seed,
                          batch_size=args.batch_size, guidance_scale=(4.0 if is_toy else 7.5) if args.guidance_scale is None else args.guidance_scale,
                          num_inference_steps=(15 if is_toy else 25) if args.steps is None else args.steps, negative_prompt=args.negative_prompt,
                          reference_pipe=reference, text_embedder=text_embedder, image_embedders=image_embedders,
                          joints=joints, num_samples=args.samples, out_dir=out, progress=not args.no_progress)
        write_report(result, out)
        return result

    if args.overwrite:  # a fresh audit beside the old one, swapped in when complete
        with staged_folder(args.out) as staging:
            result = audit(staging)
    else:  # in place: an interrupted audit resumes from the prompts it cached
        result = audit(args.out)
    metrics = result.metrics("model")
    print(" ".join(f"{k}={v:.3f}" for k, v in metrics.items() if not k.startswith("freq_")))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'report.md'}")
    return 0
