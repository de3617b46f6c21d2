"""``diffusers-fair push``: upload a fair adaptor folder to the Hugging Face Hub."""

from __future__ import annotations

import argparse


NAME = "push"
HELP = "upload a fair adaptor folder to the Hugging Face Hub"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="the adaptor folder (written by training or `diffusers-fair convert`)")
    parser.add_argument("repo_id", help="Hub repo id, owner/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    parser.add_argument("--message", default=None, help="commit message")
    parser.add_argument("--license", default=None,
                        help="Hub license id for the uploaded card and metadata (default: the adaptor's, else "
                             "its base model's)")


def run(args: argparse.Namespace) -> int:
    from ..adaptors.hub import push_adaptor

    commit = push_adaptor(
        args.folder, args.repo_id, private=args.private, revision=args.revision, token=args.token,
        commit_message=args.message, license=args.license,
    )
    print(f"pushed {args.folder} to {args.repo_id} at commit {commit}")
    print(f'load it with: pipe.load_fair_adaptor("{args.repo_id}", revision="{commit}")')
    return 0
