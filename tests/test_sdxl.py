"""Stable Diffusion XL end to end on tiny random-weight pipelines (diffusers_fair.testing).

The family's conditioning against StableDiffusionXLPipeline's own; the sampler and the trainer's
images against the stock pipeline's; the adjusted backward with the pooled embeddings of a trained
second text encoder; adaptors saved in the layout stock SDXL loaders read, loaded by the package
with its pre-checks and rollback.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from peft import LoraConfig
from safetensors.torch import load_file

import diffusers_fair  # noqa: F401  (the fair-adaptor methods on the stock pipelines)
from diffusers_fair.adaptors.format import save_fair_adaptor
from diffusers_fair.adaptors.metadata import FairAdaptorMetadata
from diffusers_fair.adaptors.pipeline import add_fair_tokens, fair_adaptors, load_fair_adaptor
from diffusers_fair.components.families import SD1, SDXL, encode_prompt, family_of, load_pipeline
from diffusers_fair.evaluation.audit import generate
from diffusers_fair.method.dft import adjusted_backward, sample_latents
from diffusers_fair.method.targets import TargetDistribution
from diffusers_fair.testing import PROMPTS, tiny_components, tiny_pipeline, tiny_training_run
from diffusers_fair.training.config import FairTrainingConfig
from diffusers_fair.training.trainer import DistributionalAlignmentTrainer
from helpers.adaptors import TE_TARGETS, random_lora


PROMPT = PROMPTS[0]


def draw(pipe, prompt=PROMPT, seed: int = 1) -> np.ndarray:
    return pipe(prompt, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


@torch.no_grad()
def text_states(pipe, prompt=PROMPT):
    """Both text encoders' penultimate hidden states for ``prompt`` (what the U-Net reads)."""
    return [encoder(tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                              return_tensors="pt").input_ids, output_hidden_states=True).hidden_states[-2]
            for tokenizer, encoder in SDXL.encoder_pairs(pipe)]


def state(pipe):
    """What a failed load must leave as it was."""
    return {"image": draw(pipe), "text": text_states(pipe), "adapters": pipe.get_list_adapters(),
            "vocab": [len(pipe.tokenizer), len(pipe.tokenizer_2)],
            "rows": [e.get_input_embeddings().weight.shape[0] for e in (pipe.text_encoder, pipe.text_encoder_2)],
            "fair": list(fair_adaptors(pipe))}


def assert_same(before, after):
    assert np.array_equal(before["image"], after["image"])
    assert all(torch.equal(a, b) for a, b in zip(before["text"], after["text"]))
    for key in ("adapters", "vocab", "rows", "fair"):
        assert before[key] == after[key], key


@pytest.fixture(scope="module")
def adaptor(tmp_path_factory):
    """A smoke run's SDXL adaptor with LoRA on both text encoders and the U-Net, and 2 soft tokens in both."""
    return tiny_training_run("sdxl", tmp_path_factory.mktemp("sdxl"), train_unet_lora=True, num_soft_tokens=2)


# --------------------------------------------------------------------------- the family's conditioning
def test_the_family_of_a_pipeline():
    assert family_of(tiny_pipeline("sd15")) is SD1 and family_of(tiny_pipeline("sdxl")) is SDXL
    refiner = tiny_pipeline("sdxl")
    refiner.text_encoder = None  # the SDXL refiner has only the second text encoder
    with pytest.raises(ValueError, match="refiner is not supported"):
        family_of(refiner)


@torch.no_grad()
def test_conditioning_is_the_stock_pipelines():
    pipe = tiny_pipeline("sdxl")
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                                   do_classifier_free_guidance=True)
    cond = encode_prompt(pipe, PROMPT, height=16, width=24)
    neg = encode_prompt(pipe, "", height=16, width=24, negative=True)
    assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.added_cond_kwargs["text_embeds"], pooled)
    # A negative prompt left out is zeros (force_zeros_for_empty_prompt), as in the stock pipeline.
    assert torch.equal(neg.prompt_embeds, negative) and torch.equal(neg.added_cond_kwargs["text_embeds"], negative_pooled)
    assert not negative.any()
    time_ids = pipe._get_add_time_ids((16, 24), (0, 0), (16, 24), dtype=embeds.dtype, text_encoder_projection_dim=32)
    assert torch.equal(cond.added_cond_kwargs["time_ids"], time_ids)
    # A negative prompt that is written is encoded.
    _, written, _, written_pooled = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=True, negative_prompt="a person")
    neg = encode_prompt(pipe, "a person", height=16, width=24, negative=True)
    assert torch.equal(neg.prompt_embeds, written) and torch.equal(neg.added_cond_kwargs["text_embeds"], written_pooled)
    with pytest.raises(ValueError, match="natural"):
        encode_prompt(pipe, PROMPT, height=16, width=16, length=8)


