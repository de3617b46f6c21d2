"""Fair adaptors on disk: the files training produces and every loader reads.

A *fair adaptor* is a small folder that changes a Stable Diffusion pipeline so that the images a
prompt produces follow a target distribution of protected attributes. It holds:

``pytorch_lora_weights.safetensors``
    LoRA weights for the text encoder and/or the U-Net, written by diffusers' own
    ``StableDiffusionPipeline.save_lora_weights`` (peft key names with a ``text_encoder.`` /
    ``unet.`` prefix, the ``LoraConfig`` of each component in the safetensors header under
    ``lora_adapter_metadata``). A stock pipeline loads it with ``pipe.load_lora_weights(folder)``.
    Text-encoder keys keep the ``text_model.`` level (``text_encoder.text_model.encoder.layers.0
    .self_attn.q_proj.lora_A.weight``), the layout of Stable Diffusion LoRAs on the Hub: diffusers
    strips it for text encoders without that level (transformers >= 5), and older stacks need it.
``learned_embeds.safetensors``
    Soft tokens in the layout ``load_textual_inversion`` reads: one entry, the token name (e.g.
    ``"<fair>"``) mapped to an ``(n_tokens, hidden)`` tensor. diffusers adds the tokens
    ``<fair>``, ``<fair>_1``, ... ``<fair>_{n-1}`` and expands ``<fair>`` in a prompt to all of them.
    The adaptor works when ``<fair>`` starts the prompt (``FairFinetunePipeline`` adds it).
``fair_adaptor.json``
    :class:`FairAdaptorMetadata`: what the adaptor is for (targets), what it expects of the
    pipeline (base model, text hidden size, cross-attention size), how it was trained, the bias
    it measured before and after, and the sha256 of each weight file.
``README.md``
    A Hub model card (huggingface_hub ``ModelCard``) following MODEL_CARD.md.

Use :func:`save_fair_adaptor` to write one (the trainer does) and :func:`read_fair_adaptor` to
read and verify one. Beside this module: the metadata in ``metadata.py``, the model card in
``model_card.py``, loading into a pipeline in ``pipeline.py`` (undoing a failed load in
``transaction.py``), the Hub and the index of named adaptors in ``hub.py``, the converter of the
original release's files in ``convert.py``, the checks of weight files in ``lora_state.py``.

A folder read back must hold what :func:`save_fair_adaptor` writes: regular files (no symbolic
links), metadata of the documented types and sizes that agrees with the kind and the files, and
weights that are finite floating-point tensors with complete LoRA layers of consistent ranks.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .._utils.io import read_json, replace_atomically
from ..components.families import SD1, SDXL, soft_tokens_by_encoder
from .lora_state import check_lora_file, check_lora_shapes, check_soft_token_file, lora_state_and_config, lora_summary
from .metadata import (
    CARD_NAME,
    DEFAULT_SOFT_TOKEN,
    FORMAT_VERSION,
    LORA_WEIGHT_NAME,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    METADATA_NAME,
    SOFT_TOKENS_NAME,
    FairAdaptorMetadata,
    check_soft_token,
    sha256_file,
)


# --------------------------------------------------------------------------- saving
def save_fair_adaptor(
    folder: str | Path,
    *,
    metadata: FairAdaptorMetadata,
    text_encoder_lora=None,
    unet_lora=None,
    text_encoder_lora_config=None,
    unet_lora_config=None,
    soft_tokens: torch.Tensor | dict[str, torch.Tensor] | None = None,
    soft_token: str = DEFAULT_SOFT_TOKEN,
    overwrite: bool = False,
    text_encoder_2_lora=None,
    text_encoder_2_lora_config=None,
) -> FairAdaptorMetadata:
    """Write a fair adaptor folder; returns the completed metadata (as written to ``fair_adaptor.json``).

    Args:
        folder: where to write (created if missing).
        metadata: the descriptive fields; ``kind``, ``soft_token``, ``token_names``, ``lora``,
            ``files`` and ``library_versions`` are filled here.
        text_encoder_lora: the text encoder with its peft LoRA adapter attached (exactly one
            adapter), or a peft state dict (``peft.get_peft_model_state_dict``) together with
            ``text_encoder_lora_config``. The trainer passes its EMA weights as a state dict.
        unet_lora: the same for the U-Net.
        text_encoder_lora_config, unet_lora_config: ``peft.LoraConfig`` (or its dict) of a state
            dict given above; it is stored in the safetensors header as diffusers does.
        soft_tokens: ``(n_tokens, hidden)`` learned token embeddings, or ``None``. For SDXL a dict
            ``{"text_encoder": (n, 768), "text_encoder_2": (n, 1280)}``, stored under ``clip_l`` and
            ``clip_g`` as SDXL textual inversions are.
        soft_token: the token name the embeddings are stored under; diffusers adds ``soft_token``,
            ``soft_token_1``, ... to the vocabulary. Must not contain spaces.
        overwrite: replace an adaptor already in ``folder`` (weight files the new one lacks are removed).
        text_encoder_2_lora, text_encoder_2_lora_config: SDXL's second text encoder's LoRA, as
            ``text_encoder_lora``; written by ``StableDiffusionXLPipeline.save_lora_weights`` under
            ``text_encoder_2.`` keys.
    """
    if not isinstance(metadata, FairAdaptorMetadata):
        raise ValueError(f"metadata must be a FairAdaptorMetadata, got {type(metadata).__name__}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    written = [folder / name for name in (METADATA_NAME, LORA_WEIGHT_NAME, SOFT_TOKENS_NAME, CARD_NAME)]
    if any(path.exists() for path in written) and not overwrite:
        raise ValueError(f"{folder} already holds an adaptor; pass overwrite=True to replace it")

    loras = {}
    if text_encoder_lora is not None:
        loras["text_encoder"] = lora_state_and_config(text_encoder_lora, text_encoder_lora_config, "text_encoder")
        check_lora_shapes("text_encoder", loras["text_encoder"][0], metadata.text_hidden_size, "text_hidden_size")
    elif text_encoder_lora_config is not None:
        raise ValueError("text_encoder_lora_config given without text_encoder_lora")
    if unet_lora is not None:
        loras["unet"] = lora_state_and_config(unet_lora, unet_lora_config, "unet")
        check_lora_shapes("unet", loras["unet"][0], metadata.cross_attention_dim, "cross_attention_dim")
    elif unet_lora_config is not None:
        raise ValueError("unet_lora_config given without unet_lora")
    if text_encoder_2_lora is not None:
        loras["text_encoder_2"] = lora_state_and_config(text_encoder_2_lora, text_encoder_2_lora_config,
                                                        "text_encoder_2")
    elif text_encoder_2_lora_config is not None:
        raise ValueError("text_encoder_2_lora_config given without text_encoder_2_lora")

    if isinstance(soft_tokens, Mapping):  # SDXL: one vector set per text encoder
        soft_tokens = _sdxl_soft_tokens(soft_tokens, metadata)
        for key, vectors in soft_tokens.items():
            if not vectors.is_floating_point() or not torch.isfinite(vectors).all():
                raise ValueError(f"soft_tokens[{key!r}] must be finite floating-point values")
        check_soft_token(soft_token)
    elif soft_tokens is not None:
        if not isinstance(soft_tokens, torch.Tensor) or soft_tokens.dim() != 2 or soft_tokens.shape[0] < 1:
            raise ValueError("soft_tokens must be a (n_tokens, hidden) tensor with n_tokens >= 1")
        if not soft_tokens.is_floating_point() or not torch.isfinite(soft_tokens).all():
            raise ValueError("soft_tokens must be finite floating-point values")
        if soft_tokens.shape[1] != metadata.text_hidden_size:
            raise ValueError(
                f"soft_tokens have size {soft_tokens.shape[1]}, metadata says text_hidden_size={metadata.text_hidden_size}"
            )
        check_soft_token(soft_token)

    if not loras and soft_tokens is None:
        raise ValueError("nothing to save: give text_encoder_lora, unet_lora and/or soft_tokens")
    kind = "+".join(part for part, present in (("lora", bool(loras)), ("soft_tokens", soft_tokens is not None)) if present)
    if metadata.kind is not None and metadata.kind != kind:
        raise ValueError(f"metadata.kind is {metadata.kind!r} but the weights given make a {kind!r} adaptor")

    # Everything is written to a staging folder first and moved into place when complete, the metadata
    # last: a full disk or a crash while saving leaves the previous adaptor in ``folder`` untouched.
    # The staging folder's name is unique to this call, so concurrent saves into one folder do not collide.
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
    try:
        complete = _write_adaptor_files(staging, metadata, loras, soft_tokens, soft_token, kind)
        # safetensors writes its files 0600; give them the permissions of the files written with open().
        mode = stat.S_IMODE((staging / METADATA_NAME).stat().st_mode)
        for name in (LORA_WEIGHT_NAME, SOFT_TOKENS_NAME, CARD_NAME, METADATA_NAME):
            if (staging / name).exists():
                os.chmod(staging / name, mode)
                os.replace(staging / name, folder / name)
            else:
                (folder / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return complete


def _sdxl_soft_tokens(soft_tokens: Mapping, metadata: FairAdaptorMetadata) -> dict[str, torch.Tensor]:
    """SDXL soft tokens ``{"text_encoder": (n, h1), "text_encoder_2": (n, h2)}`` as the file's
    ``{"clip_l": ..., "clip_g": ...}``; the first size is the metadata's ``text_hidden_size``."""
    encoders, keys = SDXL.text_encoders, SDXL.textual_inversion_keys
    if sorted(soft_tokens) != sorted(encoders):
        raise ValueError(f"soft_tokens as a dict must map {list(encoders)} to their vectors, got {sorted(soft_tokens)}")
    entries = {}
    for encoder, key in zip(encoders, keys):
        vectors = soft_tokens[encoder]
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[0] < 1:
            raise ValueError(f"soft_tokens[{encoder!r}] must be a (n_tokens, hidden) tensor with n_tokens >= 1")
        entries[key] = vectors
    if entries["clip_l"].shape[0] != entries["clip_g"].shape[0]:
        raise ValueError(f"soft_tokens have {entries['clip_l'].shape[0]} vectors for text_encoder and "
                         f"{entries['clip_g'].shape[0]} for text_encoder_2; both text encoders need the same number")
    if entries["clip_l"].shape[1] != metadata.text_hidden_size:
        raise ValueError(f"soft_tokens['text_encoder'] have size {entries['clip_l'].shape[1]}, metadata says "
                         f"text_hidden_size={metadata.text_hidden_size}")
    return entries


