"""Loading fair adaptors into pipelines: FairFinetunePipeline and load_fair_adaptor on stock pipelines,
the adaptor index, and FairFinetunePipeline's saved folders. (The methods on stock pipelines and
stock calls interleaved with package calls: tests/test_stock_pipeline.py.)

Reference outputs are computed independently: LoRA effects with forward hooks adding
``weight * B A x`` to each adapted layer (tests/test_adaptors.py LoraHooks), soft tokens with
diffusers' own textual-inversion loader and a hand-written prompt.
"""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline, StableDiffusionPipeline

from diffusers_fair.adaptors import hub
from diffusers_fair.adaptors.format import save_fair_adaptor
from diffusers_fair.adaptors.metadata import TOY_BASE_MODEL
from diffusers_fair.adaptors.pipeline import (
    FairFinetunePipeline,
    add_fair_tokens,
    fair_adaptors,
    load_fair_adaptor,
    unload_fair_adaptor,
)
from helpers.adaptors import (
    PROMPT,
    LoraHooks,
    assert_same,
    generate,
    make_metadata,
    pipeline_state,
    random_lora,
    save_random_adaptor,
    text_states,
    tiny_pipeline,
)


@pytest.fixture(scope="module")
def adaptors(tmp_path_factory):
    """Adaptor folders with random weights for the tiny pipeline: te LoRA (two), te+unet LoRA, soft tokens, both."""
    root = tmp_path_factory.mktemp("adaptors")
    shapes = tiny_pipeline(0)
    out = {}
    out["a"] = (root / "a", *save_random_adaptor(root / "a", shapes, seed=1, name="lora-a"))
    out["b"] = (root / "b", *save_random_adaptor(root / "b", shapes, seed=2, name="lora-b"))
    out["unet"] = (root / "unet", *save_random_adaptor(root / "unet", shapes, seed=3, unet=True, name="lora-unet"))
    out["soft"] = (root / "soft", *save_random_adaptor(root / "soft", shapes, seed=4, text_encoder=False, soft_tokens=3, name="soft"))
    out["both"] = (root / "both", *save_random_adaptor(root / "both", shapes, seed=5, soft_tokens=2, soft_token="<both>", name="both"))
    return out


# --------------------------------------------------------------------------- no adaptor
def test_without_adaptor_fair_pipeline_is_bit_exact_stock():
    stock = tiny_pipeline(0)
    fair = FairFinetunePipeline(**stock.components)
    for kwargs in ({}, {"negative_prompt": "a nurse", "guidance_scale": 5.0}, {"num_images_per_prompt": 2}):
        assert np.array_equal(generate(stock, **kwargs), generate(fair, **kwargs))
    prompts = [PROMPT, "a photo of a nurse"]
    assert np.array_equal(generate(stock, prompts), generate(fair, prompts))


def test_from_pretrained_and_from_pipe(tmp_path, adaptors):
    tiny_pipeline(0).save_pretrained(tmp_path / "model")
    stock = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    fair = FairFinetunePipeline.from_pretrained(tmp_path / "model")
    for p in (stock, fair):
        p.set_progress_bar_config(disable=True)
    assert isinstance(fair, FairFinetunePipeline)
    assert np.array_equal(generate(stock), generate(fair))

    # A stock pipeline with soft tokens loaded by the function: from_pipe carries them over and
    # FairFinetunePipeline then starts prompts with them.
    load_fair_adaptor(stock, adaptors["soft"][0])
    by_hand = generate(stock, "<fair> " + PROMPT)
    converted = FairFinetunePipeline.from_pipe(stock)
    assert list(converted.fair_adaptors) == ["soft"]
    assert np.array_equal(generate(converted), by_hand)