@pytest.mark.parametrize("scheduler", ["euler", "dpmsolver++"])
@pytest.mark.parametrize("guidance", [1.0, 2.5])
@torch.no_grad()
def test_the_sampler_draws_what_the_stock_pipeline_draws(scheduler, guidance):
    pipe = tiny_pipeline("sdxl")
    if scheduler == "dpmsolver++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    stock = pipe([PROMPT] * 2, latents=noise, num_inference_steps=3, guidance_scale=guidance, output_type="latent").images
    cond = encode_prompt(pipe, PROMPT, height=16, width=16).repeat(2)
    neg = encode_prompt(pipe, "", height=16, width=16, negative=True).repeat(2)
    ours = sample_latents(pipe.unet, pipe.scheduler, noise, cond.prompt_embeds, num_inference_steps=3,
                          guidance_scale=guidance, negative_prompt_embeds=neg.prompt_embeds,
                          added_cond_kwargs=cond.added_cond_kwargs, negative_added_cond_kwargs=neg.added_cond_kwargs)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


def test_the_added_conditioning_is_checked():
    pipe = tiny_pipeline("sdxl")
    noise = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        cond = encode_prompt(pipe, PROMPT, height=16, width=16).repeat(2)
    common = dict(num_inference_steps=2, negative_prompt_embeds=cond.prompt_embeds)
    added = cond.added_cond_kwargs
    with pytest.raises(ValueError, match="needs negative_added_cond_kwargs"):
        sample_latents(pipe.unet, pipe.scheduler, noise, cond.prompt_embeds, guidance_scale=2.0, added_cond_kwargs=added,
                       **common)
    with pytest.raises(ValueError, match="batch size 2"):
        sample_latents(pipe.unet, pipe.scheduler, noise, cond.prompt_embeds, added_cond_kwargs={
            "text_embeds": added["text_embeds"][:1], "time_ids": added["time_ids"]}, **common)
    with pytest.raises(ValueError, match="its own argument"):
        sample_latents(pipe.unet, pipe.scheduler, noise, cond.prompt_embeds, added_cond_kwargs=added,
                       unet_kwargs={"added_cond_kwargs": added}, **common)
    with pytest.raises(ValueError, match="without added_cond_kwargs"):
        sample_latents(pipe.unet, pipe.scheduler, noise, cond.prompt_embeds, negative_added_cond_kwargs=added,
                       **common)


def test_adjusted_backward_reaches_the_second_encoder_through_the_pooled_embeddings():
    """two_pass == one_graph with both text encoders and the U-Net adapted (float64), and the pooled
    embeddings alone carry a gradient to the second encoder: the sampler hands them to every U-Net call."""
    pipe = tiny_pipeline("sdxl").to(torch.float64)
    for part, targets in (("text_encoder_2", TE_TARGETS), ("unet", ["to_q", "to_k", "to_v"])):
        getattr(pipe, part).add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    params = [p for n, p in [*pipe.text_encoder_2.named_parameters(), *pipe.unet.named_parameters()] if "lora_" in n]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def gradients(mode, detach_states=False):
        for p in params:
            p.grad = None
        cond = encode_prompt(pipe, PROMPT, height=16, width=16).repeat(2)
        neg = encode_prompt(pipe, "a person", height=16, width=16, negative=True).repeat(2)
        embeds = cond.prompt_embeds.detach() if detach_states else cond.prompt_embeds
        adjusted_backward(pipe.unet, pipe.scheduler, noise, embeds, lambda z: (z ** 2).mean(), num_inference_steps=3,
                          guidance_scale=2.0, negative_prompt_embeds=neg.prompt_embeds.detach(), mode=mode,
                          added_cond_kwargs=cond.added_cond_kwargs, negative_added_cond_kwargs=neg.added_cond_kwargs)
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    two_pass, one_graph = gradients("two_pass"), gradients("one_graph")
    for a, b in zip(two_pass, one_graph):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)  # the scheduler steps in float32
    encoder_2 = [g for (n, _), g in zip(pipe.text_encoder_2.named_parameters(), two_pass) if "lora_" in n]
    pooled_only = gradients("two_pass", detach_states=True)[:len(encoder_2)]
    assert any(g.abs().max() > 0 for g in pooled_only)
    assert not all(torch.allclose(a, b) for a, b in zip(pooled_only, encoder_2))


