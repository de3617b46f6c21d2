"""``diffusers-fair pull``: fetch a fair adaptor from the Hub (or the index) and verify it."""

from __future__ import annotations

import argparse


NAME = "pull"
HELP = "fetch a fair adaptor (an index name or a Hub repo id) and verify it, optionally into a folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name_or_repo", help='an index name ("toy-gender-race") or a Hub repo id, owner/name')
    parser.add_argument("--to", dest="folder", default=None, help="copy the adaptor's files into this folder")
    parser.add_argument("--revision", default=None,
                        help="branch, tag or commit sha (default: the index's pinned commit, or main)")
    parser.add_argument("--token", default=None,
                        help="Hub token for private repos (default: HF_TOKEN or the stored login)")
    parser.add_argument("--overwrite", action="store_true", help="replace an adaptor already in the --to folder")


def run(args: argparse.Namespace) -> int:
    from ..adaptors.hub import pull_adaptor

    adaptor = pull_adaptor(
        args.name_or_repo, args.folder, revision=args.revision, token=args.token, overwrite=args.overwrite
    )
    meta = adaptor.metadata
    print(f"{meta.kind} adaptor {meta.name!r} for {meta.base_model}: verified, in {adaptor.folder}")
    where = args.name_or_repo
    if args.folder is not None:  # a bare folder name would be looked up in the adaptor index first
        where = args.folder if any(sep in args.folder for sep in "/\\") else f"./{args.folder}"
    print(f'load it with: pipe.load_fair_adaptor("{where}")')
    return 0
