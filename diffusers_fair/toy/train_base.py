"""Train the toy world's base text-to-image model from scratch (seeded).

    python -m diffusers_fair.toy.train_base --out runs/toy_base [--steps 4000 --decay-start 2250]

Two stages, each checkpointed under ``--out`` (a rerun continues where it stopped):

1. The autoencoder (AutoencoderKL, 32x32 images <-> 16x16x4 latents) on random portraits.
2. The text encoder and the U-Net together, the autoencoder frozen. The recipe that makes a tiny
   model follow the words: v-prediction (with epsilon-prediction the high-noise loss barely depends
   on the image, so the text gets almost no gradient), timesteps drawn with density proportional to t,
   a curriculum that mixes prompts naming the traits explicitly (annealed from 80% to 50% of the
   batch) with the concept-word prompts, 10% empty prompts (for classifier-free guidance), the text
   encoder at 3x the U-Net's learning rate, and an EMA of the weights (decay 0.995).
   ``--face-weight`` (extra denoising-loss weight inside the face box), ``--final-explicit`` and
   ``--trait-head-weight`` (an auxiliary linear head on the pooled text embedding that predicts each
   image's traits, so that the text encoder carries every word's skews) are further options;
   ``--init-from`` continues from a saved pipeline instead of starting from scratch.
   docs/TOY_WORLD.md says which of them the shipped model used.

The result is a stock ``StableDiffusionPipeline`` folder (``--out/pipeline``), which is what
``diffusers_fair/toy/model`` ships. On 2 CPU cores with one thread: about 1.3 s per step at batch 64.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from . import architecture, world
from .render import TRAITS, random_traits, render
from .tokenizer import build_tokenizer


GROUP_WEIGHTS = {"occupation": 0.8, "sport": 0.1, "descriptor": 0.1}


def to_model_range(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images) * 2 - 1


# ----------------------------------------------------------------------------------------------
# Stage 1: autoencoder
# ----------------------------------------------------------------------------------------------
def train_vae(out: Path, steps: int, batch: int, seed: int) -> AutoencoderKL:
    final = out / "vae"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(final)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = architecture.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = time.time()
    for step in range(1, steps + 1):
        x = to_model_range(render(random_traits(batch, rng), rng).images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0:
            print(f"vae step {step}/{steps} rec {rec.item():.5f} kl {kl.item():.4f} {time.time() - start:.0f}s", flush=True)
    with torch.no_grad():
        x = to_model_range(render(random_traits(512, rng), rng).images)
        latents = vae.encode(x).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(final)
    print("vae scaling factor", vae.config.scaling_factor, flush=True)
    return vae


# ----------------------------------------------------------------------------------------------
# Stage 2: text encoder + U-Net
# ----------------------------------------------------------------------------------------------
class PromptSampler:
    """Draws (prompt, traits) pairs: explicit-trait prompts, concept-word prompts and empty prompts."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.words = world.words()
        weights = np.array([GROUP_WEIGHTS[w.group] / sum(x.group == w.group for x in self.words) for w in self.words])
        self.word_probs = weights / weights.sum()
        self.styles = world.load_world()["styles"]
        self.occupations = world.words("occupation")

    def one(self, explicit_fraction: float) -> tuple[str, dict[str, int]]:
        rng = self.rng
        u = rng.uniform()
        if u < 0.1:  # empty prompt: traits as the data at large
            word = self.occupations[rng.integers(len(self.occupations))]
            return "", {k: int(v[0]) for k, v in world.sample_traits(word, 1, rng).items()}
        if u < 0.1 + 0.9 * explicit_fraction:
            traits = {k: int(v[0]) for k, v in random_traits(1, rng).items()}
            named = rng.uniform(size=3) < 0.6
            if not named.any():
                named[rng.integers(3)] = True
            names = {t: TRAITS[t][traits[t]] if named[i] else None for i, t in enumerate(TRAITS)}
            return world.explicit_prompt(**names), traits
        word = self.words[rng.choice(len(self.words), p=self.word_probs)]
        style = self.styles[rng.integers(len(self.styles))] if word.group == "occupation" and rng.uniform() < 0.15 else None
        traits = {k: int(v[0]) for k, v in world.sample_traits(word, 1, rng).items()}
        return world.prompt(word, style), traits

    def batch(self, n: int, explicit_fraction: float):
        pairs = [self.one(explicit_fraction) for _ in range(n)]
        prompts = [p for p, _ in pairs]
        traits = {t: np.array([tr[t] for _, tr in pairs]) for t in TRAITS}
        return prompts, traits


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's hidden states (what the U-Net attends to) and its pooled output."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    out = text_encoder(ids)
    return out[0], out[1]