DESCRIPTIVE_FIELDS = ("description", "metrics_before", "metrics_after", "eval_prompts", "license")


def update_fair_adaptor_metadata(folder: str | Path, **fields) -> FairAdaptorMetadata:
    """Change descriptive fields of a saved adaptor (e.g. the metrics measured after saving it).

    Only the fields in ``DESCRIPTIVE_FIELDS`` can change; the weights are checked against their sha256
    and left as they are; the model card and ``fair_adaptor.json`` are rewritten, each atomically.
    Returns the new metadata.
    """
    unknown = sorted(set(fields) - set(DESCRIPTIVE_FIELDS))
    if unknown:
        raise ValueError(f"only {list(DESCRIPTIVE_FIELDS)} can be updated in a saved adaptor, got {unknown}")
    folder = Path(folder)
    metadata = replace(read_fair_adaptor(folder).metadata, **fields)
    from .model_card import build_model_card

    for name, write in ((CARD_NAME, lambda path: build_model_card(metadata).save(path)),
                        (METADATA_NAME, lambda path: path.write_text(metadata.to_json(), encoding="utf-8"))):
        replace_atomically(folder / name, write)
    return metadata


def _write_adaptor_files(folder: Path, metadata, loras: dict, soft_tokens, soft_token: str, kind: str) -> FairAdaptorMetadata:
    """Write weights, model card and metadata into ``folder``; return the completed metadata."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    files, token_names = {}, []
    if loras:
        layers = {f"{part}_lora_layers": state for part, (state, _) in loras.items()}
        metadata_of = {f"{part}_lora_adapter_metadata": config for part, (_, config) in loras.items()}
        # The SDXL loader class writes text_encoder_2 keys; both write text_encoder and unet keys alike.
        saver = StableDiffusionXLPipeline if "text_encoder_2" in loras else StableDiffusionPipeline
        saver.save_lora_weights(folder, weight_name=LORA_WEIGHT_NAME, **layers, **metadata_of)
        files[LORA_WEIGHT_NAME] = sha256_file(folder / LORA_WEIGHT_NAME)
    if soft_tokens is not None:
        entries = soft_tokens if isinstance(soft_tokens, dict) else {soft_token: soft_tokens}
        save_file({key: value.detach().to("cpu").contiguous().clone() for key, value in entries.items()},
                  str(folder / SOFT_TOKENS_NAME))
        files[SOFT_TOKENS_NAME] = sha256_file(folder / SOFT_TOKENS_NAME)
        count = next(iter(entries.values())).shape[0]
        token_names = [soft_token] + [f"{soft_token}_{i}" for i in range(1, count)]

    complete = replace(
        metadata,
        format_version=FORMAT_VERSION,
        kind=kind,
        soft_token=soft_token if soft_tokens is not None else None,
        token_names=token_names,
        lora={component: lora_summary(*loras[component]) for component in loras},
        files=files,
        library_versions=_library_versions(),
    )
    from .model_card import build_model_card

    build_model_card(complete).save(folder / CARD_NAME)
    (folder / METADATA_NAME).write_text(complete.to_json(), encoding="utf-8")
    return complete


def _library_versions() -> dict:
    import diffusers
    import peft

    from ..version import __version__

    return {"diffusers_fair": __version__, "diffusers": diffusers.__version__, "peft": peft.__version__}


# --------------------------------------------------------------------------- reading
@dataclass
class FairAdaptor:
    """A fair adaptor folder whose metadata has been read (and its files verified).

    Attributes:
        folder: the folder holding the files.
        metadata: its ``fair_adaptor.json``.
        source: where it came from, for messages (a path, an index name or ``repo@revision``).
    """

    folder: Path
    metadata: FairAdaptorMetadata
    source: str = ""

    @property
    def has_lora(self) -> bool:
        return LORA_WEIGHT_NAME in self.metadata.files

    @property
    def has_soft_tokens(self) -> bool:
        return SOFT_TOKENS_NAME in self.metadata.files

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights as diffusers stores them (``text_encoder.`` / ``unet.`` keys).

        Raises ``ValueError`` unless they are what a saver writes (:func:`~.lora_state.check_lora_file`):
        finite floating-point 2-D tensors, both halves of every layer, ranks agreeing with each other,
        with the file's header and with the metadata.
        """
        from .._utils.io import load_safetensors, read_safetensors_header

        path, what = self.folder / LORA_WEIGHT_NAME, f"{self.source}: {LORA_WEIGHT_NAME}"
        state = load_safetensors(path, what)
        check_lora_file(state, read_safetensors_header(path, what), self.metadata.lora, what)
        return state

    def _soft_token_state(self) -> dict[str, torch.Tensor]:
        """The soft-token file's entries, checked: finite floating-point vectors (1-D or 2-D), at least one."""
        from .._utils.io import load_safetensors

        what = f"{self.source}: {SOFT_TOKENS_NAME}"
        state = load_safetensors(self.folder / SOFT_TOKENS_NAME, what)
        check_soft_token_file(state, what)
        return state

    def soft_tokens(self) -> tuple[str, torch.Tensor]:
        """``(token name, (n_tokens, hidden) embeddings)``; for SDXL those of the first text encoder
        (:meth:`soft_tokens_by_encoder` gives both)."""
        state = self._soft_token_state()
        if sorted(state) == sorted(SDXL.textual_inversion_keys):
            state = {self.metadata.soft_token: self.soft_tokens_by_encoder()["text_encoder"]}
        if len(state) != 1:
            raise ValueError(f"{self.source}: {SOFT_TOKENS_NAME} must hold exactly one entry, found {sorted(state)}")
        token, embeddings = next(iter(state.items()))
        if embeddings.dim() == 1:
            embeddings = embeddings[None]
        return token, embeddings

    def soft_tokens_by_encoder(self) -> dict[str, torch.Tensor]:
        """The soft tokens of each text encoder: ``{"text_encoder": (n_tokens, hidden)}``, and for SDXL also
        ``"text_encoder_2"`` (stored as ``clip_l`` and ``clip_g``)."""
        state = self._soft_token_state()
        family = SDXL if sorted(state) == sorted(SDXL.textual_inversion_keys) else SD1
        try:
            return soft_tokens_by_encoder(family, state, self.metadata.soft_token)
        except ValueError as error:
            raise ValueError(f"{self.source}: {SOFT_TOKENS_NAME}: {error}") from None