def test_shipped_toy_model_bit_exact_and_recognised(adaptors, shapes, tmp_path):
    from diffusers_fair.toy import MODEL_DIR, model_path

    if not (MODEL_DIR / "model_index.json").exists():
        pytest.skip("the toy model is not built")
    stock = StableDiffusionPipeline.from_pretrained(model_path())
    fair = FairFinetunePipeline.from_pretrained(model_path())
    for p in (stock, fair):
        p.set_progress_bar_config(disable=True)
    prompt = "a photo of the face of a nurse, a person"
    assert np.array_equal(generate(stock, prompt), generate(fair, prompt))

    save_random_adaptor(tmp_path / "for-sd15", shapes, seed=9, name="for-sd15", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    with pytest.raises(ValueError, match="this pipeline is diffusers-fair/toy"):
        fair.load_fair_adaptor(tmp_path / "for-sd15")
    fair.load_fair_adaptor(adaptors["a"][0])  # made for diffusers-fair/toy
    assert not np.array_equal(generate(stock, prompt), generate(fair, prompt))


# --------------------------------------------------------------------------- LoRA
def test_lora_adaptor_equals_stock_load_lora_weights_and_hooks(adaptors):
    folder, _, te_state, unet_state, _ = adaptors["unet"]
    stock, fair = tiny_pipeline(0), tiny_pipeline(0, cls=FairFinetunePipeline)
    base_image = generate(stock)
    stock.load_lora_weights(folder)  # diffusers alone
    record = fair.load_fair_adaptor(folder)
    assert record.adapter_name == "lora-unet" and record.has_lora
    assert torch.equal(text_states(stock), text_states(fair))
    image = generate(fair)
    assert np.array_equal(generate(stock), image)
    assert not np.allclose(image, base_image, atol=1e-3)

    reference = tiny_pipeline(0)
    hooks = [LoraHooks(reference.text_encoder, (1.0, te_state)), LoraHooks(reference.unet, (1.0, unet_state))]
    torch.testing.assert_close(text_states(fair), text_states(reference), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(image, generate(reference), atol=1e-4)
    for h in hooks:
        h.remove()


def test_two_adaptors_combine_with_weights_and_unload(adaptors):
    pipe = tiny_pipeline(0)
    base = pipeline_state(pipe)
    folder_a, _, state_a, _, _ = adaptors["a"]
    folder_b, _, state_b, _, _ = adaptors["b"]
    load_fair_adaptor(pipe, folder_a, weight=0.5)
    load_fair_adaptor(pipe, folder_b, weight=-0.75)
    assert {n: a.weight for n, a in fair_adaptors(pipe).items()} == {"lora-a": 0.5, "lora-b": -0.75}
    assert sorted(pipe.get_active_adapters()) == ["lora-a", "lora-b"]

    reference = tiny_pipeline(0)
    hooks = LoraHooks(reference.text_encoder, (0.5, state_a), (-0.75, state_b))
    torch.testing.assert_close(text_states(pipe), text_states(reference), rtol=1e-5, atol=1e-5)
    hooks.remove()

    unload_fair_adaptor(pipe, "lora-a")
    hooks = LoraHooks(reference.text_encoder, (-0.75, state_b))
    torch.testing.assert_close(text_states(pipe), text_states(reference), rtol=1e-5, atol=1e-5)
    hooks.remove()
    with pytest.raises(ValueError, match="no fair adaptor named 'lora-a'"):
        unload_fair_adaptor(pipe, "lora-a")
    unload_fair_adaptor(pipe)
    assert_same(base, pipeline_state(pipe))  # unfused unload restores the pipeline bit for bit
    assert "base_layer" not in "".join(pipe.text_encoder.state_dict())  # LoRA wrappers removed too


def test_fused_adaptor_matches_unfused(adaptors):
    folder_a = adaptors["a"][0]
    folder_unet = adaptors["unet"][0]
    plain, fused = tiny_pipeline(0), tiny_pipeline(0)
    base = generate(fused)
    load_fair_adaptor(plain, folder_a, weight=0.5)
    load_fair_adaptor(fused, folder_a, weight=0.5, fuse=True)
    np.testing.assert_allclose(generate(fused), generate(plain), atol=1e-5)
    # a second adaptor joins the fused set
    load_fair_adaptor(plain, folder_unet, weight=0.8)
    load_fair_adaptor(fused, folder_unet, weight=0.8)
    np.testing.assert_allclose(generate(fused), generate(plain), atol=1e-5)
    unload_fair_adaptor(fused, "lora-a")
    unload_fair_adaptor(plain, "lora-a")
    np.testing.assert_allclose(generate(fused), generate(plain), atol=1e-5)
    unload_fair_adaptor(fused)
    np.testing.assert_allclose(generate(fused), base, atol=1e-5)  # restored by subtraction: equal up to rounding


# --------------------------------------------------------------------------- soft tokens
def test_soft_tokens_are_prepended_to_prompts_not_negative_prompts(adaptors):
    folder = adaptors["soft"][0]
    stock, fair = tiny_pipeline(0), tiny_pipeline(0, cls=FairFinetunePipeline)
    base = generate(fair)
    stock.load_textual_inversion(folder)  # diffusers alone, the token written by hand
    record = fair.load_fair_adaptor(folder)
    assert record.soft_token == "<fair>" and record.token_names == ["<fair>", "<fair>_1", "<fair>_2"]
    image = generate(fair)
    assert np.array_equal(image, generate(stock, "<fair> " + PROMPT))
    assert not np.allclose(image, base, atol=1e-3)
    prompts = [PROMPT, "a photo of a nurse"]
    assert np.array_equal(generate(fair, prompts), generate(stock, ["<fair> " + p for p in prompts]))
    assert add_fair_tokens(fair, prompts) == ["<fair> " + p for p in prompts]

    seen = {}
    original = fair.encode_prompt

    def spy(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None, **kwargs):
        seen["prompt"], seen["negative"] = prompt, negative_prompt
        return original(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt, **kwargs)

    fair.encode_prompt = spy
    generate(fair, negative_prompt="a nurse")
    assert seen == {"prompt": "<fair> " + PROMPT, "negative": "a nurse"}
    del fair.encode_prompt

    embeds, _ = fair.encode_prompt(fair.add_fair_tokens(PROMPT), "cpu", 1, False)
    with pytest.raises(ValueError, match="prompt_embeds"):
        fair(prompt_embeds=embeds, num_inference_steps=2)
    with pytest.raises(ValueError, match="weighted"):
        load_fair_adaptor(tiny_pipeline(0), folder, weight=0.5)

    fair.unload_fair_adaptor()
    assert np.array_equal(generate(fair), base)
    assert fair.text_encoder.config.vocab_size == len(fair.tokenizer)


# --------------------------------------------------------------------------- failures leave the pipeline unchanged
def _corrupt(folder):
    weights = folder / "pytorch_lora_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "case, message",
    [
        ("hidden size", "hidden size 32"),
        ("cross-attention size", "cross-attention size of 32"),
        ("base model", "trained on stable-diffusion-v1-5"),
        ("corrupt weights", "sha256"),
        ("token taken", "already in the tokenizer"),
        ("name taken", "already loaded"),
        ("missing layer", "does not have"),
        ("unpublished", "not published"),
        ("fails while loading", "injected failure"),
    ],
)
def test_failed_load_leaves_pipeline_unchanged(case, message, adaptors, shapes, tmp_path, monkeypatch):
    pipe = tiny_pipeline(0, cls=FairFinetunePipeline)
    load_fair_adaptor(pipe, adaptors["a"][0], weight=0.7)
    load_fair_adaptor(pipe, adaptors["soft"][0])
    before = pipeline_state(pipe)

    target = adaptors["both"][0]
    kwargs = {}
    if case in ("hidden size", "cross-attention size"):
        field = "text_hidden_size" if case == "hidden size" else "cross_attention_dim"
        meta = make_metadata("other", **{field: 32})
        target = tmp_path / "other"
        save_fair_adaptor(target, metadata=meta, soft_tokens=torch.zeros(2, meta.text_hidden_size), soft_token="<other>")
    elif case == "base model":
        target = tmp_path / "sd15"
        save_random_adaptor(target, shapes, seed=9, name="sd15", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
        pipe.register_to_config(_name_or_path=TOY_BASE_MODEL)
    elif case == "corrupt weights":
        target = tmp_path / "corrupt"
        save_random_adaptor(target, shapes, seed=9, name="corrupt")
        _corrupt(target)
    elif case == "token taken":
        target, kwargs = adaptors["soft"][0], {"adapter_name": "soft-again"}
    elif case == "name taken":
        kwargs = {"adapter_name": "lora-a"}
    elif case == "missing layer":
        # LoRA weights for a third encoder layer; the tiny text encoder has two.
        state, config = random_lora(shapes.text_encoder, ["q_proj"], 9)
        state = {k.replace("layers.1.", "layers.2."): v for k, v in state.items()}
        target = tmp_path / "missing"
        save_fair_adaptor(target, metadata=make_metadata("missing"), text_encoder_lora=state, text_encoder_lora_config=config)
    elif case == "unpublished":
        target = "gender"
    elif case == "fails while loading":
        def broken(*args, **kwargs):
            raise RuntimeError("injected failure")

        monkeypatch.setattr(pipe, "load_textual_inversion", broken)

    with pytest.raises((ValueError, RuntimeError), match=message):
        load_fair_adaptor(pipe, target, **kwargs)
    if case == "base model":
        pipe.register_to_config(_name_or_path=None)
    monkeypatch.undo()
    assert_same(before, pipeline_state(pipe))
    assert {n: a.weight for n, a in fair_adaptors(pipe).items()} == {"lora-a": 0.7, "soft": 1.0}


def test_base_model_check_uses_hub_ids_and_aliases(adaptors, tmp_path):
    pipe = tiny_pipeline(0)
    folder = tmp_path / "sd15"
    save_random_adaptor(folder, pipe, seed=9, name="sd15", base_model="runwayml/stable-diffusion-v1-5")
    pipe.register_to_config(_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert load_fair_adaptor(pipe, folder).metadata.base_model == "runwayml/stable-diffusion-v1-5"
    pipe.register_to_config(_name_or_path="someone/another-model")
    with pytest.raises(ValueError, match="check_base_model=False"):
        load_fair_adaptor(pipe, adaptors["a"][0])
    load_fair_adaptor(pipe, adaptors["a"][0], check_base_model=False)
    assert sorted(fair_adaptors(pipe)) == ["lora-a", "sd15"]


# --------------------------------------------------------------------------- the index
SD15_NAMES = ("gender", "gender-race", "gender-race-age", "gender-race-multi-concept", "race", "gender-soft-tokens")
RELEASE_FILE = {"lora": "text_encoder_lora_EMA.pth", "soft_tokens": "prefix_embedding_EMA.pth"}
RELEASE_DOCS = "https://github.com/sail-sg/finetune-fair-diffusion/blob/main/exp-"


def test_shipped_index_is_valid_and_unpublished_entries_refuse():
    index = hub.load_index()
    for name in SD15_NAMES:
        assert index[name].status == "unpublished"
        assert index[name].base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    toy = [e for e in index.values() if e.name.startswith("toy-")]
    assert toy and all(e.status == "local" and e.base_model == TOY_BASE_MODEL for e in toy)
    assert {"toy-gender-race", "toy-gender-soft-tokens"} <= set(index)
    entry = index["gender-race"]
    with pytest.raises(ValueError, match="not published yet") as error:
        hub.resolve_adaptor("gender-race")
    message = str(error.value)
    assert "\n" not in message  # one line on the command line
    release = entry.release
    for part in (entry.convert, release["documentation"], release["archive"], 'load_fair_adaptor("fair-adaptors/gender-race")'):
        assert part in message
    with pytest.raises(ValueError, match="not an adaptor name"):
        hub.resolve_adaptor("no-such-adaptor")


def test_sd15_entries_name_the_release_and_the_exact_convert_command():
    from diffusers_fair.cli import build_parser

    index = hub.load_index()
    adaptors_doc = (Path(__file__).parent.parent / "docs" / "ADAPTORS.md").read_text(encoding="utf-8")
    for name in SD15_NAMES:
        entry = index[name]
        assert entry.release["documentation"].startswith(RELEASE_DOCS)
        assert entry.release["archive"].endswith("-checkpoints.zip")
        # The command line parses it as a conversion of the entry's released file into the entry's adaptor.
        words = shlex.split(entry.convert)
        assert words[0] == "diffusers-fair"
        args = build_parser().parse_args(words[1:])
        assert args.command == "convert" and args.src == entry.release["file"]
        assert Path(args.src).name == RELEASE_FILE[entry.kind]
        assert args.name == name and args.target == list(entry.targets)
        assert args.dst == entry.convert_destination == f"fair-adaptors/{name}"
        assert entry.convert in adaptors_doc, name  # the docs show the same command


@pytest.mark.parametrize(
    "change, message",
    [
        ({"release": {"documentation": "https://x"}}, "'release' must give"),
        ({"release": None, "convert": "diffusers-fair convert a.pth out"}, "must convert the released file"),
        ({"convert": "python convert.py a.pth out"}, "must be a command"),
        ({"convert": "diffusers-fair convert other.pth out"}, "must convert the released file"),
    ],
)
def test_index_release_fields_are_checked(change, message, tmp_path):
    entry = {
        "status": "unpublished", "description": "test", "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "kind": "lora", "repo_id": "a/b",
        "release": {"documentation": "https://x", "archive": "x.zip", "file": "run/text_encoder_lora_EMA.pth"},
        "convert": "diffusers-fair convert run/text_encoder_lora_EMA.pth out --name x",
    }
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"format_version": 1, "adaptors": {"x": entry}}))
    assert hub.load_index(index)["x"].convert_destination == "out"
    index.write_text(json.dumps({"format_version": 1, "adaptors": {"x": {**entry, **change}}}))
    with pytest.raises(ValueError, match=message):
        hub.load_index(index)


