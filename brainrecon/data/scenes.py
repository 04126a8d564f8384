"""Procedural stimuli for the simulated subject: coloured shapes on textured backgrounds, with captions.

A `Scene` is a small symbolic description (background + 1-4 objects). It is rendered to pixels by
`render_scene`, described in words by `scene_captions` (5 per image, like COCO) and summarised as a
fixed-length vector by `scene_semantics`, which drives the simulated higher visual areas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ("circle", "square", "triangle", "star", "cross", "ring", "bar", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "pink": (245, 130, 190),
    "brown": (130, 80, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = {"small": 0.08, "medium": 0.14, "large": 0.21}  # radius as a fraction of the image side
SIZE_NAMES = tuple(SIZES)
BACKGROUNDS = (
    "plain",
    "vertical gradient",
    "horizontal gradient",
    "radial gradient",
    "stripes",
    "checker",
    "noise",
)
MAX_OBJECTS = 4

_PLURALS = {"cross": "crosses"}
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class SceneObject:
    category: str
    colour: str
    size: str
    x: float  # centre, fraction of the image width (0 = left)
    y: float  # centre, fraction of the image height (0 = top)
    angle: float  # rotation in degrees


@dataclass(frozen=True)
class Scene:
    background: str  # one of BACKGROUNDS
    background_colours: tuple[str, str]  # colour names; the second is unused by "plain"
    pattern_angle: float  # stripe / checker orientation in degrees
    pattern_period: float  # stripe / checker / noise scale, fraction of the image side
    texture_seed: int  # makes the noise texture a pure function of the scene
    objects: tuple[SceneObject, ...]

    @property
    def count(self) -> int:
        return len(self.objects)


def draw_scene(rng: np.random.Generator) -> Scene:
    """Draw a random scene: 1-4 objects that share a category (and often a colour) about half the time."""
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    mode = rng.choice(["same", "same category", "mixed"], p=[0.3, 0.2, 0.5])
    category, colour, size = rng.choice(CATEGORIES), rng.choice(COLOUR_NAMES), rng.choice(SIZE_NAMES)
    objects = []
    for _ in range(count):
        if mode == "mixed":
            category, colour, size = rng.choice(CATEGORIES), rng.choice(COLOUR_NAMES), rng.choice(SIZE_NAMES)
        elif mode == "same category":
            colour, size = rng.choice(COLOUR_NAMES), rng.choice(SIZE_NAMES)
        x, y = rng.uniform(0.12, 0.88, size=2)
        objects.append(
            SceneObject(
                str(category),
                str(colour),
                str(size),
                round(float(x), 4),
                round(float(y), 4),
                round(float(rng.uniform(0, 360)), 2),
            )
        )
    c0, c1 = rng.choice(COLOUR_NAMES, size=2, replace=False)
    return Scene(
        background=str(rng.choice(BACKGROUNDS)),
        background_colours=(str(c0), str(c1)),
        pattern_angle=round(float(rng.uniform(0, 180)), 2),
        pattern_period=round(float(rng.uniform(0.06, 0.25)), 4),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
        objects=tuple(objects),
    )


# ---------------------------------------------------------------- rendering


def _muted(name: str) -> np.ndarray:
    # Backgrounds are pulled towards grey so that objects of the same colour name still stand out.
    return 0.65 * np.asarray(COLOURS[name], dtype=np.float32) + 0.35 * 128.0


def _background(scene: Scene, n: int) -> np.ndarray:
    """(n, n, 3) float32 RGB in [0, 255]."""
    c0, c1 = (_muted(c) for c in scene.background_colours)
    u = (np.arange(n, dtype=np.float32) + 0.5) / n
    yy, xx = u[:, None], u[None, :]  # broadcast instead of full grids: this runs for every stimulus
    kind = scene.background
    if kind == "plain":
        t = np.zeros((1, 1), dtype=np.float32)
    elif kind == "vertical gradient":
        t = yy
    elif kind == "horizontal gradient":
        t = xx
    elif kind == "radial gradient":
        t = np.minimum(np.hypot(xx - 0.5, yy - 0.5) / 0.7071, 1)
    elif kind in ("stripes", "checker"):
        a = np.deg2rad(scene.pattern_angle)
        along = np.floor((xx * np.cos(a) + yy * np.sin(a)) / scene.pattern_period)
        if kind == "checker":
            along += np.floor((yy * np.cos(a) - xx * np.sin(a)) / scene.pattern_period)
        t = (along % 2).astype(np.float32)
    elif kind == "noise":
        k = max(2, round(1 / scene.pattern_period))
        coarse = np.random.default_rng(scene.texture_seed).random((k, k)).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse, mode="F").resize((n, n), Image.Resampling.BICUBIC))
        t = np.clip(t, 0, 1)
    else:
        raise ValueError(f"unknown background kind {kind!r}; expected one of {BACKGROUNDS}")
    rgb = np.ascontiguousarray(np.broadcast_to(t, (n, n)), dtype=np.float32)[..., None] * (c1 - c0)
    rgb += c0
    return rgb


def _polygon(
    cx: float, cy: float, radii: np.ndarray, angles: np.ndarray, rot: float
) -> list[tuple[float, float]]:
    a = angles + np.deg2rad(rot)
    return list(zip((cx + radii * np.cos(a)).tolist(), (cy + radii * np.sin(a)).tolist(), strict=True))


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, n: int) -> None:
    cx, cy, r = obj.x * n, obj.y * n, SIZES[obj.size] * n
    fill = COLOURS[obj.colour]
    cat = obj.category
    if cat == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif cat == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(0.35 * r)))
    elif cat == "square":
        # Squares stay near upright so they do not read as diamonds.
        corners = np.deg2rad([45, 135, 225, 315])
        draw.polygon(_polygon(cx, cy, np.full(4, r), corners, (obj.angle % 30) - 15), fill=fill)
    elif cat == "diamond":
        draw.polygon(
            _polygon(cx, cy, np.array([r, 0.6 * r, r, 0.6 * r]), np.deg2rad([-90, 0, 90, 180]), 0), fill=fill
        )
    elif cat == "triangle":
        draw.polygon(_polygon(cx, cy, np.full(3, r), np.deg2rad([-90, 30, 150]), obj.angle), fill=fill)
    elif cat == "star":
        radii = np.tile([r, 0.45 * r], 5)
        draw.polygon(_polygon(cx, cy, radii, np.deg2rad(np.arange(10) * 36 - 90), obj.angle), fill=fill)
    elif cat == "cross":
        w = 0.3 * r
        xs = np.array([w, w, r, r, w, w, -w, -w, -r, -r, -w, -w])
        ys = np.array([r, w, w, -w, -w, -r, -r, -w, -w, w, w, r])
        draw.polygon(_polygon(cx, cy, np.hypot(xs, ys), np.arctan2(ys, xs), obj.angle), fill=fill)
    elif cat == "bar":
        xs, ys = np.array([r, r, -r, -r]) * 1.1, np.array([0.25, -0.25, -0.25, 0.25]) * r
        draw.polygon(_polygon(cx, cy, np.hypot(xs, ys), np.arctan2(ys, xs), obj.angle), fill=fill)
    else:
        raise ValueError(f"unknown category {cat!r}; expected one of {CATEGORIES}")


def render_scene(scene: Scene, size: int) -> np.ndarray:
    """(size, size, 3) uint8. Drawn at twice the size and box-downsampled, which antialiases the edges."""
    n = 2 * size
    background = _background(scene, n)
    canvas = Image.fromarray(np.rint(background, out=background).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw_object(draw, obj, n)
    return np.asarray(canvas.reduce(2))


# ---------------------------------------------------------------- captions


def _plural(category: str, n: int) -> str:
    return category if n == 1 else _PLURALS.get(category, category + "s")


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _groups(scene: Scene, with_size: bool) -> list[tuple[int, str]]:
    """[(count, "large red")...] phrase stems in order of first appearance, objects merged when alike."""
    counts: dict[tuple[str, ...], int] = {}
    for o in scene.objects:
        key = (o.size, o.colour, o.category) if with_size else (o.colour, o.category)
        counts[key] = counts.get(key, 0) + 1
    return [(n, " ".join((*key[:-1], _plural(key[-1], n)))) for key, n in counts.items()]


def _object_phrase(scene: Scene, with_size: bool, numeral_one: bool = False) -> str:
    parts = [
        (f"one {stem}" if numeral_one else _with_article(stem)) if n == 1 else f"{_NUMBER_WORDS[n]} {stem}"
        for n, stem in _groups(scene, with_size)
    ]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _background_phrase(scene: Scene) -> str:
    c0, c1 = scene.background_colours
    return _with_article(
        {
            "plain": f"plain {c0} background",
            "vertical gradient": f"{c0} to {c1} gradient",
            "horizontal gradient": f"{c0} and {c1} horizontal gradient",
            "radial gradient": f"radial {c0} and {c1} gradient",
            "stripes": f"striped {c0} and {c1} background",
            "checker": f"{c0} and {c1} checkerboard",
            "noise": f"noisy {c0} and {c1} texture",
        }[scene.background]
    )


def _where(scene: Scene) -> str:
    x = float(np.mean([o.x for o in scene.objects]))
    y = float(np.mean([o.y for o in scene.objects]))
    vertical = "top" if y < 0.4 else "bottom" if y > 0.6 else ""
    horizontal = "left" if x < 0.4 else "right" if x > 0.6 else ""
    spot = " ".join(w for w in (vertical, horizontal) if w)
    return f"near the {spot}" if spot else "in the middle"


def scene_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Exactly 5 different captions, each naming the objects' categories, colours and counts."""
    objs = _object_phrase(scene, with_size=True)
    objs_short = _object_phrase(scene, with_size=False)
    bg = _background_phrase(scene)
    n = scene.count
    total = "one shape" if n == 1 else f"{_NUMBER_WORDS[n]} shapes"
    templates = [
        f"{objs} on {bg}",
        f"a picture of {objs} over {bg}",
        f"{objs_short} against {bg}",
        f"{total} on {bg}: {_object_phrase(scene, with_size=False, numeral_one=True)}",
        f"an image showing {objs} {_where(scene)}",
        f"{bg} with {objs_short}",
        f"there {'is' if n == 1 else 'are'} {objs} on {bg}",
        f"a simple drawing of {objs_short}, {total} in all",
    ]
    # Each template has its own fixed words, so any 5 of them are different captions. One of the two that
    # state the total is always among them: "a red circle and a blue star" alone never says "two".
    says_total = [3, 7]
    others = [i for i in range(len(templates)) if i not in says_total]
    picked = [int(rng.choice(says_total)), *rng.choice(others, size=4, replace=False).tolist()]
    return [templates[i] for i in sorted(picked)]


