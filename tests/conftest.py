import os


os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


torch.set_num_threads(1)


import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402


# Property tests draw the same examples on every run in CI (derandomised), so that a rare example cannot
# fail one run and pass the next; elsewhere they explore (and keep failures in .hypothesis/). Choose with
# HYPOTHESIS_PROFILE=ci|dev; CI=true selects "ci".
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="module")
def shapes():
    """An untouched tiny pipeline whose layers give the shapes of random adaptors."""
    from helpers.adaptors import tiny_pipeline

    return tiny_pipeline(0)


@pytest.fixture(scope="module")
def astronaut():
    """A photo with one face: (512, 512, 3) uint8, the face at about x 177-272, y 82-177."""
    from skimage import data as skimage_data

    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random-weight open_clip CLIP built through open_clip's own factory from a registered config."""
    import json

    import open_clip

    from diffusers_fair.components.clip import OpenCLIPImageEmbedder
    from helpers.components import TINY_CLIP

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path_factory.mktemp("open_clip") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return OpenCLIPImageEmbedder.from_pretrained(TINY_CLIP, pretrained=None)


@pytest.fixture(scope="module")
def tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=56)
    return Dinov2Model(config)

