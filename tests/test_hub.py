"""The Hub: uploads at the huggingface_hub API boundary, downloads end to end against a local server.

Uploads: ``push_adaptor`` is given a fake ``HfApi`` that records the operations; the test checks
them (and that the real ``HfApi`` methods accept exactly those arguments). Offline and unreachable
Hubs are tried with the real ``HfApi``: ``push`` and ``pull`` then fail with one line naming the cause.

Downloads: an ``olah`` server (a Hub mirror that serves local git repositories as model repos,
offline) runs on 127.0.0.1 for the module. ``HF_ENDPOINT`` is pointed at it; because
huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` when it is imported, the test also
sets the constants derived from them (``huggingface_hub.constants``), which is what the variables
do in a fresh process. Downloads then go through the real ``snapshot_download`` and HTTP.
"""

import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from diffusers_fair.adaptors import hub
from diffusers_fair.adaptors.metadata import (
    LORA_WEIGHT_NAME,
    METADATA_NAME,
    TOY_BASE_MODEL,
)
from diffusers_fair.adaptors.model_card import PLACEHOLDER
from diffusers_fair.adaptors.pipeline import load_fair_adaptor
from helpers.adaptors import save_random_adaptor, text_states, tiny_pipeline


REPO = "fair-test/toy-gender"


@pytest.fixture(scope="module")
def shapes():
    return tiny_pipeline(0)


@pytest.fixture(scope="module")
def adaptor_dirs(tmp_path_factory, shapes):
    root = tmp_path_factory.mktemp("adaptors")
    save_random_adaptor(root / "first", shapes, seed=1, name="toy-gender")
    save_random_adaptor(root / "second", shapes, seed=2, name="toy-gender")
    return root


# --------------------------------------------------------------------------- uploads
class FakeApi:
    """Records the HfApi calls push_adaptor makes."""

    endpoint = "https://hub.example"

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", {"repo_id": repo_id, "operations": list(operations), **kwargs}))
        return SimpleNamespace(oid="c0ffee" + "0" * 34)


