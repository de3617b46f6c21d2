"""The fair adaptor file format: LoRA safetensors, soft tokens, fair_adaptor.json, the model card.

The module-level helpers (a tiny random-weight Stable Diffusion pipeline, random LoRA weights,
reference outputs computed with forward hooks) are shared with the other adaptor test files.
"""

import copy
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_fair.adaptors.format import (
    read_fair_adaptor,
    save_fair_adaptor,
    update_fair_adaptor_metadata,
)
from diffusers_fair.adaptors.metadata import (
    BASE_MODEL_MARKER,
    CARD_NAME,
    FORMAT_VERSION,
    LORA_WEIGHT_NAME,
    METADATA_NAME,
    SD15,
    SOFT_TOKENS_NAME,
    TOY_BASE_MODEL,
    FairAdaptorMetadata,
    base_model_id,
    target_from_dict,
    target_to_dict,
)
from diffusers_fair.adaptors.model_card import PLACEHOLDER, build_model_card, card_for_repo
from diffusers_fair.method.targets import TargetDistribution
from helpers.adaptors import (
    RANK,
    TE_TARGETS,
    UNET_TARGETS,
    make_metadata,
    random_lora,
    save_random_adaptor,
    tiny_pipeline,
)


# --------------------------------------------------------------------------- shared helpers
@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(0)


# --------------------------------------------------------------------------- the LoRA file
def test_lora_file_has_diffusers_keys_and_lora_config_header(pipe, tmp_path):
    metadata, te_state, unet_state, _ = save_random_adaptor(tmp_path, pipe, unet=True)
    assert metadata.kind == "lora"
    saved = load_file(str(tmp_path / LORA_WEIGHT_NAME))
    expected = {f"text_encoder.text_model.{k}" for k in te_state} | {f"unet.{k}" for k in unet_state}
    assert set(saved) == expected
    for key, value in te_state.items():
        assert torch.equal(saved[f"text_encoder.text_model.{key}"], value)

    with safe_open(str(tmp_path / LORA_WEIGHT_NAME), "pt") as handle:
        header = handle.metadata()
    assert header["format"] == "pt"
    lora_config = json.loads(header["lora_adapter_metadata"])
    assert lora_config["text_encoder.r"] == RANK and lora_config["unet.r"] == RANK
    assert lora_config["text_encoder.lora_alpha"] == RANK
    assert sorted(lora_config["text_encoder.target_modules"]) == sorted(TE_TARGETS)
    assert sorted(lora_config["unet.target_modules"]) == sorted(UNET_TARGETS)
    # The header is what diffusers itself writes for the same configs.
    reference = tmp_path / "reference"
    StableDiffusionPipeline.save_lora_weights(
        reference,
        text_encoder_lora_layers={f"text_model.{k}": v for k, v in te_state.items()},
        unet_lora_layers=unet_state,
        text_encoder_lora_adapter_metadata=random_lora(pipe.text_encoder, TE_TARGETS, 0)[1].to_dict(),
        unet_lora_adapter_metadata=random_lora(pipe.unet, UNET_TARGETS, 0)[1].to_dict(),
    )
    with safe_open(str(reference / LORA_WEIGHT_NAME), "pt") as handle:
        assert json.loads(handle.metadata()["lora_adapter_metadata"]) == lora_config
    assert metadata.lora["text_encoder"] == {"rank": RANK, "alpha": float(RANK), "target_modules": sorted(TE_TARGETS), "num_layers": 12}
    assert metadata.lora["unet"]["num_layers"] == 4 * 2 * 7  # attn1 + attn2 in 7 transformer blocks


