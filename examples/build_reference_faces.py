"""Build the reference set of real-face embeddings for the face-realism loss.

The face-realism loss pulls each generated face towards the most similar real face of a reference
set; the paper used CelebA and FairFace. This script reads every image of a folder (recursively),
finds the largest face with the same detector and crop as training uses, embeds it with the face
embedder, and writes the unit embeddings to one safetensors file::

    python examples/build_reference_faces.py --images /data/fairface/train --align \\
        --embedder face_embedder.safetensors --out reference_faces.safetensors

``--align`` warps each face onto the 112 x 112 face template from the detector's landmarks instead
of cropping its box: build the reference set this way for training with ``align_faces: true`` (as
the Stable Diffusion configs in ``examples/configs/`` train), so that reference faces are read as
the generated faces are; without it, faces are the detector's square crops (``align_faces: false``).
``--no-detect`` skips detection for folders of face crops (FairFace and aligned CelebA images are
crops already): the largest centred square of each image is embedded (it cannot be combined with
``--align``, which needs the detector's landmarks). Images in which no face is found are skipped
and counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffusers_fair.components.face_embedder import ReferenceFaceSet, TorchvisionFaceEmbedder, face_crops
from diffusers_fair.components.mediapipe_detector import MediaPipeDetectorConfig, MediaPipeFaceDetector


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of face images (searched recursively)")
    parser.add_argument("--embedder", required=True, help="face embedder weights (.safetensors)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--no-detect", action="store_true", help="images are face crops: embed their centre square")
    parser.add_argument("--align", action="store_true",
                        help="align each face to the face template from the detector's landmarks (align_faces: true)")
    parser.add_argument("--min-confidence", type=float, default=MediaPipeDetectorConfig.min_confidence)
    parser.add_argument("--box-expansion", type=float, default=MediaPipeDetectorConfig.box_expansion)
    parser.add_argument("--batch-size", type=int, default=64, help="faces embedded per forward pass")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many images (sorted by path)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"--images must be a folder, got {folder}")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: Path) -> torch.Tensor:
    """``(1, 3, H, W)`` float tensor in ``[0, 1]``."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.align and args.no_detect:
        raise ValueError("--align needs the detector's landmarks; it cannot be combined with --no-detect")
    paths = list_images(Path(args.images))[: args.limit]
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {args.images}")
    embedder = TorchvisionFaceEmbedder.from_safetensors(args.embedder, device=args.device)
    detector = None
    if not args.no_detect:
        detector = MediaPipeFaceDetector(
            MediaPipeDetectorConfig(min_confidence=args.min_confidence, box_expansion=args.box_expansion)
        )

    chunks, pending, skipped = [], [], 0

    def flush():
        if pending:
            with torch.no_grad():
                chunks.append(embedder(torch.cat(pending).to(args.device)).cpu())
            pending.clear()

    # Detection runs image by image (folders mix sizes); embedding runs in batches of crops.
    for path in tqdm(paths, desc="faces"):
        image = load_image(path)
        crops, found = face_crops(image, embedder.input_size, detector, align=args.align)
        if not found.any():
            skipped += 1
            continue
        pending.append(crops)
        if len(pending) >= args.batch_size:
            flush()
    flush()
    if not chunks:
        raise ValueError(f"no face found in any of the {len(paths)} images")
    embeddings = torch.cat(chunks)
    metadata = {"source": str(args.images), "images": str(len(paths)), "faces": str(len(embeddings)),
                "aligned": "true" if args.align else "false"}
    ReferenceFaceSet(embeddings).save(args.out, metadata=metadata)
    print(f"{len(embeddings)} face embeddings written to {args.out}; {skipped} images without a face skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
