"""Direct finetuning through the sampling chain: naive DFT and adjusted DFT (two-pass and one-graph).

Direct finetuning (DFT) trains a diffusion model by backpropagating a loss on its *generated*
images: draw noise ``z_T``, run the sampler for ``T`` steps to ``z_0``, compute ``L(z_0)`` (decode
with a VAE, classify faces, compare embeddings...) and follow ``dL/dtheta``.

Why naive DFT fails
-------------------
A deterministic sampler (DDIM, DPM-Solver++) computes ``z_{k-1} = r_k z_k + c_k eps_k`` (or a
multistep variant), where ``eps_k = U-Net(z_k, t_k, c; theta)`` is the noise prediction (or the
v-prediction) of step ``k``. The exact gradient is

    dL/dtheta = sum_k  g^T  (dz_0 / d eps_k)  (d eps_k / d theta),

and ``dz_0 / d eps_k`` contains, besides the direct path, every path through the *later* U-Net
calls (each later ``eps_j`` depends on ``z_j``, which depends on ``eps_k``). These Jacobian products
grow in scale and in variance toward ``t = T``: the early steps dominate the gradient with noise,
and in the paper's experiment the loss does not decrease at all.

What adjusted DFT does
----------------------
It treats every U-Net input ``z_k`` as a constant (the Jacobian ``dz_k`` through the U-Net is
dropped), so the only path from ``eps_k`` to ``z_0`` is the scheduler's own arithmetic, which is a
scalar: ``dz_0 / d eps_k = a_k * I``. With ``g = dL/dz_0`` the adjusted gradient is

    dL/dtheta ~= sum_k  < s_k * g ,  d eps_k / d theta >,

with ``s_k = sign(a_k)`` (``standardize=True``: every step gets the same weight, keeping the
direction of the true path) or ``s_k = a_k`` (``standardize=False``, the unstandardised variant).

Standardised step weights (``step_weights``). ``"unit"`` (the default) is the paper's ``|A_t| = 1``:
``s_k = sign(a_k)``. ``"authors"`` reproduces the authors' code, which multiplies the gradient
reaching each noise prediction by ``c_t = sqrt(abar_t) sqrt(1 - abar_t) / (1 - alpha_t)`` at the
step's timestep ``t``, normalised by the geometric mean of the ``c`` over the steps
(:func:`ddpm_step_factors`): ``s_k = a_k c_k / (prod_j c_j)^(1/T)``. ``1 / c_t`` is ``|A_t|`` of a
*DDPM* step at ``t`` (the paper's eq. 9), so the factors standardise a DDPM chain; the ``a_k`` of a
20-step DPM-Solver++ chain are another solver's, and ``|s_k|`` is not constant (for Stable Diffusion
1.5's noise schedule: 0.22 at the first step, 0.36-0.40 in the middle, 0.71-0.74 at the last two).

Three ways to compute it (``mode``)
-----------------------------------
* ``"naive"``: autograd through the whole chain. The exact gradient; memory grows with ``T``.
* ``"one_graph"``: one graph through the chain in which every U-Net call sees a detached input,
  and a gradient hook on each step's noise prediction rescales the arriving gradient ``a_k g`` to
  ``s_k g``. Memory still grows with ``T`` (every step's U-Net activations are alive at once).
* ``"two_pass"`` (default): the same gradient as ``one_graph``, in constant memory.

  1. Pass 1, no grad: run the sampler; keep each step's U-Net input (after
     ``scale_model_input``) and timestep: ``T`` latent-sized tensors.
  2. Compute ``L(z_0)`` with grad from a leaf ``z_0`` and backpropagate once, giving ``g``.
  3. Find the scalars ``a_k`` by replaying the scheduler's arithmetic on one-element tensors
     (no U-Net involved; cached per schedule): :func:`step_coefficients`.
  4. Pass 2: for each step recompute ``eps_k`` with grad from the stored input and call
     ``eps_k.backward(s_k * g)``. Only one step's graph is alive at a time.

  When ``prompt_embeds`` comes from a trained text encoder, pass 2 feeds the U-Net a detached leaf
  copy, accumulates ``dL/dc`` over the steps, and runs the text encoder's backward once at the end.

The sampling loop is the one of diffusers' ``StableDiffusionPipeline``: ``set_timesteps``, initial
latents times ``init_noise_sigma``, ``scale_model_input``, classifier-free guidance
``eps_u + w (eps_c - eps_u)`` on the U-Net batch ``[negative, positive]`` when ``w > 1``, and
``scheduler.step``. The caller's scheduler is never stepped: every pass uses a fresh copy built from
its config. SDXL's U-Net also takes ``added_cond_kwargs`` (pooled text embeddings and time ids):
given for the prompt and the negative prompt, they reach every U-Net call, stacked for the guidance
batch as in ``StableDiffusionXLPipeline``, and a trained encoder behind them gets its gradient the
same way as through ``prompt_embeds``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm


__all__ = [
    "DFTResult",
    "STEP_WEIGHTS",
    "SUPPORTED_SCHEDULERS",
    "adjusted_backward",
    "check_scheduler",
    "ddpm_step_factors",
    "sample_latents",
    "step_coefficients",
]

MODES = ("two_pass", "one_graph", "naive")

# How the standardised adjusted gradient weights each step (see "Standardised step weights" above).
STEP_WEIGHTS = ("unit", "authors")

# Scheduler classes whose deterministic step is linear in (sample, model_output).
SUPPORTED_SCHEDULERS = ("DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler")

# Relative tolerance of the linearity check of the scalar replay (the schedulers upcast to float32).
_LINEARITY_RTOL = 1e-4

_COEFFICIENT_CACHE: dict[tuple[type, str, int], torch.Tensor] = {}
_COEFFICIENT_CACHE_SIZE = 128


@dataclass
class DFTResult:
    """What :func:`adjusted_backward` returns (gradients themselves are accumulated in ``.grad``).

    Attributes:
        latents: the generated ``z_0``, detached, in the dtype and device of the input latents.
        loss: ``loss_fn(z_0)``, detached.
        coefficients: ``a_k = dz_0 / d(model_output_k)`` for each sampling step (float64, CPU), the
            scalar path from step ``k``'s model output to ``z_0`` with U-Net inputs held constant.
        scales: the multipliers ``s_k`` applied to ``dL/dz_0`` for each step: ``sign(a_k)``,
            ``a_k * ddpm_step_factors(...)[k]`` (``step_weights="authors"``) or ``a_k``
            (``standardize=False``); ``None`` for ``mode="naive"``, which uses the exact chain.
        timesteps: the scheduler timesteps of the steps, in sampling order (CPU).
        stats: what ``loss_fn`` returned besides the loss (``loss_fn(z_0) -> (loss, stats)``), or
            ``None`` when it returned the loss alone: how a loss reports its parts to the caller.
    """

    latents: torch.Tensor
    loss: torch.Tensor
    coefficients: torch.Tensor
    scales: torch.Tensor | None
    timesteps: torch.Tensor
    stats: Any = None


# ----------------------------------------------------------------------------------------------
# Schedulers: validation, fresh copies, the scalar replay
# ----------------------------------------------------------------------------------------------


def check_scheduler(scheduler) -> None:
    """Raise ``ValueError`` unless ``scheduler``'s deterministic step is linear in (sample, model output).

    Adjusted DFT needs ``z_0 = sum_k a_k eps_k + b z_T`` with scalar ``a_k``: the supported classes
    are DDIM (``eta=0``, as the pipeline calls it), DPM-Solver multistep (``dpmsolver++`` or
    ``dpmsolver``, the paper's sampler) and Euler (``s_churn=0``, as the pipeline calls it). Clipping
    and dynamic thresholding of the predicted ``x_0`` make the step non-linear; SDE variants and
    ancestral samplers inject noise.
    """
    name = type(scheduler).__name__
    if name not in SUPPORTED_SCHEDULERS:
        raise ValueError(
            f"{name} is not supported by direct finetuning; use one of {', '.join(SUPPORTED_SCHEDULERS)} "
            "(deterministic steps, linear in the sample and the model output)."
        )
    config = scheduler.config
    if config.get("thresholding", False):
        raise ValueError(f"{name} with thresholding=True makes the step non-linear; set thresholding=False.")
    if config.get("clip_sample", False):
        raise ValueError(f"{name} with clip_sample=True makes the step non-linear; set clip_sample=False.")
    if name == "DPMSolverMultistepScheduler":
        if config.algorithm_type not in ("dpmsolver++", "dpmsolver"):
            raise ValueError(
                f"DPMSolverMultistepScheduler with algorithm_type={config.algorithm_type!r} injects noise; "
                "use 'dpmsolver++' or 'dpmsolver'."
            )
        if config.get("variance_type") is not None:
            raise ValueError("DPMSolverMultistepScheduler with a learned variance_type is not supported.")


def _fresh_scheduler(scheduler, num_inference_steps: int, device):
    """A new scheduler from ``scheduler``'s config with timesteps set: the caller's state is never touched."""
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(num_inference_steps, device=device)
    return fresh


def _cache_key(scheduler, num_inference_steps: int) -> tuple[type, str, int]:
    config = json.dumps(dict(scheduler.config), sort_keys=True, default=str)
    return type(scheduler), config, int(num_inference_steps)


def step_coefficients(scheduler, num_inference_steps: int) -> torch.Tensor:
    """Return ``a_k = dz_0 / d(model_output_k)`` for each step, with U-Net inputs held constant.

    The scheduler's arithmetic is replayed (on a fresh copy, CPU, float64) on a batch of one-element
    samples: column ``j < T`` feeds model output 1 at step ``j`` and 0 elsewhere from ``z_T = 0``,
    so it ends at ``a_j``; column ``T`` feeds ``z_T = 1`` and no model output (its end value is the
    coefficient ``b`` of ``z_T``); a last column with random inputs checks that the map is linear,
    ``z_0 = sum_k a_k eps_k + b z_T``, and a ``ValueError`` is raised if it is not.

    The result (float64, CPU, shape ``(T,)``) is cached per scheduler class, config and step count.
    """
    check_scheduler(scheduler)
    key = _cache_key(scheduler, num_inference_steps)
    if key in _COEFFICIENT_CACHE:
        return _COEFFICIENT_CACHE[key].clone()

    replay = _fresh_scheduler(scheduler, num_inference_steps, "cpu")
    timesteps = replay.timesteps
    num_steps = len(timesteps)
    columns = num_steps + 2
    gen = torch.Generator().manual_seed(0)
    check_eps = torch.randn(num_steps, generator=gen, dtype=torch.float64)
    check_z = torch.randn((), generator=gen, dtype=torch.float64)

    sample = torch.zeros(columns, 1, 1, 1, dtype=torch.float64)
    sample[num_steps] = 1.0
    sample[num_steps + 1] = check_z
    for k, t in enumerate(timesteps):
        model_output = torch.zeros(columns, 1, 1, 1, dtype=torch.float64)
        model_output[k] = 1.0
        model_output[num_steps + 1] = check_eps[k]
        replay.scale_model_input(sample, t)  # some schedulers expect this call before step()
        sample = replay.step(model_output, t, sample).prev_sample
    end = sample.flatten().to(torch.float64)
    a, b, checked = end[:num_steps], end[num_steps], end[num_steps + 1]

    predicted = (a * check_eps).sum() + b * check_z
    scale = (a.abs() * check_eps.abs()).sum() + (b * check_z).abs()
    if (checked - predicted).abs() > _LINEARITY_RTOL * scale:
        raise ValueError(
            f"{type(scheduler).__name__}'s step is not linear in (sample, model_output) with this config; "
            "adjusted DFT needs a deterministic, linear step."
        )

    if len(_COEFFICIENT_CACHE) >= _COEFFICIENT_CACHE_SIZE:
        _COEFFICIENT_CACHE.pop(next(iter(_COEFFICIENT_CACHE)))
    _COEFFICIENT_CACHE[key] = a.clone()
    return a


def ddpm_step_factors(scheduler, num_inference_steps: int) -> torch.Tensor:
    """Return the factors ``f_k = c_k / (prod_j c_j)^(1/T)`` of ``step_weights="authors"``, one per step.

    ``c_k = sqrt(abar_t) sqrt(1 - abar_t) / (1 - alpha_t)`` at the step's timestep ``t``, from the
    scheduler's ``alphas_cumprod`` and ``alphas``: the inverse of ``|A_t|`` of a DDPM step at ``t``.
    The result is float64 on the CPU, shape ``(T,)``, with a geometric mean of 1.

    Raises:
        ValueError: if the scheduler has no ``alphas_cumprod`` / ``alphas``, or its timesteps are not
            whole numbers (e.g. ``EulerDiscreteScheduler`` with ``timestep_spacing="linspace"``).
    """
    fresh = _fresh_scheduler(scheduler, num_inference_steps, "cpu")
    name = type(scheduler).__name__
    if getattr(fresh, "alphas_cumprod", None) is None or getattr(fresh, "alphas", None) is None:
        raise ValueError(f"step_weights='authors' needs a scheduler with alphas_cumprod and alphas; {name} has none")
    timesteps = fresh.timesteps.to(torch.float64)
    if not torch.equal(timesteps, timesteps.round()):
        raise ValueError(f"step_weights='authors' needs whole-number timesteps; {name} with this config gives "
                         f"{timesteps[:3].tolist()}...: use DDIM or DPM-Solver, or timestep_spacing='leading'")
    index = timesteps.long()
    abar = fresh.alphas_cumprod.to(torch.float64)[index]
    alpha = fresh.alphas.to(torch.float64)[index]
    c = abar.sqrt() * (1 - abar).sqrt() / (1 - alpha)
    return c / torch.exp(torch.log(c).mean())


def _step_scales(scheduler, num_inference_steps: int, coefficients: torch.Tensor, standardize: bool,
                 step_weights: str) -> torch.Tensor:
    """The multipliers ``s_k`` of ``dL/dz_0`` for each step (see "Standardised step weights")."""
    if not standardize:
        return coefficients.clone()
    if step_weights == "unit":
        return torch.sign(coefficients)
    return coefficients * ddpm_step_factors(scheduler, num_inference_steps)


# ----------------------------------------------------------------------------------------------
# The sampling loop
# ----------------------------------------------------------------------------------------------


def _noise_prediction(unet, latent_input, t, prompt_embeds, negative_prompt_embeds, guidance_scale, unet_kwargs,
                      added=None, negative_added=None):
    """The (guided) model output of one step, as StableDiffusionPipeline (and, with ``added``,
    StableDiffusionXLPipeline) computes it."""
    if guidance_scale > 1.0:
        model_input = torch.cat([latent_input, latent_input])
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        kwargs = _with_added_conditioning(unet_kwargs, added, negative_added)
        out = unet(model_input, t, encoder_hidden_states=embeds, **kwargs).sample
        out_uncond, out_text = out.chunk(2)
        return out_uncond + guidance_scale * (out_text - out_uncond)
    kwargs = _with_added_conditioning(unet_kwargs, added, None)
    return unet(latent_input, t, encoder_hidden_states=prompt_embeds, **kwargs).sample


def _with_added_conditioning(unet_kwargs, added, negative_added):
    """``unet_kwargs`` with ``added_cond_kwargs`` for the U-Net batch: ``added``, or ``[negative_added, added]``
    stacked per key for the guidance batch ``[negative, positive]``."""
    if added is None:
        return unet_kwargs
    if negative_added is not None:
        added = {key: torch.cat([negative_added[key], value]) for key, value in added.items()}
    return {**unet_kwargs, "added_cond_kwargs": added}


def _run_sampler(
    unet,
    scheduler,
    latents,
    prompt_embeds,
    negative_prompt_embeds,
    guidance_scale,
    unet_kwargs,
    *,
    added=None,
    negative_added=None,
    detach_unet_input: bool = False,
    on_model_output: Callable[[int, torch.Tensor], None] | None = None,
    record: list | None = None,
    progress: bool = False,
):
    """Run the sampling loop on an already prepared (fresh) scheduler; returns ``z_0``.

    Runs under the caller's grad mode. ``added`` / ``negative_added`` are the ``added_cond_kwargs`` of
    the positive and negative conditioning (SDXL), given to every U-Net call. ``detach_unet_input``
    feeds every U-Net call a detached input (the adjusted-DFT graph); ``on_model_output(k, eps_k)``
    sees each step's guided model output; ``record`` receives ``(unet_input, t)`` per step.
    """
    z = latents * scheduler.init_noise_sigma
    for k, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False)):
        latent_input = scheduler.scale_model_input(z.detach() if detach_unet_input else z, t)
        if record is not None:
            record.append((latent_input, t))
        eps = _noise_prediction(
            unet, latent_input, t, prompt_embeds, negative_prompt_embeds, guidance_scale, unet_kwargs, added,
            negative_added,
        )
        if on_model_output is not None:
            on_model_output(k, eps)
        z = scheduler.step(eps, t, z).prev_sample
    return z


def _validate_inputs(scheduler, latents, prompt_embeds, negative_prompt_embeds, guidance_scale, num_inference_steps):
    check_scheduler(scheduler)
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    if latents.dim() != 4:
        raise ValueError(f"latents must be (batch, channels, height, width), got shape {tuple(latents.shape)}")
    if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != latents.shape[0]:
        raise ValueError(
            f"prompt_embeds must be (batch, tokens, dim) with the latents' batch size {latents.shape[0]}, "
            f"got shape {tuple(prompt_embeds.shape)}"
        )
    if guidance_scale > 1.0:
        if negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative_prompt_embeds (e.g. the empty prompt's embeddings)")
        if negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)}, "
                f"prompt_embeds {tuple(prompt_embeds.shape)}; they must match"
            )


def _validate_added(added, negative_added, unet_kwargs, batch: int, guidance_scale: float) -> None:
    """``added_cond_kwargs`` (SDXL's pooled text embeddings and time ids) for every U-Net call."""
    if added is None:
        if negative_added is not None:
            raise ValueError("negative_added_cond_kwargs given without added_cond_kwargs")
        return
    if "added_cond_kwargs" in (unet_kwargs or {}):
        raise ValueError("pass added_cond_kwargs as its own argument, not in unet_kwargs: with guidance the "
                         "sampler stacks the negative and positive ones for each U-Net call")
    for key, value in added.items():
        if not isinstance(value, torch.Tensor) or value.shape[0] != batch:
            raise ValueError(f"added_cond_kwargs[{key!r}] must be a tensor with the latents' batch size {batch}, "
                             f"got {tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    if guidance_scale > 1.0:
        if negative_added is None or sorted(negative_added) != sorted(added):
            raise ValueError("guidance_scale > 1 with added_cond_kwargs needs negative_added_cond_kwargs with the "
                             f"same keys {sorted(added)} (the negative prompt's)")
        for key, value in added.items():
            if negative_added[key].shape != value.shape:
                raise ValueError(f"negative_added_cond_kwargs[{key!r}] has shape {tuple(negative_added[key].shape)}, "
                                 f"added_cond_kwargs[{key!r}] {tuple(value.shape)}; they must match")


@torch.no_grad()
def sample_latents(
    unet,
    scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    negative_prompt_embeds: torch.Tensor | None = None,
    unet_kwargs: dict[str, Any] | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    negative_added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample ``z_0`` from initial noise ``latents`` without grad, as StableDiffusionPipeline does.

    The same loop as :func:`adjusted_backward` (e.g. for the frozen model's reference images from the
    same noise), with the same arguments. ``latents`` is standard normal noise; it is multiplied by the
    scheduler's ``init_noise_sigma`` as the pipeline does. The caller's scheduler is not stepped.
    """
    _validate_inputs(scheduler, latents, prompt_embeds, negative_prompt_embeds, guidance_scale, num_inference_steps)
    _validate_added(added_cond_kwargs, negative_added_cond_kwargs, unet_kwargs, latents.shape[0], guidance_scale)
    fresh = _fresh_scheduler(scheduler, num_inference_steps, latents.device)
    return _run_sampler(
        unet, fresh, latents, prompt_embeds, negative_prompt_embeds, guidance_scale, unet_kwargs or {},
        added=added_cond_kwargs, negative_added=negative_added_cond_kwargs, progress=progress,
    )


# ----------------------------------------------------------------------------------------------
# The gradient
# ----------------------------------------------------------------------------------------------


def _call_loss(loss_fn, z0: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``loss_fn(z0)`` as ``(scalar loss, stats)``: ``stats`` is ``None`` when it returned the loss alone."""
    out = loss_fn(z0)
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError(f"loss_fn must return a loss or a (loss, stats) pair, got a tuple of {len(out)}")
        return _checked_loss(out[0]), out[1]
    return _checked_loss(out), None


def _checked_loss(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a one-element tensor, got {type(loss).__name__} "
                         f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    if not loss.requires_grad:
        raise ValueError("loss_fn's result does not depend on z_0 through autograd (it does not require grad)")
    return loss.reshape(())


def _require_trainable(eps: torch.Tensor) -> None:
    if not eps.requires_grad:
        raise ValueError(
            "the U-Net output does not require grad: no U-Net parameter or prompt embedding is trainable"
        )


def _leaf_copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A detached leaf standing in for ``tensor`` in pass 2, collecting its gradient over the steps."""
    if tensor is None or not tensor.requires_grad:
        return tensor
    return tensor.detach().requires_grad_(True)


def _two_pass(unet, scheduler, latents, prompt_embeds, negative_prompt_embeds, loss_fn, guidance_scale,
              unet_kwargs, num_inference_steps, scales, progress, *, added=None, negative_added=None):
    # Pass 1: sample without grad, keeping each step's U-Net input.
    record: list[tuple[torch.Tensor, torch.Tensor]] = []
    fresh = _fresh_scheduler(scheduler, num_inference_steps, latents.device)
    with torch.no_grad():
        z0 = _run_sampler(
            unet, fresh, latents, prompt_embeds, negative_prompt_embeds, guidance_scale, unet_kwargs,
            added=added, negative_added=negative_added, record=record, progress=progress,
        )

    # The loss and g = dL/dz_0 (one backward through the decoder and the loss models).
    z0_leaf = z0.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, stats = _call_loss(loss_fn, z0_leaf)
        loss.backward()
    if z0_leaf.grad is None:
        raise ValueError("loss_fn's result does not depend on z_0")
    g = z0_leaf.grad

    # Pass 2: recompute each step with grad and feed it s_k * g; one step's graph at a time.
    cond = _leaf_copy(prompt_embeds)
    uncond = _leaf_copy(negative_prompt_embeds)
    # SDXL's pooled text embeddings come from a text encoder too: leaf copies of them, the same way.
    cond_added = None if added is None else {key: _leaf_copy(value) for key, value in added.items()}
    uncond_added = None if negative_added is None else {key: _leaf_copy(v) for key, v in negative_added.items()}
    with torch.enable_grad():
        steps = tqdm(record, desc="adjusted backward", disable=not progress, leave=False)
        for (latent_input, t), s_k in zip(steps, scales.tolist()):
            eps = _noise_prediction(unet, latent_input, t, cond, uncond, guidance_scale, unet_kwargs, cond_added,
                                    uncond_added)
            _require_trainable(eps)
            if s_k != 0.0:
                eps.backward(g.to(eps.dtype) * s_k)
            del eps

    # The text encoder's backward (or any graph that produced the embeddings), once.
    pairs = [(prompt_embeds, cond), (negative_prompt_embeds, uncond)]
    for originals, leaves in ((added, cond_added), (negative_added, uncond_added)):
        if originals is not None:
            pairs += [(originals[key], leaves[key]) for key in originals]
    roots, grads = [], []
    for original, leaf in pairs:
        if leaf is not None and leaf is not original and leaf.grad is not None:
            roots.append(original)
            grads.append(leaf.grad)
    if roots:
        torch.autograd.backward(roots, grads)
    return z0, loss, stats


def _one_graph(unet, scheduler, latents, prompt_embeds, negative_prompt_embeds, loss_fn, guidance_scale,
               unet_kwargs, num_inference_steps, coefficients, scales, progress, *, added=None, negative_added=None):
    # The gradient reaching eps_k through the scheduler is a_k * g; the hook turns it into s_k * g.
    factors = [s / a if a != 0.0 else 0.0 for s, a in zip(scales.tolist(), coefficients.tolist())]

    def rescale(k: int, eps: torch.Tensor) -> None:
        _require_trainable(eps)
        eps.register_hook(lambda grad, f=factors[k]: grad * f)

    fresh = _fresh_scheduler(scheduler, num_inference_steps, latents.device)
    with torch.enable_grad():
        z0 = _run_sampler(
            unet, fresh, latents, prompt_embeds, negative_prompt_embeds, guidance_scale, unet_kwargs,
            added=added, negative_added=negative_added, detach_unet_input=True, on_model_output=rescale,
            progress=progress,
        )
        loss, stats = _call_loss(loss_fn, z0)
        loss.backward()
    return z0.detach(), loss, stats


def _naive(unet, scheduler, latents, prompt_embeds, negative_prompt_embeds, loss_fn, guidance_scale,
           unet_kwargs, num_inference_steps, progress, *, added=None, negative_added=None):
    fresh = _fresh_scheduler(scheduler, num_inference_steps, latents.device)
    with torch.enable_grad():
        z0 = _run_sampler(
            unet, fresh, latents, prompt_embeds, negative_prompt_embeds, guidance_scale, unet_kwargs,
            added=added, negative_added=negative_added, on_model_output=lambda k, eps: _require_trainable(eps),
            progress=progress,
        )
        loss, stats = _call_loss(loss_fn, z0)
        loss.backward()
    return z0.detach(), loss, stats


def adjusted_backward(
    unet,
    scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, Any]],
    *,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    negative_prompt_embeds: torch.Tensor | None = None,
    mode: str = "two_pass",
    standardize: bool = True,
    step_weights: str = "unit",
    unet_kwargs: dict[str, Any] | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    negative_added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> DFTResult:
    """Sample ``z_0`` from ``latents`` and accumulate the (adjusted) DFT gradient of ``loss_fn(z_0)``.

    Gradients are *accumulated* into ``.grad`` of every tensor that requires grad and reaches the
    loss: U-Net parameters or adapters, ``prompt_embeds`` (and through it a text encoder or soft
    tokens), and anything ``loss_fn`` itself trains. Zero the gradients before calling if needed.

    Args:
        unet: a callable with the signature of diffusers' ``UNet2DConditionModel``
            (``unet(sample, timestep, encoder_hidden_states=..., **unet_kwargs)`` returning an object
            with ``.sample``); a peft-wrapped U-Net works, and so does gradient checkpointing.
        scheduler: a DDIM, DPM-Solver multistep or Euler scheduler (see :func:`check_scheduler`). Only
            its config is read; its state is left as it was.
        latents: initial noise ``(B, C, H, W)``, standard normal, as passed to the pipeline's
            ``latents=`` (it is multiplied by ``init_noise_sigma``). Sets the dtype and device.
        prompt_embeds: ``(B, tokens, dim)`` text embeddings; may require grad (a trained text encoder).
        loss_fn: ``loss_fn(z_0) -> scalar tensor``, or ``-> (scalar tensor, stats)`` to hand back
            values computed with the loss (``DFTResult.stats``); may decode with a VAE, run
            classifiers, close over targets.
        num_inference_steps: sampling steps ``T``.
        guidance_scale: classifier-free guidance weight ``w``; guidance is applied when ``w > 1``.
        negative_prompt_embeds: embeddings of the negative (e.g. empty) prompt; needed when ``w > 1``.
        mode: ``"two_pass"`` (adjusted, memory flat in ``T``), ``"one_graph"`` (adjusted, one graph with
            gradient hooks), or ``"naive"`` (the exact gradient through the whole chain).
        standardize: adjusted modes only: standardised step weights (``step_weights``) if True, else
            ``s_k = a_k``.
        step_weights: with ``standardize=True``: ``"unit"`` (``s_k = sign(a_k)``, the paper's
            ``|A_t| = 1``) or ``"authors"`` (``s_k = a_k * ddpm_step_factors(scheduler, T)[k]``, the
            authors' code); see the module docstring.
        unet_kwargs: extra keyword arguments for every U-Net call (``cross_attention_kwargs``...).
        added_cond_kwargs: the U-Net's ``added_cond_kwargs`` for the prompt, each value ``(B, ...)``
            (SDXL: ``{"text_embeds": pooled text embeddings, "time_ids": ...}``); may require grad (a
            trained second text encoder), like ``prompt_embeds``.
        negative_added_cond_kwargs: the same for the negative prompt; needed with ``added_cond_kwargs``
            when ``w > 1``. Each U-Net call of the guidance batch ``[negative, positive]`` gets both,
            stacked, as ``StableDiffusionXLPipeline`` does.
        progress: show a progress bar over the steps.

    Returns:
        :class:`DFTResult` with the detached ``z_0`` and loss, the per-step coefficients and the
        loss's ``stats``.

    Raises:
        ValueError: on an unknown ``mode`` or ``step_weights``, ``step_weights="authors"`` with
            ``standardize=False``, an unsupported scheduler or inputs of the wrong shapes.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(standardize, bool):
        raise TypeError(f"standardize must be a bool, got {standardize!r}")
    if step_weights not in STEP_WEIGHTS:
        raise ValueError(f"step_weights must be one of {STEP_WEIGHTS}, got {step_weights!r}")
    if step_weights == "authors" and not standardize:
        raise ValueError("step_weights='authors' is a standardisation of the step weights; "
                         "use it with standardize=True")
    _validate_inputs(scheduler, latents, prompt_embeds, negative_prompt_embeds, guidance_scale, num_inference_steps)
    _validate_added(added_cond_kwargs, negative_added_cond_kwargs, unet_kwargs, latents.shape[0], guidance_scale)
    unet_kwargs = dict(unet_kwargs or {})
    added = dict(added=added_cond_kwargs, negative_added=negative_added_cond_kwargs if guidance_scale > 1.0 else None)

    coefficients = step_coefficients(scheduler, num_inference_steps)
    scales = None  # the exact gradient (mode="naive") has no step weights
    if mode != "naive":
        scales = _step_scales(scheduler, num_inference_steps, coefficients, standardize, step_weights)
    timesteps = _fresh_scheduler(scheduler, num_inference_steps, "cpu").timesteps

    common = (unet, scheduler, latents, prompt_embeds, negative_prompt_embeds, loss_fn, guidance_scale,
              unet_kwargs, num_inference_steps)
    if mode == "two_pass":
        z0, loss, stats = _two_pass(*common, scales, progress, **added)
    elif mode == "one_graph":
        z0, loss, stats = _one_graph(*common, coefficients, scales, progress, **added)
    else:
        z0, loss, stats = _naive(*common, progress, **added)
    return DFTResult(latents=z0, loss=loss.detach(), coefficients=coefficients, scales=scales, timesteps=timesteps,
                     stats=stats)
