"""Fair adaptors on stock diffusers pipelines: the methods ``import diffusers_fair`` adds, and package
calls interleaved with diffusers' own LoRA and textual-inversion calls.

The state of record is peft's and the tokenizer's: after any stock call (``set_adapters``,
``fuse_lora``, ``unload_lora_weights``, ``delete_adapters``, ``unload_textual_inversion``) the next
package call must neither undo it nor refuse because of a stale record. Reference outputs are
computed independently with forward hooks adding ``weight * B A x`` (``LoraHooks``), or with a
second pipeline that reached the same state by other calls.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

import diffusers_fair
from diffusers_fair.adaptors.pipeline import (
    METHOD_NAMES,
    FairAdaptorMixin,
    FairFinetunePipeline,
    add_fair_tokens,
    fair_adaptors,
    load_fair_adaptor,
    register_pipeline_methods,
)
from helpers.adaptors import (
    PROMPT,
    LoraHooks,
    assert_same,
    generate,
    pipeline_state,
    save_random_adaptor,
    text_states,
    tiny_pipeline,
)


COMPONENTS = ["unet", "text_encoder"]


@pytest.fixture(scope="module")
def adaptors(tmp_path_factory, shapes):
    """Random adaptors for the tiny pipeline: two text-encoder LoRAs, a text-encoder + U-Net LoRA, soft
    tokens, LoRA and soft tokens."""
    root = tmp_path_factory.mktemp("adaptors")
    out = {}
    for key, kwargs in {
        "a": dict(seed=1, name="lora-a"),
        "b": dict(seed=2, name="lora-b"),
        "unet": dict(seed=3, unet=True, name="lora-unet"),
        "soft": dict(seed=4, text_encoder=False, soft_tokens=3, name="soft"),
        "both": dict(seed=5, soft_tokens=2, soft_token="<both>", name="both"),
    }.items():
        _, te_state, unet_state, _ = save_random_adaptor(root / key, shapes, **kwargs)
        out[key] = (root / key, te_state, unet_state)
    return out


def weights(pipe) -> dict:
    return {name: (a.weight, a.active, a.fused) for name, a in fair_adaptors(pipe).items()}


def assert_text_states_match_hooks(pipe, *weighted_states):
    reference = tiny_pipeline(0)
    hooks = LoraHooks(reference.text_encoder, *weighted_states)
    torch.testing.assert_close(text_states(pipe), text_states(reference), rtol=1e-5, atol=1e-5)
    hooks.remove()


# --------------------------------------------------------------------------- the methods
def test_import_adds_the_methods_to_stable_diffusion_pipelines_only():
    assert diffusers_fair.register_pipeline_methods is register_pipeline_methods
    for cls in (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                StableDiffusionXLPipeline):  # SDXL's loading: tests/test_sdxl.py
        for name in METHOD_NAMES:
            assert getattr(cls, name) is FairAdaptorMixin.__dict__[name], (cls, name)


def test_registration_never_overrides_what_a_class_has():
    def own(self, *args, **kwargs):
        return "own"

    Mine = type("Mine", (), {"load_fair_adaptor": own, "fair_adaptors": "kept"})
    Bare = type("Bare", (), {})
    register_pipeline_methods([Mine, Bare])
    register_pipeline_methods([Mine, Bare])  # a second call changes nothing either
    assert Mine.load_fair_adaptor is own and Mine.fair_adaptors == "kept"
    assert Mine.unload_fair_adaptor is FairAdaptorMixin.__dict__["unload_fair_adaptor"]
    assert all(getattr(Bare, name) is FairAdaptorMixin.__dict__[name] for name in METHOD_NAMES)
    # FairFinetunePipeline keeps its own (the mixin's) methods, before the stock class in its MRO.
    assert FairFinetunePipeline.add_fair_tokens is FairAdaptorMixin.add_fair_tokens


def test_stock_pipeline_method_equals_the_function(adaptors):
    method, function = tiny_pipeline(0), tiny_pipeline(0)
    record = method.load_fair_adaptor(adaptors["unet"][0], weight=0.5)
    assert record == load_fair_adaptor(function, adaptors["unet"][0], weight=0.5)
    assert np.array_equal(generate(method), generate(function))
    assert list(method.fair_adaptors) == ["lora-unet"] and method.fair_adaptors["lora-unet"].weight == 0.5
    with pytest.raises(AttributeError):
        method.fair_adaptors = {}  # a read-only listing
    listing = method.fair_adaptors
    listing.clear()
    assert list(method.fair_adaptors) == ["lora-unet"]  # a copy: clearing it changes nothing
    method.unload_fair_adaptor("lora-unet")
    assert method.fair_adaptors == {} and method.get_list_adapters() == {}


def test_shipped_toy_model_stock_pipeline_draws_what_the_function_draws():
    from diffusers_fair.toy import MODEL_DIR, model_path

    if not (MODEL_DIR / "model_index.json").exists():
        pytest.skip("the toy model is not built")
    prompt = "a photo of the face of a nurse, a person"
    base, method, function = (StableDiffusionPipeline.from_pretrained(model_path()) for _ in range(3))
    for p in (base, method, function):
        p.set_progress_bar_config(disable=True)
    record = method.load_fair_adaptor("toy-gender-race")
    load_fair_adaptor(function, "toy-gender-race")
    assert type(method) is StableDiffusionPipeline and record.source.startswith("toy-gender-race")
    image = generate(method, prompt)
    assert np.array_equal(image, generate(function, prompt))
    assert not np.allclose(image, generate(base, prompt), atol=1e-3)


# --------------------------------------------------------------------------- stock set_adapters
def test_stock_set_adapters_weights_survive_package_calls(adaptors):
    pipe = tiny_pipeline(0)
    (folder_a, state_a, _), (folder_b, state_b, _) = adaptors["a"], adaptors["b"]
    folder_unet, te_unet, unet_unet = adaptors["unet"]
    pipe.load_fair_adaptor(folder_a)
    pipe.set_adapters(["lora-a"], [0.5])
    assert weights(pipe) == {"lora-a": (0.5, True, False)}  # read back from peft, not from the package's record
    pipe.load_fair_adaptor(folder_b, weight=-0.75)
    assert weights(pipe) == {"lora-a": (0.5, True, False), "lora-b": (-0.75, True, False)}
    assert_text_states_match_hooks(pipe, (0.5, state_a), (-0.75, state_b))

    # A plain LoRA loaded with diffusers, weighted by the user: its weight is kept too.
    pipe.load_lora_weights(folder_unet, adapter_name="style")
    pipe.set_adapters(["lora-a", "lora-b", "style"], [0.5, -0.75, 0.25])
    pipe.unload_fair_adaptor("lora-b")
    assert sorted(pipe.get_active_adapters()) == ["lora-a", "style"]
    assert_text_states_match_hooks(pipe, (0.5, state_a), (0.25, te_unet))
    reference = tiny_pipeline(0)
    hooks = [LoraHooks(reference.text_encoder, (0.5, state_a), (0.25, te_unet)),
             LoraHooks(reference.unet, (0.25, unet_unet))]
    np.testing.assert_allclose(generate(pipe), generate(reference), atol=1e-4)
    for h in hooks:
        h.remove()


def test_stock_per_component_weights_survive_package_calls(adaptors):
    pipe = tiny_pipeline(0)
    folder_unet, te_state, unet_state = adaptors["unet"]
    pipe.load_fair_adaptor(folder_unet)
    pipe.set_adapters(["lora-unet"], [{"text_encoder": 0.5, "unet": 1.5}])
    assert weights(pipe) == {"lora-unet": (None, True, False)}  # no single weight: the layers differ
    pipe.load_fair_adaptor(adaptors["a"][0], weight=-1.0)
    pipe.unload_fair_adaptor("lora-a")
    reference = tiny_pipeline(0)
    hooks = [LoraHooks(reference.text_encoder, (0.5, te_state)), LoraHooks(reference.unet, (1.5, unet_state))]
    np.testing.assert_allclose(generate(pipe), generate(reference), atol=1e-4)
    for h in hooks:
        h.remove()


def test_stock_deactivation_survives_package_calls(adaptors):
    pipe = tiny_pipeline(0)
    (folder_a, _, _), (folder_b, state_b, _) = adaptors["a"], adaptors["b"]
    pipe.load_fair_adaptor(folder_a)
    pipe.load_fair_adaptor(folder_b)
    pipe.set_adapters(["lora-b"])  # the user switches lora-a off
    pipe.load_fair_adaptor(adaptors["soft"][0])
    pipe.load_fair_adaptor(adaptors["unet"][0], weight=0.5)
    assert weights(pipe) == {"lora-a": (1.0, False, False), "lora-b": (1.0, True, False),
                             "soft": (1.0, True, False), "lora-unet": (0.5, True, False)}
    assert sorted(pipe.get_active_adapters()) == ["lora-b", "lora-unet"]
    assert_text_states_match_hooks(pipe, (1.0, state_b), (0.5, adaptors["unet"][1]))


def test_a_failed_load_keeps_stock_weights(adaptors, monkeypatch):
    pipe = tiny_pipeline(0)
    pipe.load_fair_adaptor(adaptors["a"][0])
    pipe.load_fair_adaptor(adaptors["b"][0])
    pipe.set_adapters(["lora-a", "lora-b"], [0.3, {"text_encoder": -0.5, "unet": 2.0}])
    before = pipeline_state(pipe)

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(pipe, "load_textual_inversion", broken)
    with pytest.raises(RuntimeError, match="injected failure"):
        pipe.load_fair_adaptor(adaptors["both"][0])
    monkeypatch.undo()
    assert_same(before, pipeline_state(pipe))
    assert weights(pipe) == {"lora-a": (0.3, True, False), "lora-b": (-0.5, True, False)}


# --------------------------------------------------------------------------- stock LoRA unloading
def test_stock_unload_lora_weights_then_the_package_loads_again(adaptors):
    pipe, fresh = tiny_pipeline(0), tiny_pipeline(0)
    pipe.load_fair_adaptor(adaptors["a"][0], weight=0.5)
    pipe.load_fair_adaptor(adaptors["b"][0])
    pipe.unload_lora_weights()
    assert pipe.fair_adaptors == {}
    with pytest.raises(ValueError, match="nothing to unload"):
        pipe.unload_fair_adaptor()
    pipe.load_fair_adaptor(adaptors["a"][0])  # not refused as "already loaded"
    fresh.load_fair_adaptor(adaptors["a"][0])
    assert weights(pipe) == {"lora-a": (1.0, True, False)}
    assert torch.equal(text_states(pipe), text_states(fresh))

    pipe.delete_adapters(["lora-a"])
    assert pipe.fair_adaptors == {}
    pipe.load_fair_adaptor(adaptors["a"][0], weight=0.5)
    assert weights(pipe) == {"lora-a": (0.5, True, False)}


def test_stock_unload_lora_weights_keeps_the_soft_tokens_of_an_adaptor(adaptors):
    pipe = tiny_pipeline(0, cls=FairFinetunePipeline)
    tokens_only = tiny_pipeline(0)
    tokens_only.load_textual_inversion(adaptors["both"][0])
    pipe.load_fair_adaptor(adaptors["both"][0])
    pipe.unload_lora_weights()
    record = pipe.fair_adaptors["both"]
    assert (record.has_lora, record.weight, record.soft_token) == (False, 1.0, "<both>")
    assert np.array_equal(generate(pipe), generate(tokens_only, "<both> " + PROMPT))
    pipe.unload_fair_adaptor()
    assert pipe.fair_adaptors == {} and len(pipe.tokenizer) == len(tiny_pipeline(0).tokenizer)


# --------------------------------------------------------------------------- stock unload_textual_inversion
def test_stock_unload_textual_inversion_leaves_no_stale_prefix(adaptors):
    base = tiny_pipeline(0)
    pipe = tiny_pipeline(0, cls=FairFinetunePipeline)
    pipe.load_fair_adaptor(adaptors["soft"][0])
    assert add_fair_tokens(pipe, PROMPT) == "<fair> " + PROMPT
    pipe.unload_textual_inversion()
    assert pipe.fair_adaptors == {} and add_fair_tokens(pipe, PROMPT) == PROMPT
    assert np.array_equal(generate(pipe), generate(base))
    pipe.load_fair_adaptor(adaptors["soft"][0])  # the tokens are free again
    assert list(pipe.fair_adaptors) == ["soft"]

    # An adaptor with LoRA and soft tokens keeps its LoRA, and stops starting prompts with its tokens.
    pipe = tiny_pipeline(0, cls=FairFinetunePipeline)
    lora_only = tiny_pipeline(0)
    lora_only.load_lora_weights(adaptors["both"][0], adapter_name="both")
    pipe.load_fair_adaptor(adaptors["both"][0])
    pipe.unload_textual_inversion(tokens=["<both>", "<both>_1"])
    record = pipe.fair_adaptors["both"]
    assert (record.has_lora, record.soft_token, record.token_names) == (True, None, [])
    assert np.array_equal(generate(pipe), generate(lora_only))
    pipe.unload_fair_adaptor("both")
    assert pipe.fair_adaptors == {} and pipe.get_list_adapters() == {}


# --------------------------------------------------------------------------- stock fuse_lora / unfuse_lora
def test_stock_fuse_lora_survives_package_calls(adaptors):
    fused, plain = tiny_pipeline(0), tiny_pipeline(0)
    base = generate(plain)
    for p in (fused, plain):
        p.load_fair_adaptor(adaptors["a"][0])
    fused.fuse_lora(components=COMPONENTS, lora_scale=0.5)  # stock, with a scale
    plain.set_adapters(["lora-a"], [0.5])
    assert weights(fused) == {"lora-a": (0.5, True, True)}
    np.testing.assert_allclose(generate(fused), generate(plain), atol=1e-5)

    # A package load joins the fused set, and the stock scale of the fused adapter is kept.
    for p in (fused, plain):
        p.load_fair_adaptor(adaptors["unet"][0], weight=0.8)
    assert weights(fused) == {"lora-a": (0.5, True, True), "lora-unet": (0.8, True, True)}
    np.testing.assert_allclose(generate(fused), generate(plain), atol=1e-5)

    for p in (fused, plain):
        p.unload_fair_adaptor("lora-unet")
    assert weights(fused) == {"lora-a": (0.5, True, True)}
    np.testing.assert_allclose(generate(fused), generate(plain), atol=1e-5)
    fused.unload_fair_adaptor()
    assert fused.get_list_adapters() == {}
    np.testing.assert_allclose(generate(fused), base, atol=1e-5)  # restored by subtraction


def test_stock_unfuse_lora_survives_package_calls(adaptors):
    pipe = tiny_pipeline(0)
    pipe.load_fair_adaptor(adaptors["a"][0], fuse=True)
    assert weights(pipe) == {"lora-a": (1.0, True, True)}
    pipe.unfuse_lora(components=COMPONENTS)
    pipe.load_fair_adaptor(adaptors["b"][0])  # the pipeline is no longer fused: the new adaptor is not fused either
    assert weights(pipe) == {"lora-a": (1.0, True, False), "lora-b": (1.0, True, False)}
    assert_text_states_match_hooks(pipe, (1.0, adaptors["a"][1]), (1.0, adaptors["b"][1]))


def test_stock_fuse_then_unload_lora_weights_makes_the_merge_permanent(adaptors):
    pipe, plain = tiny_pipeline(0), tiny_pipeline(0)
    for p in (pipe, plain):
        p.load_fair_adaptor(adaptors["a"][0])
    pipe.fuse_lora(components=COMPONENTS)
    pipe.unload_lora_weights()
    assert pipe.fair_adaptors == {} and pipe.get_list_adapters() == {}
    torch.testing.assert_close(text_states(pipe), text_states(plain), rtol=1e-5, atol=1e-5)
