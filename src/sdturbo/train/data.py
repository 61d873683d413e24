"""Procedural captioned shapes: the seeded, endless training stream of sdturbo-mini, and its held-out prompts.

Every example is a pure function of (seed, index): one to three shapes (circle, square, triangle) in eight named
colours and two sizes, placed to make a stated relation true, over a plain named or a varied background. Each
example carries its ground truth (shape, colour, size, position per object) for training an evaluation classifier.
Ranks of a distributed run read disjoint indices of the same stream, so no data is sharded on disk."""

from __future__ import annotations

import colorsys
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 65, 220),
    "yellow": (245, 220, 30),
    "orange": (245, 135, 20),
    "purple": (135, 45, 175),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUND_COLORS = {**COLORS, "gray": (128, 128, 128)}  # plain backgrounds; gray is never an object colour
VARIED = "varied"  # a gradient with texture, never named in captions
SIZES = {"small": 0.2, "large": 0.36}  # object extent, as a fraction of the image side
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PREFIXES = ("a picture of ", "an image of ", "a drawing of ")
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, for anti-aliased edges
COLOR_JITTER = 12  # per-channel jitter of object colours, so a colour name covers a small region


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    center: tuple[float, float]  # (x, y) as fractions of width and height, y downwards

    @property
    def extent(self) -> float:
        return SIZES[self.size]

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) as fractions of the image side."""
        half = self.extent / 2
        return (self.center[0] - half, self.center[1] - half, self.center[0] + half, self.center[1] + half)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str  # a BACKGROUND_COLORS name, or VARIED
    relation: str | None  # two objects: objects[0] <relation> objects[1]; otherwise None


@dataclass(frozen=True)
class Example:
    image: torch.Tensor  # [3, H, W] float32 in [-1, 1]
    caption: str
    scene: Scene


@dataclass(frozen=True)
class Batch:
    image: torch.Tensor  # [B, 3, H, W] float32 in [-1, 1]
    captions: list[str]
    scenes: list[Scene]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _distinct_objects(rng: np.random.Generator, count: int, background: str) -> list[tuple[str, str, str]]:
    """(shape, colour, size) triples with distinct (shape, colour), so every caption names each object uniquely."""
    colors = [c for c in COLORS if c != background]
    chosen: list[tuple[str, str, str]] = []
    while len(chosen) < count:
        shape, color = str(rng.choice(SHAPES)), str(rng.choice(colors))
        if all((shape, color) != (s, c) for s, c, _ in chosen):
            chosen.append((shape, color, str(rng.choice(list(SIZES)))))
    return chosen


def _place_pair(rng: np.random.Generator, relation: str, extents: tuple[float, float]) -> list[tuple[float, float]]:
    """Centres for objects 0 and 1 such that 0 is <relation> 1: each in its own half along the relation's axis, the
    other coordinate close, so the relation is the obvious description."""
    first_low = relation in ("left of", "above")  # object 0 is in the low half (left or top)
    main, cross = [], []
    for i, extent in enumerate(extents):
        half = extent / 2
        in_low_half = (i == 0) == first_low
        lo, hi = (half + 0.02, 0.5 - half) if in_low_half else (0.5 + half, 1 - half - 0.02)
        main.append(rng.uniform(lo, max(lo, hi)))
    margin = max(extents) / 2 + 0.02
    cross0 = rng.uniform(margin, 1 - margin)
    cross = [cross0, float(np.clip(cross0 + rng.uniform(-0.1, 0.1), margin, 1 - margin))]
    if relation in ("left of", "right of"):
        return [(main[i], cross[i]) for i in range(2)]
    return [(cross[i], main[i]) for i in range(2)]


def _place_free(rng: np.random.Generator, extents: list[float]) -> list[tuple[float, float]]:
    """Centres in distinct quadrants, jittered so that objects never overlap."""
    quadrants = rng.permutation(4)[: len(extents)]
    centres = []
    for q, extent in zip(quadrants, extents):
        slack = max(0.0, 0.25 - extent / 2 - 0.01)
        base = (0.25 + 0.5 * (q % 2), 0.25 + 0.5 * (q // 2))
        centres.append((base[0] + rng.uniform(-slack, slack), base[1] + rng.uniform(-slack, slack)))
    return centres


def sample_scene(rng: np.random.Generator) -> Scene:
    count = int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))
    background = str(rng.choice(list(BACKGROUND_COLORS))) if rng.random() < 0.6 else VARIED
    specs = _distinct_objects(rng, count, background)
    extents = [SIZES[size] for _, _, size in specs]
    relation = None
    if count == 1:
        half = extents[0] / 2 + 0.02
        centres = [(rng.uniform(half, 1 - half), rng.uniform(half, 1 - half))]
    elif count == 2:
        relation = str(rng.choice(RELATIONS))
        centres = _place_pair(rng, relation, (extents[0], extents[1]))
    else:
        centres = _place_free(rng, extents)
    objects = tuple(
        ShapeObject(shape, color, size, (float(x), float(y))) for (shape, color, size), (x, y) in zip(specs, centres)
    )
    return Scene(objects, background, relation)


def describe_object(obj: ShapeObject, with_size: bool) -> str:
    words = ([obj.size] if with_size else []) + [obj.color, obj.shape]
    return f"{article(words[0])} {' '.join(words)}"


def caption_scene(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """A caption drawn from the templates; rng=None gives the canonical one (all sizes, the plain background,
    relations as stated, no prefix). Forms: "a red circle", "a large blue square", "a green triangle on a black
    background", "a red circle left of a blue square" (right of / above / below), "a red circle, a blue square and
    a green triangle"."""
    canonical = rng is None
    with_size = [canonical or rng.random() < 0.5 for _ in scene.objects]
    phrases = [describe_object(obj, s) for obj, s in zip(scene.objects, with_size)]
    if scene.relation is not None:
        if not canonical and rng.random() < 0.5:  # the same fact stated from the other object
            text = f"{phrases[1]} {INVERSE_RELATION[scene.relation]} {phrases[0]}"
        else:
            text = f"{phrases[0]} {scene.relation} {phrases[1]}"
    elif len(phrases) == 1:
        text = phrases[0]
    else:
        text = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if scene.background != VARIED and (canonical or rng.random() < 0.5):
        text += f" on {article(scene.background)} {scene.background} background"
    if not canonical and rng.random() < 0.2:
        text = str(rng.choice(PREFIXES)) + text
    return text


