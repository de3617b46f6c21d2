"""The Stable Diffusion components: MediaPipe faces, open_clip, DINOv2, MobileNet heads, face embeddings.

No weights are downloaded: the embedders and classifiers are tiny random-weight versions of the real
architectures, built here; the detector runs the real BlazeFace model on scikit-image's astronaut
photograph (shipped inside the scikit-image wheel). Preprocessing is compared with the libraries'
own pipelines (open_clip's transform, transformers' image processors, PIL).
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusers_fair.components.classifiers import (
    FAIRFACE_ATTRIBUTES,
    MobileNetAttributeClassifier,
)
from diffusers_fair.components.clip import (
    CLIPZeroShotClassifier,
    OpenCLIPImageEmbedder,
    resize_and_center_crop,
)
from diffusers_fair.components.dinov2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DINOv2ImageEmbedder,
)
from diffusers_fair.components.face_embedder import (
    ReferenceFaceSet,
    TorchvisionFaceEmbedder,
    embed_faces,
    face_crops,
)
from diffusers_fair.components.mediapipe_detector import (
    MediaPipeDetectorConfig,
    MediaPipeFaceDetector,
)
from diffusers_fair.method.boxes import crop_faces
from diffusers_fair.method.face_alignment import FOUR_POINT_TEMPLATE, align_faces
from helpers.components import TINY_CLIP, dinov2_processors, head, to_tensor
from helpers.scripts import load_script


REPO = Path(__file__).resolve().parent.parent
# --------------------------------------------------------------------------- shared data
@pytest.fixture(scope="module")
def detector():
    with MediaPipeFaceDetector() as detector:
        yield detector


def load_example(name: str):
    return load_script("examples", name)


# --------------------------------------------------------------------------- MediaPipe detector
def test_detector_finds_the_astronaut_and_expands_its_box(detector, astronaut):
    raw = detector.faces_in(astronaut)
    assert len(raw) == 1
    x0, y0, x1, y1, score = raw[0]
    assert score > 0.85
    assert abs((x0 + x1) / 2 - 224) < 12 and abs((y0 + y1) / 2 - 130) < 12  # her face
    found = detector.detect(to_tensor(astronaut))
    assert found.found.tolist() == [True]
    assert found.scores[0].item() == pytest.approx(score)
    # A square 1.5 times the longer side, about the same centre.
    side = 1.5 * max(x1 - x0, y1 - y0)
    expected = [(x0 + x1 - side) / 2, (y0 + y1 - side) / 2, (x0 + x1 + side) / 2, (y0 + y1 + side) / 2]
    assert found.boxes[0].tolist() == pytest.approx(expected)


def test_detector_boxes_at_the_border_shift_inside_or_stay_centred(detector, astronaut):
    corner = np.array(astronaut[75:459, 170:490])  # her face now touches the top-left corner
    (x0, y0, x1, y1, _), = detector.faces_in(corner)
    side = 1.5 * max(x1 - x0, y1 - y0)
    assert (x0 + x1 - side) / 2 < 0 and (y0 + y1 - side) / 2 < 0
    shifted = detector.detect(to_tensor(corner)).boxes[0].tolist()
    assert shifted == pytest.approx([0, 0, side, side])
    with MediaPipeFaceDetector(MediaPipeDetectorConfig(shift_inside=False)) as centred:
        kept = centred.detect(to_tensor(corner)).boxes[0].tolist()
    assert kept == pytest.approx([(x0 + x1 - side) / 2, (y0 + y1 - side) / 2, (x0 + x1 + side) / 2, (y0 + y1 + side) / 2])


def test_detector_finds_no_face_in_blank_or_noise(detector):
    generator = torch.Generator().manual_seed(0)
    images = torch.stack(
        [torch.zeros(3, 256, 256), torch.full((3, 256, 256), 0.5), torch.rand(3, 256, 256, generator=generator)]
    )
    found = detector.detect(images)
    assert found.found.tolist() == [False, False, False]
    assert found.boxes.abs().sum().item() == 0 and found.scores.abs().sum().item() == 0


@pytest.mark.parametrize("big_first", [True, False])
def test_detector_keeps_the_largest_of_several_faces(detector, astronaut, big_first):
    canvas = np.full((512, 512, 3), 128, dtype=np.uint8)
    big, small = head(astronaut, 256), head(astronaut, 192)
    if big_first:
        canvas[:256, :256], canvas[320:, 320:] = big, small
        big_centre = (128, 128)
    else:
        canvas[:192, :192], canvas[256:, 256:] = small, big
        big_centre = (384, 384)
    faces = detector.faces_in(canvas)
    assert len(faces) >= 2
    areas = sorted((f[2] - f[0]) * (f[3] - f[1]) for f in faces)
    found = detector.detect(to_tensor(canvas))
    x0, y0, x1, y1 = found.boxes[0].tolist()
    assert found.found.item()
    assert (x1 - x0) ** 2 == pytest.approx(1.5**2 * areas[-1], rel=1e-4)  # square boxes from BlazeFace
    # The chosen face is the big head's, wherever it is in the image.
    assert abs((x0 + x1) / 2 - big_centre[0]) < 40 and abs((y0 + y1) / 2 - big_centre[1]) < 40


def test_face_crops_carry_gradients_to_the_image_batch(detector, astronaut):
    images = torch.cat([to_tensor(astronaut), torch.zeros(1, 3, 512, 512)]).requires_grad_(True)
    found = detector.detect(images)
    assert found.found.tolist() == [True, False]
    crops = crop_faces(images, found.boxes, 64)
    weights = torch.randn(crops[:1].shape, generator=torch.Generator().manual_seed(0))
    (crops[:1] * weights).sum().backward()
    grad = images.grad[0].abs().sum(dim=0)
    x0, y0, x1, y1 = found.boxes[0].tolist()
    inside = grad[int(y0) + 2 : int(y1) - 2, int(x0) + 2 : int(x1) - 2]
    assert (inside > 0).float().mean() > 0.5
    outside = grad.clone()
    outside[max(int(y0) - 2, 0) : int(y1) + 3, max(int(x0) - 2, 0) : int(x1) + 3] = 0
    assert outside.sum().item() == 0
    assert images.grad[1].abs().sum().item() == 0


def test_detector_rejects_bad_input_and_settings(detector):
    with pytest.raises(ValueError, match="shape"):
        detector.detect(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="float"):
        detector.detect(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="model"):
        MediaPipeDetectorConfig(model="long_range")
    with pytest.raises(ValueError, match="box_expansion"):
        MediaPipeDetectorConfig(box_expansion=0)
    with pytest.raises(ValueError, match="not found"):
        MediaPipeFaceDetector(MediaPipeDetectorConfig(model_path="/nonexistent/model.tflite"))


def test_full_range_model_finds_the_astronaut(astronaut):
    import mediapipe

    if getattr(mediapipe, "solutions", None) is None:
        with pytest.raises(ValueError, match="legacy"):
            MediaPipeFaceDetector(MediaPipeDetectorConfig(model="full_range"))
        return
    with MediaPipeFaceDetector(MediaPipeDetectorConfig(model="full_range")) as full_range:
        found = full_range.detect(to_tensor(astronaut))
    x0, y0, x1, y1 = found.boxes[0].tolist()
    assert found.found.item() and abs((x0 + x1) / 2 - 224) < 15 and abs((y0 + y1) / 2 - 130) < 20


# --------------------------------------------------------------------------- resizing like PIL
def pil_float_reference(pixels: np.ndarray, size: int, crop: int) -> torch.Tensor:
    """torchvision's Resize(size, bicubic) + CenterCrop(crop) on float ('F') PIL images, per channel."""
    from torchvision import transforms

    transform = transforms.Compose(
        [transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(crop)]
    )
    channels = [
        np.asarray(transform(Image.fromarray(pixels[..., c].astype(np.float32) / 255, mode="F"))) for c in range(3)
    ]
    return torch.from_numpy(np.stack(channels))[None]


