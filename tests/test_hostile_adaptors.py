"""Hostile and careless adaptor input: every failure a clear ``ValueError``, every failed load fully undone.

Each test builds a valid adaptor with the package's own saver and then changes one thing in it the
way a careless or hostile author could (forged weights with matching sha256, forged metadata,
symlinks, huge or deeply nested values), then checks the error and that the pipeline is exactly as
it was: weights, ``requires_grad`` flags, adapters, vocabulary, prompt prefix and generated images.
"""

import dataclasses
import json
import os
import stat
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusers_fair.adaptors import format as adaptor_format
from diffusers_fair.adaptors import hub
from diffusers_fair.adaptors.format import read_fair_adaptor, save_fair_adaptor
from diffusers_fair.adaptors.metadata import (
    LORA_WEIGHT_NAME,
    METADATA_NAME,
    SOFT_TOKENS_NAME,
    FairAdaptorMetadata,
    sha256_file,
)
from diffusers_fair.adaptors.pipeline import (
    FairFinetunePipeline,
    add_fair_tokens,
    fair_adaptors,
    load_fair_adaptor,
    unload_fair_adaptor,
)
from helpers.adaptors import TE_TARGETS, generate, make_metadata, random_lora, save_random_adaptor, tiny_pipeline


# --------------------------------------------------------------------------- the pipeline's state, bit for bit
def snapshot(pipe) -> dict:
    """Everything a load or unload could change: weights (by name), requires_grad flags, peft adapters,
    vocabulary, the text encoder's vocab_size, the prompt prefix, the fair-adaptor list and an image."""
    state = {}
    for component in ("text_encoder", "unet"):
        model = getattr(pipe, component)
        state[f"{component} weights"] = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        state[f"{component} requires_grad"] = {name: p.requires_grad for name, p in model.named_parameters()}
        state[f"{component} adapters"] = sorted(getattr(model, "peft_config", None) or {})
    state["vocab"] = dict(pipe.tokenizer.get_vocab())
    state["vocab_size"] = pipe.text_encoder.config.vocab_size
    state["prefix"] = add_fair_tokens(pipe, "a photo")
    state["fair"] = {name: (a.weight, a.active, a.token_names) for name, a in fair_adaptors(pipe).items()}
    state["image"] = generate(pipe)
    return state


def assert_unchanged(before, after):
    assert before.keys() == after.keys()
    for key in before:
        if key.endswith("weights"):
            assert before[key].keys() == after[key].keys(), key
            changed = [name for name in before[key] if not torch.equal(before[key][name], after[key][name])]
            assert not changed, f"{key}: {changed[:5]}"
        elif key == "image":
            assert np.array_equal(before[key], after[key])
        else:
            assert before[key] == after[key], key


# --------------------------------------------------------------------------- forging adaptor files
def forge_lora(folder, change_state=None, change_header=None):
    """Rewrite the LoRA file with ``change_state(state)`` / ``change_header(config dict)`` and record its sha256."""
    path = Path(folder) / LORA_WEIGHT_NAME
    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
    state = load_file(str(path))
    if change_state is not None:
        state = change_state(state)
    if change_header is not None:
        config = json.loads(header["lora_adapter_metadata"])
        change_header(config)
        header["lora_adapter_metadata"] = json.dumps(config)
    save_file(state, str(path), metadata=header)
    forge_metadata(folder, lambda meta: meta["files"].__setitem__(LORA_WEIGHT_NAME, sha256_file(path)))


def forge_tokens(folder, state):
    path = Path(folder) / SOFT_TOKENS_NAME
    save_file(state, str(path))
    forge_metadata(folder, lambda meta: meta["files"].__setitem__(SOFT_TOKENS_NAME, sha256_file(path)))


def forge_metadata(folder, change):
    path = Path(folder) / METADATA_NAME
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def first_key(state, suffix):
    return sorted(key for key in state if key.endswith(suffix))[0]


def _set(state, key, value):
    state[key] = value
    return state


def _lower_one_rank(state):
    """One layer's lora_A of rank 2 while its lora_B keeps rank 4."""
    key = first_key(state, "q_proj.lora_A.weight")
    return _set(state, key, state[key][:2])


def _drop(state, key):
    del state[key]
    return state


