"""The settings that reproduce the authors' code, each one option away from the paper's defaults.

The transport cost, the adjusted-DFT step weights and the loss rules have their tests beside the
existing ones (test_alignment.py, test_dft.py, test_losses.py); natural padding in pipelines and the
audit in test_pipeline.py and test_evaluation.py, aligned reference faces in test_components_real.py.
Here: the config fields (defaults keep the paper's choices), prompt padding in the trainer, face
alignment to the face template (the warp, the face-reading routine, MediaPipe's landmarks), and the
paper's example configs held to the docs table of the authors' per-experiment values.
"""

import ast
import math
import re
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_fair.components.base import FaceDetection
from diffusers_fair.components.faces import read_faces
from diffusers_fair.method.boxes import crop_faces
from diffusers_fair.method.face_alignment import (
    FIVE_POINT_TEMPLATE,
    FOUR_POINT_TEMPLATE,
    align_faces,
    similarity_to_template,
)
from diffusers_fair.method.targets import TargetDistribution
from diffusers_fair.training.config import FairTrainingConfig
from diffusers_fair.training.experiment import experiment_from_dict, read_config_file, read_experiment
from helpers.training import GENDER, PROMPTS, make_trainer, stub_components


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"

# field -> (the default; the authors' code's choice), as docs/TRAINING.md lists them
OPTIONS = {
    "ot_cost": ("squared", "euclidean"),
    "dft_step_weights": ("unit", "authors"),
    "prompt_padding": ("max_length", "natural"),
    "faceless_image_weight": ("full", "smallest_change_factor"),
    "face_realism_images": ("kept_target", "every_face"),
}


# ---------------------------------------------------------------------------- the config
def test_each_option_keeps_todays_default_and_offers_the_authors_choice():
    hints = typing.get_type_hints(FairTrainingConfig)
    for config in (FairTrainingConfig(), FairTrainingConfig.toy()):
        for name, (default, authors) in OPTIONS.items():
            assert typing.get_args(hints[name]) == (default, authors), name
            assert getattr(config, name) == default
            assert getattr(FairTrainingConfig(**{name: authors}), name) == authors
            with pytest.raises(ValueError, match=f"^{name} must be one of"):
                FairTrainingConfig(**{name: "other"})
        assert (config.align_faces, config.attribute_face_region_factors) == (False, {})


def test_option_values_are_checked_against_each_other():
    with pytest.raises(ValueError, match="^dft_step_weights='authors' .* needs standardize_dft=True"):
        FairTrainingConfig(dft_step_weights="authors", standardize_dft=False)
    with pytest.raises(ValueError, match=r"^attribute_face_region_factors\['race'\] must be in \[0, 1\], got 1.5"):
        FairTrainingConfig(attribute_face_region_factors={"race": 1.5})
    with pytest.raises(ValueError, match="^attribute_face_region_factors must be a mapping"):
        FairTrainingConfig(attribute_face_region_factors={"race": "0.3"})
    config = FairTrainingConfig.from_dict({"attribute_face_region_factors": {"race": 0.3, "age": 0.3},
                                           "align_faces": True, "ot_cost": "euclidean"})
    assert config.attribute_face_region_factors == {"race": 0.3, "age": 0.3} and config.align_faces


# ---------------------------------------------------------------------------- prompt padding
def by_hand(pipe, text, length=None):
    """The text encoder on ``text``: padded to the maximum length without a mask, or to ``length`` with one."""
    tokenizer = pipe.tokenizer
    if length is None:
        ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]
    tokens = tokenizer([text], padding="max_length", max_length=length, return_tensors="pt")
    return pipe.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]