@pytest.mark.parametrize("shape", [(512, 512), (301, 437), (437, 301), (70, 53)])
def test_resize_and_center_crop_computes_pils_filter(astronaut, shape):
    pixels = np.array(Image.fromarray(astronaut).resize(shape[::-1], Image.BICUBIC))
    ours = resize_and_center_crop(to_tensor(pixels), 224, 224, "bicubic", "round")
    reference = pil_float_reference(pixels, 224, 224).clamp(0, 1)
    assert ours.shape == reference.shape == (1, 3, 224, 224)
    assert (ours - reference).abs().max().item() < 1e-4


def test_resize_and_center_crop_rejects_bad_arguments():
    with pytest.raises(ValueError, match="interpolation"):
        resize_and_center_crop(torch.rand(1, 3, 8, 8), 4, 4, "nearest")
    with pytest.raises(ValueError, match="larger"):
        resize_and_center_crop(torch.rand(1, 3, 8, 16), 4, 6)
    with pytest.raises(ValueError, match="shape"):
        resize_and_center_crop(torch.rand(3, 8, 8), 4, 4)


# --------------------------------------------------------------------------- open_clip
def open_clip_reference(embedder: OpenCLIPImageEmbedder, pixels: np.ndarray) -> torch.Tensor:
    """open_clip's own inference transform (PIL) for the embedder's settings."""
    import open_clip

    transform = open_clip.image_transform(
        embedder.image_size, is_train=False, mean=embedder.mean, std=embedder.std,
        resize_mode=embedder.resize_mode, interpolation=embedder.interpolation,
    )
    return transform(Image.fromarray(pixels))[None]


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("shape", [(512, 512), (301, 437), (53, 70)])
def test_open_clip_preprocessing_matches_open_clip_transform(tiny_clip, astronaut, size, shape):
    embedder = OpenCLIPImageEmbedder(tiny_clip.model, preprocess_cfg={**tiny_clip.model.visual.preprocess_cfg, "size": size})
    pixels = np.array(Image.fromarray(astronaut).resize(shape[::-1], Image.BICUBIC))
    ours = embedder.preprocess(to_tensor(pixels))
    reference = open_clip_reference(embedder, pixels)
    assert ours.shape == reference.shape == (1, 3, size, size)
    # In pixel units: PIL rounds to 8 bits between its two resampling passes; we do not.
    error = (ours - reference).abs() * torch.tensor(embedder.std).view(1, 3, 1, 1) * 255
    assert error.mean().item() < 0.6
    assert error.max().item() < 16


