"""Tests of diffusers_fair.method.dft: the adjusted gradient against independent computations.

Everything runs in float64 on a tiny random-weight UNet2DConditionModel. The references here do not
use dft.py's internals: the sampling loop is written out again (and checked against diffusers'
StableDiffusionPipeline), the per-step coefficients are measured from the gradient that reaches each
noise prediction, and DDIM's coefficients are derived by hand.
"""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from diffusers_fair.method.dft import (
    DFTResult,
    adjusted_backward,
    ddpm_step_factors,
    sample_latents,
    step_coefficients,
)


DTYPE = torch.float64
STEPS = 4
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def make_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=8,
        sample_size=8,
        norm_num_groups=4,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).to(DTYPE)


def make_scheduler(name: str, prediction_type: str = "epsilon", **overrides):
    if name == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type,
                             **SD_BETAS, **overrides)
    if name == "dpm":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                           prediction_type=prediction_type, **SD_BETAS, **overrides)
    if name == "euler":
        return EulerDiscreteScheduler(prediction_type=prediction_type, **SD_BETAS, **overrides)
    raise AssertionError(name)


def make_inputs(batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=gen, dtype=DTYPE)
    cond = torch.randn(batch, 5, 8, generator=gen, dtype=DTYPE)
    uncond = torch.randn(batch, 5, 8, generator=gen, dtype=DTYPE)
    weight = torch.randn(batch, 4, 8, 8, generator=gen, dtype=DTYPE)

    def loss_fn(z0):
        return (torch.tanh(z0) * weight).sum() + 0.1 * (z0**2).mean()

    return latents, cond, uncond, loss_fn


def plain_loop(unet, scheduler, latents, cond, uncond, w, steps, *, detach_input=False, on_eps=None):
    """The StableDiffusionPipeline denoising loop, written out (grad follows the caller's mode)."""
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(steps)
    z = latents * sched.init_noise_sigma
    for k, t in enumerate(sched.timesteps):
        z_in = z.detach() if detach_input else z
        z_in = torch.cat([z_in] * 2) if w > 1 else z_in
        z_in = sched.scale_model_input(z_in, t)
        embeds = torch.cat([uncond, cond]) if w > 1 else cond
        eps = unet(z_in, t, encoder_hidden_states=embeds).sample
        if w > 1:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + w * (eps_c - eps_u)
        if on_eps is not None:
            on_eps(k, eps)
        z = sched.step(eps, t, z).prev_sample
    return z


def reference_adjusted(unet, scheduler, latents, cond, uncond, w, loss_fn, steps, standardize):
    """Hook-based adjusted gradient: a_k is read off the gradient that reaches each noise prediction.

    Returns the measured a_k. Accumulates the adjusted gradient into ``.grad``.
    """
    with torch.no_grad():
        z0 = plain_loop(unet, scheduler, latents, cond, uncond, w, steps)
    z0.requires_grad_(True)
    loss_fn(z0).backward()
    g = z0.grad
    measured = {}

    def hook(k, grad):
        a_k = (grad * g).sum() / (g * g).sum()
        assert torch.allclose(grad, a_k * g, rtol=1e-5, atol=1e-9 * grad.abs().max()), "a_k is not a scalar"
        measured[k] = a_k.item()
        return grad / a_k.abs() if standardize else grad

    def on_eps(k, eps):
        eps.register_hook(lambda grad: hook(k, grad))

    z0 = plain_loop(unet, scheduler, latents, cond, uncond, w, steps, detach_input=True, on_eps=on_eps)
    loss_fn(z0).backward()
    return torch.tensor([measured[k] for k in range(len(measured))], dtype=DTYPE)


def collect_grads(*modules_or_tensors) -> torch.Tensor:
    parts = []
    for item in modules_or_tensors:
        tensors = [item] if isinstance(item, torch.Tensor) else [p for p in item.parameters() if p.requires_grad]
        for t in tensors:
            parts.append(t.grad.flatten() if t.grad is not None else torch.zeros(t.numel(), dtype=t.dtype))
    return torch.cat(parts)


def zero_grads(*modules_or_tensors):
    for item in modules_or_tensors:
        tensors = [item] if isinstance(item, torch.Tensor) else list(item.parameters())
        for t in tensors:
            t.grad = None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------