def test_local_index_entries_load_by_name(adaptors, tmp_path, monkeypatch):
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    save_random_adaptor(index_dir / "shipped", tiny_pipeline(0), seed=1, name="toy-test")
    entry = {"status": "local", "description": "test", "base_model": TOY_BASE_MODEL, "kind": "lora", "targets": ["gender: male, female"]}
    index = {
        "format_version": 1,
        "adaptors": {
            "toy-test": {**entry, "path": "shipped"},
            "toy-unbuilt": {**entry, "path": "unbuilt"},
            "toy-wrong-kind": {**entry, "path": "shipped", "kind": "soft_tokens"},
        },
    }
    (index_dir / "index.json").write_text(json.dumps(index))
    monkeypatch.setattr(hub, "INDEX_PATH", index_dir / "index.json")

    pipe, reference = tiny_pipeline(0), tiny_pipeline(0)
    record = load_fair_adaptor(pipe, "toy-test")
    load_fair_adaptor(reference, index_dir / "shipped")
    assert record.adapter_name == "toy-test"
    assert np.array_equal(generate(pipe), generate(reference))
    with pytest.raises(ValueError, match="not built"):
        load_fair_adaptor(pipe, "toy-unbuilt")
    with pytest.raises(ValueError, match="announces a soft_tokens adaptor"):
        load_fair_adaptor(pipe, "toy-wrong-kind")
    with pytest.raises(ValueError, match="revision= applies to Hub adaptors only"):
        load_fair_adaptor(pipe, "toy-test", revision="main")

    bad = {"format_version": 1, "adaptors": {"x": {**entry, "status": "published", "repo_id": "a/b", "revision": "main"}}}
    (index_dir / "index.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="commit sha"):
        hub.load_index()


# --------------------------------------------------------------------------- saved folders
def test_saved_fair_pipeline_loads_with_every_diffusers_loader(tmp_path, adaptors):
    fair = tiny_pipeline(0, cls=FairFinetunePipeline)
    fair.save_pretrained(tmp_path / "model")
    model_index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionPipeline"
    expected = generate(fair)
    loaders = [(DiffusionPipeline, StableDiffusionPipeline), (AutoPipelineForText2Image, StableDiffusionPipeline),
               (StableDiffusionPipeline, StableDiffusionPipeline), (FairFinetunePipeline, FairFinetunePipeline)]
    for loader, cls in loaders:
        loaded = loader.from_pretrained(tmp_path / "model")
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is cls, loader
        assert np.array_equal(generate(loaded), expected), loader


def test_saving_with_lora_loaded_is_refused_and_soft_tokens_are_saved(tmp_path, adaptors):
    fair = tiny_pipeline(0, cls=FairFinetunePipeline)
    fair.load_fair_adaptor(adaptors["a"][0])
    with pytest.raises(ValueError, match="LoRA adapters loaded .*'lora-a'.*unload them first"):
        fair.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    fair.unload_fair_adaptor()
    fair.load_fair_adaptor(adaptors["soft"][0])
    fair.save_pretrained(tmp_path / "with-tokens")
    stock = DiffusionPipeline.from_pretrained(tmp_path / "with-tokens")
    stock.set_progress_bar_config(disable=True)
    assert np.array_equal(generate(stock, "<fair> " + PROMPT), generate(fair))


# --------------------------------------------------------------------------- prompt padding
NATURAL = {"prompt_padding": "natural"}
LONG_NEGATIVE = "a smiling person, a photo of the face of a smiling nurse"


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """Adaptors recording their prompt padding: natural LoRA, natural soft tokens, max-length LoRA."""
    root = tmp_path_factory.mktemp("padded")
    shapes = tiny_pipeline(0)
    return {
        "natural": (root / "natural", *save_random_adaptor(root / "natural", shapes, seed=1, name="natural",
                                                           training=NATURAL)),
        "natural-soft": (root / "natural-soft", *save_random_adaptor(root / "natural-soft", shapes, seed=4,
                                                                     text_encoder=False, soft_tokens=3,
                                                                     name="natural-soft", training=NATURAL)),
        "max": (root / "max", *save_random_adaptor(root / "max", shapes, seed=2, name="max-length",
                                                   training={"prompt_padding": "max_length"})),
    }


def natural_length(pipe, text: str) -> int:
    return len(pipe.tokenizer(text).input_ids)


def padded_by_hand(pipe, texts, length: int) -> torch.Tensor:
    """Each text tokenized to ``length`` tokens with its attention mask, through the text encoder; one row per text."""
    rows = []
    for text in texts:
        tokens = pipe.tokenizer(text, padding="max_length", max_length=length, return_tensors="pt")
        assert tokens.input_ids.shape == (1, length)
        with torch.no_grad():
            rows.append(pipe.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0])
    return torch.cat(rows)


