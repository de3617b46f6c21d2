"""Synthetic portraits for the toy world.

Each image shows a face-like figure (head, eyes, mouth, neck, shoulders, hair) in front of a
varied background. Three visible traits stand in for the paper's protected attributes:

* ``hair_length``: short or long (two classes, the gender slot),
* ``skin_tone``: pale, tan, brown or deep (four classes, the race slot),
* ``hair_colour``: dark or grey (two classes, the age slot).

Everything else varies freely: the head's position, size and pose, the background's colours and a
background object, the shirt colour, the lighting. Rendering is vectorised over a batch with
numpy, anti-aliased by drawing at twice the resolution and averaging 2x2 blocks, and fully
determined by the seed.

``render`` also returns the scene parameters it drew (the targets of the toy image embedder) and
can leave the figure out of chosen images (empty scenes: the face detector's negatives) without
changing anything else about the scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


TRAITS = {
    "hair_length": ["short", "long"],
    "skin_tone": ["pale", "tan", "brown", "deep"],
    "hair_colour": ["dark", "grey"],
}

SKIN_TONES = np.array(
    [[0.98, 0.86, 0.76], [0.86, 0.66, 0.47], [0.62, 0.42, 0.27], [0.36, 0.23, 0.15]], dtype=np.float32
)
DARK_HAIR = np.array([0.12, 0.08, 0.05], dtype=np.float32)
GREY_HAIR = np.array([0.86, 0.86, 0.88], dtype=np.float32)


@dataclass
class Portraits:
    """A batch of rendered portraits.

    Attributes:
        images: ``(N, 3, S, S)`` float32 in ``[0, 1]``.
        traits: trait name -> ``(N,)`` int64 class indices (see ``TRAITS``).
        boxes: ``(N, 4)`` float32 face boxes ``(x0, y0, x1, y1)`` in pixels (head and hair);
            zeros for images without a figure.
        scene: name -> ``(N, d)`` float32 scene parameters, each scaled to about ``[0, 1]`` (see
            ``SCENE_PARAMETERS``): what an image shows besides the traits.
        has_figure: ``(N,)`` bool, ``False`` for empty scenes.
    """

    images: np.ndarray
    traits: dict[str, np.ndarray]
    boxes: np.ndarray
    scene: dict[str, np.ndarray] | None = None
    has_figure: np.ndarray | None = None


# Scene parameters returned by ``render`` (name -> number of values), each scaled to about [0, 1]:
# the head's centre, size and pose (yaw), the lighting, the two background colours, the shirt colour,
# the background object (present or not, colour, position, size; colour and geometry are zero when it
# is absent).
SCENE_PARAMETERS = {
    "head_x": 1, "head_y": 1, "head_size": 1, "yaw": 1, "light": 1,
    "background_top": 3, "background_bottom": 3, "shirt": 3,
    "object_present": 1, "object_colour": 3, "object_box": 4,
}


def random_traits(num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Traits drawn uniformly and independently."""
    return {name: rng.integers(0, len(classes), num) for name, classes in TRAITS.items()}


