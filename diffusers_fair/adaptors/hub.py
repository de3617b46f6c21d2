"""Where fair adaptors come from and go to: the adaptor index, the Hugging Face Hub, model cards.

*The index* (``diffusers_fair/adaptors/shipped/index.json``, shipped inside the package) gives
short names to adaptors: ``load_fair_adaptor(pipe, "gender-race")``. An entry is

* ``"published"``: on the Hub at ``repo_id``, pinned to a commit ``revision``;
* ``"unpublished"``: announced (its intended ``repo_id``), not on the Hub yet: loading it raises.
  The Stable Diffusion 1.5 entries say where the paper's authors documented their released
  weights (``release``) and the ``diffusers-fair convert`` command that turns the released file
  into this adaptor (``convert``); the error prints both;
* ``"local"``: a folder shipped with the package, ``path`` relative to the index folder (the
  toy-world adaptors, so that they load offline).

*The Hub*: :func:`download_adaptor` fetches a repo at one revision with ``snapshot_download``
(the normal Hugging Face cache, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` apply) and checks every
weight file against the sha256 in ``fair_adaptor.json``; :func:`pull_adaptor` also copies it into
a folder. :func:`push_adaptor` creates the repo and uploads the adaptor (weights, metadata, model
card with the repo id in its usage snippet) in one commit, whose sha it returns. Network failures
raise ``ValueError`` naming the cause.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from .._utils.io import read_json, replace_atomically
from .format import FairAdaptor, read_fair_adaptor
from .metadata import (
    CARD_NAME,
    KINDS,
    LORA_WEIGHT_NAME,
    METADATA_NAME,
    SOFT_TOKENS_NAME,
    canonical_base_model,
    looks_like_repo_id,
)
from .model_card import card_for_repo


INDEX_DIR = Path(__file__).parent / "shipped"
INDEX_PATH = INDEX_DIR / "index.json"
INDEX_FORMAT_VERSION = 1
STATUSES = ("published", "unpublished", "local")
PUSH_RECORD_NAME = "hub_pushes.json"

_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# A branch or tag name as the Hub shows them (``main``, ``v1.0``, ``refs/pr/1``): names of letters, digits,
# ``.``, ``_``, ``-`` and ``+`` joined by single ``/``; never ``..``, a leading ``.`` or ``-``, or a path.
_REVISION = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]*(/[A-Za-z0-9_+][A-Za-z0-9._+-]*)*")
MAX_REVISION_LENGTH = 255
MAX_INDEX_BYTES = 4 << 20
MAX_NAME_LENGTH = 4096  # a name, folder or repo id given to resolve_adaptor; each path part at most 255
MAX_PATH_PART = 255


def check_revision(revision) -> str:
    """Raise ``ValueError`` unless ``revision`` is a commit sha, a branch or a tag name (never a path)."""
    if (not isinstance(revision, str) or len(revision) > MAX_REVISION_LENGTH or not _REVISION.fullmatch(revision)
            or ".." in revision or revision.endswith((".", ".lock"))):
        shown = repr(revision) if len(str(revision)) <= 80 else repr(str(revision)[:77] + "...")
        raise ValueError(
            f"revision {shown} is not a commit sha, a branch or a tag name (names of letters, digits, '.', '_', '-' "
            f"and '+' joined by '/', no '..', at most {MAX_REVISION_LENGTH} characters); a revision is never a path"
        )
    return revision


def _check_name_length(text: str) -> None:
    """Refuse names the filesystem would refuse with ``OSError`` (too long as a path)."""
    parts = re.split(r"[/\\]", text)
    if len(text) > MAX_NAME_LENGTH or any(len(part) > MAX_PATH_PART for part in parts):
        raise ValueError(
            f"{text[:60]!r}... is too long for an adaptor name, folder or Hub repo id ({len(text)} characters, "
            f"{max(map(len, parts))} in one path part; at most {MAX_NAME_LENGTH} and {MAX_PATH_PART})"
        )
RELEASE_FIELDS = ("documentation", "archive", "file")
CONVERT_COMMAND = "diffusers-fair convert"

logger = logging.getLogger(__name__)


class AdaptorDownloadError(ValueError):
    """A fair adaptor could not be fetched from the Hub (the message says why and what to do)."""


def _cause(error: BaseException) -> str:
    """``Type: first line of the message``: a failure's cause on one line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


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
        release: where the weights this adaptor is converted from were released:
            ``{"documentation": url, "archive": zip file name, "file": path inside the archive}``.
        convert: the ``diffusers-fair convert`` command that writes this adaptor from that file.
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
    release: dict | None = None
    convert: str | None = None

    @property
    def convert_destination(self) -> str | None:
        """The folder the ``convert`` command writes (its second argument)."""
        return shlex.split(self.convert)[3] if self.convert else None

    def folder(self, index_dir: Path) -> Path:
        """The folder of a local entry (``index_dir``: the folder holding the index file)."""
        if self.status != "local":
            raise ValueError(f"index entry {self.name!r} is {self.status}, not local")
        return index_dir / self.path


