"""Train face attribute classifiers (MobileNetV3-Large, one head per attribute).

Distributional alignment needs classifiers that give class probabilities for the faces of generated
images; the paper trained MobileNetV3-Large networks on CelebA and FairFace faces, and separate ones
for evaluation. This script trains :class:`~diffusers_fair.components.MobileNetAttributeClassifier`
and writes it as one safetensors file. Train two with different seeds or data (e.g. FairFace for
guidance, CelebA for evaluation) to keep evaluation independent of training.

Data, one of:

* ``--hf-dataset``: a Hugging Face ``datasets`` copy of FairFace (columns ``gender``, ``race``,
  ``age`` as class labels, e.g. ``HuggingFaceM4/FairFace`` with ``--hf-config 1.25``) or of CelebA
  (boolean columns ``Male`` and ``Young``, e.g. ``flwrlabs/celeba``). Needs ``pip install datasets``.
  FairFace's seven race labels are merged into the paper's four groups (WMELH = White, Middle
  Eastern, Latino Hispanic; Asian = East and Southeast Asian; Black; Indian); its age ranges become
  ``young`` / ``old`` at ``--old-from`` years (50 by default); CelebA's ``Young`` gives age.
* ``--image-folder DIR`` laid out as ``DIR/<attribute>/<class>/<image>``, e.g.
  ``DIR/gender/female/001.jpg``, ``DIR/age/old/417.png``. Each image trains the head of its
  attribute only.

Faces are cropped as during finetuning: MediaPipe finds the largest face, its box is grown 1.5 times
and resized to the classifier's input (``--no-detect`` uses the centre square of each image, for
data that is already face crops; images without a detected face also fall back to it). Example::

    python examples/train_attribute_classifier.py --hf-dataset HuggingFaceM4/FairFace \\
        --hf-config 1.25 --out fairface_mobilenet.safetensors --epochs 10
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from diffusers_fair.components.classifiers import FAIRFACE_ATTRIBUTES, MobileNetAttributeClassifier
from diffusers_fair.components.face_embedder import center_square_boxes
from diffusers_fair.components.mediapipe_detector import MediaPipeDetectorConfig, MediaPipeFaceDetector
from diffusers_fair.method.boxes import crop_faces


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

# FairFace race labels (lower case, '_' as space) -> the paper's four groups.
FAIRFACE_RACE_GROUPS = {
    "white": "wmelh",
    "middle eastern": "wmelh",
    "latino hispanic": "wmelh",
    "east asian": "asian",
    "southeast asian": "asian",
    "black": "black",
    "indian": "indian",
}


def _normalise_label(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def fairface_label_maps(gender_names, race_names, age_names, old_from: int) -> dict[str, dict[int, str]]:
    """Per attribute, FairFace class-label index -> our class name.

    Args:
        gender_names, race_names, age_names: the ``ClassLabel.names`` of the dataset's columns.
        old_from: age ranges whose lower bound is at least this are ``old``, the others ``young``.
    """
    gender = {}
    for index, name in enumerate(gender_names):
        key = _normalise_label(name)
        if key not in FAIRFACE_ATTRIBUTES["gender"]:
            raise ValueError(f"unknown FairFace gender label {name!r}")
        gender[index] = key
    race = {}
    for index, name in enumerate(race_names):
        key = _normalise_label(name)
        if key not in FAIRFACE_RACE_GROUPS:
            raise ValueError(f"unknown FairFace race label {name!r}; known: {sorted(FAIRFACE_RACE_GROUPS)}")
        race[index] = FAIRFACE_RACE_GROUPS[key]
    age = {}
    for index, name in enumerate(age_names):
        match = re.search(r"\d+", name)
        if match is None:
            raise ValueError(f"FairFace age label {name!r} has no number")
        age[index] = "old" if int(match.group()) >= old_from else "young"
    return {"gender": gender, "race": race, "age": age}


def celeba_labels(record: dict) -> dict[str, str]:
    """Gender and age class names from a CelebA record's boolean ``Male`` and ``Young`` columns."""
    return {
        "gender": "male" if _celeba_flag(record["Male"]) else "female",
        "age": "young" if _celeba_flag(record["Young"]) else "old",
    }


