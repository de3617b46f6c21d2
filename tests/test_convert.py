"""Converting the original release's .pth files, on files synthesised in its key layout.

The reference applies the original weights by hand, the way diffusers 0.19 did: forward hooks
that add ``up(down(x))`` to each adapted layer's output (scale 1), and soft tokens as rows
appended to the embedding table and placed right after the start-of-text token.
"""

import copy
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from diffusers_fair.adaptors import convert
from diffusers_fair.adaptors.format import read_fair_adaptor
from diffusers_fair.adaptors.metadata import LORA_WEIGHT_NAME, SD15
from diffusers_fair.adaptors.pipeline import FairFinetunePipeline, add_fair_tokens, load_fair_adaptor
from diffusers_fair.method.targets import TargetDistribution
from diffusers_fair.training.config import FairTrainingConfig
from helpers.adaptors import PROMPT, generate, text_states, tiny_pipeline


RANK = 3
TEXT_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def _pair(linear, generator):
    down = torch.randn(RANK, linear.in_features, generator=generator) * 0.2
    up = torch.randn(linear.out_features, RANK, generator=generator) * 0.2
    return down, up


def official_text_encoder_lora(text_encoder, seed):
    """``{key: tensor}`` in the release's layout and ``[(module name, down, up)]`` for the reference."""
    generator = torch.Generator().manual_seed(seed)
    state, layers = {}, []
    for name, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TEXT_LAYERS):
            down, up = _pair(module, generator)
            state[f"text_model.{name}.lora_linear_layer.down.weight"] = down
            state[f"text_model.{name}.lora_linear_layer.up.weight"] = up
            layers.append((name, down, up))
    return state, layers


def official_unet_lora(unet, seed):
    generator = torch.Generator().manual_seed(seed)
    state, layers = {}, []
    for processor in unet.attn_processors:
        attention = processor.removesuffix(".processor")
        for proj, path in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            module = unet.get_submodule(f"{attention}.{path}")
            down, up = _pair(module, generator)
            state[f"{processor}.{proj}_lora.down.weight"] = down
            state[f"{processor}.{proj}_lora.up.weight"] = up
            layers.append((f"{attention}.{path}", down, up))
    return state, layers


