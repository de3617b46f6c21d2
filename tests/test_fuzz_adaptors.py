"""Property-based fuzzing of adaptor folders: random bytes, random JSON and random tensors as adaptor files.

The property, for every example: ``load_fair_adaptor`` either loads the adaptor (and unloading it
gives back the pipeline) or raises ``ValueError`` (``AdaptorDownloadError`` is one), never another
exception, and after a refusal the pipeline is exactly as it was: its weights, ``requires_grad``
flags, peft adapters, vocabulary, prompt prefix and fair-adaptor list. The pipeline already holds
a LoRA adaptor and a soft-token adaptor, so a failed load must also leave those alone.
"""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from diffusers_fair.adaptors.format import read_fair_adaptor
from diffusers_fair.adaptors.metadata import LORA_WEIGHT_NAME, METADATA_NAME, SOFT_TOKENS_NAME, sha256_file
from diffusers_fair.adaptors.pipeline import (
    FairFinetunePipeline,
    add_fair_tokens,
    fair_adaptors,
    load_fair_adaptor,
    unload_fair_adaptor,
)
from helpers.adaptors import save_random_adaptor, tiny_pipeline


def fuzz(max_examples: int):
    """Hypothesis settings for these tests: few examples (each loads into a pipeline), no deadline."""
    return settings(max_examples=max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- the pipeline and its fingerprint
COMPONENTS = ("text_encoder", "unet")


class Fingerprint:
    """The state a load may change, recorded once; :meth:`assert_same` compares a pipeline with it bit for bit."""

    def __init__(self, pipe):
        self.weights = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in COMPONENTS}
        self.rest = self._rest(pipe)

    @staticmethod
    def _rest(pipe):
        return {
            "requires_grad": {(c, n): p.requires_grad for c in COMPONENTS
                              for n, p in getattr(pipe, c).named_parameters()},
            "adapters": {c: sorted(getattr(getattr(pipe, c), "peft_config", None) or {}) for c in COMPONENTS},
            "vocab": sorted(pipe.tokenizer.get_vocab().items()),
            "vocab_size": pipe.text_encoder.config.vocab_size,
            "prefix": add_fair_tokens(pipe, "p"),
            "fair": {name: (a.weight, a.active, a.token_names) for name, a in fair_adaptors(pipe).items()},
        }

    def assert_same(self, pipe):
        for component, weights in self.weights.items():
            now = getattr(pipe, component).state_dict()
            assert now.keys() == weights.keys(), component
            assert all(torch.equal(now[k], v) for k, v in weights.items()), component
        rest = self._rest(pipe)
        for key, value in self.rest.items():
            assert rest[key] == value, key


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A pipeline holding two adaptors, its fingerprint, and a valid LoRA + soft-token adaptor to corrupt."""
    root = tmp_path_factory.mktemp("fuzz")
    shapes = tiny_pipeline(0)
    save_random_adaptor(root / "held-lora", shapes, seed=1, unet=True, name="held-lora")
    save_random_adaptor(root / "held-soft", shapes, seed=2, text_encoder=False, soft_tokens=2, name="held-soft")
    save_random_adaptor(root / "valid", shapes, seed=3, unet=True, soft_tokens=2, soft_token="<valid>", name="valid")
    pipe = tiny_pipeline(0, cls=FairFinetunePipeline)
    load_fair_adaptor(pipe, root / "held-lora", weight=0.5)
    load_fair_adaptor(pipe, root / "held-soft")
    return {"pipe": pipe, "fingerprint": Fingerprint(pipe), "valid": root / "valid"}


def check_load(world, folder):
    """Load ``folder``: a success is unloaded again; either way the pipeline must end as it was."""
    pipe = world["pipe"]
    try:
        loaded = load_fair_adaptor(pipe, folder, adapter_name="fuzzed")
    except ValueError:
        pass
    else:
        assert loaded.adapter_name == "fuzzed"
        unload_fair_adaptor(pipe, "fuzzed")
    finally:
        shutil.rmtree(folder.parent)
    world["fingerprint"].assert_same(pipe)


def corrupted_copy(world, write):
    """A copy of the valid adaptor in a new temporary folder, changed by ``write(folder)``."""
    folder = Path(tempfile.mkdtemp(prefix="fuzz-")) / "adaptor"
    shutil.copytree(world["valid"], folder)
    write(folder)
    return folder


def record_hash(folder, name):
    path = folder / METADATA_NAME
    meta = json.loads(path.read_text())
    if name in meta["files"]:
        meta["files"][name] = sha256_file(folder / name)
        path.write_text(json.dumps(meta))


# --------------------------------------------------------------------------- strategies
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
METADATA_FIELDS = ["name", "base_model", "text_hidden_size", "cross_attention_dim", "base_revision", "description",
                   "targets", "training", "metrics_before", "metrics_after", "eval_prompts", "license",
                   "format_version", "kind", "soft_token", "token_names", "lora", "files", "library_versions",
                   "colour"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8,
          torch.bool]
ENTRY_NAMES = ["<valid>", "<other>", "clip_l", "clip_g", "x"]


@st.composite
def tensors(draw):
    """A small tensor of any dtype and 0-3 dimensions, maybe with NaN or infinite values."""
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    values = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    special = draw(st.sampled_from([None, float("nan"), float("inf"), float("-inf")]))
    if special is not None and values.numel():
        values.view(-1)[0] = special
    return values.to(dtype) if dtype.is_floating_point else values.abs().mul(3).to(dtype)


@st.composite
def lora_states(draw, keys):
    """Some of the valid file's keys (perhaps renamed, perhaps with another shape or dtype), and maybe extra keys."""
    from safetensors.torch import load_file

    state = {}
    for key, tensor in load_file(str(keys)).items():
        action = draw(st.sampled_from(["keep", "keep", "keep", "drop", "replace", "transpose", "rename"]))
        if action == "keep":
            state[key] = tensor
        elif action == "replace":
            state[key] = draw(tensors())
        elif action == "transpose":
            state[key] = tensor.T.contiguous()
        elif action == "rename":
            state[key.replace(draw(st.sampled_from(["lora_A", "lora_B", "text_encoder", "layers.0"])),
                              draw(st.sampled_from(["lora_B", "lora_A", "unet", "layers.7", "x"])))] = tensor
    for name in draw(st.lists(st.text(min_size=1, max_size=30), max_size=2)):
        state[name] = draw(tensors())
    return state


