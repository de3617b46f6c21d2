"""One prompt and one starting latent per image: the pipeline call that per-image baselines start from.

Prompt intervention and Fair Diffusion change each image's prompt or guidance separately. Before
they can, a pipeline call (a prompt or a list, ``num_images_per_prompt``, optional latents or a
generator) is spelled out image by image: :func:`per_image_call` lists each image's prompt and
negative prompt and draws the starting latents exactly as ``StableDiffusionPipeline`` would, so that
a baseline at zero strength reproduces the stock pipeline's images bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PerImageCall:
    """A pipeline call spelled out per image.

    Attributes:
        prompts: one prompt per image.
        negative_prompts: one negative prompt per image, or ``None``.
        latents: ``(N, C, h, w)`` starting latents (not yet scaled by the scheduler's ``init_noise_sigma``).
    """

    prompts: list[str]
    negative_prompts: list[str] | None
    latents: torch.Tensor


def per_image_call(pipe, prompt, negative_prompt, num_images_per_prompt: int, latents: torch.Tensor | None,
                   generator, height: int | None, width: int | None, dtype: torch.dtype) -> PerImageCall:
    """Spell out a call of ``pipe`` image by image (see the module doc).

    Raises:
        ValueError: when the prompt is missing, the negative prompts do not match the prompts, or
            ``latents`` has another number of images than the call makes.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if prompt is None:
        raise ValueError("give a prompt (these pipelines rewrite each image's prompt, so they take no prompt_embeds)")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if negative_prompt is None or isinstance(negative_prompt, str):
        negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
    else:
        negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts; give one per prompt")
    prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    if negatives is not None:
        negatives = [p for p in negatives for _ in range(num_images_per_prompt)]
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    shape = (len(prompts), pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    if latents is None:
        # what StableDiffusionPipeline.prepare_latents draws when it is given no latents
        latents = randn_tensor(shape, generator=generator, device=pipe._execution_device, dtype=dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape} for this call, got {tuple(latents.shape)}")
    return PerImageCall(prompts, negatives, latents)


def concatenate(outputs: list, order: list[int]):
    """The images of several calls (tensors, arrays or lists of PIL images) put back in the original order.

    ``order[j]`` is the original position of the ``j``-th image of the concatenated outputs.
    """
    if isinstance(outputs[0], torch.Tensor):
        stacked = torch.cat(outputs)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return stacked[inverse]
    import numpy as np

    if isinstance(outputs[0], np.ndarray):
        stacked = np.concatenate(outputs)
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[np.array(order)] = np.arange(len(order))
        return stacked[inverse]
    flat = [image for output in outputs for image in output]
    result = [None] * len(order)
    for image, position in zip(flat, order):
        result[position] = image
    return result
