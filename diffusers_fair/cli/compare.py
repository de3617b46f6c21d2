"""``diffusers-fair compare``: the fair adaptor side by side with the published alternatives (toy world)."""

from __future__ import annotations

import argparse


NAME = "compare"
HELP = "audit the base model, the fair adaptor and the published debiasing alternatives on the same prompts"
METHODS = ("ours", "prompt", "ethical", "fair-diffusion", "uce", "debias-vl")  # diffusers_fair.toy.compare.METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder: comparison.json, comparison.md, comparison.png")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="the methods besides the base model (default: all)")
    parser.add_argument("--train", action="store_true",
                        help="train our adaptor afresh with the demo's settings instead of loading the shipped one")
    parser.add_argument("--adaptor", default="toy-gender-race", help="the shipped adaptor that is 'ours'")
    parser.add_argument("--seed", type=int, default=0, help="audit noise seed (and training seed with --train)")
    parser.add_argument("--images-per-word", type=int, default=32, help="images per held-out word (default: 32)")
    parser.add_argument("--words", type=int, default=20, help="how many of the 20 held-out words to audit")
    parser.add_argument("--uce-concepts", choices=["held-out", "train"], default="held-out",
                        help="the words UCE edits (default: the audited held-out words)")
    parser.add_argument("--uce-iterations", type=int, default=10,
                        help="UCE's re-balancing iterations at most (the authors' 30; default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")


def run(args: argparse.Namespace) -> int:
    from ..toy.compare import CompareSettings, run_comparison

    settings = CompareSettings(seed=args.seed, images_per_word=args.images_per_word, num_words=args.words,
                               adaptor=args.adaptor, train=args.train, uce_concepts=args.uce_concepts,
                               uce_iterations=args.uce_iterations, threads=args.threads)
    run_comparison(args.out, args.methods, settings)
    return 0
