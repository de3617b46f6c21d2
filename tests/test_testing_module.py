"""diffusers_fair.testing: tiny pipelines of each family and the smoke training run on them."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

import diffusers_fair  # noqa: F401  (the fair-adaptor methods on the stock pipelines)
from diffusers_fair.adaptors.format import read_fair_adaptor
from diffusers_fair.testing import KINDS, PROMPTS, tiny_components, tiny_pipeline, tiny_training_run


def draw(pipe, seed: int = 1) -> np.ndarray:
    return pipe(PROMPTS[0], num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """kind -> the folder of a two-iteration smoke run's adaptor."""
    return {kind: tiny_training_run(kind, tmp_path_factory.mktemp(kind)) for kind in KINDS}


def test_tiny_pipelines_are_the_families_pipelines():
    sd, xl = tiny_pipeline("sd15"), tiny_pipeline("sdxl")
    assert type(sd) is StableDiffusionPipeline and type(xl) is StableDiffusionXLPipeline
    assert xl.unet.config.addition_embed_type == "text_time"
    # SDXL's U-Net reads both encoders' hidden states side by side, and the second encoder's projection.
    hidden = xl.text_encoder.config.hidden_size + xl.text_encoder_2.config.hidden_size
    assert xl.text_encoder.config.hidden_size != xl.text_encoder_2.config.hidden_size
    assert xl.unet.config.cross_attention_dim == hidden
    assert draw(sd).shape == draw(xl).shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="kind must be one of"):
        tiny_pipeline("sd3")


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_weights_and_the_global_random_state_is_left_alone(kind):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_pipeline(kind, seed=4)
    assert torch.equal(torch.rand(3), expected)
    b, c = tiny_pipeline(kind, seed=4), tiny_pipeline(kind, seed=5)
    for (name, pa), pb, pc in zip(a.unet.named_parameters(), b.unet.parameters(), c.unet.parameters()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.unet.parameters(), c.unet.parameters()))
    assert np.array_equal(draw(a), draw(b))


@pytest.mark.parametrize("kind", KINDS)
def test_the_smoke_run_adaptor_loads_with_the_package_and_stock_diffusers_and_changes_the_images(kind, trained):
    folder = trained[kind]
    adaptor = read_fair_adaptor(folder)
    assert adaptor.metadata.kind == "lora" and adaptor.metadata.training["iterations_trained"] == 2
    base = draw(tiny_pipeline(kind))

    pipe = tiny_pipeline(kind)
    record = pipe.load_fair_adaptor(folder)
    assert record.adapter_name == f"tiny-{kind}-gender" and record.active
    ours = draw(pipe)
    stock = tiny_pipeline(kind)
    stock.load_lora_weights(folder)
    assert np.array_equal(ours, draw(stock))
    assert np.abs(ours - base).max() > 1e-3

    pipe.unload_fair_adaptor()
    assert np.array_equal(draw(pipe), base)


def test_the_smoke_run_is_seeded(trained, tmp_path):
    again = tiny_training_run("sd15", tmp_path)
    first, second = safe_open(trained["sd15"] / "pytorch_lora_weights.safetensors", "pt"), \
        safe_open(again / "pytorch_lora_weights.safetensors", "pt")
    assert sorted(first.keys()) == sorted(second.keys())
    for key in first.keys():
        assert torch.equal(first.get_tensor(key), second.get_tensor(key)), key
    with pytest.raises(ValueError, match="kind must be one of"):
        tiny_training_run("sd2", tmp_path / "bad")


def test_tiny_components_fit_the_trainers_interfaces():
    components = tiny_components()
    images = torch.rand(3, 3, 16, 16)
    detection = components.detector.detect(images)
    assert detection.found.all() and detection.boxes[0].tolist() == [0.0, 0.0, 16.0, 16.0]
    logits = components.classifier(torch.rand(3, 3, 8, 8))
    assert logits["gender"].shape == (3, 2)
    assert components.image_embedders[0](images).shape == (3, 16)
    assert components.face_embedder(torch.rand(3, 3, 8, 8)).shape == components.reference_faces[:3].shape