@dataclass(frozen=True)
class PromptSpec:
    """What a caption asserts: (shape, colour, size or None) per object in caption order, the relation, the plain
    background (None when unstated)."""

    objects: tuple[tuple[str, str, str | None], ...]
    relation: str | None
    background: str | None


_OBJECT = r"an? (?:(small|large) )?(\w+) (circle|square|triangle)"
_BACKGROUND = r"(?: on an? (\w+) background)?"
_PREFIX = "(?:" + "|".join(PREFIXES) + ")?"


def parse_caption(caption: str) -> PromptSpec:
    """Invert caption_scene: what the caption says, for checking generated images against their prompt."""
    relation = "|".join(RELATIONS)
    patterns = (
        (rf"{_PREFIX}{_OBJECT} ({relation}) {_OBJECT}{_BACKGROUND}", "relation"),
        (rf"{_PREFIX}{_OBJECT}, {_OBJECT} and {_OBJECT}{_BACKGROUND}", "three"),
        (rf"{_PREFIX}{_OBJECT}{_BACKGROUND}", "one"),
    )
    for pattern, form in patterns:
        match = re.fullmatch(pattern, caption)
        if match is None:
            continue
        groups = match.groups()
        if form == "relation":
            objects = (groups[0:3], groups[4:7])
            return PromptSpec(tuple(_spec(o) for o in objects), groups[3], groups[7])
        objects = [groups[i : i + 3] for i in range(0, len(groups) - 1, 3)]
        return PromptSpec(tuple(_spec(o) for o in objects), None, groups[-1])
    raise ValueError(f"not a shapes caption: {caption!r}")


def _spec(groups: tuple[str | None, ...]) -> tuple[str, str, str | None]:
    size, color, shape = groups
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r}")
    return (shape, color, size)


