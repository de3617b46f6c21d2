"""Time a toy-world audit: ``evaluate`` over a prompt file, the report, and a resumed rerun.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval.py                       # 50 prompts x 8 images
    OMP_NUM_THREADS=1 python benchmarks/bench_eval.py --reference           # before/after: two models per image
    OMP_NUM_THREADS=1 python benchmarks/bench_eval.py --prompts examples/prompts/toy_heldout.txt --images-per-prompt 16

Prints one table: loading, the audit itself (seconds, per prompt, per generated image), writing
the report (JSON, markdown, charts, grids), and the same audit run again on its own output folder
(every prompt read back from the cache: the cost of resuming).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, default=REPO / "examples" / "prompts" / "toy_audit50.txt")
    parser.add_argument("--limit", type=int, default=None, help="only the first LIMIT prompts (a quick check)")
    parser.add_argument("--images-per-prompt", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reference", action="store_true",
                        help="also generate every image with a reference model (a second copy of the toy model), "
                             "as an audit of an adapted model against its base does")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    start = time.perf_counter()
    from diffusers import StableDiffusionPipeline

    from diffusers_fair import toy
    from diffusers_fair._utils.io import read_prompts
    from diffusers_fair.evaluation.audit import evaluate
    from diffusers_fair.evaluation.report import write_report
    from diffusers_fair.toy.components import load_toy_components

    pipe = StableDiffusionPipeline.from_pretrained(toy.model_path())
    reference = StableDiffusionPipeline.from_pretrained(toy.model_path()) if args.reference else None
    components = load_toy_components()
    scene, features = components.image_embedders
    prompts = read_prompts(args.prompts)[: args.limit]
    rows.append(("import and load", time.perf_counter() - start, ""))

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        kwargs = dict(images_per_prompt=args.images_per_prompt, seed=0, batch_size=args.batch_size, guidance_scale=args.guidance_scale,
                      num_inference_steps=args.steps, reference_pipe=reference, image_embedders={"clip": scene, "dino": features},
                      out_dir=out)
        start = time.perf_counter()
        result = evaluate(pipe, prompts, components, **kwargs)
        seconds = time.perf_counter() - start
        images = len(prompts) * args.images_per_prompt * (2 if args.reference else 1)
        rows.append((f"audit: {len(prompts)} prompts x {args.images_per_prompt} images" + (" x 2 models" if args.reference else ""),
                     seconds, f"{seconds / len(prompts):.2f} s/prompt, {1000 * seconds / images:.0f} ms/image"))
        start = time.perf_counter()
        write_report(result, out)
        rows.append(("report (json, markdown, charts, grids)", time.perf_counter() - start, ""))
        start = time.perf_counter()
        evaluate(pipe, prompts, components, **kwargs, progress=False)
        rows.append(("rerun, every prompt cached", time.perf_counter() - start, ""))

    print(f"toy audit: {args.steps} steps, guidance {args.guidance_scale:g}, batch {args.batch_size}, {torch.get_num_threads()} thread(s)")
    print(f"| {'step':<52} | {'seconds':>8} | {'':<34} |")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 36}|")
    for name, value, note in rows:
        print(f"| {name:<52} | {value:8.1f} | {note:<34} |")
    summary = result.summary()
    print("bias per attribute (mean over prompts):",
          ", ".join(f"{name} {g['bias_mean']:.3f}" for name, g in summary["groups"].items() if g["bias_mean"] is not None))


if __name__ == "__main__":
    main()