def read_fair_adaptor(
    folder: str | Path, *, verify: bool = True, source: str | None = None, links_within: str | Path | None = None
) -> FairAdaptor:
    """Read ``fair_adaptor.json`` from ``folder`` and check the folder against it.

    Checks that every weight file listed exists and, with ``verify`` (the default), that its
    sha256 matches; that the kind matches the files. ``fair_adaptor.json`` and the weight files
    must be regular files in ``folder``: symbolic links are refused, except links to files inside
    ``links_within`` (the Hugging Face cache keeps a snapshot's files as links into the repo's
    ``blobs/``). ``fair_adaptor.json`` is read only up to 4 MiB and 32 levels of nesting. Raises
    ``ValueError`` naming the problem.
    """
    folder = Path(folder)
    source = source or str(folder)
    try:
        if not folder.is_dir():
            raise ValueError(f"{source}: no such adaptor folder")
        meta_path = _file_in_folder(folder, METADATA_NAME, source, links_within)
        if meta_path is None:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"))
            hint = f"; its PyTorch pickles {pickles} are never loaded (convert them: diffusers-fair convert)" if pickles else ""
            raise ValueError(f"{source}: no {METADATA_NAME}, so this is not a fair adaptor folder{hint}")
    except OSError as error:  # a name too long, no permission
        raise ValueError(f"{source}: the adaptor folder cannot be read ({error.strerror or error})") from None
    data = read_json(meta_path, f"{source}:", max_bytes=MAX_METADATA_BYTES, max_depth=MAX_METADATA_DEPTH)
    try:
        metadata = FairAdaptorMetadata.from_dict(data)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None

    expected = {"lora": {LORA_WEIGHT_NAME}, "soft_tokens": {SOFT_TOKENS_NAME}, "lora+soft_tokens": {LORA_WEIGHT_NAME, SOFT_TOKENS_NAME}}
    if metadata.kind is None or set(metadata.files) != expected[metadata.kind]:
        raise ValueError(f"{source}: kind {metadata.kind!r} does not match the files listed {sorted(metadata.files)}")
    try:
        metadata.check_complete()
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    for name, digest in metadata.files.items():
        path = _file_in_folder(folder, name, source, links_within)
        if path is None:
            raise ValueError(f"{source}: {name} is listed in {METADATA_NAME} but missing")
        if verify and sha256_file(path) != digest:
            raise ValueError(f"{source}: {name} does not match the sha256 in {METADATA_NAME} (corrupt or modified file)")
    return FairAdaptor(folder=folder, metadata=metadata, source=source)


def _file_in_folder(folder: Path, name: str, source: str, links_within: str | Path | None = None) -> Path | None:
    """``folder / name`` if it is a regular file there, ``None`` if there is nothing of that name.

    Raises ``ValueError`` for a folder or other non-file of that name, and for a symbolic link,
    unless it points to a regular file inside ``links_within``.
    """
    path = folder / name
    if path.is_symlink():
        if links_within is None:
            raise ValueError(f"{source}: {name} is a symbolic link; an adaptor's files must be regular files in its "
                             f"folder (copy the file there)")
        root = Path(links_within).resolve()
        if not path.resolve().is_relative_to(root):
            raise ValueError(f"{source}: {name} is a symbolic link to a file outside {root}")
    if not path.exists():
        return None
    if not path.is_file():
        raise ValueError(f"{source}: {name} is not a regular file")
    return path
