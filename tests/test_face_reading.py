"""The face-reading routine (components/faces.py) on the toy world's images and models.

Each test compares the routine with a computation done by hand, one image at a time: the toy
detector's raw outputs thresholded, the square computed from the box with plain arithmetic, the crop
of that one image, the classifier (or face embedder) on that one crop.
"""

import math

import pytest
import torch

from diffusers_fair.components.base import FaceDetection
from diffusers_fair.components.faces import read_faces
from diffusers_fair.evaluation import audit
from diffusers_fair.method.boxes import crop_faces


@pytest.fixture(scope="module")
def toy_components():
    from diffusers_fair.toy.components import load_toy_components

    return load_toy_components()


@pytest.fixture(scope="module")
def toy_images():
    """Ten toy-pipeline images of two prompts, then a flat grey and a random-noise image."""
    from diffusers import StableDiffusionPipeline

    from diffusers_fair import toy
    from diffusers_fair.toy import world

    pipe = StableDiffusionPipeline.from_pretrained(toy.model_path())
    pipe.set_progress_bar_config(disable=True)
    images = []
    for word in world.words("occupation", "train")[:2]:
        prompt = world.prompt(word)
        noise = audit.initial_noise(0, prompt, 5, audit.latent_shape(pipe))
        images.append(audit.generate(pipe, prompt, noise, guidance_scale=4.0, num_inference_steps=6, batch_size=5))
    blank = torch.full((1, 3, 32, 32), 0.5)
    noise_image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return torch.cat([*images, blank, noise_image])