# ---------------------------------------------------------------- semantics


SEMANTIC_NAMES: tuple[str, ...] = (
    *(f"count_{c}" for c in CATEGORIES),
    *(f"has_{c}" for c in CATEGORIES),
    *(f"colour_{c}" for c in COLOUR_NAMES),
    *(f"n_objects_{k}" for k in range(1, MAX_OBJECTS + 1)),
    *(f"size_{s}" for s in SIZE_NAMES),
    "mean_size",
    *(f"background_{b.replace(' ', '_')}" for b in BACKGROUNDS),
)


def scene_semantics(scene: Scene) -> np.ndarray:
    """(len(SEMANTIC_NAMES),) float32: what is in the scene, not where (names in SEMANTIC_NAMES)."""
    n = scene.count
    cat_counts = np.array([sum(o.category == c for o in scene.objects) for c in CATEGORIES], dtype=np.float32)
    colour_hist = (
        np.array([sum(o.colour == c for o in scene.objects) for c in COLOUR_NAMES], dtype=np.float32) / n
    )
    size_hist = np.array([sum(o.size == s for o in scene.objects) for s in SIZE_NAMES], dtype=np.float32) / n
    n_onehot = np.eye(MAX_OBJECTS, dtype=np.float32)[n - 1]
    mean_size = np.float32(np.mean([SIZE_NAMES.index(o.size) / (len(SIZE_NAMES) - 1) for o in scene.objects]))
    background = np.eye(len(BACKGROUNDS), dtype=np.float32)[BACKGROUNDS.index(scene.background)]
    vec = np.concatenate(
        [
            cat_counts,
            (cat_counts > 0).astype(np.float32),
            colour_hist,
            n_onehot,
            size_hist,
            [mean_size],
            background,
        ]
    )
    assert vec.shape == (len(SEMANTIC_NAMES),), vec.shape
    return vec