def make_trait_head() -> torch.nn.Linear:
    """A linear layer from the pooled text embedding to one logit per trait class (all traits side by side)."""
    return torch.nn.Linear(architecture.TEXT_HIDDEN, sum(len(classes) for classes in TRAITS.values()))


def trait_head_loss(logits: torch.Tensor, traits: dict[str, np.ndarray]) -> torch.Tensor:
    """Sum over traits of the cross-entropy between the head's logits and the rendered image's traits.

    Each image is drawn from its prompt's trait distribution, so the loss is smallest when the head's
    softmax equals that distribution: the pooled embedding must carry every word's skews linearly.
    """
    loss, start = logits.new_zeros(()), 0
    for trait, classes in TRAITS.items():
        loss = loss + F.cross_entropy(logits[:, start : start + len(classes)], torch.from_numpy(traits[trait]))
        start += len(classes)
    return loss


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def save_pipeline(folder: Path, vae, text_encoder, tokenizer, unet) -> None:
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=architecture.make_sampler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def face_weights(boxes: np.ndarray, size: int, face_weight: float) -> torch.Tensor:
    """Per-pixel loss weights on a ``size`` x ``size`` latent grid: ``1 + face_weight`` inside each face box, 1 elsewhere.

    ``boxes`` are the renderer's ``(N, 4)`` face boxes in image pixels; the weights are normalised to mean 1
    per image so that the loss keeps its scale.
    """
    scale = size / architecture.IMAGE_SIZE
    centres = (np.arange(size) + 0.5) / scale
    b = boxes[:, :, None]
    inside_x = (centres[None, None, :] >= b[:, 0:1]) & (centres[None, None, :] <= b[:, 2:3])
    inside_y = (centres[None, None, :] >= b[:, 1:2]) & (centres[None, None, :] <= b[:, 3:4])
    mask = inside_y[:, 0, :, None] & inside_x[:, 0, None, :]
    weights = 1.0 + face_weight * torch.from_numpy(mask.astype(np.float32))
    return (weights / weights.mean(dim=(1, 2), keepdim=True))[:, None]


def learning_rate_factor(step: int, steps: int, decay_start: int | None) -> float:
    """Linear warm-up over 200 steps, constant, then (from ``decay_start``) a cosine decay to 0.1 at ``steps``."""
    factor = min(1.0, step / 200)
    if decay_start is not None and step > decay_start:
        progress = (step - decay_start) / max(1, steps - decay_start)
        factor *= 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress))
    return factor