CASES = [
    (sched_name, prediction_type, guidance, standardize)
    for sched_name in ["ddim", "dpm"]
    for prediction_type in ["epsilon", "v_prediction"]
    for guidance in [1.0, 3.0]
    for standardize in [True, False]
] + [("euler", "v_prediction", 3.0, True), ("euler", "epsilon", 1.0, False)]


@pytest.mark.parametrize("sched_name, prediction_type, guidance, standardize", CASES)
def test_two_pass_equals_one_graph_equals_reference(sched_name, prediction_type, guidance, standardize):
    unet = make_unet()
    scheduler = make_scheduler(sched_name, prediction_type)
    latents, cond, uncond, loss_fn = make_inputs()
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=guidance, negative_prompt_embeds=uncond,
                  standardize=standardize)

    measured = reference_adjusted(unet, scheduler, latents, cond, uncond, guidance, loss_fn, STEPS, standardize)
    reference = collect_grads(unet)
    zero_grads(unet)
    two = adjusted_backward(unet, scheduler, latents, cond, loss_fn, mode="two_pass", **kwargs)
    two_grads = collect_grads(unet)
    zero_grads(unet)
    one = adjusted_backward(unet, scheduler, latents, cond, loss_fn, mode="one_graph", **kwargs)
    one_grads = collect_grads(unet)

    assert reference.norm() > 0
    assert rel_err(two_grads, reference) < 1e-6
    assert rel_err(one_grads, reference) < 1e-6
    assert torch.allclose(two.coefficients, measured, rtol=1e-5)
    assert torch.equal(two.latents, one.latents)
    expected_scales = torch.sign(measured) if standardize else measured
    assert torch.allclose(two.scales, expected_scales, rtol=1e-5)


