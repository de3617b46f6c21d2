"""Target distributions over protected attributes.

A :class:`TargetDistribution` says how often each class of an attribute should appear among the
images a prompt produces, for example ``gender: male=0.5, female=0.5`` or ``age: young=0.75,
old=0.25``. Distributional alignment pushes the generated images towards it.

Several attributes can be debiased jointly (intersectional fairness). A *joint* target is a
distribution over *cells*, the tuples of one class per attribute, such as ``("female", "asian")``.
It is built either as the product of independent marginals (``gender * race``) or from an explicit
table (:meth:`TargetDistribution.joint`). Cells are ordered row-major: the last attribute varies
fastest, as in ``itertools.product`` and ``torch.reshape``.

Examples::

    gender = TargetDistribution.uniform("gender", ["male", "female"])
    age = TargetDistribution("age", {"young": 0.75, "old": 0.25})
    same_age = TargetDistribution.parse("age: young=0.75, old=0.25")
    both = gender * age                      # 4 cells, independent
    both.marginal("age") == age              # True
"""

from __future__ import annotations

import itertools
import math
import numbers
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import torch


# A probability vector may miss a sum of 1 by this much (float32 round-off of user input).
SUM_TOLERANCE = 1e-6

# The most cells a target may have: 12 binary attributes, or gender x 7 races x 9 ages many times over.
# A product of many attributes grows exponentially; the bound refuses it before anything is allocated.
MAX_CELLS = 4096

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\- ]+$")


def _check_name(name: object, what: str) -> str:
    """Validate an attribute or class name: a non-empty string without the parser's separators."""
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a string, got {type(name).__name__}")
    stripped = name.strip()
    if not stripped:
        raise ValueError(f"{what} must not be empty")
    if stripped != name:
        raise ValueError(f"{what} {name!r} has leading or trailing spaces")
    if not _NAME_PATTERN.match(name):
        raise ValueError(
            f"{what} {name!r} may contain only letters, digits, spaces, '_', '-' and '.'"
        )
    return name


def _check_class_names(attribute: str, class_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(class_names, str):
        raise ValueError(f"class names of {attribute!r} must be a sequence of strings, not a string")
    names = tuple(_check_name(name, f"class name of {attribute!r}") for name in class_names)
    if not names:
        raise ValueError(f"attribute {attribute!r} needs at least one class")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"attribute {attribute!r} has duplicate class names: {duplicates}")
    _check_num_cells(len(names), f"attribute {attribute!r}")
    return names


def _check_num_cells(num_cells: int, what: str) -> None:
    """Refuse a target of more than :data:`MAX_CELLS` cells, before its table is allocated."""
    if num_cells > MAX_CELLS:
        raise ValueError(f"{what} would have {num_cells} cells; a target may have at most {MAX_CELLS} cells "
                         "(fewer attributes or classes)")


