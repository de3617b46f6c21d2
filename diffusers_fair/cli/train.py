"""``diffusers-fair train``: train a fair adaptor as an experiment config says."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


NAME = "train"
HELP = "train a fair adaptor from an experiment config (YAML or JSON; see docs/TRAINING.md)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path,
                        help="experiment config, .yaml or .json, e.g. examples/configs/gender.yaml")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (replaces training.output_dir); the adaptor is saved to DIR/adaptor")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="change a config value (repeatable), e.g. --set training.learning_rate=1e-4. KEY is a "
                             "dotted path; VALUE is read as YAML, as if written in the config file: 1e-4 and 200 are "
                             "numbers, true/false booleans, null nothing, [a, b] a list, {race: 0.6} a mapping, "
                             "anything else text")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config and print the resolved configuration as JSON (the plan on stderr); "
                             "load no model")
    parser.add_argument("--resume", default=None, metavar="latest|CHECKPOINT",
                        help="continue a run: 'latest' (the newest checkpoint in the output folder) or a checkpoint "
                             "folder (sets training.resume_from)")


def run(args: argparse.Namespace) -> int:
    from ..training.experiment import describe, read_experiment, train_experiment

    experiment = read_experiment(args.config, args.overrides, output_dir=args.out, resume_from=args.resume)
    if experiment.toy_world:
        from ..toy.experiment import check_toy_experiment, train_toy_experiment

        check_toy_experiment(experiment)
    if args.dry_run:
        print(json.dumps(experiment.to_dict(), indent=2))
        print(describe(experiment), file=sys.stderr)
        return 0
    if experiment.toy_world:
        train_toy_experiment(experiment)
    else:
        train_experiment(experiment)
    return 0