def _celeba_flag(value) -> bool:
    """CelebA attributes come as booleans, 0/1 or -1/1 depending on the copy."""
    return bool(value) and value != -1


def folder_samples(root: Path) -> tuple[dict[str, list[str]], list[tuple[Path, dict[str, str]]]]:
    """Attributes and ``(path, {attribute: class})`` samples of a ``root/<attribute>/<class>/`` folder."""
    if not root.is_dir():
        raise ValueError(f"--image-folder must be a folder, got {root}")
    attributes, samples = {}, []
    for attribute_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        classes = sorted(p.name for p in attribute_dir.iterdir() if p.is_dir())
        if len(classes) < 2:
            raise ValueError(f"{attribute_dir} needs at least two class folders, found {classes}")
        known = FAIRFACE_ATTRIBUTES.get(attribute_dir.name)
        # Keep the paper's class order for its attributes; otherwise alphabetical.
        attributes[attribute_dir.name] = list(known) if known and set(known) == set(classes) else classes
        for class_name in classes:
            for path in sorted((attribute_dir / class_name).rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    samples.append((path, {attribute_dir.name: class_name}))
    if not samples:
        raise ValueError(f"no images under {root}/<attribute>/<class>/")
    return attributes, samples


class FaceDataset(torch.utils.data.Dataset):
    """Face crops and label indices (``-1`` where an attribute is unlabelled).

    Args:
        load: ``index -> (PIL image, {attribute: class name})``.
        length: number of samples.
        attributes: the classifier's attributes, which fix the label order.
        size: side of the crops.
        detect: crop the largest detected face (MediaPipe); otherwise the centre square.
        flip: flip horizontally at random (training augmentation).
        seed: seed of the flips.
    """

    def __init__(self, load, length, attributes, size, detect, flip, seed=0):
        self.load, self.length, self.attributes = load, length, attributes
        self.size, self.detect, self.flip, self.seed = size, detect, flip, seed
        self.detector = None  # created lazily: one per worker process
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        image, labels = self.load(index)
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255
        boxes = center_square_boxes(x)
        if self.detect:
            if self.detector is None:
                self.detector = MediaPipeFaceDetector(MediaPipeDetectorConfig())
            found = self.detector.detect(x)
            if bool(found.found[0]):
                boxes = found.boxes
        crop = crop_faces(x, boxes, self.size)[0]
        if self.flip:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + index)
            if torch.rand((), generator=generator) < 0.5:
                crop = torch.flip(crop, dims=[2])
        target = torch.full((len(self.attributes),), -1, dtype=torch.long)
        for position, (name, classes) in enumerate(self.attributes.items()):
            if name in labels:
                target[position] = classes.index(labels[name])
        return crop, target


def hf_source(args):
    """``(attributes, train (load, length), val (load, length))`` from a Hugging Face dataset."""
    try:
        import datasets
    except ImportError as error:
        raise ValueError("--hf-dataset needs the 'datasets' package: pip install datasets") from error
    train = datasets.load_dataset(args.hf_dataset, args.hf_config, split=args.hf_split)
    val = datasets.load_dataset(args.hf_dataset, args.hf_config, split=args.hf_val_split) if args.hf_val_split else None
    features = train.features
    if all(c in features for c in ("gender", "race", "age")):
        maps = fairface_label_maps(
            features["gender"].names, features["race"].names, features["age"].names, args.old_from
        )
        attributes = dict(FAIRFACE_ATTRIBUTES)

        def labels_of(record):
            return {name: maps[name][record[name]] for name in maps}

    elif "Male" in features and "Young" in features:
        attributes = {"gender": FAIRFACE_ATTRIBUTES["gender"], "age": FAIRFACE_ATTRIBUTES["age"]}
        labels_of = celeba_labels
    else:
        raise ValueError(
            f"{args.hf_dataset} has neither FairFace columns (gender, race, age) nor CelebA columns "
            f"(Male, Young); found {sorted(features)}"
        )

    def loader(dataset):
        def load(i):
            record = dataset[i]
            return record[args.image_column], labels_of(record)

        return load, len(dataset)

    if val is None:
        train_idx, val_idx = split_indices(len(train), args.val_fraction, args.seed)
        return attributes, loader(train.select(train_idx)), loader(train.select(val_idx))
    return attributes, loader(train), loader(val)