@torch.no_grad()
def test_natural_padding_keeps_the_prompts_length_with_an_attention_mask(tmp_path):
    natural = make_trainer(tmp_path / "natural", targets=[GENDER], prompt_padding="natural")
    padded = make_trainer(tmp_path / "padded", targets=[GENDER])
    pipe, tokenizer = natural.pipeline, natural.pipeline.tokenizer
    prompt = PROMPTS[0]
    length = len(tokenizer(prompt).input_ids)
    assert length < tokenizer.model_max_length

    cond, neg = natural._embeddings(prompt, 3)
    assert cond.shape[:2] == neg.shape[:2] == (3, length)
    torch.testing.assert_close(cond[0], by_hand(pipe, prompt, length)[0], rtol=0, atol=0)
    torch.testing.assert_close(neg[0], by_hand(pipe, "", length)[0], rtol=0, atol=0)
    assert torch.equal(cond[0], cond[2])

    full_cond, full_neg = padded._embeddings(prompt, 3)
    assert full_cond.shape[1] == tokenizer.model_max_length
    torch.testing.assert_close(full_cond[0], by_hand(padded.pipeline, prompt)[0], rtol=0, atol=0)
    # The tokens before the padding attend only to earlier tokens: the same in both; the padding differs.
    torch.testing.assert_close(cond, full_cond[:, :length], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(neg, full_neg[:, :length], atol=1e-4)  # the empty prompt's masked padding

    # A negative prompt longer than the prompt sets the common length.
    natural.config.negative_prompt = "a photo of the face of a doctor and a nurse and a pilot"
    cond, neg = natural._embeddings("a doctor", 1)
    assert cond.shape[1] == neg.shape[1] == len(tokenizer(natural.config.negative_prompt).input_ids)
    # Without guidance there is no negative prompt, and the prompt keeps its own length.
    natural.config.guidance_scale = 1.0
    cond, neg = natural._embeddings("a doctor", 1)
    assert neg is None and cond.shape[1] == len(tokenizer("a doctor").input_ids)


@torch.no_grad()
def test_the_paddings_agree_on_a_prompt_of_the_maximum_length(tmp_path):
    natural = make_trainer(tmp_path, targets=[GENDER], prompt_padding="natural", guidance_scale=1.0)
    tokenizer = natural.pipeline.tokenizer
    words = ["doctor"] * (tokenizer.model_max_length - 2)
    prompt = " ".join(words)
    assert len(tokenizer(prompt).input_ids) == tokenizer.model_max_length
    cond, _ = natural._embeddings(prompt, 1)
    assert torch.equal(cond, by_hand(natural.pipeline, prompt))


@torch.no_grad()
def test_pipelines_encode_natural_padding_as_the_trainer_does(tmp_path):
    from diffusers_fair.adaptors.prompt_padding import encode_natural

    trainer = make_trainer(tmp_path, targets=[GENDER], prompt_padding="natural")
    for negative in ("", "a photo of the face of a doctor and a nurse and a pilot"):  # shorter, longer
        trainer.config.negative_prompt = negative
        cond, neg = trainer._embeddings(PROMPTS[0], 1)
        embeds, negative_embeds = encode_natural(trainer.pipeline, [PROMPTS[0]], [negative])
        assert torch.equal(embeds, cond) and torch.equal(negative_embeds, neg)


def test_a_training_step_with_natural_padding(tmp_path):
    records = {}
    for padding in ("max_length", "natural"):
        trainer = make_trainer(tmp_path / padding, targets=[GENDER], prompt_padding=padding)
        records[padding] = trainer.train_step()
    assert not records["natural"]["skipped"] and math.isfinite(records["natural"]["loss"])
    assert records["natural"]["loss"] != pytest.approx(records["max_length"]["loss"], rel=1e-6)


# ---------------------------------------------------------------------------- face alignment
def rotation(angle: float, scale: float) -> torch.Tensor:
    return scale * torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                                dtype=torch.float64)


def landmarks_under(template: torch.Tensor, matrix: torch.Tensor, shift: torch.Tensor, size: int = 112):
    """Landmarks that ``x -> matrix x + shift`` takes onto the template of a ``size`` crop (continuous coordinates)."""
    target = (template + 0.5) * size / 112
    return torch.linalg.solve(matrix, (target - shift).T).T


@pytest.mark.parametrize("template", [FIVE_POINT_TEMPLATE, FOUR_POINT_TEMPLATE])
def test_the_similarity_is_recovered_exactly(template):
    matrix, shift = rotation(0.4, 1.7), torch.tensor([12.0, -30.0], dtype=torch.float64)
    landmarks = landmarks_under(template, matrix, shift)
    fitted = similarity_to_template(landmarks[None])[0]
    torch.testing.assert_close(fitted[:, :2], matrix, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fitted[:, 2], shift, rtol=1e-12, atol=1e-10)
    assert torch.allclose(FOUR_POINT_TEMPLATE[3], (FIVE_POINT_TEMPLATE[3] + FIVE_POINT_TEMPLATE[4]) / 2)


