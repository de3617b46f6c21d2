"""Bad input gets a clear error, and no failure loses work: the cases docs/RELIABILITY.md lists
that the other test files do not already cover.

Adaptor cases use the tiny random-weight pipeline of test_adaptors.py and check that a refused
load leaves the pipeline bit for bit as it was (test_pipeline.py's ``snapshot``); trainer cases
use the tiny trainer of test_trainer.py.
"""

import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import helpers.training as T
from diffusers_fair.adaptors import hub
from diffusers_fair.adaptors.format import read_fair_adaptor, save_fair_adaptor
from diffusers_fair.adaptors.metadata import (
    LORA_WEIGHT_NAME,
    METADATA_NAME,
    SOFT_TOKENS_NAME,
    FairAdaptorMetadata,
    sha256_file,
)
from diffusers_fair.adaptors.pipeline import load_fair_adaptor, unload_fair_adaptor
from diffusers_fair.method.targets import TargetDistribution
from diffusers_fair.training import checkpointing
from diffusers_fair.training.prompts import load_prompt_sets, resolve_prompt_sets
from diffusers_fair.training.setup_checks import check_components
from helpers.adaptors import (
    assert_same,
    make_metadata,
    pipeline_state,
    random_lora,
    save_random_adaptor,
    tiny_pipeline,
)


# --------------------------------------------------------------------------- targets and configs
def test_probabilities_must_be_numbers():
    for value in (None, "0.5", True):
        with pytest.raises(ValueError, match="probability of x=a must be a number"):
            TargetDistribution("x", {"a": value, "b": 0.5})
    with pytest.raises(ValueError, match=r"probability of cell \('m', 'y'\) must be a number"):
        TargetDistribution.joint({"g": ["m", "f"], "a": ["y", "o"]}, {("m", "y"): "1"})
    assert TargetDistribution("x", {"a": torch.tensor(0.25), "b": 3 / 4}).prob("a") == 0.25  # numbers of any kind


def test_unreadable_prompt_set_files(tmp_path):
    with pytest.raises(ValueError, match="cannot be read"):
        load_prompt_sets(tmp_path)  # a folder
    binary = tmp_path / "sets.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prompt_sets(binary)


def test_target_with_another_class_count_than_the_classifier(tmp_path):
    three = TargetDistribution.uniform("gender", ["male", "female", "other"])
    sets = resolve_prompt_sets(T.PROMPTS, [three])
    with pytest.raises(ValueError, match=r"'gender' has 3 classes .* the classifier 2 \['male', 'female'\]"):
        check_components(T.stub_components(), sets, T.tiny_config(tmp_path))


class NarrowRaceHead(T.TinyClassifier):
    """Declares four race classes but its race head gives three logits."""

    def forward(self, faces):
        logits = super().forward(faces)
        return {**logits, "race": logits["race"][:, :3]}