def folder_source(args):
    attributes, samples = folder_samples(Path(args.image_folder))
    train_idx, val_idx = split_indices(len(samples), args.val_fraction, args.seed)

    def loader(indices):
        def load(i):
            path, labels = samples[indices[i]]
            with Image.open(path) as image:
                return image.convert("RGB"), labels

        return load, len(indices)

    return attributes, loader(train_idx), loader(val_idx)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random split into training and validation indices."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(n * val_fraction)
    return sorted(order[n_val:]), sorted(order[:n_val])


def multi_head_loss(logits: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Sum over attributes of the mean cross-entropy over the images labelled for it."""
    total = targets.new_zeros((), dtype=torch.float32)
    for position, values in enumerate(logits.values()):
        labelled = targets[:, position] >= 0
        if labelled.any():
            total = total + F.cross_entropy(values[labelled].float(), targets[labelled, position])
    return total


@torch.no_grad()
def evaluate(model, loader, device) -> dict[str, float]:
    """Accuracy per attribute over the labelled images of ``loader``."""
    model.eval()
    correct, count = {}, {}
    for crops, targets in loader:
        logits = model(crops.to(device))
        targets = targets.to(device)
        for position, (name, values) in enumerate(logits.items()):
            labelled = targets[:, position] >= 0
            correct[name] = correct.get(name, 0) + int((values.argmax(1) == targets[:, position])[labelled].sum())
            count[name] = count.get(name, 0) + int(labelled.sum())
    model.train()
    return {name: correct[name] / count[name] for name in correct if count[name]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dataset", help="Hugging Face dataset name or local path (FairFace or CelebA)")
    source.add_argument("--image-folder", help="folder laid out as <attribute>/<class>/<image>")
    parser.add_argument("--hf-config", default=None, help="dataset configuration, e.g. '1.25' for FairFace")
    parser.add_argument("--hf-split", default="train")
    parser.add_argument("--hf-val-split", default=None, help="validation split; default: hold out --val-fraction")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--old-from", type=int, default=50, help="FairFace: age ranges from this age on are 'old'")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--no-detect", action="store_true", help="images are face crops: use their centre square")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--init", choices=["imagenet", "random"], default="imagenet",
                        help="trunk initialisation; 'imagenet' downloads torchvision's weights")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    attributes, (train_load, n_train), (val_load, n_val) = hf_source(args) if args.hf_dataset else folder_source(args)
    if n_train == 0:
        raise ValueError("no training images")
    detect = not args.no_detect
    train_set = FaceDataset(train_load, n_train, attributes, args.input_size, detect, flip=True, seed=args.seed)
    val_set = FaceDataset(val_load, n_val, attributes, args.input_size, detect, flip=False)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, generator=generator, num_workers=args.num_workers,
        drop_last=n_train >= args.batch_size,
    )
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, num_workers=args.num_workers)

    model = MobileNetAttributeClassifier(attributes, input_size=args.input_size)
    if args.init == "imagenet":
        model.load_imagenet_trunk()
    model.to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_loader)
    total = steps_per_epoch * args.epochs if args.max_steps is None else min(args.max_steps, steps_per_epoch * args.epochs)
    progress = tqdm(total=total, desc="training")
    step = 0
    for epoch in range(math.ceil(total / steps_per_epoch)):
        train_set.epoch = epoch
        for crops, targets in train_loader:
            loss = multi_head_loss(model(crops.to(args.device)), targets.to(args.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
            if step >= total:
                break
        if n_val:
            accuracy = evaluate(model, val_loader, args.device)
            print(f"epoch {epoch}: validation accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    progress.close()
    model.save_safetensors(args.out)
    print(f"classifier with attributes {attributes} written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