def test_aligned_faces_sample_the_image_where_the_similarity_says():
    # A linear image: bilinear sampling reproduces it exactly, so every aligned pixel can be predicted.
    height, width, size = 90, 120, 56
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                            torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    image = torch.stack([xs / width, ys / height, (xs + ys) / (width + height)])[None]
    matrix, shift = rotation(-0.25, 0.8), torch.tensor([-20.0, -10.0], dtype=torch.float64)
    landmarks = landmarks_under(FIVE_POINT_TEMPLATE, matrix, shift, size)
    aligned = align_faces(image, landmarks[None], size)
    assert aligned.shape == (1, 3, size, size)
    centres = torch.arange(size, dtype=torch.float64) + 0.5
    out_y, out_x = torch.meshgrid(centres, centres, indexing="ij")
    source = torch.linalg.solve(matrix, torch.stack([out_x.flatten(), out_y.flatten()]) - shift[:, None])
    sx, sy = source[0].view(size, size), source[1].view(size, size)
    inside = (sx > 0.5) & (sx < width - 0.5) & (sy > 0.5) & (sy < height - 0.5)
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(aligned[0, 0][inside], (sx / width)[inside], rtol=0, atol=1e-12)
    torch.testing.assert_close(aligned[0, 1][inside], (sy / height)[inside], rtol=0, atol=1e-12)
    far = (sx < -1) | (sx > width + 1) | (sy < -1) | (sy > height + 1)
    assert far.any() and (aligned[0][:, far] == 0).all()  # outside the image: zeros


def test_aligned_faces_carry_the_gradient_to_the_pixels_they_read():
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0), requires_grad=True)
    landmarks = torch.stack([landmarks_under(FOUR_POINT_TEMPLATE, rotation(0.0, 3.0), torch.zeros(2)),
                             landmarks_under(FOUR_POINT_TEMPLATE, rotation(0.3, 4.0), torch.tensor([-40.0, -30.0]))])
    align_faces(images, landmarks, 16)[1].sum().backward()
    assert images.grad[0].abs().sum() == 0 and images.grad[1].abs().sum() > 0


def test_alignment_refuses_bad_landmarks():
    with pytest.raises(ValueError, match="4 or 5 points"):
        similarity_to_template(torch.zeros(1, 3, 2) + torch.arange(3.0)[None, :, None])
    with pytest.raises(ValueError, match="all lie on one point"):
        similarity_to_template(torch.ones(1, 5, 2))
    with pytest.raises(ValueError, match="one face per image"):
        align_faces(torch.zeros(2, 3, 8, 8), torch.rand(1, 5, 2), 8)
    with pytest.raises(ValueError, match=r"shape \(B, 4 or 5, 2\) matching boxes"):
        FaceDetection(boxes=torch.zeros(2, 4), found=torch.zeros(2, dtype=torch.bool), scores=torch.zeros(2),
                      landmarks=torch.zeros(2, 6, 2))


class LandmarkDetector:
    """The whole image is the face; its four landmarks are fixed points, or there are none."""

    def __init__(self, landmarks: torch.Tensor | None):
        self.landmarks = landmarks

    def detect(self, images):
        n, _, h, w = images.shape
        found = torch.tensor([True] * (n - 1) + [False])
        boxes = torch.tensor([0.0, 0.0, w, h]).repeat(n, 1) * found[:, None]
        landmarks = None if self.landmarks is None else self.landmarks.repeat(n, 1, 1) * found[:, None, None]
        return FaceDetection(boxes=boxes, found=found, scores=found.float(), landmarks=landmarks)


def test_read_faces_embeds_aligned_faces_only_when_asked_and_given_landmarks():
    components = stub_components()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    points = torch.tensor([[5.0, 6.0], [11.0, 6.5], [8.0, 9.0], [8.2, 12.0]])
    embedder, classifier = components.face_embedder, components.classifier
    kwargs = dict(face_embedder=embedder)
    aligned = read_faces(images, LandmarkDetector(points), classifier, align_faces=True, **kwargs)
    boxed = read_faces(images, LandmarkDetector(points), classifier, **kwargs)
    no_landmarks = read_faces(images, LandmarkDetector(None), classifier, align_faces=True, **kwargs)
    with torch.no_grad():
        expected = embedder(align_faces(images[:2], points.repeat(2, 1, 1), embedder.input_size))
        crops = embedder(crop_faces(images[:2], torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2), embedder.input_size))
    torch.testing.assert_close(aligned.face_embeddings[:2], expected)
    torch.testing.assert_close(boxed.face_embeddings[:2], crops)
    torch.testing.assert_close(no_landmarks.face_embeddings, boxed.face_embeddings)
    assert aligned.face_embeddings[2].abs().sum() == 0
    # The classifier always reads the square crops; the landmarks come back, zeros where no face.
    for name in aligned.logits:
        assert torch.equal(aligned.logits[name], boxed.logits[name])
    assert torch.equal(aligned.landmarks[:2], points.repeat(2, 1, 1)) and aligned.landmarks[2].abs().sum() == 0
    assert no_landmarks.landmarks is None