@pytest.mark.parametrize("sched_name", ["ddim", "dpm"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_naive_equals_autograd_through_the_loop(sched_name, guidance):
    unet = make_unet()
    scheduler = make_scheduler(sched_name, "v_prediction")
    latents, cond, uncond, loss_fn = make_inputs()
    z0 = plain_loop(unet, scheduler, latents, cond, uncond, guidance, STEPS)
    loss_fn(z0).backward()
    expected = collect_grads(unet)
    zero_grads(unet)
    result = adjusted_backward(unet, scheduler, latents, cond, loss_fn, num_inference_steps=STEPS,
                               guidance_scale=guidance, negative_prompt_embeds=uncond, mode="naive")
    assert result.scales is None
    assert rel_err(collect_grads(unet), expected) < 1e-10
    # The exact gradient is not the adjusted one.
    zero_grads(unet)
    adjusted_backward(unet, scheduler, latents, cond, loss_fn, num_inference_steps=STEPS,
                      guidance_scale=guidance, negative_prompt_embeds=uncond, standardize=False)
    assert rel_err(collect_grads(unet), expected) > 1e-3


@pytest.mark.parametrize("sched_name", ["ddim", "dpm", "euler"])
def test_sampling_matches_stable_diffusion_pipeline(sched_name):
    unet = make_unet()
    scheduler = make_scheduler(sched_name)
    latents, cond, uncond, loss_fn = make_inputs()
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents, num_inference_steps=STEPS,
                    guidance_scale=3.0, output_type="latent").images
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=3.0, negative_prompt_embeds=uncond)
    sampled = sample_latents(unet, scheduler, latents, cond, **kwargs)
    with torch.no_grad():
        written_out = plain_loop(unet, scheduler, latents, cond, uncond, 3.0, STEPS)
    result = adjusted_backward(unet, scheduler, latents, cond, loss_fn, **kwargs)
    assert isinstance(result, DFTResult)
    torch.testing.assert_close(sampled, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(written_out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.latents, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.loss, loss_fn(expected), rtol=1e-12, atol=1e-12)
    assert not result.latents.requires_grad and not result.loss.requires_grad


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_coefficients_match_hand_derivation(prediction_type, spacing, set_alpha_to_one):
    """Deterministic DDIM: z_prev = sqrt(ab_prev) x0_pred + sqrt(1 - ab_prev) eps_pred = r_k z + c_k m_k.

    epsilon:      x0 = (z - sqrt(1-ab) m) / sqrt(ab), eps = m
                  r = sqrt(ab_prev / ab),  c = sqrt(1-ab_prev) - sqrt(ab_prev) sqrt(1-ab) / sqrt(ab)
    v_prediction: x0 = sqrt(ab) z - sqrt(1-ab) m,  eps = sqrt(ab) m + sqrt(1-ab) z
                  r = sqrt(ab_prev ab) + sqrt((1-ab_prev)(1-ab)),
                  c = sqrt(1-ab_prev) sqrt(ab) - sqrt(ab_prev) sqrt(1-ab)
    so a_k = c_k * prod_{j after k} r_j.
    """
    steps = 6
    scheduler = DDIMScheduler(clip_sample=False, prediction_type=prediction_type, timestep_spacing=spacing,
                              set_alpha_to_one=set_alpha_to_one, **SD_BETAS)
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    abar = sched.alphas_cumprod.to(DTYPE)
    final = 1.0 if set_alpha_to_one else abar[0].item()
    r, c = [], []
    for t in sched.timesteps.tolist():
        prev = t - 1000 // steps
        ab, ab_prev = abar[t].item(), (abar[prev].item() if prev >= 0 else final)
        if prediction_type == "epsilon":
            r.append(math.sqrt(ab_prev / ab))
            c.append(math.sqrt(1 - ab_prev) - math.sqrt(ab_prev) * math.sqrt(1 - ab) / math.sqrt(ab))
        else:
            r.append(math.sqrt(ab_prev * ab) + math.sqrt((1 - ab_prev) * (1 - ab)))
            c.append(math.sqrt(1 - ab_prev) * math.sqrt(ab) - math.sqrt(ab_prev) * math.sqrt(1 - ab))
    expected = torch.tensor([c[k] * math.prod(r[k + 1:]) for k in range(steps)], dtype=DTYPE)
    torch.testing.assert_close(step_coefficients(scheduler, steps), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scheduler", [
    make_scheduler("ddim", "v_prediction"),
    DPMSolverMultistepScheduler(solver_order=2, **SD_BETAS),
    DPMSolverMultistepScheduler(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min", **SD_BETAS),
    DPMSolverMultistepScheduler(use_karras_sigmas=True, **SD_BETAS),
    make_scheduler("euler", "v_prediction"),
], ids=["ddim", "dpm++2", "dpm3", "dpm-karras", "euler"])
def test_coefficients_are_per_step_scalars_on_a_batch(scheduler):
    """On full (B, C, H, W) tensors, d z_0 / d m_k is a_k times the identity for every batch element."""
    steps = 5
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(3, 4, 5, 5, generator=gen, dtype=DTYPE) * sched.init_noise_sigma
    outputs = [torch.randn(3, 4, 5, 5, generator=gen, dtype=DTYPE, requires_grad=True) for _ in range(steps)]
    for t, m in zip(sched.timesteps, outputs):
        sched.scale_model_input(z, t)
        z = sched.step(m, t, z).prev_sample
    probe = torch.randn(3, 4, 5, 5, generator=gen, dtype=DTYPE)
    grads = torch.autograd.grad((z * probe).sum(), outputs)
    a = step_coefficients(scheduler, steps)
    assert a.shape == (steps,)
    for a_k, grad in zip(a, grads):
        torch.testing.assert_close(grad, a_k * probe, rtol=1e-5, atol=1e-6 * probe.abs().max().item())


@pytest.mark.parametrize("scheduler, message", [
    (DDIMScheduler(clip_sample=True), "clip_sample"),
    (DPMSolverMultistepScheduler(thresholding=True), "thresholding"),
    (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "injects noise"),
    (DDPMScheduler(), "DDIMScheduler, DPMSolverMultistepScheduler"),
])
def test_unsupported_schedulers_raise(scheduler, message):
    unet = make_unet()
    latents, cond, _, loss_fn = make_inputs()
    with pytest.raises(ValueError, match=message):
        adjusted_backward(unet, scheduler, latents, cond, loss_fn, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match=message):
        step_coefficients(scheduler, STEPS)


def test_replay_detects_a_non_linear_step():
    """A step that is not linear (here: tanh on the result) fails the replay's linearity check."""

    class DDIMScheduler(make_scheduler("ddim").__class__):  # same class name, non-linear step
        def step(self, *args, **kwargs):
            out = super().step(*args, **kwargs)
            out.prev_sample = torch.tanh(out.prev_sample)
            return out

    linear = make_scheduler("ddim")
    step_coefficients(linear, STEPS)  # cached for the linear class: must not be reused for the subclass
    scheduler = DDIMScheduler.from_config(linear.config)
    with pytest.raises(ValueError, match="not linear"):
        step_coefficients(scheduler, STEPS)


def test_bad_arguments_raise():
    unet = make_unet()
    scheduler = make_scheduler("ddim")
    latents, cond, _, loss_fn = make_inputs()
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        adjusted_backward(unet, scheduler, latents, cond, loss_fn, num_inference_steps=STEPS, guidance_scale=2.0)
    with pytest.raises(ValueError, match="mode"):
        adjusted_backward(unet, scheduler, latents, cond, loss_fn, num_inference_steps=STEPS, mode="fast")
    with pytest.raises(ValueError, match="batch size"):
        adjusted_backward(unet, scheduler, latents, cond[:1], loss_fn, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="one-element"):
        adjusted_backward(unet, scheduler, latents, cond, lambda z: z, num_inference_steps=STEPS)
    unet.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        adjusted_backward(unet, scheduler, latents, cond, loss_fn, num_inference_steps=STEPS)


def test_trained_text_encoder_backward_runs_once():
    """Embeddings from a (tiny linear) text encoder: its grads equal one_graph's, from one backward."""
    unet = make_unet().requires_grad_(False)
    scheduler = make_scheduler("dpm")
    latents, _, _, loss_fn = make_inputs()
    torch.manual_seed(5)
    encoder = torch.nn.Linear(8, 8).to(DTYPE)
    tokens, empty = torch.randn(2, 5, 8, dtype=DTYPE), torch.randn(2, 5, 8, dtype=DTYPE)

    grads, backward_counts = {}, {}
    for mode in ["one_graph", "two_pass"]:
        zero_grads(encoder)
        cond, uncond = encoder(tokens), encoder(empty)
        count = [0]
        cond.register_hook(lambda grad, count=count: count.__setitem__(0, count[0] + 1))
        adjusted_backward(unet, scheduler, latents, cond, loss_fn, num_inference_steps=STEPS, guidance_scale=3.0,
                          negative_prompt_embeds=uncond, mode=mode)
        grads[mode], backward_counts[mode] = collect_grads(encoder), count[0]
    assert grads["one_graph"].norm() > 0
    assert rel_err(grads["two_pass"], grads["one_graph"]) < 1e-6
    assert backward_counts == {"one_graph": 1, "two_pass": 1}
    assert all(p.grad is None for p in unet.parameters())


def test_leaf_prompt_embeds_get_grads():
    unet = make_unet().requires_grad_(False)
    scheduler = make_scheduler("ddim")
    latents, cond, _, loss_fn = make_inputs()
    grads = {}
    for mode in ["one_graph", "two_pass"]:
        leaf = cond.clone().requires_grad_(True)
        adjusted_backward(unet, scheduler, latents, leaf, loss_fn, num_inference_steps=STEPS, mode=mode)
        grads[mode] = leaf.grad
    assert rel_err(grads["two_pass"], grads["one_graph"]) < 1e-6


def test_caller_scheduler_state_untouched():
    unet = make_unet()
    latents, cond, _, loss_fn = make_inputs()
    untouched = make_scheduler("dpm")
    adjusted_backward(unet, untouched, latents, cond, loss_fn, num_inference_steps=STEPS)
    assert untouched.num_inference_steps is None and untouched.step_index is None

    scheduler = make_scheduler("dpm")
    scheduler.set_timesteps(7)
    z = latents.clone()
    for t in scheduler.timesteps[:2]:
        z = scheduler.step(torch.randn_like(z), t, z).prev_sample
    before = dict(timesteps=scheduler.timesteps.clone(), step_index=scheduler.step_index,
                  lower_order_nums=scheduler.lower_order_nums, outputs=[m.clone() for m in scheduler.model_outputs])
    for mode in ["two_pass", "one_graph", "naive"]:
        adjusted_backward(unet, scheduler, latents, cond, loss_fn, num_inference_steps=STEPS, mode=mode)
    assert torch.equal(scheduler.timesteps, before["timesteps"])
    assert scheduler.step_index == before["step_index"] == 2
    assert scheduler.lower_order_nums == before["lower_order_nums"]
    assert all(torch.equal(a, b) for a, b in zip(scheduler.model_outputs, before["outputs"]))


def test_gradient_checkpointing_gives_the_same_gradient():
    scheduler = make_scheduler("dpm")
    latents, cond, uncond, loss_fn = make_inputs()
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0, negative_prompt_embeds=uncond)
    unet = make_unet()
    adjusted_backward(unet, scheduler, latents, cond, loss_fn, **kwargs)
    expected = collect_grads(unet)
    for mode in ["two_pass", "one_graph"]:
        checkpointed = make_unet()
        checkpointed.enable_gradient_checkpointing()
        adjusted_backward(checkpointed, scheduler, latents, cond, loss_fn, mode=mode, **kwargs)
        assert rel_err(collect_grads(checkpointed), expected) < 1e-6