def save_lora(folder, shapes, seed, name, overwrite=False):
    """A text-encoder LoRA adaptor written with ``save_fair_adaptor`` itself (``overwrite`` passed on)."""
    state, config = random_lora(shapes.text_encoder, TE_TARGETS, seed)
    return save_fair_adaptor(folder, metadata=make_metadata(name), text_encoder_lora=state,
                             text_encoder_lora_config=config, overwrite=overwrite)


@pytest.fixture
def loaded(shapes, tmp_path):
    """A pipeline with a LoRA adaptor (text encoder and U-Net, weight 0.7) and a soft-token adaptor loaded."""
    pipe = tiny_pipeline(0, cls=FairFinetunePipeline)
    save_random_adaptor(tmp_path / "a", shapes, seed=1, unet=True, name="lora-a")
    save_random_adaptor(tmp_path / "soft", shapes, seed=2, text_encoder=False, soft_tokens=2, name="soft")
    load_fair_adaptor(pipe, tmp_path / "a", weight=0.7)
    load_fair_adaptor(pipe, tmp_path / "soft")
    return pipe


# --------------------------------------------------------------------------- loading is a transaction
@pytest.mark.parametrize("preloaded", [False, True])
@pytest.mark.parametrize("kind", ["lora", "soft_tokens", "lora+soft_tokens"])
def test_load_then_unload_gives_back_the_pipeline_bit_for_bit(kind, preloaded, shapes, tmp_path, loaded):
    pipe = loaded if preloaded else tiny_pipeline(0, cls=FairFinetunePipeline)
    before = snapshot(pipe)
    save_random_adaptor(tmp_path / "new", shapes, seed=5, text_encoder="lora" in kind, unet="lora" in kind,
                        soft_tokens=3 if "soft" in kind else 0, soft_token="<new>", name="new")
    load_fair_adaptor(pipe, tmp_path / "new")
    unload_fair_adaptor(pipe, "new")
    assert_unchanged(before, snapshot(pipe))
    if preloaded:  # unloading everything gives back the pipeline as it was before any adaptor
        unload_fair_adaptor(pipe)
        assert_unchanged(snapshot(tiny_pipeline(0, cls=FairFinetunePipeline)), snapshot(pipe))


def _bypass_weight_checks(monkeypatch):
    """Let forged weights reach diffusers, peft and transformers, to fail inside them."""
    monkeypatch.setattr(adaptor_format.FairAdaptor, "lora_state_dict",
                        lambda self: load_file(str(self.folder / LORA_WEIGHT_NAME)))