def square(box, factor, size):
    """The square crop of ``box`` by hand: ``factor`` x its longer side about its centre, shifted inside."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * factor
    left = min(max((x0 + x1) / 2 - side / 2, 0.0), max(size - side, 0.0))
    top = min(max((y0 + y1) / 2 - side / 2, 0.0), max(size - side, 0.0))
    return [left, top, left + side, top + side]


def by_hand(images, components, model):
    """Per image: (found, detector box, square, model output on its own crop or None)."""
    out = []
    for image in images:
        with torch.no_grad():
            box, probability = components.detector(image[None])
        found = bool(probability[0] >= components.detector.threshold)
        crop_box = square(box[0].tolist(), components.crop_factor, image.shape[-1]) if found else [0.0] * 4
        output = None
        if found:
            crop = crop_faces(image[None], torch.tensor([crop_box]), model.input_size)
            output = model(crop)
        out.append((found, box[0], crop_box, output))
    return out


def test_read_faces_equals_detect_square_crop_classify_by_hand(toy_images, toy_components):
    reading = read_faces(toy_images, toy_components.detector, toy_components.classifier,
                         crop_factor=toy_components.crop_factor)
    expected = by_hand(toy_images, toy_components, toy_components.classifier)
    found = [e[0] for e in expected]
    assert reading.found.tolist() == found
    assert 0 < sum(found) < len(found)  # both kinds of image are in the batch
    for i, (has_face, box, crop_box, logits) in enumerate(expected):
        torch.testing.assert_close(reading.crop_boxes[i], torch.tensor(crop_box), rtol=1e-5, atol=1e-4)
        for name, classes in toy_components.classifier.attributes.items():
            assert reading.logits[name].shape == (len(toy_images), len(classes))
            assert reading.logits[name].dtype == torch.float32
            if has_face:
                torch.testing.assert_close(reading.boxes[i], box, rtol=1e-5, atol=1e-4)
                torch.testing.assert_close(reading.logits[name][i], logits[name][0], rtol=1e-4, atol=1e-4)
                assert reading.scores[i] >= toy_components.detector.threshold
            else:
                assert reading.logits[name][i].tolist() == [0.0] * len(classes)
                assert reading.boxes[i].tolist() == [0.0] * 4 and reading.scores[i] == 0
    assert reading.face_embeddings is None


def test_face_embeddings_are_the_embedders_reading_of_its_own_crop(toy_images, toy_components):
    embedder = toy_components.face_embedder
    reading = read_faces(toy_images, toy_components.detector, toy_components.classifier,
                         crop_factor=toy_components.crop_factor, face_embedder=embedder)
    for i, (has_face, _, _, embedding) in enumerate(by_hand(toy_images, toy_components, embedder)):
        if has_face:
            torch.testing.assert_close(reading.face_embeddings[i], embedding[0], rtol=1e-4, atol=1e-4)
        else:
            assert not reading.face_embeddings[i].any()
    none = read_faces(toy_images[-2:-1], toy_components.detector, toy_components.classifier, face_embedder=embedder)
    assert not none.found.any() and none.face_embeddings is None  # no face: nothing to embed


class RecordingDetector:
    """The toy detector, recording whether it was given gradient."""

    def __init__(self, detector):
        self.detector, self.calls = detector, []

    def detect(self, images):
        self.calls.append((images.requires_grad, torch.is_grad_enabled()))
        return self.detector.detect(images)


def test_gradient_reaches_the_pixels_through_the_crop_only(toy_images, toy_components):
    images = toy_images.clone().requires_grad_(True)
    detector = RecordingDetector(toy_components.detector)
    reading = read_faces(images, detector, toy_components.classifier, crop_factor=toy_components.crop_factor)
    assert detector.calls == [(False, False)]  # detection sees detached images, without grad
    weights = {name: torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
               for name, logits in reading.logits.items()}
    sum((weights[n] * l).sum() for n, l in reading.logits.items()).backward()

    size = images.shape[-1]
    pixel = torch.arange(size) + 0.5
    for i, (has_face, _, crop_box, _) in enumerate(by_hand(toy_images, toy_components, toy_components.classifier)):
        grad = images.grad[i]
        if not has_face:
            assert not grad.any()
            continue
        # The same gradient by hand: through this image's crop and the classifier alone.
        image = toy_images[i : i + 1].clone().requires_grad_(True)
        logits = toy_components.classifier(crop_faces(image, torch.tensor([crop_box]), toy_components.classifier.input_size))
        sum((weights[n][i] * l[0]).sum() for n, l in logits.items()).backward()
        torch.testing.assert_close(grad, image.grad[0], rtol=1e-4, atol=1e-5)  # batched vs single convolutions
        # Bilinear sampling inside the square touches only the pixels within one pixel of it.
        x0, y0, x1, y1 = crop_box
        near_x = (pixel > x0 - 1) & (pixel < x1 + 1)
        near_y = (pixel > y0 - 1) & (pixel < y1 + 1)
        outside = ~(near_y[:, None] & near_x[None, :])
        assert grad.abs().sum() > 0
        assert outside.any() and not grad[:, outside].any()


class ShiftedDetector:
    """One fixed box per image, a face in every other image."""

    def detect(self, images):
        n = images.shape[0]
        found = torch.arange(n) % 2 == 0
        boxes = torch.tensor([[20.0, 2.0, 30.0, 10.0]]).repeat(n, 1) * found[:, None]
        return FaceDetection(boxes=boxes, found=found, scores=found.float())


def test_squares_are_shifted_inside_and_empty_batches_give_zero_rows(toy_components):
    classifier = toy_components.classifier
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reading = read_faces(images, ShiftedDetector(), classifier, crop_factor=2.0)
    # Box 10 x 8 at centre (25, 6): a square of side 20, shifted left to x0 = 12 and down to y0 = 0.
    assert reading.crop_boxes.tolist() == [[12.0, 0.0, 32.0, 20.0], [0.0] * 4, [12.0, 0.0, 32.0, 20.0]]
    assert reading.boxes[0].tolist() == [20.0, 2.0, 30.0, 10.0]
    empty = read_faces(images[:0], ShiftedDetector(), classifier)
    assert empty.found.shape == (0,) and all(l.shape == (0, len(classifier.attributes[n])) for n, l in empty.logits.items())
    with pytest.raises(ValueError, match="crop_factor"):
        read_faces(images, ShiftedDetector(), classifier, crop_factor=0.0)
    with pytest.raises(ValueError, match="images"):
        read_faces(images[0], ShiftedDetector(), classifier)


def test_the_audit_and_the_toy_crops_read_faces_the_same_way(toy_images, toy_components):
    from diffusers_fair.toy.components import face_crops

    reading = read_faces(toy_images, toy_components.detector, toy_components.classifier,
                         crop_factor=toy_components.crop_factor)
    found = reading.found
    for batch_size in (3, 32):
        readout = audit.read_faces(toy_images, toy_components, batch_size=batch_size)
        assert torch.equal(readout.found, found)
        torch.testing.assert_close(readout.boxes, reading.boxes)
        torch.testing.assert_close(readout.scores, reading.scores)
        for name, logits in reading.logits.items():
            probs = readout.probs[name]
            torch.testing.assert_close(probs[found], logits[found].softmax(dim=1), rtol=1e-4, atol=1e-5)
            assert not probs[~found].any()
            assert probs[found].sum(dim=1).tolist() == pytest.approx([1.0] * int(found.sum()))
    size = toy_components.classifier.input_size
    crops = face_crops(toy_images[found], reading.boxes[found], size, toy_components.crop_factor)
    torch.testing.assert_close(crops, crop_faces(toy_images[found], reading.crop_boxes[found], size))
    assert math.isclose(toy_components.crop_factor, toy_components.classifier.crop_factor)
