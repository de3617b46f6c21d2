"""Train the toy world's classifier, detector and embedders (seeded) and write their weights.

    python -m diffusers_fair.toy.train_components [--out diffusers_fair/toy/weights --seed 0]

All models learn from rendered portraits (``render.render``), drawn once into a training pool and a
separate validation pool (different seeds); a fifth of the pool are empty scenes (no figure), the
detector's negatives. Images are augmented the way generated images differ from rendered ones
(slight blur, noise, brightness), and face crops are taken through ``faces.expand_boxes`` and
``faces.crop_faces`` from the true boxes with random shifts, scales and crop factors, so that the
classifier does not depend on the detector being exact.

Writes ``<name>.safetensors`` for each model, ``reference_faces.safetensors`` (face embeddings of
rendered faces with uniform traits, and their traits) and ``metadata.json`` (architecture settings,
seed, the validation numbers and timings). About four minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from . import components as C
from .render import SCENE_PARAMETERS, TRAITS, random_traits, render, scene_vector


CONFIG = {
    "face_size": C.FACE_SIZE,
    "crop_factor": C.FACE_CROP_FACTOR,
    "classifier_width": 24,
    "detector_width": 16,
    "detector_hidden": 64,
    "scene_width": 16,
    "scene_dim": 96,
    "random_width": 24,
    "face_width": 16,
    "face_dim": 64,
}

# Passes over the training pool per model (the classifier and the detector converge fastest).
EPOCHS = {"classifier": 8, "detector": 6, "scene_embedder": 6, "face_embedder": 10}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
class Pool:
    """Rendered portraits as tensors: images, traits, boxes, scene vectors, figure mask."""

    def __init__(self, num: int, seed: int, empty_fraction: float):
        rng = np.random.default_rng(seed)
        traits = random_traits(num, rng)
        figure = rng.uniform(size=num) >= empty_fraction
        p = render(traits, rng, figure=figure)
        self.images = torch.from_numpy(p.images)
        self.traits = {k: torch.from_numpy(v) for k, v in p.traits.items()}
        self.boxes = torch.from_numpy(p.boxes)
        self.scene = torch.from_numpy(scene_vector(p.scene))
        self.figure = torch.from_numpy(p.has_figure)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: torch.Tensor) -> dict:
        return {
            "images": self.images[index],
            "traits": {k: v[index] for k, v in self.traits.items()},
            "boxes": self.boxes[index],
            "scene": self.scene[index],
            "figure": self.figure[index],
        }


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness within 5%, a random amount of 3x3 blur on half the images, Gaussian noise up to 0.06."""
    b = images.shape[0]

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(b, *shape, generator=gen)

    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    amount = uniform(0, 1, 1, 1, 1) * (torch.rand(b, 1, 1, 1, generator=gen) < 0.5)
    out = images + amount * (blurred - images)
    out = out * uniform(0.95, 1.05, 1, 1, 1)
    out = out + uniform(0, 0.06, 1, 1, 1) * torch.randn(out.shape, generator=gen)
    return out.clamp(0, 1)