def render(
    traits: dict[str, np.ndarray],
    seed: int | np.random.Generator,
    size: int = 32,
    figure: bool | np.ndarray = True,
) -> Portraits:
    """Render one portrait per entry of ``traits`` (each an ``(N,)`` array of class indices).

    The scene (position, pose, colours) is drawn from ``seed``; the same seed and traits always give
    the same images. ``figure`` (a bool, or an ``(N,)`` bool array) leaves the figure out where it is
    ``False``: the same background and object, no person; such images get a zero box. The random draws
    do not depend on ``figure``, so the other images are unchanged.
    """
    for name in TRAITS:
        if name not in traits:
            raise ValueError(f"missing trait {name!r}; expected {sorted(TRAITS)}")
    n = len(traits["hair_length"])
    has_figure = np.broadcast_to(np.asarray(figure, dtype=bool), (n,)).copy()
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    s2 = 2 * size
    unit = s2 / 32.0  # geometry below is in 32-pixel units

    def param(low, high):
        return rng.uniform(low, high, (n, 1, 1)).astype(np.float32)

    # Scene parameters.
    cx, cy = param(11, 21) * unit, param(10, 15) * unit
    r = param(5.0, 7.0) * unit
    rx = 0.85 * r
    yaw = param(-1, 1)
    light = param(0.93, 1.07)
    bg_top, bg_bottom = rng.uniform(0, 1, (n, 3)), rng.uniform(0, 1, (n, 3))
    shirt = rng.uniform(0.05, 0.95, (n, 3))
    obj_colour = rng.uniform(0, 1, (n, 3))
    ox, oy = param(0, 26) * unit, param(0, 20) * unit
    ow, oh = param(3, 8) * unit, param(3, 10) * unit
    has_obj = rng.uniform(0, 1, (n, 1, 1)) < 0.6
    hair_jitter = rng.uniform(-0.04, 0.04, (n, 3))
    tone_jitter = rng.uniform(-0.02, 0.02, (n, 3))

    y, x = np.mgrid[0:s2, 0:s2].astype(np.float32) + 0.5
    y, x = y[None], x[None]

    def paint(canvas, mask, colour):
        # canvas (N, 3, H, W); mask (N, H, W) bool; colour (N, 3)
        return np.where(mask[:, None], colour[:, :, None, None], canvas)

    person = has_figure[:, None, None]

    t = (y / s2)[:, None]  # (1, 1, H, W)
    img = bg_top[:, :, None, None] * (1 - t) + bg_bottom[:, :, None, None] * t
    img = paint(img, has_obj & (abs(x - ox - ow / 2) < ow / 2) & (abs(y - oy - oh / 2) < oh / 2), obj_colour)

    long_hair = (traits["hair_length"] == 1)[:, None, None]
    hair = np.where((traits["hair_colour"] == 1)[:, None], GREY_HAIR, DARK_HAIR) + hair_jitter
    skin = SKIN_TONES[traits["skin_tone"]] + tone_jitter

    # Shoulders, long hair behind the head, neck, head, hair cap, eyes, mouth.
    shoulders = ((x - cx) / (2.1 * r)) ** 2 + ((y - (cy + 2.3 * r)) / (1.3 * r)) ** 2 < 1
    img = paint(img, person & shoulders, shirt)
    behind = long_hair & (abs(x - cx) < 1.3 * rx) & (y > cy - 0.6 * r) & (y < cy + 1.7 * r)
    img = paint(img, person & behind, hair)
    neck = (abs(x - cx) < 0.35 * r) & (y > cy) & (y < cy + 1.4 * r)
    img = paint(img, person & neck, skin)
    head = ((x - cx) / rx) ** 2 + ((y - cy) / r) ** 2 < 1
    img = paint(img, person & head, skin)
    cap = (((x - cx) / (1.12 * rx)) ** 2 + ((y - cy + 0.08 * r) / (1.1 * r)) ** 2 < 1) & (y < cy - 0.4 * r)
    img = paint(img, person & cap, hair)
    eye_x = cx + yaw * 0.25 * rx
    eye_y = cy - 0.05 * r
    eye_r = 0.14 * r
    eyes = ((x - (eye_x - 0.38 * rx)) ** 2 + (y - eye_y) ** 2 < eye_r**2) | (
        (x - (eye_x + 0.38 * rx)) ** 2 + (y - eye_y) ** 2 < eye_r**2
    )
    img = paint(img, person & eyes, np.full((n, 3), 0.05, np.float32))
    mouth = (abs(x - eye_x) < 0.3 * rx) & (abs(y - (cy + 0.5 * r)) < 0.07 * r + 0.5)
    img = paint(img, person & mouth, np.tile(np.array([[0.55, 0.15, 0.15]], np.float32), (n, 1)))

    img = np.clip(img * light[:, None], 0, 1)
    img = img.reshape(n, 3, size, 2, size, 2).mean(axis=(3, 5)).astype(np.float32)

    top = cy - 1.1 * r
    bottom = np.where(long_hair, cy + 1.7 * r, cy + r)
    half = np.where(long_hair, 1.3 * rx, 1.12 * rx)
    boxes = np.concatenate([cx - half, top, cx + half, bottom], axis=2)[:, 0] / 2  # back to output pixels
    boxes = np.clip(boxes, 0, size).astype(np.float32)
    boxes[~has_figure] = 0

    def flat(a):
        return a.reshape(n, -1).astype(np.float32)

    present = flat(has_obj)
    scene = {
        "head_x": flat(cx / s2), "head_y": flat(cy / s2), "head_size": flat((r / unit - 5.0) / 2.0),
        "yaw": flat((yaw + 1) / 2), "light": flat((light - 0.93) / 0.14),
        "background_top": flat(bg_top), "background_bottom": flat(bg_bottom), "shirt": flat(shirt),
        "object_present": present, "object_colour": flat(obj_colour) * present,
        "object_box": np.concatenate([flat(ox), flat(oy), flat(ow), flat(oh)], axis=1) / s2 * present,
    }
    return Portraits(
        images=img,
        traits={k: np.asarray(v, dtype=np.int64) for k, v in traits.items()},
        boxes=boxes,
        scene=scene,
        has_figure=has_figure,
    )


def scene_vector(scene: dict[str, np.ndarray]) -> np.ndarray:
    """The scene parameters of ``Portraits.scene`` as one ``(N, D)`` float32 array, in ``SCENE_PARAMETERS`` order."""
    missing = [name for name in SCENE_PARAMETERS if name not in scene]
    if missing:
        raise ValueError(f"scene lacks parameters {missing}")
    return np.concatenate([scene[name] for name in SCENE_PARAMETERS], axis=1).astype(np.float32)