def test_natural_padding_generates_from_the_hand_padded_embeddings(padded):
    folder = padded["natural"][0]
    fair, stock = tiny_pipeline(0, cls=FairFinetunePipeline), tiny_pipeline(0)
    fair.load_fair_adaptor(folder)
    stock.load_fair_adaptor(folder)  # a stock pipeline pads to the maximum length whatever the adaptor says
    length = natural_length(stock, PROMPT)
    assert length < stock.tokenizer.model_max_length
    image = generate(fair)
    expected = generate(stock, None, prompt_embeds=padded_by_hand(stock, [PROMPT], length),
                        negative_prompt_embeds=padded_by_hand(stock, [""], length))
    assert np.array_equal(image, expected)
    assert not np.allclose(image, generate(stock), atol=1e-3)  # the maximum length conditions the U-Net otherwise
    assert np.array_equal(generate(fair, prompt_padding="max_length"), generate(stock))
    # Positional arguments reach the stock call as they would (height, width, num_inference_steps).
    positional = fair(PROMPT, 32, 32, 3, generator=torch.Generator().manual_seed(1), output_type="np").images
    assert np.array_equal(positional, image)

    # A longer negative prompt sets the common length; a list of prompts, several images each.
    prompts = [PROMPT, "a photo of a nurse"]
    length = natural_length(stock, LONG_NEGATIVE)
    assert length > max(natural_length(stock, p) for p in prompts)
    expected = generate(stock, None, prompt_embeds=padded_by_hand(stock, prompts, length),
                        negative_prompt_embeds=padded_by_hand(stock, [LONG_NEGATIVE] * 2, length),
                        num_images_per_prompt=2)
    assert np.array_equal(generate(fair, prompts, negative_prompt=LONG_NEGATIVE, num_images_per_prompt=2), expected)
    # Without guidance there is no negative prompt: the prompts keep the longest prompt's length.
    length = max(natural_length(stock, p) for p in prompts)
    expected = generate(stock, None, prompt_embeds=padded_by_hand(stock, prompts, length), guidance_scale=1.0)
    assert np.array_equal(generate(fair, prompts, guidance_scale=1.0, negative_prompt=LONG_NEGATIVE), expected)