def test_peft_lora_unet_with_low_precision_base():
    """A peft LoRA on a bfloat16 U-Net with float32 adapter weights: the modes agree, grads are fp32."""
    from peft import LoraConfig

    unet = make_unet().to(torch.bfloat16).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = [p for p in unet.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()
    scheduler = make_scheduler("dpm")
    latents, cond, uncond, loss_fn = make_inputs()
    latents, cond, uncond = latents.bfloat16(), cond.bfloat16(), uncond.bfloat16()

    def loss_bf16(z0):
        return loss_fn(z0.double())

    grads = {}
    for mode in ["one_graph", "two_pass"]:
        zero_grads(*lora)
        result = adjusted_backward(unet, scheduler, latents, cond, loss_bf16, num_inference_steps=3,
                                   guidance_scale=3.0, negative_prompt_embeds=uncond, mode=mode)
        assert result.latents.dtype == torch.bfloat16
        assert all(p.grad.dtype == torch.float32 for p in lora)
        grads[mode] = collect_grads(*lora)
    assert torch.isfinite(grads["two_pass"]).all() and grads["two_pass"].norm() > 0
    assert rel_err(grads["two_pass"], grads["one_graph"]) < 5e-2


def test_coefficients_are_cached_and_not_aliased():
    scheduler = make_scheduler("dpm")
    first = step_coefficients(scheduler, 5)
    first.zero_()
    second = step_coefficients(scheduler, 5)
    assert second.abs().min() > 0


@pytest.mark.parametrize("mode", ["two_pass", "one_graph", "naive"])
def test_a_loss_with_stats_hands_them_back_and_gives_the_same_gradient(mode):
    unet = make_unet()
    scheduler = make_scheduler("dpm")
    latents, cond, uncond, loss_fn = make_inputs()
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=2.0, negative_prompt_embeds=uncond, mode=mode)

    plain = adjusted_backward(unet, scheduler, latents, cond, loss_fn, **kwargs)
    plain_grads = collect_grads(unet)
    zero_grads(unet)
    seen = []

    def loss_with_stats(z0):
        seen.append(z0.detach().clone())
        loss = loss_fn(z0)
        return loss, {"loss": loss.detach(), "calls": len(seen)}

    result = adjusted_backward(unet, scheduler, latents, cond, loss_with_stats, **kwargs)
    assert plain.stats is None
    assert len(seen) == 1 and result.stats["calls"] == 1
    assert torch.equal(result.stats["loss"], result.loss) and torch.equal(seen[0], result.latents)
    assert torch.equal(collect_grads(unet), plain_grads)

    with pytest.raises(ValueError, match="a tuple of 3"):
        adjusted_backward(unet, scheduler, latents, cond, lambda z0: (loss_fn(z0), 1, 2), **kwargs)