def test_open_clip_embedder_matches_open_clip_and_passes_gradients(tiny_clip, astronaut):
    image = to_tensor(astronaut).requires_grad_(True)
    embedding = tiny_clip(image)
    assert embedding.shape == (1, 16)
    assert embedding.norm(dim=-1).item() == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        reference = F.normalize(tiny_clip.model.encode_image(open_clip_reference(tiny_clip, astronaut)), dim=-1)
    assert F.cosine_similarity(embedding, reference).item() > 0.999
    weights = torch.randn(16, generator=torch.Generator().manual_seed(1))
    (embedding @ weights).backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_clip.model.parameters())


def test_clip_zero_shot_logits_are_scaled_cosines_to_mean_prompt_embeddings(tiny_clip, astronaut):
    import open_clip

    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    prompts = {
        "gender": {"male": ["a photo of a man"], "female": ["a photo of a woman", "a photo of a female person"]},
        "wears glasses": {"yes": ["a person wearing glasses"], "no": ["a person not wearing glasses"]},
    }
    classifier = CLIPZeroShotClassifier(tiny_clip, tokenizer, prompts)
    assert classifier.attributes == {"gender": ["male", "female"], "wears glasses": ["yes", "no"]}
    assert classifier.input_size == 64
    faces = to_tensor(head(astronaut, 64)).requires_grad_(True)
    logits = classifier(faces)
    # Independent computation: one prompt at a time, averaged by hand.
    model = tiny_clip.model
    with torch.no_grad():
        image = F.normalize(model.encode_image(tiny_clip.preprocess(faces)), dim=-1)
        for name, classes in prompts.items():
            expected = []
            for class_prompts in classes.values():
                texts = [F.normalize(model.encode_text(tokenizer([p])), dim=-1)[0] for p in class_prompts]
                mean = F.normalize(torch.stack(texts).mean(0), dim=0)
                expected.append(model.logit_scale.exp() * (image[0] @ mean))
            assert logits[name][0].tolist() == pytest.approx(torch.stack(expected).tolist(), rel=1e-4, abs=1e-5)
    logits["gender"].log_softmax(-1)[0, 1].backward()
    assert faces.grad.abs().sum() > 0
    halved = CLIPZeroShotClassifier(tiny_clip, tokenizer, prompts, logit_scale=model.logit_scale.exp().item() / 2)
    assert halved(faces)["gender"][0].tolist() == pytest.approx((logits["gender"][0] / 2).tolist(), rel=1e-4)