def test_mediapipe_gives_four_landmarks_that_align_the_astronauts_face(astronaut):
    pytest.importorskip("mediapipe")
    from diffusers_fair.components.mediapipe_detector import MediaPipeFaceDetector
    from helpers.components import to_tensor

    with MediaPipeFaceDetector() as detector:
        raw = detector.faces_and_landmarks_in(astronaut)
        boxes = detector.faces_in(astronaut)
        detection = detector.detect(torch.cat([to_tensor(astronaut), torch.zeros(1, 3, 512, 512)]))
    (box, points), = raw
    assert boxes == [box]
    x0, y0, x1, y1, _ = box
    assert points.shape == (4, 2) and ((points >= [x0, y0]) & (points <= [x1, y1])).all()
    assert points[0, 0] < points[2, 0] < points[1, 0]  # image-left eye, nose, image-right eye
    assert points[:2, 1].max() < points[2, 1] < points[3, 1]  # eyes above the nose above the mouth
    assert detection.landmarks.shape == (2, 4, 2)
    np.testing.assert_allclose(detection.landmarks[0].numpy(), points, rtol=0, atol=1e-4)
    assert detection.landmarks[1].abs().sum() == 0
    # The fitted similarity puts her landmarks within 3 pixels of the 112 x 112 template's (2.9 at most).
    transform = similarity_to_template(detection.landmarks[:1])[0]
    moved = (transform[:, :2] @ torch.from_numpy(points).T + transform[:, 2:]).T
    assert (moved - (FOUR_POINT_TEMPLATE + 0.5)).norm(dim=1).max() < 3.5


# ---------------------------------------------------------------------------- the docs
def test_the_docs_say_which_choice_is_the_papers_the_authors_and_the_default():
    training = (ROOT / "docs" / "TRAINING.md").read_text(encoding="utf-8")
    dft = (ROOT / "docs" / "DFT.md").read_text(encoding="utf-8")
    table = training[training.index("## The paper, the authors' code and the defaults"):]
    for name, (default, authors) in OPTIONS.items():
        row = re.search(rf"^\| `{name}` \| `'{default}'` \(default\) \| `'{authors}'` \|", table, re.M)
        assert row, name
    assert re.search(r"^\| `align_faces` \| `False` \(default\) \| `True` \|", table, re.M)
    assert re.search(r"^\| `attribute_face_region_factors` \| `\{\}` \(default\) \|", table, re.M)
    assert "`step_weights=\"unit\"` (default" in dft and "`step_weights=\"authors\"`" in dft
    assert "the form of the original implementation" not in dft


# ---------------------------------------------------------------------------- the paper's configs and the docs table
EXPERIMENT_ROW = "the authors' experiment"
BOOKKEEPING = {"base_model", "output_dir", "gradient_checkpointing"}  # training keys that are no experiment setting


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def authors_table() -> dict[str, dict[str, str]]:
    """``{config file: {row: cell}}`` from the table of docs/TRAINING.md's "The authors' per-experiment settings"."""
    text = (ROOT / "docs" / "TRAINING.md").read_text(encoding="utf-8")
    section = text[text.index("### The authors' per-experiment settings"):].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("| field |"))
    lines = []
    for line in section[start:]:
        if not line.startswith("|"):
            break
        lines.append(line)
    configs = [cell.strip("`") for cell in cells(lines[0])[1:]]
    columns = {config: {} for config in configs}
    for line in lines[2:]:  # after the header and its separator
        row, *values = cells(line)
        assert len(values) == len(configs), line
        for config, value in zip(configs, values):
            columns[config][row.strip("`")] = value
    return columns


def literal(cell: str):
    """The Python literal of a table cell written as `` `literal` ``."""
    assert cell.startswith("`") and cell.endswith("`"), cell
    return ast.literal_eval(cell[1:-1])


