"""The toy world's prompts: concept words, each with a skewed joint distribution of traits.

The data lives in ``data/world.json`` (written by ``scripts/make_toy_world.py``). Occupation words are
split into training words (used for debiasing) and held-out words (used to measure whether debiasing
generalises); the base model was trained on all of them, as Stable Diffusion saw every occupation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np


DATA = Path(__file__).parent / "data" / "world.json"


@dataclass(frozen=True)
class Word:
    name: str
    group: str  # "occupation", "sport" or "descriptor"
    split: str  # "train" or "test"
    traits: dict  # trait -> {class: probability}


@lru_cache(maxsize=1)
def load_world() -> dict:
    return json.loads(DATA.read_text())


def words(group: str | None = None, split: str | None = None) -> list[Word]:
    """The concept words, optionally filtered by group and split, in file order."""
    out = []
    for name, w in load_world()["words"].items():
        if (group is None or w["group"] == group) and (split is None or w["split"] == split):
            out.append(Word(name=name, group=w["group"], split=w["split"], traits=w["traits"]))
    return out


def prompt(word: Word, style: str | None = None) -> str:
    """The prompt of a word with its group's template (or the style template for occupations)."""
    templates = load_world()["templates"]
    if style is not None:
        if word.group != "occupation":
            raise ValueError(f"styles apply to occupations, not to {word.group} {word.name!r}")
        return templates["style"].format(style=style, word=word.name)
    return templates[word.group].format(word=word.name)


def explicit_prompt(hair_length: str | None = None, hair_colour: str | None = None, skin_tone: str | None = None) -> str:
    """A prompt naming traits directly, e.g. "a photo of the face of a person with long grey hair and deep skin"."""
    parts = []
    hair = " ".join(x for x in (hair_length, hair_colour) if x)
    if hair:
        parts.append(f"{hair} hair")
    if skin_tone:
        parts.append(f"{skin_tone} skin")
    if not parts:
        raise ValueError("name at least one trait")
    return load_world()["templates"]["explicit"].format(description=" and ".join(parts))


def vocabulary() -> list[str]:
    """Every word that appears in the toy world's prompts."""
    world = load_world()
    text = " ".join(world["templates"].values()) + " " + " ".join(world["styles"])
    text += " " + " ".join(world["words"]) + " hair skin "
    text += " ".join(c for classes in world["traits"].values() for c in classes)
    text = text.replace("{word}", " ").replace("{style}", " ").replace("{description}", " ").replace(",", " , ")
    return sorted(set(text.split()))


def sample_traits(word: Word, num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw ``num`` trait vectors from the word's distribution (traits independent given the word)."""
    classes = load_world()["traits"]
    out = {}
    for trait, names in classes.items():
        probs = np.array([word.traits[trait][c] for c in names], dtype=np.float64)
        out[trait] = rng.choice(len(names), size=num, p=probs / probs.sum())
    return out
