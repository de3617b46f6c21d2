"""The toy world: a tiny, biased text-to-image model and everything needed to debias it on a CPU."""

from pathlib import Path


MODEL_DIR = Path(__file__).parent / "model"


def model_path() -> str:
    """The folder of the shipped toy model; ``StableDiffusionPipeline.from_pretrained`` loads it."""
    if not (MODEL_DIR / "model_index.json").exists():
        raise FileNotFoundError(f"the toy model is missing from {MODEL_DIR}; train it with `python -m diffusers_fair.toy.train_base`")
    return str(MODEL_DIR)