def uploaded_files(operations) -> dict:
    """path in the repo -> uploaded bytes, from CommitOperationAdd operations."""
    files = {}
    for operation in operations:
        source = operation.path_or_fileobj
        files[operation.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
    return files


def test_push_creates_repo_and_uploads_only_the_adaptor_files(adaptor_dirs, tmp_path):
    folder = tmp_path / "adaptor"
    shutil.copytree(adaptor_dirs / "first", folder)
    (folder / "notes.txt").write_text("not part of the adaptor")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    api = FakeApi()
    commit = hub.push_adaptor(folder, REPO, private=True, revision="v1", token="secret", api=api)
    assert commit == "c0ffee" + "0" * 34
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "create_commit"]
    create, branch, upload = (kwargs for _, kwargs in api.calls)
    assert create == {"repo_id": REPO, "token": "secret", "private": True, "repo_type": "model", "exist_ok": True}
    assert branch == {"repo_id": REPO, "branch": "v1", "token": "secret", "repo_type": "model", "exist_ok": True}
    assert upload["repo_id"] == REPO and upload["revision"] == "v1" and upload["repo_type"] == "model"
    assert upload["commit_message"] == "Upload fair adaptor toy-gender"
    files = uploaded_files(upload["operations"])
    assert set(files) == {"fair_adaptor.json", "README.md", "pytorch_lora_weights.safetensors"}
    assert files["fair_adaptor.json"] == before["fair_adaptor.json"]
    assert files["pytorch_lora_weights.safetensors"] == before["pytorch_lora_weights.safetensors"]
    # The card on the Hub names the repo in its usage snippet; the local folder is left as it was.
    card = files["README.md"].decode()
    assert PLACEHOLDER not in card and f'pipe.load_fair_adaptor("{REPO}")' in card
    assert card.replace(REPO, PLACEHOLDER) == before["README.md"].decode()
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.name != hub.PUSH_RECORD_NAME} == before

    record = json.loads((folder / hub.PUSH_RECORD_NAME).read_text())
    assert record == [{"repo_id": REPO, "revision": "v1", "commit": commit, "endpoint": FakeApi.endpoint,
                       "files": ["fair_adaptor.json", "README.md", "pytorch_lora_weights.safetensors"]}]
    # The calls fit the real HfApi's signatures.
    real = huggingface_hub.HfApi
    for name, kwargs in api.calls:
        inspect.signature(getattr(real, name)).bind(None, **kwargs)

    api = FakeApi()
    hub.push_adaptor(folder, REPO, api=api)  # main: no branch to create
    assert [name for name, _ in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[0][1]["private"] is False and api.calls[1][1]["revision"] is None
    assert len(json.loads((folder / hub.PUSH_RECORD_NAME).read_text())) == 2


def test_push_license_goes_into_the_uploaded_card_and_metadata(adaptor_dirs, tmp_path):
    folder = tmp_path / "adaptor"
    shutil.copytree(adaptor_dirs / "first", folder)
    api = FakeApi()
    hub.push_adaptor(folder, REPO, license="apache-2.0", api=api)
    files = uploaded_files(api.calls[-1][1]["operations"])
    assert json.loads(files["fair_adaptor.json"])["license"] == "apache-2.0"
    (tmp_path / "card.md").write_bytes(files["README.md"])
    card = huggingface_hub.ModelCard.load(tmp_path / "card.md")
    assert card.data.license == "apache-2.0"
    assert [r.metric_type for r in card.data.eval_results] == ["bias_gender"]  # the rest of the header is kept
    assert json.loads((folder / "fair_adaptor.json").read_text())["license"] == ""  # the folder is unchanged
    with pytest.raises(ValueError, match="Hub license id"):
        hub.push_adaptor(folder, REPO, license="Apache 2.0", api=FakeApi())


def test_push_refuses_before_any_call(adaptor_dirs, tmp_path):
    folder = tmp_path / "adaptor"
    shutil.copytree(adaptor_dirs / "first", folder)
    api = FakeApi()
    with pytest.raises(ValueError, match="not a Hub repo id"):
        hub.push_adaptor(folder, "no-owner", api=api)
    with pytest.raises(ValueError, match="branch"):
        hub.push_adaptor(folder, REPO, revision="a" * 40, api=api)
    (folder / "README.md").unlink()
    with pytest.raises(ValueError, match="model card"):
        hub.push_adaptor(folder, REPO, api=api)
    (folder / LORA_WEIGHT_NAME).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        hub.push_adaptor(folder, REPO, api=api)
    assert api.calls == []


def test_push_command_line(adaptor_dirs, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "adaptor"
    shutil.copytree(adaptor_dirs / "first", folder)
    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    from diffusers_fair.cli import main

    assert main(["push", str(folder), REPO, "--private", "--message", "first release", "--license", "mit"]) == 0
    assert api.calls[0][1]["private"] is True and api.calls[-1][1]["commit_message"] == "first release"
    assert json.loads(uploaded_files(api.calls[-1][1]["operations"])["fair_adaptor.json"])["license"] == "mit"
    assert f'pipe.load_fair_adaptor("{REPO}", revision="c0ffee' in capsys.readouterr().out


def _one_line_error(capsys, argv) -> str:
    from diffusers_fair.cli import main

    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_push_and_pull_offline_fail_with_one_line_naming_the_cause(adaptor_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = str(adaptor_dirs / "first")
    line = _one_line_error(capsys, ["push", folder, REPO])
    assert line.startswith(f"diffusers-fair push: error: pushing {folder} to {REPO}")
    assert "OfflineModeIsEnabled" in line
    line = _one_line_error(capsys, ["pull", "fair-test/never-downloaded"])
    assert "HF_HUB_OFFLINE" in line and "fair-test/never-downloaded" in line

    # Online, with nothing listening at the endpoint: the connection error is the cause.
    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    line = _one_line_error(capsys, ["push", folder, REPO])
    assert f"on {dead} failed: ConnectError" in line and "check the network or HF_ENDPOINT" in line
    line = _one_line_error(capsys, ["pull", REPO])
    assert f"could not reach {dead}" in line and "ConnectError" in line


def test_pull_of_names_from_the_index(tmp_path, capsys):
    from diffusers_fair.cli import main

    assert main(["pull", "toy-gender-race", "--to", str(tmp_path / "copy")]) == 0
    assert 'pipe.load_fair_adaptor("' + str(tmp_path / "copy") + '")' in capsys.readouterr().out
    shipped = hub.load_index()["toy-gender-race"].folder(hub.INDEX_DIR)
    for name in ("fair_adaptor.json", "pytorch_lora_weights.safetensors", "README.md"):
        assert (tmp_path / "copy" / name).read_bytes() == (shipped / name).read_bytes()
    with pytest.raises(ValueError, match="already holds an adaptor"):
        hub.pull_adaptor("toy-gender-race", tmp_path / "copy")
    line = _one_line_error(capsys, ["pull", "gender-race"])
    assert "not published yet" in line and hub.load_index()["gender-race"].convert in line


# --------------------------------------------------------------------------- a local Hub server
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


class LocalHub:
    """Model repos as git repositories under ``mirrors/models/<owner>/<name>``, served by olah."""

    def __init__(self, root: Path, url: str):
        self.mirrors, self.url = root / "mirrors", url

    def commit(self, repo_id: str, files: dict, message: str = "update") -> str:
        """Replace the repo's files with ``files`` (name -> source path or bytes); return the commit sha."""
        repo = self.mirrors / "models" / repo_id
        if not repo.exists():
            repo.mkdir(parents=True)
            _git(repo, "init", "-q", "-b", "main")
        for old in repo.iterdir():
            if old.name != ".git":
                old.unlink()
        for name, content in files.items():
            (repo / name).write_bytes(content if isinstance(content, bytes) else Path(content).read_bytes())
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "--allow-empty", "-m", message)
        return _git(repo, "rev-parse", "HEAD")


def _folder_files(folder: Path) -> dict:
    return {path.name: path for path in folder.iterdir() if path.is_file()}


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    pytest.importorskip("olah", reason="olah (pip install olah) serves the local Hub for these tests")
    if shutil.which("git") is None:
        pytest.skip("git is needed to build the served repositories")
    root = tmp_path_factory.mktemp("hub")
    port = _free_port()
    (root / "mirrors" / "models").mkdir(parents=True)
    config = root / "olah.toml"
    config.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\nrepos-path = "{root / "repos"}"\n'
        f'mirrors-path = ["{root / "mirrors"}"]\nmetadata-cache-ttl = 0\n'
        "[accessibility]\noffline = true\n"
    )
    with open(root / "olah.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "olah.server", "--config", str(config)],
            cwd=root, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/models/none/none/revision/main", timeout=5)
            break
        except urllib.error.HTTPError:
            break  # the server answers
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"olah did not start: {(root / 'olah.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield LocalHub(root, url)
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture
def hub_env(local_hub, monkeypatch, tmp_path):
    """HF_ENDPOINT -> the local server, online, with an empty cache."""
    url = local_hub.url
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    return local_hub


@pytest.fixture
def published(hub_env, adaptor_dirs):
    """REPO with the first adaptor at commit ``first`` and the second on top (``main``)."""
    repo = f"fair-test/toy-{time.monotonic_ns()}"
    first = hub_env.commit(repo, _folder_files(adaptor_dirs / "first"), "first")
    second = hub_env.commit(repo, _folder_files(adaptor_dirs / "second"), "second")
    return SimpleNamespace(repo=repo, first=first, second=second, hub=hub_env)


# --------------------------------------------------------------------------- downloads
def test_download_pins_revisions_and_verifies_hashes(published, adaptor_dirs):
    first = hub.download_adaptor(published.repo, revision=published.first)
    latest = hub.download_adaptor(published.repo)
    assert first.folder.name == published.first and first.source == f"{published.repo}@{published.first}"
    assert latest.folder.name == published.second
    assert Path(constants.HF_HUB_CACHE) in first.folder.parents  # the normal cache
    for adaptor, name in ((first, "first"), (latest, "second")):
        expected = json.loads((adaptor_dirs / name / METADATA_NAME).read_text())["files"]
        assert adaptor.metadata.files == expected
        assert (adaptor.folder / LORA_WEIGHT_NAME).read_bytes() == (adaptor_dirs / name / LORA_WEIGHT_NAME).read_bytes()

    # Offline, a pinned revision comes from the cache; anything else says what to do.
    constants.HF_HUB_OFFLINE = True
    assert hub.download_adaptor(published.repo, revision=published.first).folder == first.folder
    with pytest.raises(hub.AdaptorDownloadError, match="HF_HUB_OFFLINE"):
        hub.download_adaptor("fair-test/never-downloaded")


def test_pull_copies_a_hub_adaptor_into_a_folder(published, adaptor_dirs, tmp_path):
    adaptor = hub.pull_adaptor(published.repo, tmp_path / "copy", revision=published.first)
    assert adaptor.folder == tmp_path / "copy" and published.first in adaptor.source
    for name in ("fair_adaptor.json", LORA_WEIGHT_NAME):
        assert (tmp_path / "copy" / name).read_bytes() == (adaptor_dirs / "first" / name).read_bytes()


def test_load_fair_adaptor_from_the_hub_equals_local_folder(published, adaptor_dirs):
    from_hub, from_disk = tiny_pipeline(0), tiny_pipeline(0)
    record = load_fair_adaptor(from_hub, published.repo, revision=published.first)
    load_fair_adaptor(from_disk, adaptor_dirs / "first")
    assert record.source == f"{published.repo}@{published.first}"
    assert torch.equal(text_states(from_hub), text_states(from_disk))


def test_published_index_entry_downloads_its_pinned_commit(published, tmp_path, monkeypatch):
    entry = {
        "status": "published", "description": "test", "base_model": TOY_BASE_MODEL, "kind": "lora",
        "targets": ["gender: male, female"], "repo_id": published.repo, "revision": published.first,
    }
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"format_version": 1, "adaptors": {"toy-hub": entry}}))
    monkeypatch.setattr(hub, "INDEX_PATH", index)
    adaptor = hub.resolve_adaptor("toy-hub")
    assert adaptor.folder.name == published.first  # the pinned commit, not main


