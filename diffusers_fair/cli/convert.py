"""``diffusers-fair convert``: the original release's .pth weights into a fair adaptor folder."""

from __future__ import annotations

import argparse

from ..adaptors.metadata import DEFAULT_SOFT_TOKEN, SD15
from ._outputs import positive_int


NAME = "convert"
HELP = "convert the original release's .pth weights into a fair adaptor folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="folder with text_encoder_lora[_EMA].pth / unet_lora[_EMA].pth / prefix_embedding[_EMA].pth, or one file")
    parser.add_argument("dst", help="adaptor folder to write")
    parser.add_argument("--base-model", default=SD15, help=f"base model the weights were trained on (default: {SD15})")
    parser.add_argument("--name", default=None, help="adaptor name (default: the folder name)")
    parser.add_argument("--target", action="append", default=[], help='target distribution, e.g. "gender: male, female" (repeatable)')
    parser.add_argument("--description", default="", help="one paragraph for the model card")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="use the last iterate instead of the EMA weights")
    parser.add_argument("--soft-token", default=DEFAULT_SOFT_TOKEN, help=f"token name for soft tokens (default: {DEFAULT_SOFT_TOKEN})")
    parser.add_argument("--text-hidden-size", type=positive_int, default=None, help="text encoder hidden size, where the files cannot tell it")
    parser.add_argument("--cross-attention-dim", type=positive_int, default=None, help="U-Net cross-attention size, where the files cannot tell it")
    parser.add_argument("--license", default=None,
                        help="Hub license id of the weights (default: the base model's, creativeml-openrail-m "
                             "for SD 1.5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an adaptor already in DST")


def run(args: argparse.Namespace) -> int:
    from ..adaptors.convert import convert_official

    metadata = convert_official(
        args.src,
        args.dst,
        base_model=args.base_model,
        name=args.name,
        targets=args.target,
        description=args.description,
        ema=args.ema,
        soft_token=args.soft_token,
        text_hidden_size=args.text_hidden_size,
        cross_attention_dim=args.cross_attention_dim,
        license=args.license,
        overwrite=args.overwrite,
    )
    parts = [f"{component} LoRA rank {info['rank']} on {info['num_layers']} layers" for component, info in metadata.lora.items()]
    if metadata.soft_token:
        parts.append(f"{len(metadata.token_names)} soft tokens {metadata.soft_token}")
    print(f"wrote {args.dst}: {metadata.kind} adaptor for {metadata.base_model} ({'; '.join(parts)}), "
          f"license {metadata.license or 'none stated'}")
    # A bare folder name would be looked up in the adaptor index first.
    where = args.dst if any(sep in args.dst for sep in "/\\") else f"./{args.dst}"
    print(f'load it with: pipe.load_fair_adaptor("{where}")')
    return 0
