"""Packaging for diffusers-fair."""

from setuptools import find_packages, setup


with open("README.md", encoding="utf-8") as readme:
    long_description = readme.read()

setup(
    name="diffusers_fair",
    version="0.1.0",
    description="Finetune text-to-image diffusion models for fairness (distributional alignment, adjusted DFT)",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["diffusers_fair", "diffusers_fair.*"]),
    # The toy world's shipped weights, tokenizer files, tables and experiment configs live inside the package.
    include_package_data=True,
    package_data={
        "diffusers_fair": [
            "toy/*",
            "toy/**/*",
            "components/models/*",
            "adaptors/shipped/*",
            "adaptors/shipped/**/*",
        ],
    },
    install_requires=[
        "torch",
        # open_clip needs a torchvision that imports beside the installed torch; pip picks the
        # matching pair when both are resolved together.
        "torchvision",
        "diffusers",
        # transformers 5.24 requires peft >= 0.22, which is not released, so text-encoder LoRA
        # adapters fail to attach with it.
        "transformers<5.24",
        "peft",
        "huggingface_hub",
        "safetensors",
        "open_clip_torch",
        # 0.10.14 ships the BlazeFace short-range face-detection model file inside the wheel;
        # later releases dropped the bundled model (it would have to be downloaded).
        "mediapipe==0.10.14",
        "accelerate",
        "scipy",
        # experiment configs (diffusers-fair train) are YAML or JSON
        "pyyaml",
        "tqdm",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        # olah serves local git repositories as Hub model repos, for the download tests.
        "test": ["pytest", "hypothesis", "scikit-image", "olah", "ruff"],
        "datasets": ["datasets"],
        "bench": ["pot"],
    },
    entry_points={"console_scripts": ["diffusers-fair = diffusers_fair.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