def test_download_errors_name_the_repo_and_the_fix(published, adaptor_dirs, tmp_path, monkeypatch):
    local = published.hub
    with pytest.raises(hub.AdaptorDownloadError, match="fair-test/missing@main was not found .*check the repo id"):
        hub.download_adaptor("fair-test/missing")
    with pytest.raises(hub.AdaptorDownloadError, match=f"{published.repo}@v9"):
        hub.download_adaptor(published.repo, revision="v9")
    with pytest.raises(hub.AdaptorDownloadError, match="revision"):
        hub.download_adaptor(published.repo, revision="0" * 40)

    plain = "fair-test/plain-lora"
    local.commit(plain, {LORA_WEIGHT_NAME: adaptor_dirs / "first" / LORA_WEIGHT_NAME})
    with pytest.raises(hub.AdaptorDownloadError, match="not a fair adaptor .*load_lora_weights"):
        hub.download_adaptor(plain)

    incomplete = "fair-test/incomplete"
    local.commit(incomplete, {METADATA_NAME: adaptor_dirs / "first" / METADATA_NAME})
    with pytest.raises(hub.AdaptorDownloadError, match=f"{incomplete}@.*{LORA_WEIGHT_NAME} is listed .* but missing"):
        hub.download_adaptor(incomplete)

    tampered = "fair-test/tampered"
    files = _folder_files(adaptor_dirs / "first")
    files[LORA_WEIGHT_NAME] = files[LORA_WEIGHT_NAME].read_bytes()[:-1] + b"\0"
    local.commit(tampered, files)
    with pytest.raises(hub.AdaptorDownloadError, match="sha256"):
        hub.download_adaptor(tampered)

    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(hub.AdaptorDownloadError, match=f"could not reach {dead} to download {published.repo}@main"):
        hub.download_adaptor(published.repo)