def _fail_after(monkeypatch, owner, name, calls, error):
    original = getattr(owner, name)
    count = {"n": 0}

    def failing(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


FAILURES = ["ranks disagree (transformers)", "header rank (diffusers)", "peft layer", "resize (OSError)",
            "fuse (KeyboardInterrupt)"]


@pytest.mark.parametrize("preloaded", [False, True])
@pytest.mark.parametrize("failure", FAILURES)
def test_a_failure_inside_the_libraries_is_undone_whatever_raised_it(failure, preloaded, shapes, tmp_path, loaded,
                                                                     monkeypatch):
    from peft.tuners.lora.layer import LoraLayer

    pipe = loaded if preloaded else tiny_pipeline(0, cls=FairFinetunePipeline)
    folder = tmp_path / "bad"
    save_random_adaptor(folder, shapes, seed=5, unet=True, soft_tokens=2, soft_token="<bad>", name="bad")
    good = tmp_path / "good"
    save_random_adaptor(good, shapes, seed=6, unet=True, soft_tokens=2, soft_token="<bad>", name="bad")
    before = snapshot(pipe)
    kwargs = {}
    if failure.startswith("ranks disagree"):
        _bypass_weight_checks(monkeypatch)
        forge_lora(folder, _lower_one_rank)
    elif failure.startswith("header rank"):
        _bypass_weight_checks(monkeypatch)
        forge_lora(folder, change_header=lambda config: config.__setitem__("unet.r", 8))
    elif failure == "peft layer":
        _fail_after(monkeypatch, LoraLayer, "update_layer", 3, RuntimeError("injected failure in peft"))
    elif failure.startswith("resize"):
        _fail_after(monkeypatch, type(pipe.text_encoder), "resize_token_embeddings", 0, OSError(28, "No space left"))
    else:
        _fail_after(monkeypatch, type(pipe), "fuse_lora", 0, KeyboardInterrupt())
        kwargs["fuse"] = True
    with pytest.raises((ValueError, RuntimeError, OSError, KeyboardInterrupt)) as error:
        load_fair_adaptor(pipe, folder, **kwargs)
    assert "above" not in str(error.value)  # no reference to a report the package silenced
    monkeypatch.undo()
    assert_unchanged(before, snapshot(pipe))
    load_fair_adaptor(pipe, good)  # nothing half-created blocks the next load of that name
    unload_fair_adaptor(pipe, "bad")
    assert_unchanged(before, snapshot(pipe))


@pytest.mark.parametrize("case", ["A and B ranks disagree", "header rank disagrees", "metadata rank disagrees"])
def test_rank_disagreements_are_refused_before_diffusers_with_a_message_of_their_own(case, shapes, tmp_path, loaded):
    folder = tmp_path / "bad"
    save_random_adaptor(folder, shapes, seed=5, unet=True, name="bad")
    if case == "A and B ranks disagree":
        forge_lora(folder, _lower_one_rank)
        message = "rank"
    elif case == "header rank disagrees":
        forge_lora(folder, change_header=lambda config: config.__setitem__("text_encoder.r", 8))
        message = "rank 4.* r=8|r=8.*rank 4"
    else:
        forge_metadata(folder, lambda meta: meta["lora"]["unet"].__setitem__("rank", 2))
        message = "rank"
    before = snapshot(loaded)
    with pytest.raises(ValueError, match=message) as error:
        load_fair_adaptor(loaded, folder)
    assert "above" not in str(error.value) and "\n" not in str(error.value)
    assert_unchanged(before, snapshot(loaded))


# --------------------------------------------------------------------------- metadata against kind and files
@pytest.mark.parametrize("forgery", [
    {"soft_token": "<fair>"},
    {"token_names": ["<fair>"]},
    {"soft_token": "<fair>", "token_names": ["<fair>", "<fair>_1"]},
    {"soft_token": "<nowhere>", "token_names": ["<nowhere>"]},
])
def test_a_lora_adaptor_cannot_claim_tokens_or_a_prompt_prefix(forgery, shapes, tmp_path, loaded):
    folder = tmp_path / "claims"
    save_random_adaptor(folder, shapes, seed=5, name="claims")
    forge_metadata(folder, lambda meta: meta.update(forgery))
    with pytest.raises(ValueError, match="lora adaptor has no soft tokens"):
        read_fair_adaptor(folder)
    before = snapshot(loaded)
    with pytest.raises(ValueError, match="lora adaptor has no soft tokens"):
        load_fair_adaptor(loaded, folder)
    assert_unchanged(before, snapshot(loaded))
    unload_fair_adaptor(loaded, "soft")  # nothing stuck: the other adaptors still unload
    assert list(fair_adaptors(loaded)) == ["lora-a"] and "<fair>" not in loaded.tokenizer.get_vocab()


@pytest.mark.parametrize("forgery, message", [
    ({"token_names": ["<fair>", "doctor"]}, "token_names must be"),
    ({"token_names": ["<fair>"]}, "holds '<fair>' x 2"),
    ({"token_names": []}, "token_names must be"),
    ({"soft_token": None}, "without their soft_token"),
    ({"soft_token": None, "token_names": []}, "needs its soft_token"),
    ({"soft_token": "<other>", "token_names": ["<other>", "<other>_1"]}, "holds '<fair>' x 2"),
])
def test_soft_token_names_must_be_exactly_the_tokens_of_the_file(forgery, message, shapes, tmp_path):
    folder = tmp_path / "soft"
    save_random_adaptor(folder, shapes, seed=5, text_encoder=False, soft_tokens=2, name="soft")
    forge_metadata(folder, lambda meta: meta.update(forgery))
    pipe = tiny_pipeline(0)
    before = snapshot(pipe)
    with pytest.raises(ValueError, match=message):
        load_fair_adaptor(pipe, folder)
    assert_unchanged(before, snapshot(pipe))


def test_unloading_never_removes_the_tokens_of_another_adaptor(shapes, tmp_path, loaded):
    # A record that names another adaptor's tokens (written by hand into the pipeline's record)
    # must not take them along when it is unloaded.
    from diffusers_fair.adaptors import pipeline as adaptor_pipeline

    records = getattr(loaded, adaptor_pipeline._REGISTRY)
    records["lora-a"] = dataclasses.replace(records["lora-a"], token_names=("<fair>", "<fair>_1"))
    unload_fair_adaptor(loaded, "lora-a")
    assert {"<fair>", "<fair>_1"} <= set(loaded.tokenizer.get_vocab())
    assert fair_adaptors(loaded)["soft"].soft_token == "<fair>"


# --------------------------------------------------------------------------- soft-token names that are words
@pytest.mark.parametrize("name", ["doctor", "Doctor", "DOCTOR", "photo</w>", "a", "<|endoftext|>"])
def test_soft_token_names_cannot_be_vocabulary_entries_in_any_form(name, shapes, tmp_path):
    folder = tmp_path / "word"
    save_random_adaptor(folder, shapes, seed=5, text_encoder=False, soft_tokens=1, soft_token=name, name="word")
    pipe = tiny_pipeline(0, cls=FairFinetunePipeline)
    before = snapshot(pipe)
    with pytest.raises(ValueError, match="already in the tokenizer"):
        load_fair_adaptor(pipe, folder)
    assert_unchanged(before, snapshot(pipe))


def test_a_soft_token_differing_from_a_loaded_one_only_in_case_is_refused(shapes, tmp_path, loaded):
    folder = tmp_path / "upper"
    save_random_adaptor(folder, shapes, seed=5, text_encoder=False, soft_tokens=2, soft_token="<FAIR>", name="upper")
    with pytest.raises(ValueError, match="already in the tokenizer"):
        load_fair_adaptor(loaded, folder)
    free = tmp_path / "free"
    save_random_adaptor(free, shapes, seed=5, text_encoder=False, soft_tokens=1, soft_token="<doctor>", name="free")
    assert load_fair_adaptor(loaded, free).soft_token == "<doctor>"


# --------------------------------------------------------------------------- weights no saver would write
WEIGHT_FORGERIES = {
    "NaN in lora_A": (lambda s: _set(s, first_key(s, "lora_A.weight"), s[first_key(s, "lora_A.weight")] * np.nan),
                      "NaN or infinite"),
    "inf in lora_B": (lambda s: _set(s, first_key(s, "lora_B.weight"), s[first_key(s, "lora_B.weight")] + np.inf),
                      "NaN or infinite"),
    "integer lora_A": (lambda s: _set(s, first_key(s, "lora_A.weight"), s[first_key(s, "lora_A.weight")].int()),
                       "floating-point"),
    "bool lora_B": (lambda s: _set(s, first_key(s, "lora_B.weight"), s[first_key(s, "lora_B.weight")] > 0),
                    "floating-point"),
    "missing lora_B": (lambda s: _drop(s, first_key(s, "lora_B.weight")), "lacks its lora_B"),
    "missing lora_A": (lambda s: _drop(s, first_key(s, "lora_A.weight")), "lacks its lora_A"),
    "0-D lora_A": (lambda s: _set(s, first_key(s, "lora_A.weight"), torch.tensor(1.0)), "2-D"),
    "1-D lora_B": (lambda s: _set(s, first_key(s, "lora_B.weight"), torch.ones(64)), "2-D"),
    "a base weight": (lambda s: _set(s, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight",
                                     torch.zeros(64, 64)), "not a LoRA weight"),
    "no weights at all": (lambda s: {}, "holds no LoRA weights"),
}
TOKEN_FORGERIES = {
    "NaN soft tokens": (torch.full((2, 64), np.nan), "NaN or infinite"),
    "inf soft tokens": (torch.full((2, 64), np.inf), "NaN or infinite"),
    "integer soft tokens": (torch.ones(2, 64, dtype=torch.int64), "floating-point"),
    "bool soft tokens": (torch.ones(2, 64, dtype=torch.bool), "floating-point"),
    "0-D soft tokens": (torch.tensor(1.0), "1-D or 2-D"),
    "3-D soft tokens": (torch.ones(1, 2, 64), "1-D or 2-D"),
    "no soft tokens": (torch.ones(0, 64), "at least one"),
}


@pytest.mark.parametrize("case", list(WEIGHT_FORGERIES) + list(TOKEN_FORGERIES))
def test_weights_no_saver_would_write_are_refused_unchanged(case, shapes, tmp_path, loaded):
    folder = tmp_path / "forged"
    save_random_adaptor(folder, shapes, seed=5, unet=True, soft_tokens=2, soft_token="<forged>", name="forged")
    if case in WEIGHT_FORGERIES:
        change, message = WEIGHT_FORGERIES[case]
        forge_lora(folder, change)
    else:
        tokens, message = TOKEN_FORGERIES[case]
        forge_tokens(folder, {"<forged>": tokens})
    before = snapshot(loaded)
    with pytest.raises(ValueError, match=message):
        load_fair_adaptor(loaded, folder)
    assert_unchanged(before, snapshot(loaded))


# --------------------------------------------------------------------------- paths
class FakeApi:
    """Records the HfApi calls push_adaptor makes; every commit gets the same sha."""

    endpoint = "https://hub.example"

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id))
        return SimpleNamespace(oid="c0ffee" + "0" * 34)