def scene_satisfies(scene: Scene, spec: PromptSpec) -> bool:
    """Whether a scene makes the caption true (the relation may be stated from either object)."""
    if spec.background is not None and spec.background != scene.background:
        return False
    if len(spec.objects) != len(scene.objects):
        return False
    objects = {(o.shape, o.color): o for o in scene.objects}
    for shape, color, size in spec.objects:
        obj = objects.get((shape, color))
        if obj is None or (size is not None and size != obj.size):
            return False
    if spec.relation is None:
        return scene.relation is None
    a, b = (objects[(shape, color)] for shape, color, _ in spec.objects)
    order = (a, b) if (a, b) == scene.objects else (b, a)
    stated = spec.relation if order == (a, b) else INVERSE_RELATION[spec.relation]
    return stated == scene.relation


# Evaluation prompts, one of every form; captions equal to these never occur in the training stream.
HELDOUT_PROMPTS = (
    "a yellow triangle",
    "a purple square",
    "an orange circle",
    "a white triangle",
    "a small green square",
    "a large red triangle",
    "a small black circle",
    "a large purple circle",
    "a blue circle on a yellow background",
    "a white square on a purple background",
    "an orange triangle on a gray background",
    "a large black triangle on a white background",
    "a yellow square left of a purple triangle",
    "a green circle right of an orange square",
    "a white circle above a red triangle",
    "a blue triangle below a yellow circle",
    "a small red square left of a large green circle",
    "a large orange circle above a small blue square on a white background",
    "a purple circle, a green triangle and a yellow square",
    "a red triangle, a white circle and a blue square on a black background",
)
_HELDOUT = frozenset(HELDOUT_PROMPTS)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject, side: int, rgb: tuple[int, int, int]) -> None:
    left, top, right, bottom = (v * side for v in obj.box)
    if obj.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=rgb)
    elif obj.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=rgb)
    else:  # upright isosceles triangle filling the box
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=rgb)


def _varied_background(rng: np.random.Generator, side: int) -> np.ndarray:
    """A muted two-colour linear gradient with mild noise: [side, side, 3] float."""
    ends = [
        np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.35), rng.uniform(0.35, 0.75))) * 255
        for _ in range(2)
    ]
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:side, 0:side] / max(side - 1, 1)
    ramp = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[..., None]
    return ends[0] * (1 - ramp) + ends[1] * ramp + rng.normal(0, 6, (side, side, 3))


def render_scene(scene: Scene, size_px: int, rng: np.random.Generator) -> np.ndarray:
    """The scene as uint8 pixels [size_px, size_px, 3]; rng supplies background texture and colour jitter."""
    big = size_px * SUPERSAMPLE
    if scene.background == VARIED:
        canvas = _varied_background(rng, big)
    else:
        canvas = np.broadcast_to(np.array(BACKGROUND_COLORS[scene.background], dtype=np.float64), (big, big, 3))
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLORS[obj.color]) + jitter, 0, 255))
        _draw_shape(draw, obj, big, rgb)
    return np.asarray(image.resize((size_px, size_px), Image.Resampling.BOX))


def pixels_to_image(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1


@dataclass(frozen=True)
class ShapesStream:
    """The endless stream: example(i) depends only on (seed, i). Rank r of world_size reads, at step k, indices
    (k * world_size + r) * batch_size + 0..batch_size-1, so ranks never see the same example."""

    seed: int
    size_px: int = 64

    def example(self, index: int) -> Example:
        rng = np.random.default_rng([self.seed, index])
        while True:  # redraw the rare example whose caption is an evaluation prompt
            scene = sample_scene(rng)
            caption = caption_scene(scene, rng)
            if caption not in _HELDOUT:
                break
        return Example(pixels_to_image(render_scene(scene, self.size_px, rng)), caption, scene)

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Batch:
        start = (step * world_size + rank) * batch_size
        examples = [self.example(start + i) for i in range(batch_size)]
        images = torch.stack([e.image for e in examples])
        return Batch(images, [e.caption for e in examples], [e.scene for e in examples])

    def batches(self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        step = start_step
        while True:
            yield self.batch(step, batch_size, rank, world_size)
            step += 1