def _entry_from_dict(name: str, data: dict, source: Path) -> IndexEntry:
    where = f"{source}: entry {name!r}"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object")
    known = {"status", "description", "base_model", "kind", "targets", "repo_id", "revision", "path", "files",
             "metrics", "release", "convert"}
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
    release, convert = data.get("release"), data.get("convert")
    if release is not None and (not isinstance(release, dict) or sorted(release) != sorted(RELEASE_FIELDS)
                                or not all(isinstance(release[k], str) and release[k] for k in RELEASE_FIELDS)):
        raise ValueError(f"{where}: 'release' must give the strings {list(RELEASE_FIELDS)}")
    if convert is not None:
        try:
            words = shlex.split(convert) if isinstance(convert, str) else []
        except ValueError:
            words = []
        if words[:2] != CONVERT_COMMAND.split() or len(words) < 4:
            raise ValueError(f"{where}: 'convert' must be a command '{CONVERT_COMMAND} SRC DST ...'")
        if release is None or Path(words[2]).name != Path(release["file"]).name:
            raise ValueError(f"{where}: 'convert' must convert the released file its 'release' names")
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
        release=dict(release) if release is not None else None,
        convert=convert,
    )


def load_index(path: str | Path | None = None) -> dict[str, IndexEntry]:
    """Read and validate the adaptor index (default: the one shipped with the package)."""
    path = Path(path) if path is not None else INDEX_PATH
    missing = f"the adaptor index {path} is missing (a broken installation?)"
    data = read_json(path, "the adaptor index", missing=missing, max_bytes=MAX_INDEX_BYTES)
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
    _check_name_length(text)
    index_dir = Path(index_path if index_path is not None else INDEX_PATH).parent
    if isinstance(name_or_path, str) and "/" not in text and "\\" not in text:
        index = load_index(index_path)
        if text in index:
            entry = index[text]
            if entry.status == "unpublished":
                raise ValueError(_unpublished_message(entry))
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
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as error:  # no permission on a folder above it
        raise ValueError(f"{text} cannot be read: {error.strerror or error}") from None
    if is_dir:
        if revision is not None:
            raise ValueError(f"{text} is a local folder; revision= applies to Hub adaptors only")
        return read_fair_adaptor(path)
    if is_file:
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


def _unpublished_message(entry: IndexEntry) -> str:
    """Why an unpublished name does not load, and how to get its weights today (one line)."""
    text = (f"the adaptor {entry.name!r} ({entry.description}) is not published yet on the Hub "
            f"(announced as {entry.repo_id})")
    if entry.release is None:
        return f"{text}. Train your own with diffusers-fair, or load a local folder or Hub repo"
    release = entry.release
    return (
        f"{text}. The paper's authors released its weights in {release['archive']} (documented at "
        f"{release['documentation']}): unzip it, run `{entry.convert}` where it was unzipped, then load the folder "
        f'it writes: pipe.load_fair_adaptor("{entry.convert_destination}")'
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

    if revision is not None:
        check_revision(revision)  # offline, huggingface_hub would look a path up as a snapshot folder
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
            f"or HF_ENDPOINT ({_cause(cause or error)})"
        ) from None
    except HfHubHTTPError as error:
        raise AdaptorDownloadError(f"downloading {where} from {endpoint} failed: {_cause(error)}") from None

    folder = Path(folder)
    source = f"{repo_id}@{folder.name}"  # snapshot folders are named by their commit sha
    if not (folder / METADATA_NAME).is_file():
        raise AdaptorDownloadError(
            f"{source} has no {METADATA_NAME}, so it is not a fair adaptor (a plain LoRA repo loads with "
            f"pipe.load_lora_weights)"
        )
    try:
        # The cache keeps a snapshot's files as links into the repo's blobs/; links elsewhere are refused.
        return read_fair_adaptor(folder, source=source, links_within=folder.parent.parent)
    except ValueError as error:
        raise AdaptorDownloadError(str(error)) from None