# --------------------------------------------------------------------------- the trainer
def tiny_trainer(tmp_path, **fields):
    settings = dict(base_model="diffusers-fair/tiny-sdxl", output_dir=str(tmp_path / "run"), num_iterations=1,
                    images_per_prompt=2, micro_batch_size=2, min_inference_steps=3, max_inference_steps=3,
                    guidance_scale=2.0, log_with="none", sample_every=0, checkpoint_every=0, progress=False,
                    text_encoder_lora_rank=2)
    settings.update(fields)
    gender = TargetDistribution.uniform("gender", ["male", "female"])
    return DistributionalAlignmentTrainer(FairTrainingConfig.toy(**settings), tiny_pipeline("sdxl"), [gender],
                                          PROMPTS, tiny_components())


@torch.no_grad()
def test_the_trainers_images_are_the_stock_pipelines(tmp_path):
    trainer = tiny_trainer(tmp_path, resolution=24)
    assert trainer.latent_shape == (4, 12, 12) and trainer.image_size == 24
    noise = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(5))
    ours = trainer._sample(noise, PROMPT, 3, finetuned=False)
    stock = tiny_pipeline("sdxl")
    stock.scheduler = trainer.scheduler  # DPM-Solver++ from the pipeline's config
    images = stock([PROMPT] * 2, latents=noise, height=24, width=24, num_inference_steps=3, guidance_scale=2.0,
                   output_type="pt").images
    torch.testing.assert_close(ours, images, rtol=1e-4, atol=1e-4)


def test_a_set_up_failing_part_way_leaves_both_tokenizers_and_encoders_as_they_were(tmp_path):
    # Reference faces the face embedder cannot read: the failure comes after both encoders were given
    # their LoRA layers and both tokenizers their soft tokens.
    pipe, components = tiny_pipeline("sdxl"), tiny_components()
    components.reference_faces = torch.rand(3, 3, 64, 64)
    before, vocabularies = state(pipe), (len(pipe.tokenizer), len(pipe.tokenizer_2))
    settings = dict(base_model="diffusers-fair/tiny-sdxl", output_dir=str(tmp_path / "run"), images_per_prompt=2,
                    micro_batch_size=2, log_with="none", progress=False, text_encoder_lora_rank=2,
                    num_soft_tokens=2)
    with pytest.raises(RuntimeError):
        DistributionalAlignmentTrainer(FairTrainingConfig.toy(**settings), pipe,
                                       [TargetDistribution.uniform("gender", ["male", "female"])], PROMPTS,
                                       components)
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == vocabularies
    assert_same(before, state(pipe))


def test_the_trainer_adapts_the_text_encoders_the_config_names(tmp_path):
    for choice, parts in (("both", ["text_encoder", "text_encoder_2"]), ("text_encoder_2", ["text_encoder_2"])):
        trainer = tiny_trainer(tmp_path / choice, sdxl_text_encoder_lora=choice)
        assert sorted(trainer.lora_configs) == parts
    with pytest.raises(ValueError, match="prompt_padding='natural' is for SD 1.x"):
        tiny_trainer(tmp_path / "natural", prompt_padding="natural")
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 2"):
        tiny_trainer(tmp_path / "size", resolution=15)


def test_text_encoder_2_only_saves_text_encoder_2_keys(tmp_path):
    folder = tiny_training_run("sdxl", tmp_path, iterations=1, sdxl_text_encoder_lora="text_encoder_2")
    keys = load_file(folder / "pytorch_lora_weights.safetensors")
    assert {key.split(".")[0] for key in keys} == {"text_encoder_2"}
    pipe = tiny_pipeline("sdxl")
    pipe.load_fair_adaptor(folder)
    assert set(pipe.get_list_adapters()) == {"text_encoder_2"}