def test_clip_zero_shot_rejects_bad_prompts(tiny_clip):
    import open_clip

    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    with pytest.raises(ValueError, match="at least two classes"):
        CLIPZeroShotClassifier(tiny_clip, tokenizer, {"gender": {"male": ["a man"]}})
    with pytest.raises(ValueError, match="not a string"):
        CLIPZeroShotClassifier(tiny_clip, tokenizer, {"gender": {"male": "a man", "female": ["a woman"]}})
    with pytest.raises(ValueError, match="non-empty"):
        CLIPZeroShotClassifier(tiny_clip, tokenizer, {"gender": {"male": [], "female": ["a woman"]}})


def test_open_clip_embedder_needs_preprocessing_settings(tiny_clip):
    class Bare(torch.nn.Module):
        visual = torch.nn.Identity()

    with pytest.raises(ValueError, match="preprocess_cfg"):
        OpenCLIPImageEmbedder(Bare())
    with pytest.raises(ValueError, match="resize_mode"):
        OpenCLIPImageEmbedder(tiny_clip.model, {**tiny_clip.model.visual.preprocess_cfg, "resize_mode": "longest"})


# --------------------------------------------------------------------------- DINOv2
@pytest.mark.parametrize("shape", [(512, 512), (301, 437), (437, 301)])
def test_dinov2_preprocessing_matches_transformers_processors(tiny_dinov2, astronaut, shape):
    pixels = np.array(Image.fromarray(astronaut).resize(shape[::-1], Image.BICUBIC))
    for processor in dinov2_processors():
        embedder = DINOv2ImageEmbedder.from_image_processor(tiny_dinov2, processor)
        assert (embedder.resize_size, embedder.crop_size, embedder.interpolation) == (256, 224, "bicubic")
        ours = embedder.preprocess(to_tensor(pixels))
        reference = torch.as_tensor(np.asarray(processor(images=pixels, return_tensors="pt")["pixel_values"]))
        assert ours.shape == reference.shape == (1, 3, 224, 224)
        error = (ours - reference).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
        assert error.mean().item() < 0.6, type(processor).__name__
        assert error.max().item() < 16, type(processor).__name__


def test_dinov2_embedding_is_the_class_token_and_passes_gradients(tiny_dinov2, astronaut):
    embedder = DINOv2ImageEmbedder(tiny_dinov2)
    images = torch.cat([to_tensor(astronaut), to_tensor(astronaut[::-1].copy())]).requires_grad_(True)
    embedding = embedder(images)
    with torch.no_grad():
        hidden = tiny_dinov2(pixel_values=embedder.preprocess(images)).last_hidden_state
    assert embedding.shape == (2, 32)
    assert torch.allclose(embedding, F.normalize(hidden[:, 0], dim=-1), atol=1e-5)
    # (A layer-normed vector sums to zero, so weight the embedding to get a non-trivial gradient.)
    weights = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    (embedding * weights).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad[0].abs().sum() > 0 and images.grad[1].abs().sum() > 0
    assert all(not p.requires_grad for p in tiny_dinov2.parameters())