# --------------------------------------------------------------------------- the properties
@fuzz(25)
@given(which=st.sampled_from([LORA_WEIGHT_NAME, SOFT_TOKENS_NAME, METADATA_NAME]), data=st.binary(max_size=300),
       keep_hash=st.booleans())
def test_random_bytes_as_an_adaptor_file(world, which, data, keep_hash):
    def write(folder):
        (folder / which).write_bytes(data)
        if keep_hash and which != METADATA_NAME:
            record_hash(folder, which)

    check_load(world, corrupted_copy(world, write))


@fuzz(40)
@given(document=JSON)
def test_random_json_as_fair_adaptor_json(world, document):
    check_load(world, corrupted_copy(world, lambda folder: (folder / METADATA_NAME).write_text(json.dumps(document))))


@fuzz(60)
@given(field=st.sampled_from(METADATA_FIELDS), value=JSON)
def test_valid_metadata_with_one_random_field(world, field, value):
    def write(folder):
        meta = json.loads((folder / METADATA_NAME).read_text())
        meta[field] = value
        (folder / METADATA_NAME).write_text(json.dumps(meta))

    check_load(world, corrupted_copy(world, write))


@fuzz(40)
@given(data=st.data(), header=st.sampled_from([None, "keep", "r", "rank_pattern", "alpha", "garbage"]))
def test_random_tensors_as_lora_weights(world, data, header):
    from safetensors import safe_open

    def write(folder):
        path = folder / LORA_WEIGHT_NAME
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        state = data.draw(lora_states(path))
        if header is None:
            metadata = None
        elif header == "garbage":
            metadata["lora_adapter_metadata"] = data.draw(st.text(max_size=40))
        elif header != "keep":
            config = json.loads(metadata["lora_adapter_metadata"])
            field = {"r": "text_encoder.r", "rank_pattern": "unet.rank_pattern", "alpha": "unet.lora_alpha"}[header]
            config[field] = data.draw(JSON)
            metadata["lora_adapter_metadata"] = json.dumps(config)
        save_file(state, str(path), metadata=metadata)
        record_hash(folder, LORA_WEIGHT_NAME)

    check_load(world, corrupted_copy(world, write))


@fuzz(30)
@given(entries=st.dictionaries(st.sampled_from(ENTRY_NAMES), tensors(), max_size=3))
def test_random_tensors_as_soft_tokens(world, entries):
    def write(folder):
        save_file({k: v.contiguous() for k, v in entries.items()}, str(folder / SOFT_TOKENS_NAME))
        record_hash(folder, SOFT_TOKENS_NAME)

    check_load(world, corrupted_copy(world, write))


def test_the_fuzzed_adaptor_itself_loads_and_unloads(world):
    """The uncorrupted adaptor loads: the properties above are not vacuous refusals."""
    read_fair_adaptor(world["valid"])
    load_fair_adaptor(world["pipe"], world["valid"], adapter_name="fuzzed")
    assert "fuzzed" in fair_adaptors(world["pipe"])
    unload_fair_adaptor(world["pipe"], "fuzzed")
    world["fingerprint"].assert_same(world["pipe"])