@pytest.mark.parametrize("which", [LORA_WEIGHT_NAME, METADATA_NAME])
def test_files_must_be_regular_files_inside_the_folder(which, shapes, tmp_path):
    folder = tmp_path / "linked"
    save_random_adaptor(folder, shapes, seed=5, name="linked")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / which).rename(elsewhere / which)
    (folder / which).symlink_to(elsewhere / which)  # the same bytes, hashes that agree
    with pytest.raises(ValueError, match="symbolic link"):
        read_fair_adaptor(folder)
    with pytest.raises(ValueError, match="symbolic link"):
        load_fair_adaptor(tiny_pipeline(0), folder)
    (folder / which).unlink()
    (folder / which).mkdir()
    with pytest.raises(ValueError, match="regular file|missing|no fair_adaptor.json"):
        read_fair_adaptor(folder)


def test_push_refuses_a_symlinked_weight_file_before_any_call(shapes, tmp_path):
    folder = tmp_path / "linked"
    save_random_adaptor(folder, shapes, seed=5, name="linked")
    (folder / LORA_WEIGHT_NAME).rename(tmp_path / "secret.safetensors")
    (folder / LORA_WEIGHT_NAME).symlink_to(tmp_path / "secret.safetensors")
    api = FakeApi()
    with pytest.raises(ValueError, match="symbolic link"):
        hub.push_adaptor(folder, "owner/name", api=api)
    assert api.calls == []