# ---------------------------------------------------------------------------------------------- step weights
def hand_ddpm_factors(scheduler, steps):
    """The authors' per-step gradient factors, written out: sqrt(abar) sqrt(1 - abar) / (1 - alpha) at each
    timestep, divided by their geometric mean (math.prod, as a plain product)."""
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(steps)
    c = []
    for t in sched.timesteps.tolist():
        abar, alpha = float(sched.alphas_cumprod[int(t)]), float(sched.alphas[int(t)])
        c.append(math.sqrt(abar) * math.sqrt(1 - abar) / (1 - alpha))
    mean = math.prod(c) ** (1 / len(c))
    return torch.tensor([x / mean for x in c], dtype=DTYPE)


def authors_reference(unet, scheduler, latents, cond, uncond, w, loss_fn, steps):
    """The authors' form of adjusted DFT: one graph through the chain with detached U-Net inputs, and a
    hook multiplying the gradient that reaches each noise prediction by its factor."""
    factors = hand_ddpm_factors(scheduler, steps)

    def on_eps(k, eps):
        eps.register_hook(lambda grad, f=float(factors[k]): grad * f)

    z0 = plain_loop(unet, scheduler, latents, cond, uncond, w, steps, detach_input=True, on_eps=on_eps)
    loss_fn(z0).backward()


