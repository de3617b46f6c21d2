"""The seeded random choices of a training iteration.

Every random choice of an iteration (prompt, step count, noises) comes from :func:`draw_iteration`,
a pure function of the config, the prompt sets and the iteration number, seeded through
:func:`derive_seed`: every process draws the same, and a resumed run draws what the uninterrupted
run would have drawn. Python's ``hash()`` is never used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .config import FairTrainingConfig
from .prompts import PromptSet


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed from integers and strings, identical on every process and platform."""
    entropy = [int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "little") if isinstance(k, str) else int(k)
               for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) & (2**63 - 1)


@dataclass
class TrainingDraw:
    """The random choices of one prompt of one iteration.

    Attributes:
        prompt_set: index of the drawn prompt set.
        prompt: the drawn prompt (without soft tokens).
        num_inference_steps: the sampling step count.
        noise: ``(images_per_prompt, C, h, w)`` float32 CPU initial noises of the whole batch;
            process ``p`` of ``P`` takes rows ``p * n / P`` to ``(p + 1) * n / P``.
        ot_seed: seed of the Monte Carlo draws of the expected-OT targets.
    """

    prompt_set: int
    prompt: str
    num_inference_steps: int
    noise: torch.Tensor
    ot_seed: int


def draw_iteration(config: FairTrainingConfig, prompt_sets: list[PromptSet], latent_shape: tuple[int, int, int],
                   iteration: int, index: int = 0) -> TrainingDraw:
    """Draw prompt, step count and noises of prompt ``index`` of ``iteration`` (pure and seeded)."""
    generator = torch.Generator().manual_seed(derive_seed(config.seed, iteration, index, "draw"))
    weights = torch.tensor([s.weight for s in prompt_sets], dtype=torch.float64)
    set_index = int(torch.multinomial(weights, 1, generator=generator))
    prompts = prompt_sets[set_index].prompts
    prompt = prompts[int(torch.randint(len(prompts), (1,), generator=generator))]
    steps = int(torch.randint(config.min_inference_steps, config.max_inference_steps + 1, (1,), generator=generator))
    noise = torch.randn((config.images_per_prompt, *latent_shape), generator=generator)
    return TrainingDraw(set_index, prompt, steps, noise, derive_seed(config.seed, iteration, index, "ot"))
