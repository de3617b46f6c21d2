"""``diffusers-fair compare``: the fair adaptor side by side with the published alternatives.

Without ``--config`` on the toy world (:mod:`diffusers_fair.toy.compare`); with an experiment config
of ``diffusers-fair train`` on Stable Diffusion 1.x (:mod:`diffusers_fair.cli._compare_sd`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation.comparison import METHODS
from ._outputs import check_output_folder, earlier_results, non_negative_int, positive_int, staged_folder


NAME = "compare"
HELP = "audit the base model, the fair adaptor and the published debiasing alternatives on the same prompts"

# What a comparison writes (after every method, so a stopped one leaves them too; with --config a stopped one
# is resumed by running it again with the same arguments).
RESULT_NAMES = ("comparison.json", "comparison.md", "comparison.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        f"{HELP}. Without --config: the toy world (targets hair length and skin tone uniform, the 20 held-out "
        "words). With --config CONFIG (an experiment config of diffusers-fair train, e.g. "
        "examples/configs/gender.yaml): Stable Diffusion 1.x, on a GPU with downloaded weights; the base model is "
        "training.base_model, 'ours' the adaptor trained from the config (<training.output_dir>/adaptor, or "
        "--adaptor), the targets are the config's, the held-out prompts and images per prompt its evaluation "
        "section, audited with components.eval_classifier. Train first: diffusers-fair train CONFIG.")
    parser.add_argument("--config", type=Path, default=None, metavar="CONFIG",
                        help="Stable Diffusion: an experiment config of diffusers-fair train (YAML or JSON)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="with --config: change a config value (repeatable), as diffusers-fair train --set")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: comparison.json, comparison.md, comparison.png (with --config also the "
                             "base images and the audits, so that a stopped comparison run again with the same "
                             "arguments resumes where it stopped)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier comparison in --out: the new one is written to a "
                             "temporary folder beside it and swapped in when complete")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="the methods besides the base model (default: all)")
    parser.add_argument("--train", action="store_true",
                        help="toy world: train our adaptor afresh with the demo's settings instead of loading the "
                             "shipped one")
    parser.add_argument("--adaptor", default=None, metavar="PATH_OR_NAME",
                        help="the adaptor that is 'ours', a folder or index name (default: toy-gender-race on the toy "
                             "world, <training.output_dir>/adaptor with --config)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="audit noise seed (and training seed with --train)")
    parser.add_argument("--images-per-word", type=positive_int, default=32,
                        help="toy world: images per held-out word (default: 32; with --config the config's "
                             "evaluation.images_per_prompt)")
    parser.add_argument("--words", type=positive_int, default=20, help="toy world: how many of the 20 held-out words to audit")
    parser.add_argument("--uce-concepts", choices=["held-out", "train"], default="held-out",
                        help="the words UCE edits (default: the audited held-out words)")
    parser.add_argument("--uce-iterations", type=non_negative_int, default=10,
                        help="UCE's re-balancing iterations at most (the authors' 30; default 10)")
    parser.add_argument("--threads", type=positive_int, default=1, help="toy world: torch threads")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="with --config: images per pipeline call (default: all of a prompt's images in one call, "
                             "which keeps the per-image draws exactly at the target ratio)")


def run(args: argparse.Namespace) -> int:
    if args.config is None and (args.overrides or args.batch_size is not None):
        raise ValueError("--set and --batch-size go with --config CONFIG (Stable Diffusion)")
    if args.config is not None and args.train:
        raise ValueError("--train runs on the toy world only: on Stable Diffusion train with diffusers-fair train "
                         f"{args.config} first, or pass --adaptor")
    check_output_folder(args.out, "--out")
    earlier = earlier_results(args.out, RESULT_NAMES)
    if earlier and not args.overwrite and not _resumable(args):
        raise ValueError(f"--out {args.out} holds the results of an earlier comparison ({', '.join(earlier)}): pass "
                         "--overwrite to replace them, or choose another folder")
    compare = _run_toy if args.config is None else _run_sd
    if args.overwrite:
        with staged_folder(args.out) as staging:
            compare(args, staging)
    else:
        compare(args, args.out)
    return 0


def _resumable(args: argparse.Namespace) -> bool:
    """Whether --out holds a Stable Diffusion comparison that stopped before its end: it is resumed in place."""
    if args.config is None:
        return False  # the toy comparison is short: it starts over
    from ._compare_sd import interrupted_comparison

    return interrupted_comparison(args.out)


def _run_toy(args: argparse.Namespace, out: Path) -> None:
    from ..toy.compare import CompareSettings, run_comparison

    settings = CompareSettings(seed=args.seed, images_per_word=args.images_per_word, num_words=args.words,
                               adaptor=args.adaptor or "toy-gender-race", train=args.train, uce_concepts=args.uce_concepts,
                               uce_iterations=args.uce_iterations, threads=args.threads)
    run_comparison(out, args.methods, settings)


def _run_sd(args: argparse.Namespace, out: Path) -> None:
    from ._compare_sd import SDCompareSettings, run_sd_comparison

    settings = SDCompareSettings(seed=args.seed, adaptor=args.adaptor, uce_concepts=args.uce_concepts,
                                 uce_iterations=args.uce_iterations, batch_size=args.batch_size)
    run_sd_comparison(args.config, out, args.methods, args.overrides, settings)