def test_natural_padding_counts_the_soft_tokens(padded):
    folder = padded["natural-soft"][0]
    fair, stock = tiny_pipeline(0, cls=FairFinetunePipeline), tiny_pipeline(0)
    fair.load_fair_adaptor(folder)
    stock.load_textual_inversion(folder)  # diffusers alone; the tokens written by hand
    text = "<fair> <fair>_1 <fair>_2 " + PROMPT
    length = natural_length(stock, text)
    assert length == natural_length(stock, PROMPT) + 3
    expected = generate(stock, None, prompt_embeds=padded_by_hand(stock, [text], length),
                        negative_prompt_embeds=padded_by_hand(stock, [""], length))
    assert np.array_equal(generate(fair), expected)


def test_natural_padding_scales_the_text_encoder_lora_as_the_stock_call_does(padded):
    folder, _, te_state, _, _ = padded["natural"]
    fair = tiny_pipeline(0, cls=FairFinetunePipeline)
    fair.load_fair_adaptor(folder)
    reference = tiny_pipeline(0)
    hooks = LoraHooks(reference.text_encoder, (0.5, te_state))
    length = natural_length(reference, PROMPT)
    cond, uncond = padded_by_hand(reference, [PROMPT], length), padded_by_hand(reference, [""], length)
    hooks.remove()
    expected = generate(reference, None, prompt_embeds=cond, negative_prompt_embeds=uncond)
    unscaled = generate(fair)
    np.testing.assert_allclose(generate(fair, cross_attention_kwargs={"scale": 0.5}), expected, atol=1e-4)
    assert np.array_equal(generate(fair), unscaled)  # the LoRA's scale is put back after the call