def test_lora_from_peft_wrapped_module_equals_its_state_dict(pipe, tmp_path):
    text_encoder = copy.deepcopy(pipe.text_encoder)
    text_encoder.add_adapter(LoraConfig(r=RANK, lora_alpha=8, target_modules=TE_TARGETS, init_lora_weights=False))
    metadata = save_fair_adaptor(tmp_path, metadata=make_metadata(), text_encoder_lora=text_encoder)
    saved = load_file(str(tmp_path / LORA_WEIGHT_NAME))
    state = get_peft_model_state_dict(text_encoder)
    assert len(saved) == len(state) == 24
    for key, value in state.items():
        assert torch.equal(saved["text_encoder.text_model." + key.removeprefix("text_model.")], value)
    assert metadata.lora["text_encoder"]["alpha"] == 8.0


# --------------------------------------------------------------------------- soft tokens
def test_soft_tokens_file_is_textual_inversion_layout(pipe, tmp_path):
    metadata, _, _, tokens = save_random_adaptor(tmp_path, pipe, text_encoder=False, soft_tokens=5, soft_token="<fair-g>")
    assert metadata.kind == "soft_tokens"
    assert metadata.soft_token == "<fair-g>"
    assert metadata.token_names == ["<fair-g>", "<fair-g>_1", "<fair-g>_2", "<fair-g>_3", "<fair-g>_4"]
    saved = load_file(str(tmp_path / SOFT_TOKENS_NAME))
    assert list(saved) == ["<fair-g>"]
    assert torch.equal(saved["<fair-g>"], tokens)
    assert not (tmp_path / LORA_WEIGHT_NAME).exists()


def test_lora_and_soft_tokens_together(pipe, tmp_path):
    metadata, *_ = save_random_adaptor(tmp_path, pipe, unet=True, soft_tokens=2)
    assert metadata.kind == "lora+soft_tokens"
    assert set(metadata.files) == {LORA_WEIGHT_NAME, SOFT_TOKENS_NAME}


# --------------------------------------------------------------------------- metadata
def test_metadata_round_trips_and_hashes_the_weights(pipe, tmp_path):
    written, *_ = save_random_adaptor(tmp_path, pipe, unet=True, soft_tokens=3)
    adaptor = read_fair_adaptor(tmp_path)
    assert adaptor.metadata == written
    assert adaptor.metadata.format_version == FORMAT_VERSION
    on_disk = json.loads((tmp_path / METADATA_NAME).read_text())
    assert on_disk["base_model"] == TOY_BASE_MODEL and on_disk["text_hidden_size"] == 64
    for name, digest in on_disk["files"].items():
        assert digest == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    assert written.target_distributions() == [TargetDistribution.uniform("gender", ["male", "female"])]
    assert set(written.library_versions) == {"diffusers_fair", "diffusers", "peft"}


def test_joint_target_dict_round_trip():
    joint = TargetDistribution.joint({"gender": ["male", "female"], "age": ["young", "old"]}, [[0.4, 0.1], [0.3, 0.2]])
    data = target_to_dict(joint)
    assert json.loads(json.dumps(data)) == data
    assert data["probs"] == [0.4, 0.1, 0.3, 0.2]
    assert target_from_dict(data) == joint
    with pytest.raises(ValueError, match="probabilities"):
        target_from_dict({"classes": {"gender": ["male", "female"]}, "probs": [0.5, 0.3, 0.2]})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"text_hidden_size": 0}, "text_hidden_size"),
        ({"cross_attention_dim": 7.5}, "cross_attention_dim"),
        ({"metrics_after": {"bias": float("nan")}}, "not finite"),
        ({"metrics_before": {"bias": "low"}}, "number"),
        ({"training": {"optimizer": object()}}, "JSON"),
        ({"format_version": FORMAT_VERSION + 1}, "upgrade"),
        ({"kind": "full-finetune"}, "kind"),
        ({"base_model": ""}, "base_model"),
    ],
)
def test_metadata_rejects_bad_fields(change, message):
    with pytest.raises(ValueError, match=message):
        make_metadata(**change)


def test_metadata_for_pipeline_needs_an_identifiable_base(pipe):
    with pytest.raises(ValueError, match="base_model"):
        FairAdaptorMetadata.for_pipeline(pipe, name="x")
    meta = FairAdaptorMetadata.for_pipeline(pipe, name="x", base_model="runwayml/stable-diffusion-v1-5")
    assert meta.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (meta.text_hidden_size, meta.cross_attention_dim) == (64, 64)


