"""Prompt sets: groups of training prompts with a sampling weight and, optionally, their own targets.

One adaptor can be trained on occupations, sports and personal descriptors at once, oversampling the
small groups. :func:`load_prompt_sets` reads the one file format for prompt sets (a JSON list whose
sets hold their prompts or name a text file of them), as the examples use it; :func:`resolve_prompt_sets`
gives every set its targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .._utils.io import read_json, read_prompts
from ..method.targets import TargetDistribution


PROMPT_SET_KEYS = ("name", "prompts", "file", "weight", "targets")


@dataclass
class PromptSet:
    """A group of training prompts.

    Attributes:
        prompts: the prompts; each iteration draws one set, then one of its prompts uniformly.
        weight: relative frequency with which this set is drawn (oversampling weight); sets are
            drawn with probability ``weight / sum(weights)``, whatever their sizes.
        targets: target distributions for this set's prompts; ``None`` uses the trainer's targets.
        name: a label for logs.
    """

    prompts: list[str]
    weight: float = 1.0
    targets: list[TargetDistribution] | None = None
    name: str = ""

    def __post_init__(self):
        if isinstance(self.prompts, str) or not isinstance(self.prompts, (list, tuple)):
            raise ValueError(f"prompt set {self.name!r}: prompts must be a list of strings")
        self.prompts = list(self.prompts)
        if not self.prompts:
            raise ValueError(f"prompt set {self.name!r} has no prompts")
        for prompt in self.prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt set {self.name!r}: every prompt must be a non-empty string, got {prompt!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not (
            math.isfinite(self.weight) and self.weight > 0
        ):
            raise ValueError(f"prompt set {self.name!r}: weight must be a positive number, got {self.weight!r}")
        if self.targets is not None:
            self.targets = list(self.targets)
            if not self.targets or not all(isinstance(t, TargetDistribution) for t in self.targets):
                raise ValueError(f"prompt set {self.name!r}: targets must be a non-empty list of TargetDistribution")


def load_prompt_sets(path: str | Path) -> list[PromptSet]:
    """Read prompt sets from a JSON file: the one file format for prompt sets.

    The file holds either a plain list of prompt strings (one set, named after the file), or a
    list of sets, each an object with

    * ``"prompts"``: a list of prompt strings, or ``"file"``: a text file of prompts, one per line
      (blank lines and lines starting with ``#`` are skipped), relative to the JSON file's folder;
      exactly one of the two;
    * ``"name"`` (optional): a label for logs; by default the text file's name without its suffix,
      else ``set-<index>``;
    * ``"weight"`` (optional, default 1): the oversampling weight;
    * ``"targets"`` (optional): target distributions in :meth:`TargetDistribution.parse` syntax,
      e.g. ``["gender: male, female"]``; without them the set uses the trainer's targets.

    Raises:
        ValueError: naming the file, and the entry (its index) where one is at fault: the file is
            missing or not JSON, an entry has unknown keys, both or neither of ``prompts`` and
            ``file``, a text file that is missing or holds no prompts, a bad weight or target.
    """
    path = Path(path)
    data = read_json(path, "prompt set file")
    if not isinstance(data, list) or not data:
        raise ValueError(f"prompt set file {path} must hold a non-empty JSON list")
    if all(isinstance(item, str) for item in data):
        try:
            return [PromptSet(prompts=data, name=path.stem)]
        except ValueError as error:
            raise ValueError(f"prompt set file {path}: {error}") from None
    sets = []
    for index, item in enumerate(data):
        try:
            sets.append(_prompt_set_entry(item, index, path.parent))
        except ValueError as error:
            raise ValueError(f"prompt set file {path}: entry {index}: {error}") from None
    return sets


def _prompt_set_entry(item, index: int, folder: Path) -> PromptSet:
    """One object of a prompt set file; ``file`` is relative to ``folder``."""
    if not isinstance(item, dict):
        raise ValueError(f"must be an object, got {type(item).__name__}")
    unknown = sorted(set(item) - set(PROMPT_SET_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown} (known: {list(PROMPT_SET_KEYS)})")
    if ("prompts" in item) == ("file" in item):
        raise ValueError("needs exactly one of 'prompts' (a list) and 'file' (a text file, one prompt per line)")
    name = item.get("name", f"set-{index}")
    if "file" in item:
        if not isinstance(item["file"], str) or not item["file"]:
            raise ValueError(f"'file' must be a file name, got {item['file']!r}")
        prompt_file = folder / item["file"]
        prompts = read_prompts(prompt_file)
        name = item.get("name", prompt_file.stem)
    else:
        prompts = item["prompts"]
    targets = item.get("targets")
    if targets is not None:
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError("'targets' must be a list of strings such as \"gender: male, female\"")
        targets = [TargetDistribution.parse(t) for t in targets]
    return PromptSet(prompts=prompts, weight=item.get("weight", 1.0), targets=targets, name=str(name))


def resolve_prompt_sets(prompts, targets) -> list[PromptSet]:
    """Normalise ``prompts`` and ``targets`` into prompt sets that each carry their targets."""
    if isinstance(targets, TargetDistribution):
        targets = [targets]
    if targets is not None:
        targets = list(targets)
        if not targets or not all(isinstance(t, TargetDistribution) for t in targets):
            raise ValueError("targets must be a non-empty list of TargetDistribution")
    if isinstance(prompts, (str, PromptSet)) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompt strings or of PromptSet")
    prompts = list(prompts)
    if all(isinstance(p, str) for p in prompts):
        sets = [PromptSet(prompts=prompts, name="prompts")]
    elif all(isinstance(p, PromptSet) for p in prompts):
        sets = prompts
    else:
        raise ValueError("prompts must be all strings or all PromptSet, not a mix")
    result = []
    for s in sets:
        chosen = s.targets if s.targets is not None else targets
        if chosen is None:
            raise ValueError(f"prompt set {s.name!r} has no targets and no trainer-wide targets were given")
        attributes = [a for t in chosen for a in t.attributes]
        if len(set(attributes)) != len(attributes):
            raise ValueError(f"prompt set {s.name!r}: an attribute appears in several targets: {attributes}")
        result.append(PromptSet(prompts=s.prompts, weight=s.weight, targets=chosen, name=s.name))
    return result
