"""``diffusers-fair train``: train a fair adaptor as an experiment config says."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ._outputs import check_output_folder, earlier_results, replaced_on_success


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
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output folder that holds an earlier run: the earlier run is moved aside "
                             "and deleted when the new run has finished (put back if it fails or is interrupted)")


# What a run leaves in its output folder; a fresh run does not start in a folder holding them.
RUN_NAMES = ("training_log.jsonl", "checkpoints", "adaptor")


def run(args: argparse.Namespace) -> int:
    from ..training.experiment import describe, read_experiment, train_experiment

    if args.overwrite and args.resume is not None:
        raise ValueError("--overwrite starts over and --resume continues: give one of them")
    experiment = read_experiment(args.config, args.overrides, output_dir=args.out, resume_from=args.resume)
    if experiment.toy_world:
        from ..toy.experiment import check_toy_experiment, train_toy_experiment

        check_toy_experiment(experiment)
    out = Path(experiment.config.output_dir)
    check_output_folder(out, "the output folder")
    earlier = earlier_results(out, RUN_NAMES)
    fresh = experiment.config.resume_from is None
    if earlier and fresh and not args.overwrite:
        raise ValueError(f"the output folder {out} holds an earlier run ({', '.join(earlier)}): continue it with "
                         "--resume latest, start over with --overwrite, or choose another --out")
    if args.overwrite and earlier and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"--overwrite works in a single process; remove {out} before a multi-process run")
    if args.dry_run:
        print(json.dumps(experiment.to_dict(), indent=2))
        print(describe(experiment), file=sys.stderr)
        return 0

    def train():
        if experiment.toy_world:
            train_toy_experiment(experiment)
        else:
            train_experiment(experiment)

    if args.overwrite and earlier:
        with replaced_on_success(out):
            train()
    else:
        train()
    return 0