def test_base_model_id_of_pipelines(tmp_path):
    from diffusers_fair import toy

    (tmp_path / "marked").mkdir()
    (tmp_path / "marked" / BASE_MODEL_MARKER).write_text('{"base_model": "someone/base"}')
    (tmp_path / "copy").mkdir()
    (tmp_path / "not-a-dict").mkdir()
    (tmp_path / "not-a-dict" / BASE_MODEL_MARKER).write_text('["someone/base"]')

    def named(name):
        return SimpleNamespace(name_or_path=name)

    assert base_model_id(named(toy.model_path())) == TOY_BASE_MODEL  # the shipped toy model carries the marker
    assert base_model_id(named(str(tmp_path / "marked"))) == "someone/base"
    assert base_model_id(named("runwayml/stable-diffusion-v1-5")) == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert base_model_id(named(str(tmp_path / "copy"))) is None  # a local folder without the marker: unknown
    assert base_model_id(named(str(tmp_path / "not-a-dict"))) is None
    assert base_model_id(named(str(tmp_path / "deleted"))) is None  # neither a folder nor a repo id
    assert base_model_id(named(None)) is None  # built in memory


# --------------------------------------------------------------------------- model card
def _header(path) -> dict:
    """The YAML header of a card file, parsed on its own (what the Hub reads)."""
    text = Path(path).read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_has_base_model_license_and_eval_results(pipe, tmp_path):
    metrics = {"bias_gender": 0.125, "clip_t": 0.3}
    save_random_adaptor(tmp_path, pipe, soft_tokens=2, metrics_after=metrics, base_model=SD15)
    card = ModelCard.load(tmp_path / CARD_NAME)
    assert card.data.base_model == SD15
    assert card.data.license == "creativeml-openrail-m"  # the base model's, none being stated
    assert card.data.library_name == "diffusers"
    assert {"fairness", "diffusers-fair", "gender", "lora-soft_tokens"} <= set(card.data.tags)
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"bias_gender": 0.125, "clip_t": 0.3}
    assert _header(tmp_path / CARD_NAME)["model-index"][0]["name"] == "test-gender"
    for section in ("## Intended use", "## Out-of-scope use", "## Attributes and their limits", "## Evaluation", "## Training"):
        assert section in card.text
    assert "gender: male=0.5, female=0.5" in card.text
    assert "| bias_gender | 0.600 | 0.125 |" in card.text
    digest = json.loads((tmp_path / METADATA_NAME).read_text())["files"][LORA_WEIGHT_NAME]
    assert digest in card.text
    assert f'pipe.load_fair_adaptor("{PLACEHOLDER}")' in card.text  # the repo id is put in on push


def test_toy_card_names_the_toy_model_in_the_text_not_as_base_model(pipe, tmp_path):
    save_random_adaptor(tmp_path, pipe)  # base model: the toy model
    header = _header(tmp_path / CARD_NAME)
    assert "base_model" not in header  # diffusers-fair/toy is no Hub repo
    assert header["license"] == "unknown"  # the package states no license
    card = ModelCard.load(tmp_path / CARD_NAME)
    assert "the diffusers-fair toy model" in card.text and "diffusers_fair.toy.model_path()" in card.text
    assert "StableDiffusionPipeline.from_pretrained(model_path())" in card.text
    assert "import diffusers_fair" in card.text