def test_dinov2_rejects_unsupported_processor_settings(tiny_dinov2):
    from transformers import BitImageProcessor

    with pytest.raises(ValueError, match="shortest_edge"):
        DINOv2ImageEmbedder.from_image_processor(tiny_dinov2, BitImageProcessor(size={"height": 224, "width": 224}))
    with pytest.raises(ValueError, match="crop_size"):
        DINOv2ImageEmbedder(tiny_dinov2, resize_size=200, crop_size=224)


# --------------------------------------------------------------------------- MobileNet heads
def test_mobilenet_classifier_heads_roundtrip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    classifier = MobileNetAttributeClassifier(input_size=64)
    faces = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    logits = classifier.eval()(faces)
    assert {k: tuple(v.shape) for k, v in logits.items()} == {"gender": (2, 2), "race": (2, 4), "age": (2, 2)}
    logits["race"].logsumexp(-1).sum().backward()
    assert faces.grad.abs().sum() > 0
    path = tmp_path / "classifier.safetensors"
    classifier.save_safetensors(str(path))
    loaded = MobileNetAttributeClassifier.from_safetensors(str(path))
    assert loaded.attributes == FAIRFACE_ATTRIBUTES and loaded.input_size == 64
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        again = loaded(faces)
    for name in logits:
        assert torch.allclose(again[name], logits[name], atol=1e-6)