def jitter_boxes(boxes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Move box centres by up to ~8% of the box, scale the side by 0.85-1.2 (crop factors ~0.95-1.3)."""
    b = boxes.shape[0]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx = cx + 0.08 * w * (2 * torch.rand(b, generator=gen) - 1)
    cy = cy + 0.08 * h * (2 * torch.rand(b, generator=gen) - 1)
    scale = 0.85 + 0.35 * torch.rand(b, generator=gen)
    w, h = w * scale, h * scale
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)


def corrupt(faces: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Faces that no longer look rendered: strong noise, strong blur, two faces blended, scrambled patches."""
    b, _, s, _ = faces.shape
    kind = torch.randint(0, 4, (b,), generator=gen)
    noisy = (faces + (0.1 + 0.2 * torch.rand(b, 1, 1, 1, generator=gen)) * torch.randn(faces.shape, generator=gen)).clamp(0, 1)
    blurred = F.interpolate(F.avg_pool2d(faces, 4), size=(s, s), mode="bilinear", align_corners=False)
    alpha = 0.3 + 0.4 * torch.rand(b, 1, 1, 1, generator=gen)
    blended = alpha * faces + (1 - alpha) * faces.roll(1, dims=0)
    patch = s // 4
    tiles = faces.unfold(2, patch, patch).unfold(3, patch, patch)  # (B, 3, 4, 4, p, p)
    tiles = tiles.reshape(b, 3, 16, patch, patch)[:, :, torch.randperm(16, generator=gen)]
    scrambled = tiles.reshape(b, 3, 4, 4, patch, patch).permute(0, 1, 2, 4, 3, 5).reshape(b, 3, s, s)
    out = torch.stack([noisy, blurred, blended, scrambled])  # (4, B, 3, S, S)
    return out[kind, torch.arange(b)]


def train_crops(batch: dict, size: int, gen: torch.Generator) -> torch.Tensor:
    """Augmented face crops from jittered true boxes, taken as the trainer takes them."""
    images = augment(batch["images"], gen)
    return C.face_crops(images, jitter_boxes(batch["boxes"], gen), size)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def fit(model: nn.Module, loss_fn, pool: Pool, index: torch.Tensor, epochs: int, seed: int, name: str,
        batch_size: int = 128, lr: float = 2e-3) -> None:
    """Adam with a cosine learning rate over ``epochs`` passes of ``pool[index]`` in shuffled minibatches."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(index) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    bar = tqdm(total=steps, desc=name, mininterval=5)
    for _ in range(epochs):
        order = index[torch.randperm(len(index), generator=gen)]
        for start in range(0, len(order) - batch_size + 1, batch_size):
            loss = loss_fn(model, pool.subset(order[start : start + batch_size]), gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    model.eval()


def classifier_loss(model, batch, gen):
    logits = model(train_crops(batch, model.input_size, gen))
    return sum(F.cross_entropy(logits[k], batch["traits"][k]) for k in TRAITS)


def detector_loss(model, batch, gen):
    box, logit = model.net(augment(batch["images"], gen))
    present = batch["figure"].float()
    target = batch["boxes"] / C.IMAGE_SIZE
    corners = C.centre_size_to_corners(box, 1.0)
    box_loss = (F.smooth_l1_loss(corners, target, reduction="none", beta=0.02).sum(1) * present).sum() / present.sum().clamp(min=1)
    return F.binary_cross_entropy_with_logits(logit, present) + 10 * box_loss


def scene_loss(model, batch, gen):
    # Standardised targets: small-range parameters (the head's position, the pose) count as much as colours.
    predicted = model.regressor(model.features(augment(batch["images"], gen)))
    return F.mse_loss(predicted, (batch["scene"] - model.scene_mean) / model.scene_std)


def face_embedder_loss(model, batch, gen):
    faces = train_crops(batch, model.input_size, gen)
    bad = torch.rand(len(faces), generator=gen) < 0.5
    faces = torch.where(bad[:, None, None, None], corrupt(faces, gen), faces)
    h = model.features(faces)
    good = ~bad
    loss = 3 * F.binary_cross_entropy_with_logits(model.heads["corrupted"](h)[:, 0], bad.float())
    if good.any():
        loss = loss + sum(F.cross_entropy(model.heads[k](h[good]), batch["traits"][k][good]) for k in TRAITS)
        loss = loss + 2 * F.mse_loss(model.heads["yaw"](h[good])[:, 0], batch["scene"][good, 3])
    return loss


@torch.no_grad()
def mean_features(fn, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]).mean(0)


# ----------------------------------------------------------------------------------------------
# Evaluation (on the validation pool)
# ----------------------------------------------------------------------------------------------
def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two ``(B, 4)`` box tensors."""
    w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = w * h
    return inter / (box_area(a) + box_area(b) - inter)


@torch.no_grad()
def evaluate(models: dict, pool: Pool, seed: int) -> dict:
    """Accuracies on the validation pool: clean images, and augmented images (``_augmented``)."""
    gen = torch.Generator().manual_seed(seed)
    fig = pool.figure
    images, boxes = pool.images, pool.boxes
    out: dict = {}
    for tag, imgs in [("", images), ("_augmented", augment(images, gen))]:
        found_boxes, probs = models["detector"](imgs)
        iou = box_iou(found_boxes[fig], boxes[fig])
        out[f"detector_iou_mean{tag}"] = float(iou.mean())
        out[f"detector_iou_above_0.5{tag}"] = float((iou > 0.5).float().mean())
        out[f"detector_presence_accuracy{tag}"] = float(((probs >= 0.5) == fig).float().mean())
        clf = models["classifier"]
        for source, b in [("true_box", boxes[fig]), ("detector_box", found_boxes[fig])]:
            logits = clf(C.face_crops(imgs[fig], b, clf.input_size))
            for k in TRAITS:
                acc = (logits[k].argmax(1) == pool.traits[k][fig]).float().mean()
                out[f"classifier_{k}_{source}{tag}"] = float(acc)
    pred = models["scene_embedder"].predict_scene(images[fig])
    target = pool.scene[fig]
    r2 = 1 - ((pred - target) ** 2).mean(0) / target.var(0, unbiased=False).clamp(min=1e-8)
    start = 0
    for name, dim in SCENE_PARAMETERS.items():  # R^2 of each scene parameter (mean over its values)
        out[f"scene_r2_{name}"] = float(r2[start : start + dim].mean())
        start += dim
    fe = models["face_embedder"]
    faces = C.face_crops(images[fig], boxes[fig], fe.input_size)
    bad = torch.arange(len(faces)) % 2 == 1
    faces = torch.where(bad[:, None, None, None], corrupt(faces, gen), faces)
    out["face_embedder_corruption_accuracy"] = float(((fe.heads["corrupted"](fe.features(faces))[:, 0] > 0) == bad).float().mean())
    return out


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=C.WEIGHTS_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=10000, help="portraits in the training pool (a fifth empty)")
    parser.add_argument("--num-val", type=int, default=1000, help="portraits in the validation pool")
    parser.add_argument("--epoch-scale", type=float, default=1.0, help="multiply every model's passes over the pool (EPOCHS)")
    parser.add_argument("--num-reference", type=int, default=512, help="rendered faces in the reference face set")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed = args.seed
    timings = {}

    t0 = time.time()
    train = Pool(args.num_train, seed=seed * 1000 + 1, empty_fraction=0.2)
    val = Pool(args.num_val, seed=seed * 1000 + 2, empty_fraction=0.2)
    timings["render_s"] = time.time() - t0
    figures = torch.nonzero(train.figure)[:, 0]
    everything = torch.arange(len(train))

    torch.manual_seed(seed)
    models = C.build_models(CONFIG)
    scene = models["scene_embedder"]
    scene.scene_mean.copy_(train.scene[figures].mean(0))
    scene.scene_std.copy_(train.scene[figures].std(0).clamp(min=1e-3))
    epochs = {name: max(1, round(n * args.epoch_scale)) for name, n in EPOCHS.items()}
    plan = [
        ("classifier", classifier_loss, figures),
        ("detector", detector_loss, everything),
        ("scene_embedder", scene_loss, figures),
        ("face_embedder", face_embedder_loss, figures),
    ]
    for i, (name, loss_fn, index) in enumerate(plan):
        t = time.time()
        fit(models[name], loss_fn, train, index, epochs[name], seed=seed * 1000 + 10 + i, name=name)
        timings[f"{name}_s"] = time.time() - t

    # Centre the embedders on rendered images; embed the reference faces.
    t = time.time()
    figure_images = train.images[figures[:2000]]
    for name in ("scene_embedder", "random_embedder"):
        models[name].feature_mean.copy_(mean_features(models[name].features, figure_images))
    fe = models["face_embedder"]
    fe.feature_mean.copy_(mean_features(fe.features, C.face_crops(figure_images, train.boxes[figures[:2000]], fe.input_size)))
    ref = Pool(args.num_reference, seed=seed * 1000 + 3, empty_fraction=0.0)
    with torch.no_grad():
        reference = {"embeddings": fe(C.face_crops(ref.images, ref.boxes, fe.input_size)).contiguous()}
    reference.update({k: v.contiguous() for k, v in ref.traits.items()})
    timings["reference_s"] = time.time() - t

    metrics = evaluate(models, val, seed=seed * 1000 + 4)
    timings["total_s"] = time.time() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    for name, module in models.items():
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, args.out / f"{name}.safetensors")
    save_file(reference, args.out / "reference_faces.safetensors")
    metadata = {
        "config": CONFIG,
        "seed": seed,
        "num_train": args.num_train,
        "num_val": args.num_val,
        "epochs": epochs,
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
        "validation": {k: round(v, 4) for k, v in metrics.items()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "torch_threads": args.threads,
    }
    (args.out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    print(json.dumps(metadata, indent=2))
    return metadata


if __name__ == "__main__":
    main()