@pytest.mark.parametrize("metrics, license", [({}, ""), ({"bias_gender": 0.2}, "mit"), ({"a/b": 1e-7, "c": 3.0}, "")])
def test_every_card_reads_back_with_eval_results_and_no_stray_keys(pipe, tmp_path, metrics, license):
    metadata = replace(make_metadata(base_model=SD15, license=license, metrics_after=metrics), kind="lora")
    build_model_card(metadata).save(tmp_path / CARD_NAME)
    header = _header(tmp_path / CARD_NAME)
    assert set(header) <= {"base_model", "library_name", "license", "pipeline_tag", "tags", "model-index"}
    assert header["license"] == (license or "creativeml-openrail-m")
    card = ModelCard.load(tmp_path / CARD_NAME)
    read_back = {(r.task_type, r.dataset_name, r.metric_type, r.metric_value) for r in card.data.eval_results or []}
    assert read_back == {("text-to-image", metadata.eval_prompts, name, value) for name, value in metrics.items()}
    assert ("model-index" in header) == bool(metrics)


def test_shipped_toy_cards_are_built_from_their_metadata():
    from diffusers_fair.adaptors import hub

    local = {name: entry for name, entry in hub.load_index().items() if entry.status == "local"}
    assert local
    for name, entry in local.items():
        folder = entry.folder(hub.INDEX_DIR)
        metadata = read_fair_adaptor(folder).metadata
        written = (folder / CARD_NAME).read_text(encoding="utf-8")
        assert written == str(build_model_card(metadata, name_or_path=name)), name
        assert f'pipe.load_fair_adaptor("{name}")' in written
        card = ModelCard.load(folder / CARD_NAME)
        assert card.data.base_model is None and card.data.license == "unknown"
        assert {r.metric_type: r.metric_value for r in card.data.eval_results} == metadata.metrics_after
        assert "diffusers_fair.pipeline" not in written  # no stale module paths


def test_card_for_repo_puts_in_the_repo_id_and_license_keeping_edits(pipe, tmp_path):
    save_random_adaptor(tmp_path, pipe, base_model=SD15)
    text = (tmp_path / CARD_NAME).read_text(encoding="utf-8") + "\n## Notes\n\nA hand-written note.\n"
    pushed = card_for_repo(text, "me/fair-gender")
    assert PLACEHOLDER not in pushed and 'pipe.load_fair_adaptor("me/fair-gender")' in pushed
    assert 'pipe.load_lora_weights("me/fair-gender")' in pushed and "A hand-written note." in pushed
    (tmp_path / "pushed.md").write_text(card_for_repo(text, "me/fair-gender", license="apache-2.0"), encoding="utf-8")
    card = ModelCard.load(tmp_path / "pushed.md")
    assert card.data.license == "apache-2.0" and card.data.base_model == SD15
    assert {r.metric_type for r in card.data.eval_results} == {"bias_gender"}


def test_update_metadata_rewrites_card_and_metadata_but_not_the_weights(pipe, tmp_path):
    written, *_ = save_random_adaptor(tmp_path, pipe, soft_tokens=2)
    weights = {name: (tmp_path / name).read_bytes() for name in written.files}
    updated = update_fair_adaptor_metadata(tmp_path, metrics_after={"bias_gender": 0.05}, eval_prompts="20 words")
    assert updated == replace(written, metrics_after={"bias_gender": 0.05}, eval_prompts="20 words")
    assert read_fair_adaptor(tmp_path).metadata == updated
    assert {name: (tmp_path / name).read_bytes() for name in written.files} == weights
    assert "| bias_gender | 0.600 | 0.050 |" in ModelCard.load(tmp_path / CARD_NAME).text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*written.files, METADATA_NAME, CARD_NAME])
    with pytest.raises(ValueError, match="can be updated"):
        update_fair_adaptor_metadata(tmp_path, files={})
    with pytest.raises(ValueError, match="metrics_after"):
        update_fair_adaptor_metadata(tmp_path, metrics_after={"bias_gender": "low"})
    assert read_fair_adaptor(tmp_path).metadata == updated  # a rejected update changes nothing
    (tmp_path / LORA_WEIGHT_NAME).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        update_fair_adaptor_metadata(tmp_path, eval_prompts="x")