@pytest.mark.parametrize("sched_name, guidance", [("dpm", 3.0), ("dpm", 1.0), ("ddim", 3.0)])
def test_authors_step_weights_equal_the_hook_form_of_their_code(sched_name, guidance):
    unet = make_unet()
    scheduler = make_scheduler(sched_name)
    latents, cond, uncond, loss_fn = make_inputs()
    authors_reference(unet, scheduler, latents, cond, uncond, guidance, loss_fn, STEPS)
    reference = collect_grads(unet)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=guidance, negative_prompt_embeds=uncond,
                  step_weights="authors")
    for mode in ["two_pass", "one_graph"]:
        zero_grads(unet)
        result = adjusted_backward(unet, scheduler, latents, cond, loss_fn, mode=mode, **kwargs)
        assert rel_err(collect_grads(unet), reference) < 1e-6, mode
        factors = hand_ddpm_factors(scheduler, STEPS)
        assert torch.allclose(result.scales, result.coefficients * factors, rtol=1e-12)
        assert torch.equal(torch.sign(result.scales), torch.sign(result.coefficients))
    assert torch.allclose(ddpm_step_factors(scheduler, STEPS), hand_ddpm_factors(scheduler, STEPS), rtol=1e-12)
    assert math.isclose(math.prod(ddpm_step_factors(scheduler, STEPS).tolist()), 1.0, rel_tol=1e-9)


def test_unit_and_authors_step_weights_differ_over_several_steps_and_agree_in_direction_on_one():
    unet = make_unet()
    scheduler = make_scheduler("dpm")
    latents, cond, uncond, loss_fn = make_inputs()
    kwargs = dict(guidance_scale=3.0, negative_prompt_embeds=uncond)

    def run(step_weights, steps, mode="two_pass"):
        zero_grads(unet)
        result = adjusted_backward(unet, scheduler, latents, cond, loss_fn, num_inference_steps=steps, mode=mode,
                                   step_weights=step_weights, **kwargs)
        return result, collect_grads(unet)

    # Several steps: the same images and loss, gradients of other directions (|s_k| is not constant).
    (unit, unit_grads), (authors, authors_grads) = run("unit", STEPS), run("authors", STEPS)
    assert torch.equal(unit.latents, authors.latents) and torch.equal(unit.loss, authors.loss)
    assert torch.equal(unit.scales, torch.sign(unit.coefficients))
    assert authors.scales.abs().max() / authors.scales.abs().min() > 1.5
    cosine = (unit_grads @ authors_grads / (unit_grads.norm() * authors_grads.norm())).item()
    assert cosine < 1 - 1e-4

    # One step: the factor is 1, so the authors' weight is the path a_1 itself: the same direction, scaled.
    (unit, unit_grads), (authors, authors_grads) = run("unit", 1), run("authors", 1)
    a = unit.coefficients[0].item()
    assert authors.scales.tolist() == pytest.approx([a], rel=1e-12)
    assert rel_err(authors_grads, abs(a) * unit_grads) < 1e-10

    # The exact gradient has no step weights.
    (_, naive_unit), (_, naive_authors) = run("unit", STEPS, "naive"), run("authors", STEPS, "naive")
    assert torch.equal(naive_unit, naive_authors)


def test_step_weights_errors():
    unet = make_unet()
    latents, cond, _, loss_fn = make_inputs()
    with pytest.raises(ValueError, match="step_weights must be one of"):
        adjusted_backward(unet, make_scheduler("ddim"), latents, cond, loss_fn, num_inference_steps=STEPS,
                          step_weights="ddpm")
    with pytest.raises(ValueError, match="use it with standardize=True"):
        adjusted_backward(unet, make_scheduler("ddim"), latents, cond, loss_fn, num_inference_steps=STEPS,
                          standardize=False, step_weights="authors")
    with pytest.raises(ValueError, match="whole-number timesteps"):  # Euler's 5 steps: 999, 749.25, ...
        adjusted_backward(unet, make_scheduler("euler"), latents, cond, loss_fn, num_inference_steps=5,
                          step_weights="authors")
    # Euler with whole-number timesteps has the factors.
    leading = make_scheduler("euler", timestep_spacing="leading")
    assert torch.allclose(ddpm_step_factors(leading, STEPS), hand_ddpm_factors(leading, STEPS), rtol=1e-12)