# --------------------------------------------------------------------------- the adaptor's files and loading
def test_the_files_are_in_the_stock_sdxl_layout(adaptor):
    metadata = json.loads((adaptor / "fair_adaptor.json").read_text())
    assert metadata["kind"] == "lora+soft_tokens" and sorted(metadata["lora"]) == ["text_encoder", "text_encoder_2",
                                                                                   "unet"]
    assert metadata["cross_attention_dim"] == 80 and metadata["text_hidden_size"] == 32
    keys = load_file(adaptor / "pytorch_lora_weights.safetensors")
    assert {key.split(".")[0] for key in keys} == {"text_encoder", "text_encoder_2", "unet"}
    assert all(key.startswith(("text_encoder.text_model.", "text_encoder_2.text_model.", "unet.")) for key in keys)
    tokens = load_file(adaptor / "learned_embeds.safetensors")
    assert {key: tuple(value.shape) for key, value in tokens.items()} == {"clip_l": (2, 32), "clip_g": (2, 48)}


def test_the_model_card_shows_the_sdxl_pipeline_and_both_token_loads(adaptor):
    card = (adaptor / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "FairFinetunePipeline" not in card
    assert 'state["clip_l"]' in card and "pipe.text_encoder_2" in card and '"<fair> a photo' in card


def test_base_models_load_as_their_familys_pipeline(tmp_path):
    for kind, cls in (("sdxl", StableDiffusionXLPipeline), ("sd15", StableDiffusionPipeline)):
        tiny_pipeline(kind).save_pretrained(tmp_path / kind)
        pipe = load_pipeline(str(tmp_path / kind), safety_checker=None, requires_safety_checker=False)
        assert type(pipe) is cls  # SDXL has no safety checker: its arguments are dropped


def test_the_package_loads_as_stock_diffusers_does(adaptor):
    """LoRA through load_lora_weights, soft tokens through the two load_textual_inversion calls of SDXL."""
    base = draw(tiny_pipeline("sdxl"))
    pipe = tiny_pipeline("sdxl")
    record = pipe.load_fair_adaptor(adaptor)
    assert record.soft_token == "<fair>" and record.token_names == ["<fair>", "<fair>_1"]
    prompt = add_fair_tokens(pipe, PROMPT)
    assert prompt == f"<fair> {PROMPT}"
    ours = draw(pipe, prompt)

    stock = tiny_pipeline("sdxl")
    stock.load_lora_weights(adaptor)
    tokens = load_file(adaptor / "learned_embeds.safetensors")
    stock.load_textual_inversion(tokens["clip_l"], token="<fair>", text_encoder=stock.text_encoder,
                                 tokenizer=stock.tokenizer)
    stock.load_textual_inversion(tokens["clip_g"], token="<fair>", text_encoder=stock.text_encoder_2,
                                 tokenizer=stock.tokenizer_2)
    assert np.array_equal(ours, draw(stock, prompt))
    assert np.abs(ours - base).max() > 1e-3
    assert "<fair>_1" in pipe.tokenizer_2.get_vocab()

    pipe.unload_fair_adaptor()
    assert np.array_equal(draw(pipe), base)
    assert "<fair>" not in pipe.tokenizer.get_vocab() and "<fair>" not in pipe.tokenizer_2.get_vocab()
    assert pipe.text_encoder_2.config.vocab_size == pipe.text_encoder_2.get_input_embeddings().weight.shape[0]


def test_fused_adaptors_draw_what_unfused_ones_draw(adaptor):
    unfused, fused = tiny_pipeline("sdxl"), tiny_pipeline("sdxl")
    unfused.load_fair_adaptor(adaptor)
    record = fused.load_fair_adaptor(adaptor, fuse=True)
    assert record.fused
    prompt = add_fair_tokens(fused, PROMPT)
    np.testing.assert_allclose(draw(fused, prompt), draw(unfused, prompt), atol=1e-5)
    before = draw(tiny_pipeline("sdxl"))
    fused.unload_fair_adaptor()
    np.testing.assert_allclose(draw(fused), before, atol=1e-5)


def test_the_stock_sdxl_pipelines_have_the_methods():
    for cls in (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline):
        assert callable(cls.load_fair_adaptor) and isinstance(cls.fair_adaptors, property)


def test_the_audit_starts_sdxl_prompts_with_the_soft_tokens(adaptor):
    pipe = tiny_pipeline("sdxl")
    pipe.load_fair_adaptor(adaptor)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    images = generate(pipe, PROMPT, noise, guidance_scale=2.0, num_inference_steps=3, batch_size=2)
    stock = pipe([f"<fair> {PROMPT}"] * 2, latents=noise, guidance_scale=2.0, num_inference_steps=3,
                 output_type="pt").images
    assert torch.equal(images, stock.float())


# --------------------------------------------------------------------------- pre-checks and rollback
def sdxl_metadata(**fields):
    values = dict(name="crafted", base_model="diffusers-fair/tiny-sdxl", text_hidden_size=32, cross_attention_dim=80)
    values.update(fields)
    return FairAdaptorMetadata(**values)


def missing_layer(tmp_path, pipe):
    state, config = random_lora(pipe.text_encoder_2, TE_TARGETS, seed=1)
    state = {key.replace("layers.1.", "layers.7."): value for key, value in state.items()}
    save_fair_adaptor(tmp_path / "missing", metadata=sdxl_metadata(), text_encoder_2_lora=state,
                      text_encoder_2_lora_config=config)
    return tmp_path / "missing"


def one_encoder_tokens(tmp_path, pipe):
    save_fair_adaptor(tmp_path / "one", metadata=sdxl_metadata(), soft_tokens=torch.randn(2, 32))
    return tmp_path / "one"


def sd15_adaptor(tmp_path, pipe):
    return tiny_training_run("sd15", tmp_path / "sd15", iterations=1)


@pytest.mark.parametrize("make, message", [
    (sd15_adaptor, "cross-attention size of 32"),
    (missing_layer, "text_encoder_2 layer 'text_model.encoder.layers.7"),
    (one_encoder_tokens, r"soft tokens are for the text encoders \['text_encoder'\]"),
])
def test_an_adaptor_that_does_not_fit_is_refused_before_anything_changes(tmp_path, make, message):
    pipe = tiny_pipeline("sdxl")
    folder = make(tmp_path, pipe)
    before = state(pipe)
    with pytest.raises(ValueError, match=message):
        pipe.load_fair_adaptor(folder)
    assert_same(before, state(pipe))


def test_a_token_taken_in_the_second_tokenizer_is_refused(adaptor):
    pipe = tiny_pipeline("sdxl")
    pipe.tokenizer_2.add_tokens(["<fair>_1"])
    pipe.text_encoder_2.resize_token_embeddings(len(pipe.tokenizer_2), mean_resizing=False)
    before = state(pipe)
    with pytest.raises(ValueError, match=r"\['<fair>_1'\] are already in tokenizer_2"):
        pipe.load_fair_adaptor(adaptor)
    assert_same(before, state(pipe))


def test_a_taken_adapter_name_is_refused(adaptor):
    pipe = tiny_pipeline("sdxl")
    pipe.load_fair_adaptor(adaptor, adapter_name="first")
    before = state(pipe)
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_fair_adaptor(adaptor, adapter_name="first")
    assert_same(before, state(pipe))


def test_a_failure_in_the_second_encoders_tokens_rolls_everything_back(adaptor, monkeypatch):
    """The LoRA and the first encoder's tokens are in when loading the second encoder's tokens fails."""
    pipe = tiny_pipeline("sdxl")
    before = state(pipe)
    calls = []
    original = StableDiffusionXLPipeline.load_textual_inversion

    def failing(self, *args, **kwargs):
        calls.append(kwargs["text_encoder"])
        if kwargs["text_encoder"] is self.text_encoder_2:
            assert "<fair>" in self.tokenizer.get_vocab() and self.get_list_adapters()  # half loaded
            raise RuntimeError("disk error")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "load_textual_inversion", failing)
    with pytest.raises(RuntimeError, match="disk error"):
        load_fair_adaptor(pipe, adaptor)
    assert len(calls) == 2
    assert_same(before, state(pipe))