# --------------------------------------------------------------------------- validation
def test_read_detects_tampering_and_bad_metadata(pipe, tmp_path):
    save_random_adaptor(tmp_path, pipe)
    assert read_fair_adaptor(tmp_path).has_lora
    weights = tmp_path / LORA_WEIGHT_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        read_fair_adaptor(tmp_path)
    read_fair_adaptor(tmp_path, verify=False)  # the check can be skipped explicitly
    weights.unlink()
    with pytest.raises(ValueError, match="missing"):
        read_fair_adaptor(tmp_path)

    meta_path = tmp_path / METADATA_NAME
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "colour": "blue"}))
    with pytest.raises(ValueError, match="unknown fields"):
        read_fair_adaptor(tmp_path)
    meta_path.write_text(json.dumps({**meta, "kind": "soft_tokens"}))
    with pytest.raises(ValueError, match="does not match the files"):
        read_fair_adaptor(tmp_path)
    meta_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_fair_adaptor(tmp_path)
    meta_path.unlink()
    with pytest.raises(ValueError, match="not a fair adaptor"):
        read_fair_adaptor(tmp_path)


def test_save_rejects_bad_input(pipe, tmp_path):
    state, config = random_lora(pipe.text_encoder, TE_TARGETS, 0)
    meta = make_metadata()
    with pytest.raises(ValueError, match="nothing to save"):
        save_fair_adaptor(tmp_path / "a", metadata=meta)
    with pytest.raises(ValueError, match="needs its LoraConfig"):
        save_fair_adaptor(tmp_path / "b", metadata=meta, text_encoder_lora=state)
    with pytest.raises(ValueError, match="rank 4, its config says r=8"):
        save_fair_adaptor(tmp_path / "c", metadata=meta, text_encoder_lora=state, text_encoder_lora_config=LoraConfig(r=8, target_modules=TE_TARGETS))
    renamed = {k.replace("lora_A.weight", "lora_A.default.weight"): v for k, v in state.items()}
    with pytest.raises(ValueError, match="get_peft_model_state_dict"):
        save_fair_adaptor(tmp_path / "d", metadata=meta, text_encoder_lora=renamed, text_encoder_lora_config=config)
    missing_b = {k: v for k, v in state.items() if "q_proj.lora_B" not in k}
    with pytest.raises(ValueError, match="lacks its lora_A or lora_B"):
        save_fair_adaptor(tmp_path / "e", metadata=meta, text_encoder_lora=missing_b, text_encoder_lora_config=config)
    with pytest.raises(ValueError, match="text_hidden_size"):
        save_fair_adaptor(tmp_path / "f", metadata=make_metadata(text_hidden_size=32), text_encoder_lora=state, text_encoder_lora_config=config)
    with pytest.raises(ValueError, match="soft_tokens have size 32"):
        save_fair_adaptor(tmp_path / "g", metadata=meta, soft_tokens=torch.zeros(5, 32))
    with pytest.raises(ValueError, match="without spaces"):
        save_fair_adaptor(tmp_path / "h", metadata=meta, soft_tokens=torch.zeros(5, 64), soft_token="<my token>")
    with pytest.raises(ValueError, match="make a 'lora' adaptor"):
        save_fair_adaptor(tmp_path / "i", metadata=make_metadata(kind="soft_tokens"), text_encoder_lora=state, text_encoder_lora_config=config)
    assert not any((tmp_path / d).exists() for d in "abcdefghi")  # nothing written on a refused save

    save_fair_adaptor(tmp_path / "ok", metadata=meta, soft_tokens=torch.zeros(2, 64))
    with pytest.raises(ValueError, match="overwrite=True"):
        save_fair_adaptor(tmp_path / "ok", metadata=meta, text_encoder_lora=state, text_encoder_lora_config=config)
    rewritten = save_fair_adaptor(tmp_path / "ok", metadata=meta, text_encoder_lora=state, text_encoder_lora_config=config, overwrite=True)
    assert rewritten.kind == "lora" and not (tmp_path / "ok" / SOFT_TOKENS_NAME).exists()
    assert read_fair_adaptor(tmp_path / "ok").metadata == rewritten
