"""Convert the original release's ``.pth`` files into a fair adaptor folder.

The paper's authors released their weights as PyTorch pickles written with diffusers 0.19:

``text_encoder_lora[_EMA].pth``
    LoRA on the CLIP text encoder's attention projections and MLP, keys like
    ``text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight`` (and ``up``),
    for ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``mlp.fc1``, ``mlp.fc2``.
``unet_lora[_EMA].pth``
    LoRA attention processors of the U-Net, keys like
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight``
    for ``to_q``, ``to_k``, ``to_v``, ``to_out``.
``prefix_embedding[_EMA].pth``
    The soft-token module: ``token_embedding.weight`` of shape ``(n_tokens + 1, hidden)`` whose
    row 0 is unused and rows 1..n are the tokens placed right after the start-of-text token,
    plus a copy of the text encoder's ``position_embedding.weight`` and ``position_ids``.

diffusers 0.19 added ``up(down(x))`` to each adapted layer's output with scale 1 (no alpha). In
peft terms ``lora_A = down``, ``lora_B = up`` and ``lora_alpha = r``, which is what this writes.
The files are read with ``torch.load(weights_only=True)`` only (tensors and plain containers,
never arbitrary objects), every key must be recognised (the original loader used
``strict=False`` and ignored mismatches silently), and the result is a standard fair adaptor
folder (:func:`~diffusers_fair.adaptors.format.save_fair_adaptor`). The EMA weights are the released
ones and are used by default.

The metadata's ``training`` records how the authors trained, in ``FairTrainingConfig`` terms:
``prompt_padding: "natural"`` (every script encodes prompts at their natural length with the
attention mask, so ``FairFinetunePipeline`` and the audit generate with the same padding),
``dft_step_weights: "authors"``, and ``ot_cost: "euclidean"`` where a target has more than two
classes or cells (race and joint targets; binary targets are the same with either cost).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..method.targets import TargetDistribution
from .format import save_fair_adaptor
from .metadata import DEFAULT_SOFT_TOKEN, SD15, FairAdaptorMetadata, canonical_base_model, default_license, sha256_file


KINDS_OF_FILE = ("text_encoder_lora", "unet_lora", "prefix_embedding")
# (text hidden size, U-Net cross-attention size) of base models whose files may lack one of them.
KNOWN_SHAPES = {SD15: (768, 768)}
SOURCE = "official release of Shen et al. (sail-sg/finetune-fair-diffusion, diffusers 0.19)"

_TEXT_KEY = re.compile(
    r"^(?:text_model\.)?(?P<module>encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]))"
    r"\.lora_linear_layer\.(?P<which>up|down)\.weight$"
)
_UNET_KEY = re.compile(r"^(?P<block>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<which>up|down)\.weight$")
_PREFIX_KEYS = {"token_embedding.weight", "position_embedding.weight", "position_ids"}


def _kind_of_file(path: Path) -> str:
    stem = path.name.removesuffix(".pth").removesuffix("_EMA")
    if path.suffix != ".pth" or stem not in KINDS_OF_FILE:
        raise ValueError(f"{path.name} is not an official release file ({', '.join(k + '[_EMA].pth' for k in KINDS_OF_FILE)})")
    return stem


def find_official_files(src: str | Path, *, ema: bool = True) -> dict[str, Path]:
    """The release files in ``src`` (a folder or one file) by kind.

    In a folder, ``ema=True`` takes the ``_EMA`` files and ``ema=False`` the others; a folder
    with neither raises.
    """
    src = Path(src)
    if src.is_file():
        return {_kind_of_file(src): src}
    if not src.is_dir():
        raise ValueError(f"{src} does not exist")
    suffix = "_EMA.pth" if ema else ".pth"
    found = {kind: src / f"{kind}{suffix}" for kind in KINDS_OF_FILE if (src / f"{kind}{suffix}").is_file()}
    if not found:
        other = "_EMA.pth" if not ema else ".pth"
        present = [kind for kind in KINDS_OF_FILE if (src / f"{kind}{other}").is_file()]
        hint = f"; it has the {'EMA' if not ema else 'non-EMA'} files {present} (use ema={not ema})" if present else ""
        raise ValueError(f"{src} holds no {'EMA ' if ema else ''}release files (*{suffix}){hint}")
    return found


def load_release_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read one ``.pth`` file as a flat dict of tensors, refusing anything else."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:  # missing, a folder, no permission
        raise ValueError(f"{path} cannot be read: {error.strerror or error}") from None
    except MemoryError:
        raise
    except Exception as error:  # torch's unpickler raises many kinds on garbage (struct.error, KeyError, ...)
        raise ValueError(f"{path.name} is not a plain tensor file that loads with weights_only=True: "
                         f"{type(error).__name__}: {str(error)[:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path.name} must hold a dict of name -> tensor")
    if all(key.startswith("module.") for key in state):  # saved from a DistributedDataParallel wrapper
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def _pairs_to_peft(pairs: dict[str, dict[str, torch.Tensor]], what: str) -> tuple[dict, int]:
    """``{module: {"down": A, "up": B}}`` -> peft keys and the common rank."""
    state, ranks = {}, set()
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"up", "down"}:
            raise ValueError(f"{what}: layer {module!r} lacks its {'up' if 'down' in pair else 'down'} weight")
        down, up = pair["down"], pair["up"]
        if not (down.is_floating_point() and up.is_floating_point()):
            raise ValueError(f"{what}: layer {module!r} has weights of type {down.dtype}, {up.dtype}; floating-point "
                             f"weights expected (they are refused, not converted)")
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise ValueError(f"{what}: layer {module!r} has inconsistent shapes down {tuple(down.shape)}, up {tuple(up.shape)}")
        ranks.add(down.shape[0])
        state[f"{module}.lora_A.weight"] = down.float()
        state[f"{module}.lora_B.weight"] = up.float()
    if len(ranks) != 1:
        raise ValueError(f"{what}: layers have different ranks {sorted(ranks)}")
    return state, ranks.pop()


def convert_text_encoder_lora(state: dict[str, torch.Tensor]):
    """Official text-encoder LoRA -> ``(peft state dict, LoraConfig)``."""
    from peft import LoraConfig

    pairs: dict[str, dict] = {}
    for key, value in state.items():
        match = _TEXT_KEY.match(key)
        if not match:
            raise ValueError(f"text_encoder_lora: unrecognised key {key!r}")
        pairs.setdefault("text_model." + match["module"], {})[match["which"]] = value
    peft_state, rank = _pairs_to_peft(pairs, "text_encoder_lora")
    targets = sorted({module.rsplit(".", 1)[1] for module in pairs})
    return peft_state, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, bias="none")


def convert_unet_lora(state: dict[str, torch.Tensor]):
    """Official U-Net LoRA processors -> ``(peft state dict, LoraConfig)``."""
    from peft import LoraConfig

    pairs: dict[str, dict] = {}
    for key, value in state.items():
        match = _UNET_KEY.match(key)
        if not match:
            raise ValueError(f"unet_lora: unrecognised key {key!r}")
        proj = "to_out.0" if match["proj"] == "to_out" else match["proj"]
        pairs.setdefault(f"{match['block']}.{proj}", {})[match["which"]] = value
    peft_state, rank = _pairs_to_peft(pairs, "unet_lora")
    targets = sorted({"to_out.0" if module.endswith("to_out.0") else module.rsplit(".", 1)[1] for module in pairs})
    return peft_state, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, bias="none")


def convert_prefix_embedding(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Official soft-token module -> ``(n_tokens, hidden)`` embeddings (rows 1..n of its table)."""
    unknown = sorted(set(state) - _PREFIX_KEYS)
    if unknown or "token_embedding.weight" not in state:
        raise ValueError(f"prefix_embedding: expected keys {sorted(_PREFIX_KEYS)}, got {sorted(state)}")
    table = state["token_embedding.weight"]
    if not table.is_floating_point():
        raise ValueError(f"prefix_embedding: token_embedding.weight is {table.dtype}, floating-point weights expected")
    if table.dim() != 2 or table.shape[0] < 2:
        raise ValueError(f"prefix_embedding: token_embedding.weight has shape {tuple(table.shape)}, expected (n_tokens + 1, hidden)")
    return table[1:].float().clone()


