"""Where fair adaptors come from and go to: the adaptor index, the Hugging Face Hub, model cards.

*The index* (``diffusers_fair/adaptors_index/index.json``, shipped inside the package) gives
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

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .adaptors import (
    CARD_NAME,
    KINDS,
    LORA_WEIGHT_NAME,
    METADATA_NAME,
    SOFT_TOKENS_NAME,
    TOY_BASE_MODEL,
    FairAdaptor,
    FairAdaptorMetadata,
    canonical_base_model,
    looks_like_repo_id,
    read_fair_adaptor,
)
from .jsonfile import read_json

INDEX_DIR = Path(__file__).parent / "adaptors_index"
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
    from .targets import TargetDistribution

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


# --------------------------------------------------------------------------- model cards
ATTRIBUTE_NOTES = {
    "gender": "binary perceived gender (male / female) as predicted from the face by a classifier; it "
    "does not represent non-binary or self-identified gender.",
    "race": "four perceived race groups (WMELH = White, Middle Eastern, Latino Hispanic; Asian = East and "
    "Southeast Asian; Black; Indian) as predicted from the face by a classifier trained on FairFace; the "
    "grouping is coarse and perceived race is not identity.",
    "age": "perceived age, young or old, as predicted from the face by a classifier.",
    "hair_length": "toy world: short / long hair, the stand-in for binary gender.",
    "skin_tone": "toy world: pale / tan / brown / deep skin, the stand-in for four race groups.",
    "hair_colour": "toy world: dark / grey hair, the stand-in for young / old.",
}


METHOD = (
    "Made with diffusers-fair (distributional alignment loss and adjusted direct finetuning, "
    "Shen et al., *Finetuning Text-to-Image Diffusion Models for Fairness*, ICLR 2024)."
)
INTENDED_USE = (
    "Generating images of people from prompts that do not specify the protected attributes (occupations, "
    "activities, descriptors), so that the attributes follow the target distribution instead of the base "
    "model's learned skew. Research on fairness of generative models."
)
OUT_OF_SCOPE = (
    "Inferring or labelling anyone's gender, race or age; prompts that name an attribute explicitly (the "
    "adaptor may override them); any use presenting generated people as real; guarantees of fairness on "
    "prompts, styles or attributes unlike those evaluated below."
)
CLASSIFIER_LIMITS = (
    "The attributes are perceived from generated faces by classifiers that have biases of their own; "
    "the metrics inherit them. Images without a detected face are not counted."
)
BIAS_DEFINITION = (
    "Bias is the paper's bias(P): the mean absolute difference between the frequencies of each pair of "
    "classes, averaged over prompts (0 when a uniform target is reached)."
)
CITATION = """```bibtex
@inproceedings{shen2024finetuning,
  title={Finetuning Text-to-Image Diffusion Models for Fairness},
  author={Shen, Xudong and Du, Chao and Pang, Tianyu and Lin, Min and Wong, Yongkang and Kankanhalli, Mohan},
  booktitle={International Conference on Learning Representations},
  year={2024}
}
```"""


def _card_body(meta: FairAdaptorMetadata) -> str:
    """The markdown of the card, section by section as MODEL_CARD.md describes."""
    where = "<this repo id or folder>"
    if meta.base_model == TOY_BASE_MODEL:  # shipped inside the package, not on the Hub
        imports, base = ["from diffusers_fair.toy import model_path"], "model_path()"
    else:
        imports, base = [], f'"{meta.base_model}"'
    usage = [
        "```python",
        "from diffusers_fair.pipeline import FairFinetunePipeline",
        *imports,
        "",
        f"pipe = FairFinetunePipeline.from_pretrained({base})",
        f'pipe.load_fair_adaptor("{where}")',
        'image = pipe("a photo of the face of a doctor").images[0]',
        "```",
    ]
    if meta.kind == "lora":
        usage += ["", f'With diffusers alone: `pipe.load_lora_weights("{where}")`.']
    if meta.soft_token:
        usage += ["", (f'With diffusers alone: `pipe.load_textual_inversion("{where}")`, and start every prompt '
                       f"(not the negative prompt) with `{meta.soft_token}`.")]

    attributes = sorted({attr for t in meta.targets for attr in t["classes"]})
    default_note = "as defined by the attribute classifier used in training."
    training = [f"- {key}: `{json.dumps(value)}`" for key, value in sorted(meta.training.items())]
    for component, info in sorted(meta.lora.items()):
        training.append(f"- LoRA on the {component}: rank {info['rank']}, alpha {info['alpha']:g}, modules {info['target_modules']}")
    if meta.soft_token:
        training.append(f"- {len(meta.token_names)} soft tokens `{meta.soft_token}` prepended to the prompt")

    names = sorted(set(meta.metrics_before) | set(meta.metrics_after))
    if names:
        evaluation = [f"Measured on: {meta.eval_prompts or '(not recorded)'}. {BIAS_DEFINITION}", "",
                      "| metric | base model | with adaptor |", "|---|---|---|"]
        for name in names:
            cells = [meta.metrics_before.get(name), meta.metrics_after.get(name)]
            before, after = ("-" if value is None else f"{value:.3f}" for value in cells)
            evaluation.append(f"| {name} | {before} | {after} |")
        evaluation += ["", "Reproduce with `diffusers-fair eval` on the same prompts and seeds."]
    else:
        evaluation = ["Not measured yet."]

    sections = [
        (f"# {meta.name}: a fair adaptor for {meta.base_model}",
         [meta.description or "An adaptor that steers the protected attributes of generated people toward a target distribution.",
          "", METHOD]),
        ("## How to use", usage),
        ("## Targets", [f"- `{t['text']}`" for t in meta.targets] or ["- (not recorded)"]),
        ("## Intended use", [INTENDED_USE]),
        ("## Out-of-scope use", [OUT_OF_SCOPE]),
        ("## Attributes and their limits",
         [f"- **{attr}**: {ATTRIBUTE_NOTES.get(attr, default_note)}" for attr in attributes] + ["", CLASSIFIER_LIMITS]),
        ("## Training", training or ["- (not recorded)"]),
        ("## Evaluation", evaluation),
        ("## Files", [f"- `{name}`: sha256 `{digest}`" for name, digest in sorted(meta.files.items())]
         + [f"- `{METADATA_NAME}`: metadata (targets, shapes, training summary, metrics)"]),
        ("## Citation", [CITATION]),
    ]
    return "\n\n".join(title + "\n\n" + "\n".join(body) for title, body in sections) + "\n"


def build_model_card(meta: FairAdaptorMetadata):
    """The ``README.md`` model card of an adaptor (a huggingface_hub ``ModelCard``).

    The YAML header holds ``base_model``, ``library_name: diffusers``, tags and one
    ``eval_results`` entry per metric measured with the adaptor.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    eval_results = [
        EvalResult(
            task_type="text-to-image",
            dataset_type="prompts",
            dataset_name=meta.eval_prompts or "evaluation prompts",
            metric_type=name,
            metric_name=name,
            metric_value=float(value),
        )
        for name, value in sorted(meta.metrics_after.items())
    ]
    attributes = sorted({attr for t in meta.targets for attr in t["classes"]})
    data = ModelCardData(
        base_model=meta.base_model,
        library_name="diffusers",
        license=meta.license or None,
        pipeline_tag="text-to-image",
        tags=["diffusers", "diffusers-fair", "fairness", "text-to-image", "stable-diffusion", meta.kind.replace("+", "-"), *attributes],
        model_name=meta.name,
        eval_results=eval_results or None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_card_body(meta)}")


# --------------------------------------------------------------------------- command line
PUSH_HELP = "upload a fair adaptor folder to the Hugging Face Hub"


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="the adaptor folder (written by training or `diffusers-fair convert`)")
    parser.add_argument("repo_id", help="Hub repo id, owner/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    parser.add_argument("--message", default=None, help="commit message")


def run_push(args: argparse.Namespace) -> int:
    commit = push_adaptor(
        args.folder, args.repo_id, private=args.private, revision=args.revision, token=args.token, commit_message=args.message
    )
    print(f"pushed {args.folder} to {args.repo_id} at commit {commit}")
    print(f'load it with: load_fair_adaptor(pipe, "{args.repo_id}", revision="{commit}")')
    return 0


def register_cli(register) -> None:
    """Add ``push`` to the command line: ``register_cli(cli.register)``."""
    register("push", run_push, help=PUSH_HELP, add_arguments=add_push_arguments)