def test_mobilenet_classifier_rejects_bad_input_and_files(tmp_path):
    from safetensors.torch import load_file, save_file

    classifier = MobileNetAttributeClassifier({"glasses": ["yes", "no"]}, input_size=64)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        classifier(torch.rand(1, 3, 96, 96))
    with pytest.raises(ValueError, match="two distinct"):
        MobileNetAttributeClassifier({"gender": ["male"]})
    path = tmp_path / "classifier.safetensors"
    classifier.save_safetensors(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(path))
    state.pop("heads.glasses.bias")
    save_file(state, str(tmp_path / "broken.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="missing"):
        MobileNetAttributeClassifier.from_safetensors(str(tmp_path / "broken.safetensors"))
    save_file(state, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a MobileNetAttributeClassifier"):
        MobileNetAttributeClassifier.from_safetensors(str(tmp_path / "plain.safetensors"))


# --------------------------------------------------------------------------- face embeddings
def test_face_embedder_is_unit_length_mirror_invariant_and_roundtrips(tmp_path):
    torch.manual_seed(0)
    embedder = TorchvisionFaceEmbedder(embedding_dim=24).eval()
    faces = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        embedding = embedder(faces)
        mirrored = embedder(torch.flip(faces, dims=[3]))
    assert embedding.shape == (3, 24)
    assert torch.allclose(embedding.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(embedding, mirrored, atol=1e-5)  # flip averaging
    path = tmp_path / "embedder.safetensors"
    embedder.save_safetensors(str(path))
    loaded = TorchvisionFaceEmbedder.from_safetensors(str(path))
    assert (loaded.backbone_name, loaded.embedding_dim, loaded.input_size, loaded.flip_average) == ("resnet18", 24, 112, True)
    with torch.no_grad():
        assert torch.allclose(loaded(faces), embedding, atol=1e-6)
    with pytest.raises(ValueError, match="backbone"):
        TorchvisionFaceEmbedder(backbone="vgg11")
    with pytest.raises(ValueError, match=r"\(B, 3, 112, 112\)"):
        embedder(torch.rand(1, 3, 64, 64))


def test_reference_set_nearest_neighbour_matches_brute_force(tmp_path):
    generator = torch.Generator().manual_seed(5)
    references = torch.randn(50, 8, generator=generator) * torch.rand(50, 1, generator=generator) * 3
    queries = torch.randn(7, 8, generator=generator)
    reference_set = ReferenceFaceSet(references)
    nearest, similarity = reference_set.nearest(queries)
    for i in range(7):
        cosines = [float(F.cosine_similarity(queries[i], references[j], dim=0)) for j in range(50)]
        best = int(np.argmax(cosines))
        assert similarity[i].item() == pytest.approx(cosines[best], abs=1e-5)
        assert torch.allclose(nearest[i], references[best] / references[best].norm(), atol=1e-6)
    path = tmp_path / "reference.safetensors"
    reference_set.save(str(path), metadata={"source": "random"})
    loaded = ReferenceFaceSet.load(str(path))
    assert len(loaded) == 50 and loaded.dim == 8
    assert torch.allclose(loaded.embeddings, reference_set.embeddings, atol=1e-7)
    with pytest.raises(ValueError, match="queries"):
        reference_set.nearest(torch.randn(2, 9))
    with pytest.raises(ValueError, match="NaN"):
        ReferenceFaceSet(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="all-zero"):
        ReferenceFaceSet(torch.zeros(2, 3))


def test_embed_faces_skips_images_without_a_face(detector, astronaut):
    embedder = TorchvisionFaceEmbedder(embedding_dim=16).eval()
    images = torch.cat([to_tensor(astronaut), torch.zeros(1, 3, 512, 512)])
    embeddings, found = embed_faces(images, embedder, detector)
    assert found.tolist() == [True, False] and embeddings.shape == (1, 16)
    embeddings, found = embed_faces(images, embedder, None)
    assert found.tolist() == [True, True] and embeddings.shape == (2, 16)


def landmarks_found_in(detector, face: torch.Tensor) -> np.ndarray:
    """MediaPipe's four landmarks of the one face in a ``(3, S, S)`` float image."""
    pixels = (face.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    ((_, points),) = detector.faces_and_landmarks_in(pixels)
    return points


def test_aligned_faces_put_the_astronauts_landmarks_on_the_template(detector, astronaut):
    embedder = TorchvisionFaceEmbedder(embedding_dim=16).eval()
    images = torch.cat([to_tensor(astronaut), torch.zeros(1, 3, 512, 512)])
    aligned, found = face_crops(images, 112, detector, align=True)
    boxed, _ = face_crops(images, 112, detector)
    assert found.tolist() == [True, False] and aligned.shape == boxed.shape == (1, 3, 112, 112)
    # The same warp by hand, from the landmarks of the raw detector.
    ((_, points),) = detector.faces_and_landmarks_in(astronaut)
    expected = align_faces(images[:1], torch.from_numpy(points).float()[None], 112)
    torch.testing.assert_close(aligned, expected, rtol=0, atol=1e-5)
    # Detected again in the aligned face, her landmarks sit on the template's (within 5 pixels here, the
    # fit's residual and the detector's jitter); in the square crop of the box they are 16 to 21 away.
    template = FOUR_POINT_TEMPLATE.numpy() + 0.5
    assert np.linalg.norm(landmarks_found_in(detector, aligned[0]) - template, axis=1).max() < 7
    assert np.linalg.norm(landmarks_found_in(detector, boxed[0]) - template, axis=1).min() > 12
    # embed_faces embeds what face_crops gives; aligned and boxed faces embed differently.
    embeddings, found = embed_faces(images, embedder, detector, align=True)
    assert found.tolist() == [True, False]
    with torch.no_grad():
        torch.testing.assert_close(embeddings, embedder(aligned))
        assert not torch.allclose(embeddings, embedder(boxed), atol=1e-3)
    # Alignment needs the detector's landmarks.
    with pytest.raises(ValueError, match="align=True needs a detector"):
        embed_faces(images, embedder, None, align=True)

    class BoxesOnly:  # MediaPipe's boxes without its landmarks
        def detect(self, images):
            return dataclasses.replace(detector.detect(images), landmarks=None)

    with pytest.raises(ValueError, match="align=True needs face landmarks; BoxesOnly gives none"):
        face_crops(images, 112, BoxesOnly(), align=True)
    blank, found = embed_faces(images[1:], embedder, detector, align=True)
    assert blank.shape == (0, 16) and found.tolist() == [False]


# --------------------------------------------------------------------------- example scripts
def safe_open_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_build_reference_faces_script(tmp_path, astronaut):
    folder = tmp_path / "faces" / "nested"
    folder.mkdir(parents=True)
    Image.fromarray(astronaut).save(folder / "astronaut.png")
    Image.fromarray(np.zeros((128, 96, 3), dtype=np.uint8)).save(tmp_path / "faces" / "blank.jpg")
    TorchvisionFaceEmbedder(embedding_dim=16).save_safetensors(str(tmp_path / "embedder.safetensors"))
    script = load_example("build_reference_faces")
    common = ["--images", str(tmp_path / "faces"), "--embedder", str(tmp_path / "embedder.safetensors")]
    assert script.main(common + ["--out", str(tmp_path / "detected.safetensors")]) == 0
    detected = ReferenceFaceSet.load(str(tmp_path / "detected.safetensors"))
    assert len(detected) == 1 and detected.dim == 16
    assert script.main(common + ["--out", str(tmp_path / "all.safetensors"), "--no-detect", "--batch-size", "1"]) == 0
    assert len(ReferenceFaceSet.load(str(tmp_path / "all.safetensors"))) == 2
    # --align: the faces aligned to the template, as training with align_faces: true reads them.
    assert script.main(common + ["--out", str(tmp_path / "aligned.safetensors"), "--align"]) == 0
    aligned = ReferenceFaceSet.load(str(tmp_path / "aligned.safetensors"))
    embedder = TorchvisionFaceEmbedder.from_safetensors(str(tmp_path / "embedder.safetensors"))
    with MediaPipeFaceDetector() as detector:
        expected, _ = embed_faces(to_tensor(astronaut), embedder, detector, align=True)
        boxed, _ = embed_faces(to_tensor(astronaut), embedder, detector)
    torch.testing.assert_close(aligned.embeddings, F.normalize(expected, dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(detected.embeddings, F.normalize(boxed, dim=1), rtol=0, atol=1e-6)
    assert safe_open_metadata(tmp_path / "aligned.safetensors")["aligned"] == "true"
    assert safe_open_metadata(tmp_path / "detected.safetensors")["aligned"] == "false"
    with pytest.raises(ValueError, match="--align needs the detector's landmarks"):
        script.main(common + ["--out", str(tmp_path / "refused.safetensors"), "--align", "--no-detect"])
    assert not (tmp_path / "refused.safetensors").exists()



def test_train_attribute_classifier_script_smoke(tmp_path, astronaut):
    rng = np.random.default_rng(0)
    for attribute, classes in [("gender", ["female", "male"]), ("age", ["old", "young"])]:
        for class_name in classes:
            folder = tmp_path / "data" / attribute / class_name
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(astronaut).save(tmp_path / "data" / "gender" / "female" / "astronaut.png")
    script = load_example("train_attribute_classifier")
    out = tmp_path / "classifier.safetensors"
    argv = ["--image-folder", str(tmp_path / "data"), "--out", str(out), "--init", "random", "--max-steps", "1",
            "--batch-size", "4", "--input-size", "64", "--val-fraction", "0.25"]
    assert script.main(argv) == 0
    classifier = MobileNetAttributeClassifier.from_safetensors(str(out))
    # The paper's class order for known attributes, whatever the folder order.
    assert classifier.attributes == {"age": ["young", "old"], "gender": ["male", "female"]}
    assert classifier.input_size == 64


def test_training_label_mappings():
    script = load_example("train_attribute_classifier")
    maps = script.fairface_label_maps(
        ["Male", "Female"],
        ["East Asian", "Indian", "Black", "White", "Middle Eastern", "Latino_Hispanic", "Southeast Asian"],
        ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"],
        old_from=50,
    )
    assert maps["gender"] == {0: "male", 1: "female"}
    assert maps["race"] == {0: "asian", 1: "indian", 2: "black", 3: "wmelh", 4: "wmelh", 5: "wmelh", 6: "asian"}
    assert [maps["age"][i] for i in range(9)] == ["young"] * 6 + ["old"] * 3
    with pytest.raises(ValueError, match="race label"):
        script.fairface_label_maps(["Male", "Female"], ["Martian"], ["0-2"], old_from=50)
    assert script.celeba_labels({"Male": 1, "Young": -1}) == {"gender": "male", "age": "old"}
    assert script.celeba_labels({"Male": False, "Young": True}) == {"gender": "female", "age": "young"}
    x = torch.zeros(3, 2)
    logits = {"a": x.clone().requires_grad_(True), "b": torch.zeros(3, 3, requires_grad=True)}
    loss = script.multi_head_loss(logits, torch.tensor([[0, -1], [1, -1], [-1, -1]]))
    assert loss.item() == pytest.approx(np.log(2))  # only attribute a, two labelled images


def test_low_precision_weights_take_float32_images(tiny_clip, tiny_dinov2, astronaut):
    """Frozen models in bfloat16 (as on a GPU in mixed precision) still take and return float32."""
    import copy

    image = to_tensor(astronaut)
    clip16 = OpenCLIPImageEmbedder(copy.deepcopy(tiny_clip.model).to(torch.bfloat16))
    dino16 = DINOv2ImageEmbedder(copy.deepcopy(tiny_dinov2).to(torch.bfloat16))
    for full, half in [(tiny_clip, clip16), (DINOv2ImageEmbedder(tiny_dinov2), dino16)]:
        with torch.no_grad():
            low, high = half(image), full(image)
        assert low.dtype == torch.float32 and F.cosine_similarity(low, high).item() > 0.98
    classifier = MobileNetAttributeClassifier(input_size=64).eval()
    faces = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        high = classifier(faces)["race"]
        low = classifier.to(torch.bfloat16)(faces)["race"]
    assert low.dtype == torch.float32 and torch.allclose(low, high, atol=0.1)


def test_loading_by_name_from_local_files(tiny_clip, tiny_dinov2, tmp_path, astronaut):
    """The from_pretrained paths, fed local files instead of Hub downloads."""
    from safetensors.torch import save_file

    from diffusers_fair.components.clip import DEFAULT_PROMPTS

    image = to_tensor(astronaut)
    weights = tmp_path / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}, str(weights))
    clip = OpenCLIPImageEmbedder.from_pretrained(TINY_CLIP, pretrained=str(weights))
    with torch.no_grad():
        assert torch.allclose(clip(image), tiny_clip(image), atol=1e-6)
    zero_shot = CLIPZeroShotClassifier.from_pretrained(model_name=TINY_CLIP, pretrained=str(weights))
    assert zero_shot.attributes == {name: list(classes) for name, classes in DEFAULT_PROMPTS.items()}
    assert {k: tuple(v.shape) for k, v in zero_shot(image).items()} == {"gender": (1, 2), "race": (1, 4), "age": (1, 2)}

    folder = tmp_path / "dinov2"
    tiny_dinov2.save_pretrained(folder)
    dinov2_processors()[0].save_pretrained(folder)
    dino = DINOv2ImageEmbedder.from_pretrained(str(folder))
    assert (dino.resize_size, dino.crop_size, dino.mean, dino.std) == (256, 224, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        assert torch.allclose(dino(image), DINOv2ImageEmbedder(tiny_dinov2)(image), atol=1e-6)