BAD_REVISIONS = ["../x", "../../../../tmp", "/etc", "main/../../x", "a\\b", "", " main", "a..b", "-x", "main\n",
                 "x" * 300, "refs/pr/../../x", "a//b", "a/", ".hidden"]


@pytest.mark.parametrize("offline", [True, False])
@pytest.mark.parametrize("revision", BAD_REVISIONS)
def test_a_revision_is_never_a_path(revision, offline, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # never reached
    with pytest.raises(ValueError, match="revision") as error:
        hub.download_adaptor("owner/name", revision=revision, cache_dir=tmp_path)
    assert "cache" not in str(error.value) and "reach" not in str(error.value)
    with pytest.raises(ValueError, match="revision"):
        load_fair_adaptor(tiny_pipeline(0), "owner/name", revision=revision)


def test_a_revision_that_escapes_the_cache_does_not_load_a_planted_adaptor(shapes, tmp_path, monkeypatch):
    # Offline, huggingface_hub looks a revision up as a folder under the repo's snapshots/: a relative
    # path would lead out of the cache to any folder.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"
    (cache / "models--owner--name" / "snapshots").mkdir(parents=True)
    (cache / "models--owner--name" / "refs").mkdir()
    save_random_adaptor(tmp_path / "planted", shapes, seed=5, name="planted")
    with pytest.raises(ValueError, match="revision"):
        hub.download_adaptor("owner/name", revision="../../../planted", cache_dir=cache)


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/1", "feature/x-1", "0" * 40])
def test_good_revisions_reach_the_hub_client(revision, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.AdaptorDownloadError, match="not in the local cache"):
        hub.download_adaptor("owner/name", revision=revision, cache_dir=tmp_path)


def _fake_cache(cache, shapes, tmp_path, commit="a" * 40):
    """A Hugging Face cache holding an adaptor as huggingface_hub lays it out: snapshot links into blobs/."""
    repo = cache / "models--owner--name"
    save_random_adaptor(tmp_path / "source", shapes, seed=5, name="cached")
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir = repo / "snapshots" / commit
    snapshot_dir.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in (tmp_path / "source").iterdir():
        blob = repo / "blobs" / sha256_file(file)
        blob.write_bytes(file.read_bytes())
        (snapshot_dir / file.name).symlink_to(os.path.relpath(blob, snapshot_dir))
    return snapshot_dir


def test_hub_cache_links_load_but_links_out_of_the_cache_do_not(shapes, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"
    snapshot_dir = _fake_cache(cache, shapes, tmp_path)
    assert hub.download_adaptor("owner/name", cache_dir=cache).metadata.name == "cached"
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((snapshot_dir / LORA_WEIGHT_NAME).read_bytes())
    (snapshot_dir / LORA_WEIGHT_NAME).unlink()
    (snapshot_dir / LORA_WEIGHT_NAME).symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        hub.download_adaptor("owner/name", cache_dir=cache)


def test_push_refuses_path_like_branches(shapes, tmp_path):
    save_random_adaptor(tmp_path / "a", shapes, seed=5, name="a")
    api = FakeApi()
    for revision in ("../x", "a b", "refs/../x"):
        with pytest.raises(ValueError, match="revision"):
            hub.push_adaptor(tmp_path / "a", "owner/name", revision=revision, api=api)
    assert api.calls == []


# --------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("name", ["x" * 5000, "owner/" + "x" * 5000, "./" + "x" * 300, "x" * 300 + "/y"])
def test_over_long_names_give_a_value_error(name):
    with pytest.raises(ValueError, match="too long|characters"):
        hub.resolve_adaptor(name)
    with pytest.raises(ValueError, match="too long|characters"):
        load_fair_adaptor(tiny_pipeline(0), name)


def test_over_long_adapter_and_token_names(shapes, tmp_path):
    save_random_adaptor(tmp_path / "a", shapes, seed=5, name="a")
    with pytest.raises(ValueError, match="adapter_name"):
        load_fair_adaptor(tiny_pipeline(0), tmp_path / "a", adapter_name="x" * 1000)
    with pytest.raises(ValueError, match="soft_token"):
        save_random_adaptor(tmp_path / "b", shapes, text_encoder=False, soft_tokens=1, soft_token="<" + "x" * 99 + ">")
    forge_metadata(tmp_path / "a", lambda meta: meta.update(name="x" * 10_000))
    with pytest.raises(ValueError, match="name is 10000 characters"):
        read_fair_adaptor(tmp_path / "a")


def _nested(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("case", ["deep training", "deep lora", "deep target", "huge file", "huge integer size",
                                  "huge integer metric", "huge integer version", "huge integer in a target"])
def test_metadata_sizes_are_bounded(case, shapes, tmp_path):
    folder = tmp_path / "a"
    save_random_adaptor(folder, shapes, seed=5, name="a")
    path = folder / METADATA_NAME
    text = path.read_text()
    if case.startswith("deep"):
        field = {"deep training": "training", "deep lora": "lora", "deep target": "targets"}[case]
        meta = json.loads(text)
        meta[field] = "@deep@"
        text = json.dumps(meta).replace('"@deep@"', _nested(100_000))
        message = "nested"
    elif case == "huge file":
        text = text.replace('"description": "', '"description": "' + "x" * (5 << 20), 1)
        message = "MiB"
    else:
        huge = "9" * 5000 if case != "huge integer metric" else "9" * 400
        pattern = {"huge integer size": '"text_hidden_size": 64', "huge integer metric": '"bias_gender": 0.125',
                   "huge integer version": '"format_version": 1', "huge integer in a target": '0.5'}[case]
        key = pattern.split(":")[0]
        text = text.replace(pattern, (key + ": " if ":" in pattern else "") + huge, 1)
        message = "too large|integer|not finite|at most"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        read_fair_adaptor(folder)
    assert str(folder) in str(error.value)


def test_index_and_json_files_are_bounded(tmp_path):
    from diffusers_fair._utils.io import read_json

    index = tmp_path / "index.json"
    index.write_text('{"format_version": 1, "adaptors": ' + _nested(100_000) + "}")
    with pytest.raises(ValueError, match="nested"):
        hub.load_index(index)
    index.write_text('{"format_version": 1, "adaptors": {}, "x": "' + "x" * (20 << 20) + '"}')
    with pytest.raises(ValueError, match="MiB"):
        hub.load_index(index)
    index.write_text('{"format_version": ' + "9" * 5000 + "}")
    with pytest.raises(ValueError, match=str(index)):
        hub.load_index(index)
    deep = tmp_path / "deep.json"
    deep.write_text(_nested(200))
    with pytest.raises(ValueError, match="nested more than"):
        read_json(deep, "cache file")
    assert read_json(deep, "cache file", max_depth=300) is not None


@pytest.mark.parametrize("field, value", [
    ("description", 5), ("eval_prompts", ["x"]), ("license", 3), ("base_revision", 7), ("training", []),
    ("lora", "x"), ("library_versions", [1]), ("library_versions", {"torch": 2}), ("name", 5), ("files", []),
    ("targets", [{"classes": {"gender": 5}, "probs": [1]}]), ("targets", [{"classes": {"g": ["a"]}, "probs": ["x"]}]),
    ("targets", [{"classes": {"g": ["a"]}, "probs": [{"p": 1}]}]), ("metrics_after", {"bias": 10 ** 400}),
    ("token_names", "<fair>"), ("kind", ["lora"]), ("text_hidden_size", 10 ** 30), ("format_version", True),
])
def test_wrongly_typed_metadata_is_refused_at_read_time(field, value, shapes, tmp_path):
    folder = tmp_path / "a"
    save_random_adaptor(folder, shapes, seed=5, name="a")
    forge_metadata(folder, lambda meta: meta.__setitem__(field, value))
    with pytest.raises(ValueError, match=field.split("_")[0]):
        read_fair_adaptor(folder)


def test_an_infinite_or_huge_weight_is_refused(shapes, tmp_path):
    save_random_adaptor(tmp_path / "a", shapes, seed=5, name="a")
    pipe = tiny_pipeline(0)
    for weight in (10 ** 400, float("inf"), float("nan"), "1"):
        with pytest.raises(ValueError, match="weight must be a finite number"):
            load_fair_adaptor(pipe, tmp_path / "a", weight=weight)


# --------------------------------------------------------------------------- outputs
def test_concurrent_saves_into_one_folder_do_not_collide(shapes, tmp_path, monkeypatch):
    # The second save starts while the first is writing its staged files: each stages under its own name.
    write = adaptor_format._write_adaptor_files
    nested = {"done": False}

    def write_and_interleave(staging, *args, **kwargs):
        result = write(staging, *args, **kwargs)
        if not nested["done"]:
            nested["done"] = True
            save_lora(tmp_path / "out", shapes, 7, "second", overwrite=True)
        return result

    monkeypatch.setattr(adaptor_format, "_write_adaptor_files", write_and_interleave)
    save_lora(tmp_path / "out", shapes, 6, "first", overwrite=True)
    assert read_fair_adaptor(tmp_path / "out").metadata.name == "first"  # the last to finish, complete
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [LORA_WEIGHT_NAME, METADATA_NAME, "README.md"])


def test_concurrent_saves_in_threads_do_not_collide(shapes, tmp_path):
    errors = []

    def save(seed):
        try:
            save_lora(tmp_path / "out", shapes, seed, f"n{seed}", overwrite=True)
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=save, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not [e for e in errors if not isinstance(e, ValueError)]
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())


def test_weight_files_get_the_permissions_of_the_other_files(shapes, tmp_path):
    old = os.umask(0o022)
    try:
        save_random_adaptor(tmp_path / "a", shapes, seed=5, soft_tokens=2, name="a")
        adaptor_format.update_fair_adaptor_metadata(tmp_path / "a", description="changed")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a").iterdir()}
    assert modes == dict.fromkeys(modes, 0o644), modes


def test_a_corrupt_push_record_is_refused_before_the_push(shapes, tmp_path):
    folder = tmp_path / "a"
    save_random_adaptor(folder, shapes, seed=5, name="a")
    record = folder / hub.PUSH_RECORD_NAME
    for corrupt in ("{not json", '{"a": 1}', "[1, 2]"):
        record.write_text(corrupt)
        api = FakeApi()
        with pytest.raises(ValueError, match=hub.PUSH_RECORD_NAME):
            hub.push_adaptor(folder, "owner/name", api=api)
        assert api.calls == []
    record.unlink()
    api = FakeApi()
    commit = hub.push_adaptor(folder, "owner/name", api=api)
    commit2 = hub.push_adaptor(folder, "owner/name", api=api)
    assert [r["commit"] for r in json.loads(record.read_text())] == [commit, commit2]
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_a_push_record_spoilt_during_the_push_keeps_the_new_commit(shapes, tmp_path):
    folder = tmp_path / "a"
    save_random_adaptor(folder, shapes, seed=5, name="a")
    record = folder / hub.PUSH_RECORD_NAME

    class SpoilingApi(FakeApi):
        def create_commit(self, *args, **kwargs):
            record.write_text("{torn")
            return super().create_commit(*args, **kwargs)

    commit = hub.push_adaptor(folder, "owner/name", api=SpoilingApi())
    assert [r["commit"] for r in json.loads(record.read_text())] == [commit]
    assert (folder / f"{hub.PUSH_RECORD_NAME}.corrupt").read_text() == "{torn"


def test_metadata_built_in_code_is_checked_like_a_file():
    with pytest.raises(ValueError, match="description"):
        make_metadata(description=5)
    with pytest.raises(ValueError, match="no soft tokens"):
        summary = {"text_encoder": {"rank": 4, "alpha": 4, "num_layers": 1}}
        FairAdaptorMetadata.from_dict({**make_metadata().to_dict(), "kind": "lora", "soft_token": "<x>",
                                       "lora": summary, "files": {LORA_WEIGHT_NAME: "0" * 64}})


@pytest.mark.parametrize("field, value, message", [
    ("unet.rank_pattern", None, "rank_pattern must be a dict"),
    ("unet.rank_pattern", {"(": 2}, "invalid pattern"),
    ("unet.rank_pattern", {"to_q": 0}, "rank_pattern"),
    ("text_encoder.lora_alpha", "4", "lora_alpha must be a finite number"),
    ("text_encoder.alpha_pattern", {"q_proj": float("inf")}, "alpha_pattern"),
    ("text_encoder.r", "4", "r must be a positive integer"),
    ("unet.use_dora", True, "DoRA"),
])
def test_lora_header_fields_no_saver_writes_are_refused_unchanged(field, value, message, shapes, tmp_path, loaded):
    folder = tmp_path / "header"
    save_random_adaptor(folder, shapes, seed=5, unet=True, name="header")
    forge_lora(folder, change_header=lambda config: config.__setitem__(field, value))
    before = snapshot(loaded)
    with pytest.raises(ValueError, match=message):
        load_fair_adaptor(loaded, folder)
    assert_unchanged(before, snapshot(loaded))


# --------------------------------------------------------------------------- the original release's files
GARBAGE_PTH = {  # bytes on which torch's weights-only unpickler raises something other than UnpicklingError
    "IndexError": (b"Qc\xb5\xfe\t\x7f{\x8c^\xd7'\xe5y\xe63`T\xe1!\xda\xca\x8b\x81\xdf\xb6\xa7.\x9d\x0f\xfc"
                   b"\x05\x80g\xcb"),
    "UnicodeDecodeError": b"U\x8cg\xb1\xe5-\xd4\xd1",
    "KeyError": b"h\xc8,1\xcd>\xeeU\x10gw{0\xc1\xd0#leo\xfb.b3Bc\xdc\xca\x86\xf1\x0e",
    "struct.error": b"GM_\xd0\xc7\t",
}


@pytest.mark.parametrize("case", [*GARBAGE_PTH, "a folder", "missing", "integer weights", "integer prefix"])
def test_garbage_release_files_give_a_value_error(case, tmp_path):
    from diffusers_fair.adaptors.convert import convert_prefix_embedding, convert_text_encoder_lora, load_release_file

    path = tmp_path / "text_encoder_lora_EMA.pth"
    if case in GARBAGE_PTH:
        path.write_bytes(GARBAGE_PTH[case])
    elif case == "a folder":
        path.mkdir()
    elif case == "integer weights":
        layer = "text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer"
        torch.save({f"{layer}.down.weight": torch.ones(4, 8, dtype=torch.int64),
                    f"{layer}.up.weight": torch.ones(8, 4, dtype=torch.int64)}, path)
    elif case == "integer prefix":
        torch.save({"token_embedding.weight": torch.ones(3, 8, dtype=torch.int64)}, path)
    with pytest.raises(ValueError, match="weights_only|cannot be read|floating-point"):
        state = load_release_file(path)
        convert_prefix_embedding(state) if case == "integer prefix" else convert_text_encoder_lora(state)


def test_pull_replaces_a_link_in_the_destination_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not to be overwritten")
    destination = tmp_path / "copy"
    destination.mkdir()
    (destination / LORA_WEIGHT_NAME).symlink_to(outside)
    hub.pull_adaptor("toy-gender-race", destination)
    assert outside.read_text() == "not to be overwritten"
    assert not (destination / LORA_WEIGHT_NAME).is_symlink()
    assert read_fair_adaptor(destination).has_lora