def table_mismatches(column: dict[str, str], experiment) -> list[str]:
    """Where an experiment's resolved values differ from its column of the table, one line each."""
    name, found = experiment.source.name, []
    for row, cell in column.items():
        if row == EXPERIMENT_ROW:
            if cell.strip("`") not in experiment.source.read_text(encoding="utf-8"):
                found.append(f"{name} does not name the authors' experiment {cell}")
            continue
        if row == "targets":
            expected = [TargetDistribution.parse(t) for t in literal(cell)]
            if experiment.default_targets != expected:
                found.append(f"targets: the table says {[str(t) for t in expected]}, "
                             f"{name} has {[str(t) for t in experiment.default_targets or []]}")
            continue
        if row == "prompt-set weights":
            weights = [s.weight for s in experiment.prompt_sets]
            if cell == "one set":
                expected, value = "one set", "one set" if len(weights) == 1 else weights
            else:
                expected, value = literal(cell), weights
        else:
            expected, value = literal(cell), getattr(experiment.config, row)
        if value != expected:
            found.append(f"{row}: the table says {expected!r}, {name} has {value!r}")
    return found


def unlisted_settings(config_data: dict, column: dict[str, str]) -> set[str]:
    """The training settings a config file sets that its column of the table does not list."""
    return set(config_data.get("training") or {}) - BOOKKEEPING - set(column)


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs' paths are relative to the repository root


def test_every_paper_config_has_the_values_of_the_docs_table(in_repo):
    table = authors_table()
    paper_configs = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith(("toy_", "sdxl_")))
    assert sorted(table) == paper_configs
    rows = set(next(iter(table.values())))
    for required in ("targets", "prompt-set weights", "images_per_prompt", "num_iterations", "weight_loss_img",
                     "attribute_face_region_factors", "faceless_image_weight", "face_realism_images", "align_faces",
                     *OPTIONS):
        assert required in rows
    for config, column in table.items():
        assert table_mismatches(column, read_experiment(CONFIGS / config)) == [], config
        assert unlisted_settings(read_config_file(CONFIGS / config), column) == set(), config


def test_the_table_check_fails_when_a_config_or_the_table_changes_alone(in_repo):
    table = authors_table()
    race = read_experiment(CONFIGS / "race.yaml", ["training.weight_loss_img=8.0"])
    assert table_mismatches(table["race.yaml"], race) == ["weight_loss_img: the table says 6.0, race.yaml has 8.0"]
    gender_race = read_experiment(CONFIGS / "gender_race.yaml")
    edited = {**table["gender_race.yaml"], "own_face_confidence": "`0.9`", "ot_cost": "`'euclidean'`"}
    assert table_mismatches(edited, gender_race) == [
        "own_face_confidence: the table says 0.9, gender_race.yaml has 0.8",
        "ot_cost: the table says 'euclidean', gender_race.yaml has 'squared'"]
    # Targets and prompt-set weights are compared too.
    data = read_config_file(CONFIGS / "multi_concept.yaml")
    data["targets"] = ["race: wmelh, asian, black, indian"]  # the race factors still name a target
    changed = experiment_from_dict(data, CONFIGS / "multi_concept.yaml")
    assert table_mismatches(table["multi_concept.yaml"], changed) == [
        "targets: the table says ['gender: male=0.5, female=0.5 * race: wmelh=0.25, asian=0.25, black=0.25, "
        "indian=0.25'], multi_concept.yaml has ['race: wmelh=0.25, asian=0.25, black=0.25, indian=0.25']"]
    assert table_mismatches({**table["multi_concept.yaml"], "prompt-set weights": "`[2, 1, 1, 1]`"},
                            read_experiment(CONFIGS / "multi_concept.yaml")) == [
        "prompt-set weights: the table says [2, 1, 1, 1], multi_concept.yaml has [1.0, 1.0, 1.0, 1.0]"]
    assert table_mismatches({**table["gender.yaml"], "prompt-set weights": "`[1, 1, 1, 1]`"},
                            read_experiment(CONFIGS / "gender.yaml")) == [
        "prompt-set weights: the table says [1, 1, 1, 1], gender.yaml has [1.0]"]
    # A setting the config adds without a row of the table.
    data = read_config_file(CONFIGS / "gender.yaml")
    data["training"]["learning_rate"] = 1e-4
    assert unlisted_settings(data, table["gender.yaml"]) == {"learning_rate"}