def pull_adaptor(
    name_or_repo: str,
    folder: str | Path | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
) -> FairAdaptor:
    """Fetch an adaptor (an index name or a Hub repo id) and, with ``folder``, copy its files there.

    Without ``folder`` the adaptor stays where :func:`resolve_adaptor` found it (the Hugging Face
    cache, or the package for the toy adaptors). The copy holds ``fair_adaptor.json``, the weight
    files and the model card, and is verified again. Returns the adaptor read from where it lies.

    Raises:
        ValueError: the name is unknown or unpublished, the download failed (:class:`AdaptorDownloadError`,
            naming the cause), or ``folder`` already holds an adaptor and ``overwrite`` is not set.
    """
    adaptor = resolve_adaptor(name_or_repo, revision=revision, token=token)
    if folder is None:
        return adaptor
    folder = Path(folder)
    if (folder / METADATA_NAME).exists() and not overwrite:
        raise ValueError(f"{folder} already holds an adaptor; pass overwrite=True (--overwrite) to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    for name in [*adaptor.metadata.files, CARD_NAME, METADATA_NAME]:  # the metadata last: a complete copy
        source = adaptor.folder / name
        if source.is_file():
            # Each file is renamed into place: a link already there is replaced, never written through.
            replace_atomically(folder / name, lambda path, source=source: shutil.copyfile(source, path))
    return read_fair_adaptor(folder, source=f"{adaptor.source} (copied to {folder})")


# --------------------------------------------------------------------------- uploads
def push_adaptor(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    license: str | None = None,
    api=None,
) -> str:
    """Upload an adaptor folder to the Hub in one commit; returns the commit sha.

    The folder is verified first (``fair_adaptor.json``, sha256 of the weights, ``README.md``).
    The repo is created if needed (``private`` applies only then); ``revision`` names a branch,
    created from ``main`` when missing. Only the adaptor's own files are uploaded. The model card
    goes up with the repo id in its usage snippet, and ``license`` (a Hub license id), when given,
    in the card's header and in the uploaded ``fair_adaptor.json``; the folder itself is left as
    it is. The push is recorded in ``hub_pushes.json`` beside the files (repo, branch, commit),
    which is not uploaded. Load the exact upload again with
    ``load_fair_adaptor(pipe, repo_id, revision=<sha>)``.

    ``api`` is an ``HfApi`` (default: a new one with ``token``).

    Raises:
        ValueError: the folder is not a complete adaptor, the repo id or branch is malformed, or
            the Hub cannot be reached or refuses (the message names the cause: offline mode, no
            network, not logged in, ...).
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HTTPError

    adaptor = read_fair_adaptor(folder)
    folder = Path(folder)
    if (folder / CARD_NAME).is_symlink():
        raise ValueError(f"{folder}: {CARD_NAME} is a symbolic link; an adaptor's files must be regular files in "
                         f"its folder")
    if not (folder / CARD_NAME).is_file():
        raise ValueError(f"{folder} has no {CARD_NAME} model card; save the adaptor with save_fair_adaptor")
    if not isinstance(repo_id, str) or not looks_like_repo_id(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repo id 'owner/name'")
    if revision is not None and (not revision or _COMMIT_SHA.match(revision)):
        raise ValueError(f"revision must name a branch to push to, got {revision!r}")
    if revision is not None:
        check_revision(revision)
    record_path = folder / PUSH_RECORD_NAME
    _read_push_records(record_path)  # a corrupt record is refused now, not after the push
    if license is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        raise ValueError(f"license must be a Hub license id such as 'creativeml-openrail-m', got {license!r}")
    api = api if api is not None else HfApi(token=token)

    metadata = replace(adaptor.metadata, license=license) if license else adaptor.metadata
    card = card_for_repo((folder / CARD_NAME).read_text(encoding="utf-8"), repo_id, license=license)
    operations = [
        CommitOperationAdd(path_in_repo=METADATA_NAME, path_or_fileobj=metadata.to_json().encode("utf-8")),
        CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode("utf-8")),
        *(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
          for name in sorted(metadata.files)),
    ]
    files = [operation.path_in_repo for operation in operations]
    try:
        api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload fair adaptor {adaptor.metadata.name}",
            token=token,
            repo_type="model",
            revision=revision,
        )
    except (OSError, HTTPError) as error:  # huggingface_hub's errors, offline mode and network failures
        raise ValueError(
            f"pushing {folder} to {repo_id} on {api.endpoint} failed: {_cause(error)}{_push_hint(error)}"
        ) from None
    commit = info.oid
    try:
        records = _read_push_records(record_path)
    except ValueError as error:  # spoilt while pushing: keep it aside, never lose the new commit
        corrupt = record_path.with_name(f"{PUSH_RECORD_NAME}.corrupt")
        os.replace(record_path, corrupt)
        logger.warning("%s; it was moved to %s and a new record started", error, corrupt)
        records = []
    records.append({"repo_id": repo_id, "revision": revision or "main", "commit": commit, "endpoint": api.endpoint, "files": files})
    text = json.dumps(records, indent=2) + "\n"
    replace_atomically(record_path, lambda path: path.write_text(text, encoding="utf-8"))
    return commit


def _read_push_records(path: Path) -> list:
    """The pushes recorded in ``hub_pushes.json`` (``[]`` without the file); ``ValueError`` if it is not a list
    of objects."""
    if not path.exists() and not path.is_symlink():
        return []
    fix = "move it away or delete it (it only records earlier pushes), then push again"
    if path.is_symlink():
        raise ValueError(f"the push record {path} is a symbolic link; {fix}")
    try:
        records = read_json(path, "the push record", max_bytes=16 << 20)
    except ValueError as error:
        raise ValueError(f"{error}; {fix}") from None
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise ValueError(f"the push record {path} must hold a JSON list of pushes; {fix}")
    return records


def _push_hint(error: BaseException) -> str:
    """What to do about a failed push, when the error says."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):  # its message says what to do
        return ""
    if not isinstance(error, HfHubHTTPError):  # no answer from the Hub at all
        return " (check the network or HF_ENDPOINT)"
    if getattr(error.response, "status_code", None) in (401, 403):
        return " (log in with `hf auth login` or pass a token with write access)"
    return ""