def train_diffusion(
    out: Path,
    vae: AutoencoderKL,
    steps: int,
    batch: int,
    seed: int,
    lr: float,
    checkpoint_every: int,
    decay_start: int | None = None,
    anneal_steps: int = 1200,
    final_explicit: float = 0.5,
    face_weight: float = 0.0,
    initial_explicit: float = 0.8,
    trait_head_weight: float = 0.0,
    init_from: Path | None = None,
) -> None:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(world.vocabulary())
    if init_from is None:
        text_encoder = architecture.make_text_encoder(tokenizer)
        unet = architecture.make_unet()
    else:
        text_encoder = CLIPTextModel.from_pretrained(init_from / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(init_from / "unet")
    ema_text, ema_unet = copy.deepcopy(text_encoder), copy.deepcopy(unet)
    text_params = list(text_encoder.parameters())
    modules = [("unet.", unet), ("text.", text_encoder), ("ema_unet.", ema_unet), ("ema_text.", ema_text)]
    trait_head = None
    if trait_head_weight:
        trait_head = make_trait_head()
        text_params += list(trait_head.parameters())
        modules.append(("head.", trait_head))
    opt = torch.optim.AdamW([{"params": unet.parameters(), "lr": lr}, {"params": text_params, "lr": 3 * lr}], weight_decay=0.01)
    state_file = out / "state.safetensors"
    start_step = 0
    rng = np.random.default_rng(seed)
    if state_file.exists():
        state = load_file(state_file)
        meta = json.loads((out / "state.json").read_text())
        for prefix, module in modules:
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        opt_state = torch.load(out / "optimizer.pt", weights_only=True)
        opt.load_state_dict(opt_state)
        start_step = meta["step"]
        rng = np.random.default_rng([seed, start_step])
        torch.manual_seed(seed + start_step)
        print(f"resumed at step {start_step}", flush=True)
    sampler = PromptSampler(rng)
    noise_scheduler = architecture.make_train_scheduler()
    vae.requires_grad_(False)
    unet.train()
    text_encoder.train()
    t0 = time.time()
    running = []
    for step in range(start_step + 1, steps + 1):
        explicit = initial_explicit - (initial_explicit - final_explicit) * min(1.0, step / anneal_steps)
        prompts, traits = sampler.batch(batch, explicit)
        portraits = render(traits, rng)
        images = to_model_range(portraits.images)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        # Timesteps with density proportional to t: the high-noise steps decide the traits.
        t = (torch.sqrt(torch.rand(batch)) * noise_scheduler.config.num_train_timesteps).long().clamp(max=999)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        target = noise_scheduler.get_velocity(latents, noise, t)
        factor = learning_rate_factor(step, steps, decay_start)
        for group, base in zip(opt.param_groups, (lr, 3 * lr)):
            group["lr"] = base * factor
        hidden, pooled = encode_prompts(tokenizer, text_encoder, prompts)
        pred = unet(noisy, t, hidden).sample
        if face_weight:
            loss = (face_weights(portraits.boxes, pred.shape[-1], face_weight) * (pred - target) ** 2).mean()
        else:
            loss = F.mse_loss(pred, target)
        head_loss = trait_head_loss(trait_head(pooled), traits) if trait_head else torch.zeros(())
        loss = loss + trait_head_weight * head_loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], 1.0)
        opt.step()
        ema_update(ema_unet, unet, 0.995)
        ema_update(ema_text, text_encoder, 0.995)
        running.append((loss.item(), head_loss.item()))
        if step % 25 == 0:
            rate = (time.time() - t0) / (step - start_step)
            mean_loss, mean_head = np.mean(running, axis=0)
            head = f" trait head {mean_head:.3f}" if trait_head else ""
            print(f"step {step}/{steps} loss {mean_loss:.4f}{head} explicit {explicit:.2f} {rate:.2f}s/step", flush=True)
            running = []
        if step % checkpoint_every == 0 or step == steps:
            state = {}
            for prefix, module in modules:
                state.update({prefix + k: v.contiguous() for k, v in module.state_dict().items()})
            save_file(state, out / "state.tmp")
            torch.save(opt.state_dict(), out / "optimizer.tmp")
            (out / "state.tmp.json").write_text(json.dumps({"step": step}))
            (out / "state.tmp").replace(state_file)
            (out / "optimizer.tmp").replace(out / "optimizer.pt")
            (out / "state.tmp.json").replace(out / "state.json")
            save_pipeline(out / f"pipeline-{step:05d}", vae, ema_text, tokenizer, ema_unet)
            print(f"checkpoint {step}", flush=True)
    save_pipeline(out / "pipeline", vae, ema_text, tokenizer, ema_unet)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/toy_base"))
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--decay-start", type=int, default=2250, help="step at which the cosine learning-rate decay starts")
    parser.add_argument("--anneal-steps", type=int, default=1200, help="steps over which explicit prompts go from 80%% to --final-explicit")
    parser.add_argument("--final-explicit", type=float, default=0.5, help="share of explicit trait prompts after the anneal")
    parser.add_argument("--face-weight", type=float, default=0.0, help="extra denoising-loss weight inside the face box (0: unweighted)")
    parser.add_argument("--initial-explicit", type=float, default=0.8, help="share of explicit trait prompts at step 0")
    parser.add_argument(
        "--trait-head-weight", type=float, default=0.0,
        help="weight of an auxiliary loss: a linear head on the pooled text embedding predicts each image's traits (0: off)",
    )
    parser.add_argument(
        "--init-from", type=Path, default=None,
        help="start from this pipeline folder's autoencoder, text encoder and U-Net instead of from scratch",
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.init_from is None:
        vae = train_vae(args.out, args.vae_steps, args.vae_batch, args.seed)
    else:
        vae = AutoencoderKL.from_pretrained(args.init_from / "vae")
        vae.save_pretrained(args.out / "vae")
    train_diffusion(
        args.out, vae, args.steps, args.batch, args.seed + 1, args.lr, args.checkpoint_every,
        args.decay_start, args.anneal_steps, args.final_explicit, args.face_weight,
        args.initial_explicit, args.trait_head_weight, args.init_from,
    )


if __name__ == "__main__":
    main()
