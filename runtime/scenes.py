"""Procedural scenes with captions: the data of the shapes models, their held-out prompts and their ground truth.

A scene is one or two coloured shapes on a coloured background, drawn deterministically from an index, with a
caption that says what is drawn ("a large red circle and a small blue square on a white background"). Each shape
has four attributes — shape, colour, size, and the scene's background — and a caption names them all, so a
single-shape caption has exactly one right answer per attribute (what `evaluate` scores).

Held-out split: a fixed tenth of the single-shape attribute combinations (shape, colour, size, background) never
appears in a training scene, not even as one of two shapes; evaluation prompts are drawn from those combinations
only, so a score measures composition of seen attributes, not recall of seen captions.

Torch-free (PIL + the standard library): the runtime's `evaluate` renders reference scenes with it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache

from PIL import Image, ImageDraw

from .errors import UserError

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "pink": (240, 130, 180),
    "brown": (130, 80, 40),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "ring")
SIZES = ("small", "large")
RADIUS = {"small": (0.1, 0.18), "large": (0.22, 0.32)}  # fraction of the image side
# The attributes of a single-shape scene, each with its closed set of values (the classifier's heads, in order).
ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "background": tuple(COLORS)}
HELD_OUT_FRACTION = 0.1
_CAPTION = re.compile(r"^a (\w+) (\w+) (\w+) on an? (\w+) background$")


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    size: str
    cx: float  # centre, fraction of the image side
    cy: float
    radius: float


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    @property
    def caption(self) -> str:
        things = " and ".join(f"a {s.size} {s.color} {s.shape}" for s in self.shapes)
        return f"{things} on a {self.background} background"

    def attributes(self) -> dict[str, str]:
        """The single-shape ground truth {shape, color, size, background}."""
        if len(self.shapes) != 1:
            raise ValueError("attributes are defined for single-shape scenes")
        s = self.shapes[0]
        return {"shape": s.shape, "color": s.color, "size": s.size, "background": self.background}

    def render(self, resolution: int) -> Image.Image:
        image = Image.new("RGB", (resolution, resolution), COLORS[self.background])
        draw = ImageDraw.Draw(image)
        for s in self.shapes:
            x, y, r = s.cx * resolution, s.cy * resolution, s.radius * resolution
            box = (x - r, y - r, x + r, y + r)
            fill = COLORS[s.color]
            if s.shape == "circle":
                draw.ellipse(box, fill=fill)
            elif s.shape == "square":
                draw.rectangle(box, fill=fill)
            elif s.shape == "triangle":
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
            else:
                draw.ellipse(box, outline=fill, width=max(1, round(r / 3)))
        return image


def all_combinations() -> list[tuple[str, str, str, str]]:
    """Every valid (shape, colour, size, background): the shape's colour differs from the background."""
    return [
        (shape, color, size, bg)
        for shape in SHAPES
        for color in COLORS
        for size in SIZES
        for bg in COLORS
        if color != bg
    ]


@cache
def held_out_combinations() -> frozenset[tuple[str, str, str, str]]:
    """A fixed tenth of the combinations, the same on every machine (a seeded shuffle of a sorted list)."""
    combos = all_combinations()
    random.Random(20261129).shuffle(combos)
    return frozenset(combos[: round(len(combos) * HELD_OUT_FRACTION)])


def _random_shape(rng: random.Random, shape: str, color: str, size: str) -> Shape:
    radius = rng.uniform(*RADIUS[size])
    return Shape(shape, color, size, rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius), radius)


def training_scene(seed: int, index: int, max_shapes: int = 2) -> Scene:
    """Scene `index` of the training stream: 1..max_shapes shapes, no held-out combination anywhere."""
    rng = random.Random(seed * 1_000_003 + index)  # ints seed deterministically: the same scene on every rank
    held_out = held_out_combinations()
    names = list(COLORS)
    background = rng.choice(names)
    shapes = []
    for _ in range(rng.randint(1, max_shapes)):
        while True:  # rejection keeps every other combination equally likely
            combo = (rng.choice(SHAPES), rng.choice([c for c in names if c != background]), rng.choice(SIZES))
            if (*combo, background) not in held_out:
                break
        shapes.append(_random_shape(rng, *combo))
    return Scene(background, tuple(shapes))


def evaluation_scenes(count: int, seed: int = 0) -> list[Scene]:
    """`count` single-shape scenes from the held-out combinations (cycled in a seeded order when count exceeds
    them), each with its own seeded placement: the reference renders of the evaluation prompts."""
    if count < 1:
        raise UserError(f"--prompts must be >= 1, got {count}")
    combos = sorted(held_out_combinations())
    random.Random(seed).shuffle(combos)
    scenes = []
    for i in range(count):
        shape, color, size, background = combos[i % len(combos)]
        rng = random.Random(seed * 1_000_003 + 7_919 * (i + 1))
        scenes.append(Scene(background, (_random_shape(rng, shape, color, size),)))
    return scenes


def parse_caption(caption: str) -> dict[str, str]:
    """'a large red circle on a white background' -> {shape, color, size, background}; a clear error otherwise."""
    m = _CAPTION.match(caption.strip().lower())
    if not m or m[1] not in SIZES or m[2] not in COLORS or m[3] not in SHAPES or m[4] not in COLORS:
        raise UserError(
            f"prompt {caption!r} is not a single-shape scene caption "
            f"('a SIZE COLOUR SHAPE on a COLOUR background', e.g. 'a large red circle on a white background')"
        )
    return {"shape": m[3], "color": m[2], "size": m[1], "background": m[4]}