class BatchNormClassifier(T.TinyClassifier):
    """A classifier with state that a forward pass in training mode would change."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm2d(3)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, faces):
        return super().forward(self.drop(self.norm(faces)))


def test_classifier_head_width_is_checked_before_the_pipeline_is_touched(tmp_path):
    components = T.stub_components()
    components.classifier = NarrowRaceHead()
    pipe = T.tiny_training_pipeline()
    with pytest.raises(ValueError, match=r"'race' head gives logits of shape \(1, 3\) .* expected \(1, 4\)"):
        T.DistributionalAlignmentTrainer(T.tiny_config(tmp_path), pipe, [T.GENDER], T.PROMPTS, components)
    assert all(p.requires_grad for p in pipe.unet.parameters())  # not even frozen yet

    # The check itself changes nothing: running statistics, training mode, the random state.
    components.classifier = BatchNormClassifier()
    stats = components.classifier.norm.running_mean.clone()
    rng = torch.get_rng_state()
    check_components(components, resolve_prompt_sets(T.PROMPTS, [T.GENDER]), T.tiny_config(tmp_path))
    assert torch.equal(components.classifier.norm.running_mean, stats) and components.classifier.training
    assert torch.equal(torch.get_rng_state(), rng)


# --------------------------------------------------------------------------- adaptor files
def _overwrite_keeping_hashes(folder, name, write):
    """Replace ``folder/name`` with ``write(path)`` and record its new sha256, so only the content is wrong."""
    write(folder / name)
    meta = json.loads((folder / METADATA_NAME).read_text())
    meta["files"][name] = sha256_file(folder / name)
    (folder / METADATA_NAME).write_text(json.dumps(meta))


def test_truncated_or_pickled_weight_files_give_clear_errors(shapes, tmp_path):
    save_random_adaptor(tmp_path, shapes, soft_tokens=2)
    weights = tmp_path / LORA_WEIGHT_NAME
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match="sha256"):
        read_fair_adaptor(tmp_path)
    with pytest.raises(ValueError, match=f"{LORA_WEIGHT_NAME} is not a readable safetensors file .*truncated or corrupt"):
        read_fair_adaptor(tmp_path, verify=False).lora_state_dict()

    # Pickles under the safetensors names are recognised, never unpickled, even when the hashes agree.
    _overwrite_keeping_hashes(tmp_path, LORA_WEIGHT_NAME, lambda p: torch.save({"w": torch.zeros(2)}, p))
    _overwrite_keeping_hashes(tmp_path, SOFT_TOKENS_NAME, lambda p: p.write_bytes(b"\x80\x04\x95" + b"\0" * 20))
    adaptor = read_fair_adaptor(tmp_path)
    with pytest.raises(ValueError, match=f"{LORA_WEIGHT_NAME} is a PyTorch pickle.*never loaded"):
        adaptor.lora_state_dict()
    with pytest.raises(ValueError, match=f"{SOFT_TOKENS_NAME} is a PyTorch pickle"):
        adaptor.soft_tokens()
    pipe = tiny_pipeline(0)
    before = pipeline_state(pipe)
    with pytest.raises(ValueError, match="PyTorch pickle"):
        load_fair_adaptor(pipe, tmp_path)
    assert_same(before, pipeline_state(pipe))


def test_pickle_files_and_folders_are_refused(shapes, tmp_path):
    pipe = tiny_pipeline(0)
    before = pipeline_state(pipe)
    pth = tmp_path / "text_encoder_lora_EMA.pth"
    torch.save({"w": torch.zeros(2)}, pth)
    with pytest.raises(ValueError, match="is a file, not a fair adaptor folder: PyTorch pickles are never loaded.*diffusers-fair convert"):
        load_fair_adaptor(pipe, pth)
    with pytest.raises(ValueError, match=r"pickles \['text_encoder_lora_EMA.pth'\] are never loaded"):
        load_fair_adaptor(pipe, tmp_path)
    save_random_adaptor(tmp_path / "adaptor", shapes)
    with pytest.raises(ValueError, match=f"is a file, not a fair adaptor folder: give the folder holding it and its {METADATA_NAME}"):
        load_fair_adaptor(pipe, tmp_path / "adaptor" / LORA_WEIGHT_NAME)
    assert_same(before, pipeline_state(pipe))


@pytest.mark.parametrize("which, message", [("lora_A", "takes 48 inputs, the layer has 256"),
                                            ("lora_B", "gives 48 outputs, the layer has 64")])
def test_lora_layer_of_another_architecture_is_refused_unchanged(which, message, shapes, tmp_path):
    state, config = random_lora(shapes.text_encoder, ["fc2"], 0)
    key = next(k for k in state if k.endswith(f"layers.0.mlp.fc2.{which}.weight"))  # fc2: 256 -> 64 features
    state[key] = torch.zeros(48, 4) if which == "lora_B" else torch.zeros(4, 48)
    save_fair_adaptor(tmp_path / "bad", metadata=make_metadata("bad"), text_encoder_lora=state, text_encoder_lora_config=config)
    save_random_adaptor(tmp_path / "ok", shapes, seed=1, name="ok")
    pipe = tiny_pipeline(0)
    load_fair_adaptor(pipe, tmp_path / "ok")
    before = pipeline_state(pipe)
    with pytest.raises(ValueError, match=message):
        load_fair_adaptor(pipe, tmp_path / "bad")
    assert_same(before, pipeline_state(pipe))


def test_soft_token_file_of_another_width_is_refused_unchanged(shapes, tmp_path):
    save_random_adaptor(tmp_path, shapes, text_encoder=False, soft_tokens=2, name="soft")
    _overwrite_keeping_hashes(tmp_path, SOFT_TOKENS_NAME, lambda p: save_file({"<fair>": torch.zeros(2, 32)}, str(p)))
    pipe = tiny_pipeline(0)
    before = pipeline_state(pipe)
    with pytest.raises(ValueError, match="soft tokens have size 32, the text encoder 64"):
        load_fair_adaptor(pipe, tmp_path)
    assert_same(before, pipeline_state(pipe))


def test_loading_twice_and_unloading_what_is_not_loaded(shapes, tmp_path):
    save_random_adaptor(tmp_path, shapes, soft_tokens=2, name="twice")
    pipe = tiny_pipeline(0)
    empty = pipeline_state(pipe)
    with pytest.raises(ValueError, match="no fair adaptor is loaded .*nothing to unload"):
        unload_fair_adaptor(pipe)
    with pytest.raises(ValueError, match="no fair adaptor is loaded"):
        unload_fair_adaptor(pipe, "twice")
    load_fair_adaptor(pipe, tmp_path)
    loaded = pipeline_state(pipe)
    with pytest.raises(ValueError, match="an adapter named 'twice' is already loaded"):
        load_fair_adaptor(pipe, tmp_path)
    assert_same(loaded, pipeline_state(pipe))
    unload_fair_adaptor(pipe)
    assert_same(empty, pipeline_state(pipe))  # the refused unloads before changed nothing either
    with pytest.raises(ValueError, match="nothing to unload"):
        unload_fair_adaptor(pipe)


def test_a_failed_save_keeps_the_previous_adaptor(shapes, tmp_path, monkeypatch):
    import safetensors.torch

    save_random_adaptor(tmp_path, shapes, name="first")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_fair_adaptor(tmp_path, metadata=make_metadata("second"), soft_tokens=torch.zeros(2, 64), overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing half-written, nothing left over
    assert read_fair_adaptor(tmp_path).metadata.name == "first"


def test_metadata_targets_must_be_a_list():
    with pytest.raises(ValueError, match="targets must be a list"):
        FairAdaptorMetadata.from_dict({**make_metadata().to_dict(), "targets": 5})


def test_adaptor_index_must_be_a_json_object(tmp_path):
    index = tmp_path / "index.json"
    index.write_text("[]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        hub.load_index(index)


# --------------------------------------------------------------------------- training
def test_infinite_gradients_are_skipped_and_counted(tmp_path):
    trainer = T.make_trainer(tmp_path, max_nonfinite_steps=3)
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    name = next(iter(trainer.params))
    handle = trainer.params[name].register_hook(lambda grad: grad + float("inf"))  # the loss stays finite
    record = trainer.train_step()
    handle.remove()
    assert record["skipped"] and math.isfinite(record["loss"]) and trainer.nonfinite_steps == 1
    assert all(torch.equal(p, before[n]) for n, p in trainer.params.items())
    assert trainer.ema_updates == 0


def test_a_checkpoint_holding_a_pickle_is_refused(tmp_path):
    path = checkpointing.save_checkpoint(tmp_path, 1, {"param/w": torch.ones(3)}, {"counters": {}})
    torch.save({"param/w": torch.ones(3)}, path / checkpointing.TENSORS_FILE)
    with pytest.raises(ValueError, match="corrupt or unreadable: .*PyTorch pickle"):
        checkpointing.load_checkpoint(path)


# --------------------------------------------------------------------------- the target parser, property-based
# Names use every character the parser allows (letters, digits, '_', '.', '-', inner spaces).
NAMES = st.text(alphabet="aZ09_.- ", min_size=1, max_size=6).map(str.strip).filter(bool)


@st.composite
def targets(draw):
    """An independent product of one to three marginal targets with arbitrary valid names."""
    attributes = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    result = None
    for attribute in attributes:
        classes = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
        weights = draw(st.lists(st.integers(0, 9), min_size=len(classes), max_size=len(classes)).filter(any))
        marginal = TargetDistribution(attribute, {c: w / sum(weights) for c, w in zip(classes, weights)})
        result = marginal if result is None else result * marginal
    return result


@settings(max_examples=40, deadline=None)
@given(targets())
def test_parser_round_trips_products_with_any_valid_names(target):
    again = TargetDistribution.parse(str(target))
    assert again == target and again.classes == target.classes


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(alphabet="ab c.0123456789=:,*-_e\t", max_size=40), st.text(max_size=40)))
def test_parser_accepts_or_raises_value_error_only(text):
    try:
        target = TargetDistribution.parse(text)
    except ValueError:
        return
    assert torch.isclose(target.probs.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6)
    assert TargetDistribution.parse(str(target)) == target


CORRUPTIONS = {
    "no colon": lambda text: text.replace(":", " ", 1),
    "two colons": lambda text: text.replace(":", "::", 1),
    "empty entry": lambda text: text + ",",
    "bad number": lambda text: re.sub(r"=[^,*]+", "=x", text, count=1),
    "sum above one": lambda text: re.sub(r"=([^,*]+)", lambda m: f"={float(m.group(1)) + 0.5!r}", text, count=1),
    "negative": lambda text: re.sub(r"=([^,*]+)", lambda m: f"={-float(m.group(1)) - 0.5!r}", text, count=1),
    "duplicate class": lambda text: text + ", " + text.split(":", 1)[1].split(",")[0].strip(),
    "trailing product": lambda text: text + " *",
}


@settings(max_examples=60, deadline=None)
@given(targets(), st.sampled_from(sorted(CORRUPTIONS)))
def test_parser_rejects_corrupted_strings(target, corruption):
    text = str(target.marginal(target.attributes[-1]))  # one marginal: "attr: a=0.5, b=0.5"
    with pytest.raises(ValueError):
        TargetDistribution.parse(CORRUPTIONS[corruption](text))


# --------------------------------------------------------------------------- the table of cases
def test_every_row_of_the_reliability_table_names_an_existing_test():
    root = T.ROOT
    table = (root / "docs" / "RELIABILITY.md").read_text(encoding="utf-8")
    references = set(re.findall(r"tests/(\w+\.py)::(\w+)", table))
    assert len(references) > 40
    for file, name in sorted(references):
        assert re.search(rf"^def {name}\(", (root / "tests" / file).read_text(encoding="utf-8"), re.M), f"{file}::{name}"
    own = set(re.findall(r"^def (test_\w+)\(", (root / "tests" / "test_reliability.py").read_text(encoding="utf-8"), re.M))
    listed = {name for file, name in references if file == "test_reliability.py"}
    assert own - listed == {"test_every_row_of_the_reliability_table_names_an_existing_test"}