def authors_training_settings(targets) -> dict:
    """The ``FairTrainingConfig`` choices of the authors' code that an adaptor's users need to know.

    Every experiment script pads prompts to their natural length with the attention mask
    (``exp-1-debias-gender/1-main-debias.py`` lines 1007-1032) and weighs the adjusted-DFT steps by
    its own factors (lines 1105-1109); race and joint targets use the plain Euclidean transport cost
    (``exp-6-debias-race`` line 1461, ``exp-3-debias-gender-race`` line 1523). ``targets`` are
    ``TargetDistribution`` objects.
    """
    settings = {"prompt_padding": "natural", "dft_step_weights": "authors"}
    if any(target.num_classes > 2 for target in targets):
        settings["ot_cost"] = "euclidean"
    return settings


def convert_official(
    src: str | Path,
    dst: str | Path,
    *,
    base_model: str = SD15,
    name: str | None = None,
    targets=(),
    description: str = "",
    ema: bool = True,
    soft_token: str = DEFAULT_SOFT_TOKEN,
    text_hidden_size: int | None = None,
    cross_attention_dim: int | None = None,
    license: str | None = None,
    overwrite: bool = False,
):
    """Convert official release files (a folder or one file) into a fair adaptor folder ``dst``.

    Args:
        src: folder with ``text_encoder_lora[_EMA].pth``, ``unet_lora[_EMA].pth`` and/or
            ``prefix_embedding[_EMA].pth``, or one such file.
        dst: the adaptor folder to write.
        base_model: the base model the weights were trained on (the release used SD 1.5).
        name: adaptor name (default: the name of ``dst``).
        targets: target distributions (``TargetDistribution`` or their text form), for the metadata.
        description: one paragraph for the model card.
        ema: use the ``_EMA`` files (the released weights) rather than the last iterate.
        soft_token: token name for converted soft tokens.
        text_hidden_size, cross_attention_dim: the base model's sizes where the files cannot tell
            them (known for SD 1.5).
        license: Hub license id of the weights (default: the base model's, ``creativeml-openrail-m``
            for SD 1.5; the release's weights are SD 1.5 derivatives and fall under its license).
        overwrite: replace an adaptor already in ``dst``.

    Returns:
        The metadata written.
    """
    files = find_official_files(src, ema=ema)
    states = {kind: load_release_file(path) for kind, path in files.items()}
    base_model = canonical_base_model(base_model)

    text_lora = convert_text_encoder_lora(states["text_encoder_lora"]) if "text_encoder_lora" in states else None
    unet_lora = convert_unet_lora(states["unet_lora"]) if "unet_lora" in states else None
    soft = convert_prefix_embedding(states["prefix_embedding"]) if "prefix_embedding" in states else None

    known_hidden, known_cross = KNOWN_SHAPES.get(base_model, (None, None))
    if text_hidden_size is None:
        if text_lora is not None:
            text_hidden_size = next(v.shape[1] for k, v in text_lora[0].items() if k.endswith("self_attn.q_proj.lora_A.weight"))
        elif soft is not None:
            text_hidden_size = soft.shape[1]
        else:
            text_hidden_size = known_hidden
    if cross_attention_dim is None:
        cross = [v.shape[1] for k, v in (unet_lora[0].items() if unet_lora else []) if k.endswith("attn2.to_k.lora_A.weight")]
        cross_attention_dim = cross[0] if cross else known_cross
    if text_hidden_size is None or cross_attention_dim is None:
        raise ValueError(f"cannot tell the text hidden size / cross-attention size of {base_model}; pass them")

    parsed = [TargetDistribution.parse(t) if isinstance(t, str) else t for t in targets]
    metadata = FairAdaptorMetadata(
        name=name or Path(dst).name,
        base_model=base_model,
        text_hidden_size=int(text_hidden_size),
        cross_attention_dim=int(cross_attention_dim),
        description=description or f"Converted from the {SOURCE}.",
        targets=parsed,
        license=license or default_license(base_model),
        training={
            "source": SOURCE,
            "converted_from": {path.name: sha256_file(path) for path in files.values()},
            "ema_weights": ema,
            **authors_training_settings(parsed),
        },
    )
    return save_fair_adaptor(
        dst,
        metadata=metadata,
        text_encoder_lora=text_lora[0] if text_lora else None,
        text_encoder_lora_config=text_lora[1] if text_lora else None,
        unet_lora=unet_lora[0] if unet_lora else None,
        unet_lora_config=unet_lora[1] if unet_lora else None,
        soft_tokens=soft,
        soft_token=soft_token,
        overwrite=overwrite,
    )