def _check_number(value: object, what: str) -> float:
    """A probability given as a number; strings, bools and ``None`` are refused, not converted."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range
        raise ValueError(f"{what} is not a finite number: {_short(value)}") from None


def _short(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters (a huge integer has thousands of digits)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_probabilities(values: torch.Tensor, what: str) -> torch.Tensor:
    """Check a float64 tensor of probabilities: finite, non-negative, summing to 1."""
    if not torch.isfinite(values).all():
        raise ValueError(f"{what} contains NaN or infinite probabilities")
    if (values < 0).any():
        raise ValueError(f"{what} contains negative probabilities")
    total = float(values.sum())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ValueError(f"{what} probabilities sum to {total!r}, not 1 (tolerance {SUM_TOLERANCE})")
    return values


class TargetDistribution:
    """A target distribution over the classes of one attribute, or over the cells of several.

    Args:
        attribute: name of the attribute, e.g. ``"gender"``.
        probabilities: class name -> probability, in the order of the classifier's logits.
            Probabilities must be finite, non-negative and sum to 1 (within ``1e-6``).

    Use :meth:`uniform`, :meth:`parse`, :meth:`joint` and ``a * b`` for the other ways to build one.

    Attributes:
        attributes: the attribute names, one for a marginal target, several for a joint one.
        classes: attribute name -> its class names, in logit order.
        cells: the cells, tuples with one class name per attribute, row-major.
        probs: ``(num_cells,)`` float64 tensor, the probability of each cell.
    """

    def __init__(self, attribute: str, probabilities: Mapping[str, float]):
        if not isinstance(probabilities, Mapping):
            raise ValueError(
                "probabilities must be a mapping of class name -> probability, "
                f"got {type(probabilities).__name__}"
            )
        attribute = _check_name(attribute, "attribute name")
        names = _check_class_names(attribute, list(probabilities.keys()))
        values = torch.tensor(
            [_check_number(probabilities[name], f"probability of {attribute}={name}") for name in names], dtype=torch.float64
        )
        self._set(
            {attribute: names}, _check_probabilities(values, f"target for {attribute!r}")
        )

    def _set(self, classes: dict[str, tuple[str, ...]], probs: torch.Tensor) -> None:
        self.attributes: tuple[str, ...] = tuple(classes)
        self.classes: dict[str, tuple[str, ...]] = dict(classes)
        self.cells: list[tuple[str, ...]] = list(itertools.product(*classes.values()))
        self.probs: torch.Tensor = probs

    @classmethod
    def _from_parts(cls, classes: dict[str, tuple[str, ...]], probs: torch.Tensor):
        target = cls.__new__(cls)
        target._set(classes, probs)
        return target

    # ----------------------------------------------------------------- constructors
    @classmethod
    def uniform(cls, attribute: str, class_names: Sequence[str]) -> TargetDistribution:
        """Equal probability for each class: ``uniform("gender", ["male", "female"])``."""
        names = _check_class_names(_check_name(attribute, "attribute name"), class_names)
        return cls(attribute, {name: 1.0 / len(names) for name in names})

    @classmethod
    def joint(
        cls,
        classes: Mapping[str, Sequence[str]],
        table: Mapping[tuple[str, ...], float] | Sequence | torch.Tensor,
    ) -> TargetDistribution:
        """A joint target over several attributes given by an explicit table.

        Args:
            classes: attribute name -> class names, e.g. ``{"gender": [...], "race": [...]}``.
            table: either a mapping cell tuple -> probability (cells left out get probability 0),
                or an array-like of shape ``(K_1, ..., K_A)`` indexed by class positions.
        """
        if not isinstance(classes, Mapping) or not classes:
            raise ValueError("classes must be a non-empty mapping of attribute -> class names")
        checked = {
            _check_name(attr, "attribute name"): _check_class_names(attr, names)
            for attr, names in classes.items()
        }
        shape = tuple(len(names) for names in checked.values())
        _check_num_cells(math.prod(shape), f"a joint target over {tuple(checked)}")
        if isinstance(table, Mapping):
            values = torch.zeros(shape, dtype=torch.float64)
            given = set()
            for cell, prob in table.items():
                cell = (cell,) if isinstance(cell, str) else tuple(cell)
                if len(cell) != len(checked):
                    raise ValueError(f"cell {cell!r} must name one class per attribute {tuple(checked)}")
                index = []
                for (attr, names), name in zip(checked.items(), cell):
                    if name not in names:
                        raise ValueError(f"unknown class {name!r} for attribute {attr!r}")
                    index.append(names.index(name))
                # "female" and ("female",) name the same cell; keeping either value silently would be a guess.
                if tuple(index) in given:
                    raise ValueError(f"cell {cell!r} is given twice in the table")
                given.add(tuple(index))
                values[tuple(index)] = _check_number(prob, f"probability of cell {cell}")
        else:
            try:
                values = torch.as_tensor(table, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError, OverflowError) as error:
                raise ValueError(f"table must be a mapping of cells or an array of numbers: {error}") from None
            if tuple(values.shape) != shape:
                raise ValueError(f"table has shape {tuple(values.shape)}, expected {shape}")
        flat = _check_probabilities(values.reshape(-1).clone(), f"joint target over {tuple(checked)}")
        return cls._from_parts(checked, flat)

    @classmethod
    def parse(cls, text: str) -> TargetDistribution:
        """Parse ``"age: young=0.75, old=0.25"``.

        Grammar: ``attribute: class[=prob], class[=prob], ...``. Without any ``=prob`` the target
        is uniform; either every class has a probability or none does. Several attributes joined
        by ``*`` give their independent product: ``"gender: male, female * age: young=0.75, old=0.25"``.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError("target string is empty")
        parts = [cls._parse_one(part) for part in text.split("*")]
        result = parts[0]
        for part in parts[1:]:
            result = result * part
        return result

    @classmethod
    def _parse_one(cls, text: str) -> TargetDistribution:
        if text.count(":") != 1:
            raise ValueError(f"malformed target {text.strip()!r}: expected 'attribute: class=prob, ...'")
        attribute, body = (piece.strip() for piece in text.split(":"))
        items = [item.strip() for item in body.split(",")]
        if any(not item for item in items):
            raise ValueError(f"malformed target {text.strip()!r}: empty class entry")
        with_prob = [item for item in items if "=" in item]
        if not with_prob:
            return cls.uniform(attribute, items)
        if len(with_prob) != len(items):
            raise ValueError(
                f"malformed target {text.strip()!r}: give a probability to every class or to none"
            )
        probabilities: dict[str, float] = {}
        for item in items:
            if item.count("=") != 1:
                raise ValueError(f"malformed entry {item!r}: expected 'class=prob'")
            name, value = (piece.strip() for piece in item.split("="))
            try:
                prob = float(value)
            except ValueError:
                raise ValueError(f"malformed probability {value!r} for class {name!r}") from None
            if name in probabilities:
                raise ValueError(f"attribute {attribute!r} has duplicate class names: [{name!r}]")
            probabilities[name] = prob
        return cls(attribute, probabilities)

    # ----------------------------------------------------------------- queries
    @property
    def is_joint(self) -> bool:
        """True when the target spans several attributes."""
        return len(self.attributes) > 1

    @property
    def name(self) -> str:
        """The attribute name, or the attribute names joined by ``" x "`` for a joint target."""
        return " x ".join(self.attributes)

    @property
    def num_classes(self) -> int:
        """Number of cells (the number of classes for a marginal target)."""
        return len(self.cells)

    @property
    def class_names(self) -> list[str]:
        """Cell names: the class names for a marginal target, ``"female/asian"`` for a joint one."""
        return ["/".join(cell) for cell in self.cells]

    @property
    def shape(self) -> tuple[int, ...]:
        """Number of classes per attribute."""
        return tuple(len(names) for names in self.classes.values())

    def table(self) -> torch.Tensor:
        """The probabilities as a ``(K_1, ..., K_A)`` float64 tensor."""
        return self.probs.reshape(self.shape)

    def prob(self, *cell: str) -> float:
        """Probability of one cell: ``target.prob("young")`` or ``target.prob("female", "asian")``."""
        if len(cell) != len(self.attributes):
            raise ValueError(f"give one class per attribute {self.attributes}, got {cell!r}")
        index = []
        for attr, name in zip(self.attributes, cell):
            if name not in self.classes[attr]:
                raise ValueError(f"unknown class {name!r} for attribute {attr!r}")
            index.append(self.classes[attr].index(name))
        return float(self.table()[tuple(index)])

    def as_dict(self) -> dict:
        """Class name -> probability (marginal), or cell tuple -> probability (joint)."""
        if self.is_joint:
            return {cell: float(p) for cell, p in zip(self.cells, self.probs)}
        return {cell[0]: float(p) for cell, p in zip(self.cells, self.probs)}

    def marginal(self, attribute: str) -> TargetDistribution:
        """The marginal distribution of one attribute (sums the joint table over the others)."""
        if attribute not in self.classes:
            raise ValueError(f"unknown attribute {attribute!r}; this target has {self.attributes}")
        axis = self.attributes.index(attribute)
        other_axes = [a for a in range(len(self.attributes)) if a != axis]
        values = self.table().sum(dim=other_axes) if other_axes else self.table()
        return TargetDistribution._from_parts({attribute: self.classes[attribute]}, values.clone())

    def marginals(self) -> dict[str, TargetDistribution]:
        """Attribute name -> its marginal distribution."""
        return {attr: self.marginal(attr) for attr in self.attributes}

    def cell_class_indices(self) -> torch.Tensor:
        """``(num_cells, A)`` long tensor: for each cell, the class index of each attribute."""
        ranges = [range(k) for k in self.shape]
        return torch.tensor(list(itertools.product(*ranges)), dtype=torch.long).reshape(-1, len(self.shape))

    def __mul__(self, other: TargetDistribution) -> TargetDistribution:
        """Independent product of two targets over disjoint attributes."""
        if not isinstance(other, TargetDistribution):
            return NotImplemented
        shared = set(self.attributes) & set(other.attributes)
        if shared:
            raise ValueError(f"cannot multiply targets sharing attributes {sorted(shared)}")
        _check_num_cells(self.num_classes * other.num_classes,
                         f"the product of the targets over {self.attributes + other.attributes}")
        probs = torch.outer(self.probs, other.probs).reshape(-1)
        return TargetDistribution._from_parts({**self.classes, **other.classes}, probs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TargetDistribution):
            return NotImplemented
        return self.classes == other.classes and torch.allclose(
            self.probs, other.probs, rtol=0.0, atol=SUM_TOLERANCE
        )

    __hash__ = None  # mutable-looking value object; compare with ==, do not hash

    def __str__(self) -> str:
        """A string that :meth:`parse` reads back.

        A joint target is written as the product of its marginals, which reads back to the same
        target only when the attributes are independent.
        """
        if self.is_joint:
            return " * ".join(str(self.marginal(attr)) for attr in self.attributes)
        entries = ", ".join(f"{name}={float(p)!r}" for name, p in zip(self.class_names, self.probs))
        return f"{self.attributes[0]}: {entries}"

    def __repr__(self) -> str:
        if self.is_joint:
            return f"TargetDistribution.joint({self.classes!r}, {self.table().tolist()!r})"
        return f"TargetDistribution({self.attributes[0]!r}, {self.as_dict()!r})"

