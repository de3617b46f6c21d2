"""Where fair adaptors come from and go to: the adaptor index, the Hugging Face Hub, model cards.

*The index* (``diffusers_fair/adaptors/shipped/index.json``, shipped inside the package) gives
short names to adaptors: ``load_fair_adaptor(pipe, "gender-race")``. An entry is

* ``"published"``: on the Hub at ``repo_id``, pinned to a commit ``revision``;
* ``"unpublished"``: announced (its intended ``repo_id``), not released yet: loading it raises;
* ``"local"``: a folder shipped with the package, ``path`` relative to the index folder (the
  toy-world adaptors, so that they load offline).

*The Hub*: :func:`download_adaptor` fetches a repo at one revision with ``snapshot_download``
(the normal Hugging Face cache, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` apply) and checks every
weight file against the sha256 in ``fair_adaptor.json``. :func:`push_adaptor` creates the repo and
uploads the folder (weights, metadata, model card) in one commit, whose sha it returns.

*Model cards*: :func:`build_model_card` writes the ``README.md`` of an adaptor from its metadata,
following MODEL_CARD.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .metadata import CARD_NAME, KINDS, LORA_WEIGHT_NAME, METADATA_NAME, SOFT_TOKENS_NAME, canonical_base_model, looks_like_repo_id
from .format import FairAdaptor, read_fair_adaptor
from .._utils.io import read_json

INDEX_DIR = Path(__file__).parent / "shipped"
INDEX_PATH = INDEX_DIR / "index.json"
INDEX_FORMAT_VERSION = 1
STATUSES = ("published", "unpublished", "local")
PUSH_RECORD_NAME = "hub_pushes.json"

_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


class AdaptorDownloadError(ValueError):
    """A fair adaptor could not be fetched from the Hub (the message says why and what to do)."""


# --------------------------------------------------------------------------- the index
@dataclass(frozen=True)
class IndexEntry:
    """One named adaptor of the index.

    Attributes:
        name: the short name users type.
        status: ``"published"``, ``"unpublished"`` or ``"local"`` (see the module docstring).
        description: one line for people.
        base_model: Hub id of the base model it is for.
        kind: ``"lora"``, ``"soft_tokens"`` or ``"lora+soft_tokens"``.
        targets: the target distributions in their text form (``"gender: male, female"``).
        repo_id: Hub repo (published and unpublished entries).
        revision: the pinned commit sha (published entries).
        path: folder relative to the index folder (local entries).
        files: the files the adaptor consists of.
        metrics: measured metrics (``{"bias_gender": 0.21}``), empty until measured.
    """

    name: str
    status: str
    description: str
    base_model: str
    kind: str
    targets: tuple = ()
    repo_id: str | None = None
    revision: str | None = None
    path: str | None = None
    files: tuple = ()
    metrics: dict = field(default_factory=dict)

    def folder(self, index_dir: Path) -> Path:
        """The folder of a local entry (``index_dir``: the folder holding the index file)."""
        if self.status != "local":
            raise ValueError(f"index entry {self.name!r} is {self.status}, not local")
        return index_dir / self.path


def _entry_from_dict(name: str, data: dict, source: Path) -> IndexEntry:
    where = f"{source}: entry {name!r}"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object")
    known = {"status", "description", "base_model", "kind", "targets", "repo_id", "revision", "path", "files", "metrics"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}")
    for required in ("status", "description", "base_model", "kind"):
        if not isinstance(data.get(required), str):
            raise ValueError(f"{where} needs a string {required!r}")
    status, kind = data["status"], data["kind"]
    if status not in STATUSES:
        raise ValueError(f"{where}: status must be one of {STATUSES}, got {status!r}")
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    repo_id, revision, path = data.get("repo_id"), data.get("revision"), data.get("path")
    if status in ("published", "unpublished") and (not isinstance(repo_id, str) or not looks_like_repo_id(repo_id)):
        raise ValueError(f"{where}: a {status} entry needs a Hub repo_id 'owner/name'")
    if status == "published" and (not isinstance(revision, str) or not _COMMIT_SHA.match(revision)):
        raise ValueError(f"{where}: a published entry must pin revision to a 40-character commit sha")
    if status == "unpublished" and revision is not None:
        raise ValueError(f"{where}: an unpublished entry has no revision yet")
    if status == "local":
        if not isinstance(path, str) or not path or Path(path).is_absolute() or ".." in Path(path).parts:
            raise ValueError(f"{where}: a local entry needs a relative 'path' inside the index folder")
    elif path is not None:
        raise ValueError(f"{where}: only local entries have a 'path'")
    from ..method.targets import TargetDistribution

    targets = tuple(data.get("targets", ()))
    for text in targets:
        TargetDistribution.parse(text)  # raises ValueError on a malformed target
    return IndexEntry(
        name=name,
        status=status,
        description=data["description"],
        base_model=canonical_base_model(data["base_model"]),
        kind=kind,
        targets=targets,
        repo_id=repo_id,
        revision=revision,
        path=path,
        files=tuple(data.get("files", ())),
        metrics=dict(data.get("metrics", {})),
    )


def load_index(path: str | Path | None = None) -> dict[str, IndexEntry]:
    """Read and validate the adaptor index (default: the one shipped with the package)."""
    path = Path(path) if path is not None else INDEX_PATH
    data = read_json(path, "the adaptor index", missing=f"the adaptor index {path} is missing (a broken installation?)")
    if not isinstance(data, dict):
        raise ValueError(f"the adaptor index {path} must hold a JSON object")
    if data.get("format_version") != INDEX_FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported index format_version {data.get('format_version')!r}")
    adaptors = data.get("adaptors")
    if not isinstance(adaptors, dict):
        raise ValueError(f"{path}: 'adaptors' must map names to entries")
    return {name: _entry_from_dict(name, entry, path) for name, entry in adaptors.items()}


def _check_against_entry(adaptor: FairAdaptor, entry: IndexEntry) -> FairAdaptor:
    meta = adaptor.metadata
    if canonical_base_model(meta.base_model) != entry.base_model or meta.kind != entry.kind:
        raise ValueError(
            f"index entry {entry.name!r} announces a {entry.kind} adaptor for {entry.base_model}, but "
            f"{adaptor.source} holds a {meta.kind} adaptor for {meta.base_model}"
        )
    return adaptor


def resolve_adaptor(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
    index_path: str | Path | None = None,
) -> FairAdaptor:
    """Find an adaptor and return it read and verified (nothing is loaded into a pipeline).

    ``name_or_path`` is tried as, in this order: a name of the index (a plain name without
    ``/``), a local folder, a Hub repo id ``owner/name`` (downloaded at ``revision``, default
    ``"main"``). Write ``./name`` for a local folder that shares a name with an index entry.
    ``revision`` overrides an index entry's pinned commit and is refused for local folders.
    """
    text = str(name_or_path)
    index_dir = Path(index_path if index_path is not None else INDEX_PATH).parent
    if isinstance(name_or_path, str) and "/" not in text and "\\" not in text:
        index = load_index(index_path)
        if text in index:
            entry = index[text]
            if entry.status == "unpublished":
                raise ValueError(
                    f"the adaptor {text!r} ({entry.description}) is not published yet: its weights will appear "
                    f"at {entry.repo_id}. Train your own with diffusers-fair, or load a local folder or Hub repo"
                )
            if entry.status == "local":
                if revision is not None:
                    raise ValueError(f"{text!r} is shipped with the package; revision= applies to Hub adaptors only")
                folder = entry.folder(index_dir)
                if not (folder / METADATA_NAME).is_file():
                    raise ValueError(
                        f"the adaptor {text!r} is not built: {folder} holds no {METADATA_NAME}. The toy adaptors "
                        f"are written there by the toy demo (diffusers-fair demo)"
                    )
                return _check_against_entry(read_fair_adaptor(folder, source=f"{text} ({folder})"), entry)
            adaptor = download_adaptor(entry.repo_id, revision=revision or entry.revision, token=token, cache_dir=cache_dir)
            return _check_against_entry(adaptor, entry)
    path = Path(text)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"{text} is a local folder; revision= applies to Hub adaptors only")
        return read_fair_adaptor(path)
    if path.is_file():
        pickle = path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl")
        hint = ("PyTorch pickles are never loaded; convert the original release's .pth files with "
                "`diffusers-fair convert`" if pickle else f"give the folder holding it and its {METADATA_NAME}")
        raise ValueError(f"{text} is a file, not a fair adaptor folder: {hint}")
    if looks_like_repo_id(text):
        return download_adaptor(text, revision=revision, token=token, cache_dir=cache_dir)
    names = ", ".join(sorted(load_index(index_path)))
    raise ValueError(
        f"{text!r} is not an adaptor name ({names}), a local folder, or a Hub repo id 'owner/name'"
    )


# --------------------------------------------------------------------------- downloads
def download_adaptor(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
) -> FairAdaptor:
    """Download a fair adaptor from the Hub at one revision and verify it.

    Uses ``huggingface_hub.snapshot_download`` (the normal cache; ``HF_ENDPOINT``,
    ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` apply), which resolves ``revision`` (a branch, tag or commit
    sha; default ``"main"``) to one commit and fetches every file at that commit. Only the adaptor's
    files are fetched. Each weight file is checked against the sha256 in ``fair_adaptor.json``.
    Failures raise :class:`AdaptorDownloadError` naming the repo and what to do.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision or 'main'}"
    endpoint = constants.ENDPOINT
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=[METADATA_NAME, LORA_WEIGHT_NAME, SOFT_TOKENS_NAME, CARD_NAME],
            token=token,
            cache_dir=cache_dir,
        )
    except HFValidationError as error:
        raise AdaptorDownloadError(f"{repo_id!r} is not a valid Hub repo id: {error}") from None
    except GatedRepoError:
        raise AdaptorDownloadError(f"{repo_id} on {endpoint} is gated: accept its terms on the Hub and pass token=") from None
    except RevisionNotFoundError:
        raise AdaptorDownloadError(
            f"{repo_id} on {endpoint} has no revision {revision!r}: give an existing branch, tag or commit sha"
        ) from None
    except RepositoryNotFoundError:
        raise AdaptorDownloadError(
            f"{where} was not found on {endpoint}: check the repo id and the revision; for a private repo "
            f"pass token= (or log in with `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError as error:
        cause = error.__cause__
        if isinstance(cause, HfHubHTTPError):
            raise AdaptorDownloadError(
                f"{where} could not be listed on {endpoint} ({type(cause).__name__}): check that the revision exists"
            ) from None
        if constants.is_offline_mode():
            raise AdaptorDownloadError(
                f"{where} is not in the local cache and HF_HUB_OFFLINE is set: download it once online"
            ) from None
        raise AdaptorDownloadError(
            f"could not reach {endpoint} to download {where}, and it is not in the local cache: check the network "
            f"or HF_ENDPOINT ({cause or error})"
        ) from None
    except HfHubHTTPError as error:
        raise AdaptorDownloadError(f"downloading {where} from {endpoint} failed: {error}") from None

    folder = Path(folder)
    source = f"{repo_id}@{folder.name}"  # snapshot folders are named by their commit sha
    if not (folder / METADATA_NAME).is_file():
        raise AdaptorDownloadError(
            f"{source} has no {METADATA_NAME}, so it is not a fair adaptor (a plain LoRA repo loads with "
            f"pipe.load_lora_weights)"
        )
    try:
        return read_fair_adaptor(folder, source=source)
    except ValueError as error:
        raise AdaptorDownloadError(str(error)) from None


# --------------------------------------------------------------------------- uploads
def push_adaptor(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    api=None,
) -> str:
    """Upload an adaptor folder to the Hub in one commit; returns the commit sha.

    The folder is verified first (``fair_adaptor.json``, sha256 of the weights, ``README.md``).
    The repo is created if needed (``private`` applies only then); ``revision`` names a branch,
    created from ``main`` when missing. Only the adaptor's own files are uploaded. The push is
    recorded in ``hub_pushes.json`` beside them (repo, branch, commit), which is not uploaded.
    Load the exact upload again with ``load_fair_adaptor(pipe, repo_id, revision=<sha>)``.

    ``api`` is an ``HfApi`` (default: a new one with ``token``).
    """
    from huggingface_hub import HfApi

    adaptor = read_fair_adaptor(folder)
    folder = Path(folder)
    if not (folder / CARD_NAME).is_file():
        raise ValueError(f"{folder} has no {CARD_NAME} model card; save the adaptor with save_fair_adaptor")
    if not looks_like_repo_id(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repo id 'owner/name'")
    if revision is not None and (not revision or _COMMIT_SHA.match(revision)):
        raise ValueError(f"revision must name a branch to push to, got {revision!r}")
    api = api if api is not None else HfApi(token=token)

    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    files = [METADATA_NAME, CARD_NAME, *sorted(adaptor.metadata.files)]
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        token=token,
        commit_message=commit_message or f"Upload fair adaptor {adaptor.metadata.name}",
        allow_patterns=files,
    )
    commit = info.oid
    record_path = folder / PUSH_RECORD_NAME
    records = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else []
    records.append({"repo_id": repo_id, "revision": revision or "main", "commit": commit, "endpoint": api.endpoint, "files": files})
    record_path.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return commit