def official_prefix_embedding(text_encoder, n_tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(n_tokens + 1, text_encoder.config.hidden_size, generator=generator)
    table[0] = 0
    positions = text_encoder.embeddings.position_embedding.weight.detach().clone()
    return {"token_embedding.weight": table, "position_embedding.weight": positions, "position_ids": torch.arange(positions.shape[0])[None]}


def hook_layers(model, layers):
    handles = []
    for name, down, up in layers:
        def hook(module, inputs, output, down=down, up=up):
            return output + inputs[0] @ down.T @ up.T

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return handles


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A folder with the three EMA files (and a different non-EMA text-encoder file)."""
    folder = tmp_path_factory.mktemp("release")
    shapes = tiny_pipeline(0)
    text, text_layers = official_text_encoder_lora(shapes.text_encoder, seed=1)
    unet, unet_layers = official_unet_lora(shapes.unet, seed=2)
    prefix = official_prefix_embedding(shapes.text_encoder, 5, seed=3)
    torch.save(text, folder / "text_encoder_lora_EMA.pth")
    torch.save(official_text_encoder_lora(shapes.text_encoder, seed=4)[0], folder / "text_encoder_lora.pth")
    torch.save(unet, folder / "unet_lora_EMA.pth")
    torch.save(prefix, folder / "prefix_embedding_EMA.pth")
    return folder, text_layers, unet_layers, prefix["token_embedding.weight"][1:]


def test_converted_adaptor_reproduces_the_original_weights(release, tmp_path):
    folder, text_layers, unet_layers, soft = release
    metadata = convert.convert_official(folder, tmp_path / "converted", targets=["gender: male, female"], name="official-gender", base_model="diffusers-fair/toy")
    assert metadata.kind == "lora+soft_tokens"
    assert metadata.lora["text_encoder"] == {"rank": RANK, "alpha": float(RANK), "target_modules": ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"], "num_layers": 12}
    assert metadata.lora["unet"]["target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert (metadata.text_hidden_size, metadata.cross_attention_dim) == (64, 64)
    assert set(metadata.training["converted_from"]) == {"text_encoder_lora_EMA.pth", "unet_lora_EMA.pth", "prefix_embedding_EMA.pth"}
    assert read_fair_adaptor(tmp_path / "converted").metadata == metadata

    pipe, reference = tiny_pipeline(0), tiny_pipeline(0)
    load_fair_adaptor(pipe, tmp_path / "converted")

    # Text encoder: LoRA on q/k/v/out_proj and fc1/fc2, applied by hand.
    handles = hook_layers(reference.text_encoder, text_layers)
    torch.testing.assert_close(text_states(pipe), text_states(reference), rtol=1e-5, atol=1e-5)

    # Soft tokens: the five rows appended to the embedding table and placed after start-of-text.
    text_encoder = copy.deepcopy(reference.text_encoder)
    table = text_encoder.get_input_embeddings().weight.detach()
    text_encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(torch.cat([table, soft]), freeze=True))
    tokenizer = reference.tokenizer
    ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]
    soft_ids = torch.arange(table.shape[0], table.shape[0] + soft.shape[0])
    ids = torch.cat([ids[:1], soft_ids, ids[1:]])[: tokenizer.model_max_length]
    with torch.no_grad():
        expected = text_encoder(ids[None])[0]
    torch.testing.assert_close(text_states(pipe, add_fair_tokens(pipe, PROMPT)), expected, rtol=1e-5, atol=1e-5)
    for handle in handles:
        handle.remove()

    # U-Net: LoRA on every attention's to_q/to_k/to_v/to_out, applied by hand.
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 32, 64, generator=generator)
    handles = hook_layers(reference.unet, unet_layers)
    with torch.no_grad():
        ours = pipe.unet(sample, 500, encoder_hidden_states=context).sample
        by_hand = reference.unet(sample, 500, encoder_hidden_states=context).sample
    torch.testing.assert_close(ours, by_hand, rtol=1e-4, atol=1e-5)
    for handle in handles:
        handle.remove()


def test_ema_files_are_the_default(release, tmp_path):
    folder = release[0]
    ema = convert.find_official_files(folder)
    assert sorted(path.name for path in ema.values()) == ["prefix_embedding_EMA.pth", "text_encoder_lora_EMA.pth", "unet_lora_EMA.pth"]
    last = convert.find_official_files(folder, ema=False)
    assert [path.name for path in last.values()] == ["text_encoder_lora.pth"]
    convert.convert_official(folder, tmp_path / "last", ema=False, base_model="diffusers-fair/toy", cross_attention_dim=64)
    state = read_fair_adaptor(tmp_path / "last").lora_state_dict()
    original = torch.load(folder / "text_encoder_lora.pth", weights_only=True)
    key = "text_model.encoder.layers.0.self_attn.q_proj"
    assert torch.equal(state[f"text_encoder.{key}.lora_A.weight"], original[f"{key}.lora_linear_layer.down.weight"])
    assert torch.equal(state[f"text_encoder.{key}.lora_B.weight"], original[f"{key}.lora_linear_layer.up.weight"])

    only_last = tmp_path / "only-last"
    only_last.mkdir()
    (only_last / "text_encoder_lora.pth").write_bytes((folder / "text_encoder_lora.pth").read_bytes())
    with pytest.raises(ValueError, match="use ema=False"):
        convert.find_official_files(only_last)


def test_single_file_and_sd15_shapes(release, tmp_path):
    metadata = convert.convert_official(release[0] / "text_encoder_lora_EMA.pth", tmp_path / "te")
    assert metadata.kind == "lora" and metadata.base_model == SD15
    assert (metadata.text_hidden_size, metadata.cross_attention_dim) == (64, 768)  # 768: SD 1.5's U-Net
    with pytest.raises(ValueError, match="cannot tell"):
        convert.convert_official(release[0] / "text_encoder_lora_EMA.pth", tmp_path / "toy", base_model="someone/unknown-model")


class NotATensor:
    pass


def test_strict_reading(release, tmp_path):
    state = torch.load(release[0] / "text_encoder_lora_EMA.pth", weights_only=True)
    wrapped = {f"module.{k}": v for k, v in state.items()}  # saved from a DistributedDataParallel wrapper
    torch.save(wrapped, tmp_path / "text_encoder_lora_EMA.pth")
    assert convert.load_release_file(tmp_path / "text_encoder_lora_EMA.pth").keys() == state.keys()

    cases = {
        "unrecognised key": {**state, "text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.mid.weight": torch.zeros(1)},
        "lacks its up": {k: v for k, v in state.items() if not k.endswith("q_proj.lora_linear_layer.up.weight")},
        "different ranks": {**state, "text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": torch.zeros(2, 64), "text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": torch.zeros(256, 2)},
    }
    for message, bad in cases.items():
        torch.save(bad, tmp_path / "text_encoder_lora_EMA.pth")
        with pytest.raises(ValueError, match=message):
            convert.convert_official(tmp_path, tmp_path / "out")
    torch.save({"weights": NotATensor()}, tmp_path / "text_encoder_lora_EMA.pth")
    with pytest.raises(ValueError, match="weights_only"):
        convert.load_release_file(tmp_path / "text_encoder_lora_EMA.pth")
    torch.save({"token_embedding.weight": torch.zeros(3, 64), "extra": torch.zeros(1)}, tmp_path / "prefix_embedding.pth")
    with pytest.raises(ValueError, match="expected keys"):
        convert.convert_official(tmp_path / "prefix_embedding.pth", tmp_path / "out")
    torch.save(state, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="not an official release file"):
        convert.find_official_files(tmp_path / "weights.pth")
    assert not (tmp_path / "out").exists()


def test_convert_command_line(release, tmp_path, capsys):
    from diffusers_fair.cli import main

    argv = [str(release[0]), str(tmp_path / "cli"), "--target", "gender: male, female", "--name", "from-cli", "--base-model", "diffusers-fair/toy"]
    assert main(["convert", *argv, "--license", "mit"]) == 0
    out = capsys.readouterr().out
    assert "lora+soft_tokens adaptor for diffusers-fair/toy" in out and "license mit" in out
    assert f'pipe.load_fair_adaptor("{tmp_path / "cli"}")' in out
    adaptor = read_fair_adaptor(tmp_path / "cli")
    assert adaptor.metadata.name == "from-cli" and adaptor.metadata.targets[0]["text"] == "gender: male=0.5, female=0.5"
    assert adaptor.metadata.license == "mit"
    assert ModelCard.load(tmp_path / "cli" / "README.md").data.license == "mit"
    assert (tmp_path / "cli" / LORA_WEIGHT_NAME).is_file()


def test_converted_adaptors_generate_with_the_authors_prompt_padding(release, tmp_path):
    metadata = convert.convert_official(release[0] / "text_encoder_lora_EMA.pth", tmp_path / "te",
                                        base_model="diffusers-fair/toy", cross_attention_dim=64)
    assert metadata.training["prompt_padding"] == "natural"
    fair = tiny_pipeline(0, cls=FairFinetunePipeline)
    fair.load_fair_adaptor(tmp_path / "te")
    image = generate(fair)
    assert np.array_equal(image, generate(fair, prompt_padding="natural"))
    assert not np.allclose(image, generate(fair, prompt_padding="max_length"), atol=1e-3)


def test_converted_sd15_adaptors_carry_the_base_model_license(release, tmp_path):
    metadata = convert.convert_official(release[0] / "text_encoder_lora_EMA.pth", tmp_path / "te")
    assert metadata.license == "creativeml-openrail-m"
    card = ModelCard.load(tmp_path / "te" / "README.md")
    assert card.data.license == "creativeml-openrail-m" and card.data.base_model == SD15
    assert "source" in metadata.training and metadata.training["ema_weights"] is True


def test_the_index_convert_commands_write_their_adaptors(release, tmp_path, monkeypatch, capsys):
    """Each SD 1.5 entry's command, run as printed where the release was unzipped, writes its adaptor."""
    from diffusers_fair.adaptors import hub
    from diffusers_fair.cli import main

    monkeypatch.chdir(tmp_path)
    entries = [entry for entry in hub.load_index().values() if entry.convert]
    assert len(entries) >= 6
    for entry in entries:
        released = tmp_path / entry.release["file"]
        released.parent.mkdir(parents=True, exist_ok=True)
        source = release[0] / Path(entry.release["file"]).name
        released.write_bytes(source.read_bytes())
        words = shlex.split(entry.convert)
        assert main(words[1:]) == 0, entry.name
        assert f'load it with: pipe.load_fair_adaptor("{entry.convert_destination}")' in capsys.readouterr().out
        adaptor = read_fair_adaptor(tmp_path / entry.convert_destination)
        meta = adaptor.metadata
        assert (meta.name, meta.kind, meta.base_model) == (entry.name, entry.kind, SD15)
        assert meta.license == "creativeml-openrail-m"
        assert [TargetDistribution.parse(t) for t in entry.targets] == meta.target_distributions()
        assert hub._check_against_entry(adaptor, entry) is adaptor  # what loading by name would accept
        # How the authors trained: natural prompt padding and their step weights everywhere; the Euclidean
        # transport cost where it differs from the squared one (race and joint targets).
        authors = {"prompt_padding": "natural", "dft_step_weights": "authors"}
        if entry.name not in ("gender", "gender-soft-tokens"):
            authors["ot_cost"] = "euclidean"
        assert {k: v for k, v in meta.training.items() if k in FairTrainingConfig.__dataclass_fields__} == authors