def test_max_length_adaptors_generate_as_a_stock_pipeline(padded):
    folder = padded["max"][0]
    fair, stock = tiny_pipeline(0, cls=FairFinetunePipeline), tiny_pipeline(0)
    fair.load_fair_adaptor(folder)
    stock.load_fair_adaptor(folder)
    for kwargs in ({}, {"negative_prompt": LONG_NEGATIVE, "num_images_per_prompt": 2}):
        assert np.array_equal(generate(fair, **kwargs), generate(stock, **kwargs))


def test_the_padding_of_active_adaptors_decides_and_mixed_paddings_are_refused(padded):
    fair = tiny_pipeline(0, cls=FairFinetunePipeline)
    fair.load_fair_adaptor(padded["natural"][0])
    fair.load_fair_adaptor(padded["max"][0])
    with pytest.raises(ValueError, match=r"different prompt paddings \{'natural': 'natural', 'max-length': "
                                         r"'max_length'\}; pass prompt_padding="):
        generate(fair)
    natural = generate(fair, prompt_padding="natural")
    assert not np.allclose(natural, generate(fair, prompt_padding="max_length"), atol=1e-3)
    fair.set_adapters(["natural", "max-length"], [1.0, 0.0])  # both still active: still refused
    with pytest.raises(ValueError, match="different prompt paddings"):
        generate(fair)
    fair.set_adapters(["natural"])  # the max-length adaptor inactive: the natural one decides
    assert np.array_equal(generate(fair), generate(fair, prompt_padding="natural"))

    with pytest.raises(ValueError, match="prompt_padding must be one of"):
        generate(fair, prompt_padding="longest")
    with pytest.raises(ValueError, match="clip_skip is not supported with natural prompt padding"):
        generate(fair, clip_skip=1)
    embeds, negative = fair.encode_prompt(PROMPT, "cpu", 1, True)
    with pytest.raises(ValueError, match="encodes prompt and negative_prompt itself"):
        generate(fair, negative_prompt_embeds=negative)
    # Embeddings alone are the caller's, used as given.
    assert np.array_equal(generate(fair, None, prompt_embeds=embeds, negative_prompt_embeds=negative),
                          generate(fair, prompt_padding="max_length"))
