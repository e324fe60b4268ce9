"""Procedural toy-world scenes: 32x32 RGB images of 1-3 objects on a styled background, with an
exact boolean mask per object and a caption.

Geometry: pixel (i, j) covers [i, i+1) x [j, j+1), so a centre (y, x) is continuous and the
middle of pixel (i, j) is (i + 0.5, j + 0.5). Shapes are drawn 4x supersampled with PIL and
area-averaged, so edges are soft; an object's mask is "coverage >= 0.5". Radii and centres are
snapped to quarter pixels, which lets every drawn shape be cached as a reusable stamp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from . import vocab as V

SIZE = 32  # the model's resolution
SS = 4  # supersampling factor for drawing
GAP = 2  # free pixels kept between objects, so they never touch, even through soft edges
SINGLE_RADIUS = (5.0, 10.0)  # px at SIZE, one object in the scene
MULTI_RADIUS = (4.5, 7.5)  # px at SIZE, two or three objects
# Characters are a bit bigger: their inner part must stay recognisable.
SINGLE_CHAR_RADIUS = (6.0, 10.0)
MULTI_CHAR_RADIUS = (5.5, 7.5)


# ----------------------------------------------------------------------------------------------
# Shape geometry, in units of the object's radius r; y points down. Every outline is centred on
# its own centroid (a triangle's circumcentre is its centroid), so the judge can put a template
# at a blob's centroid.
# ----------------------------------------------------------------------------------------------

def _regular(n: int, radius: float) -> np.ndarray:
    """Vertices [n, 2] (x, y) of a regular n-gon with a vertex pointing up."""
    a = -math.pi / 2 + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(a), np.sin(a)], axis=1)


def _star(points: int = 5, outer: float = 1.25, inner_ratio: float = 0.5) -> np.ndarray:
    v = _regular(2 * points, outer)
    v[1::2] *= inner_ratio
    return v


# shape -> (outline, hole outline or None)
OUTLINES: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
    "circle": (_regular(48, 1.0), None),
    "square": (np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]), None),
    "triangle": (_regular(3, 1.2), None),
    "star": (_star(), None),
    "ring": (_regular(48, 1.0), _regular(48, 0.55)),
}


def _polygon_area(v: np.ndarray) -> float:
    x, y = v[:, 0], v[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# area of each shape at r = 1 (pixels = SHAPE_AREA[shape] * r**2)
SHAPE_AREA = {s: _polygon_area(o) - (_polygon_area(h) if h is not None else 0.0) for s, (o, h) in OUTLINES.items()}


def _grow(mask: np.ndarray, k: int) -> np.ndarray:
    """Dilate a bool mask by k pixels (3x3 square steps)."""
    m = mask
    for _ in range(k):
        v = m.copy()
        v[1:] |= m[:-1]
        v[:-1] |= m[1:]
        m = v.copy()
        m[:, 1:] |= v[:, :-1]
        m[:, :-1] |= v[:, 1:]
    return m


# Farthest reach of each outline (at r = 1): orders placement, biggest first.
SHAPE_REACH = {s: float(np.linalg.norm(o, axis=1).max()) for s, (o, _) in OUTLINES.items()}


@lru_cache(maxsize=32768)
def _stamp(shape: str, r4: int, fy4: int, fx4: int) -> tuple[np.ndarray, int]:
    """Coverage of `shape` with radius r4/4 px, centred fy4/4, fx4/4 px below/right of a pixel corner.

    Returns (coverage float32 [n, n] in [0, 1], e): the stamp's top-left pixel lies e pixels up
    and left of that corner. Read-only: it is shared by every caller.
    """
    r = r4 / 4
    outline, hole = OUTLINES[shape]
    e = math.ceil(float(np.abs(outline).max()) * r) + 1
    n = 2 * e
    canvas = Image.new("L", (n * SS, n * SS), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = e + fx4 / 4, e + fy4 / 4

    def pts(v):  # continuous px -> PIL's supersampled pixel-centre coordinates
        return [((cx + x * r) * SS - 0.5, (cy + y * r) * SS - 0.5) for x, y in v]

    draw.polygon(pts(outline), fill=255)
    if hole is not None:
        draw.polygon(pts(hole), fill=0)
    cov = np.asarray(canvas, np.float32).reshape(n, SS, n, SS).mean(axis=(1, 3)) / 255.0
    cov.setflags(write=False)
    return cov, e


def shape_coverage(shape: str, radius: float, centre: tuple[float, float], size: int = SIZE) -> np.ndarray:
    """Fraction of each pixel covered by the shape: float32 [size, size] in [0, 1]."""
    qy, qx = round(centre[0] * 4), round(centre[1] * 4)
    cov, e = _stamp(shape, max(1, round(radius * 4)), qy % 4, qx % 4)
    n = cov.shape[0]  # draw on a canvas with an n px margin, so the stamp never needs clipping
    out = np.zeros((size + 2 * n, size + 2 * n), np.float32)
    top, left = qy // 4 - e + n, qx // 4 - e + n
    if 0 <= top <= size + n and 0 <= left <= size + n:
        out[top:top + n, left:left + n] = cov
    return out[n:n + size, n:n + size]


@lru_cache(maxsize=32768)
def _footprint(shape: str, r4: int, fy4: int, fx4: int) -> tuple[np.ndarray, np.ndarray, int]:
    """For placement: (touched pixels, the same grown by GAP, offset e) of a `_stamp`, padded by GAP."""
    cov, e = _stamp(shape, r4, fy4, fx4)
    touched = np.pad(cov > 0, GAP)
    return touched, _grow(touched, GAP), e + GAP


@lru_cache(maxsize=4096)
def shape_extent(shape: str, radius: float) -> tuple[float, float, float, float]:
    """How far the shape reaches from its centre: (up, down, left, right) in px."""
    v = OUTLINES[shape][0] * radius
    return -float(v[:, 1].min()), float(v[:, 1].max()), -float(v[:, 0].min()), float(v[:, 0].max())


# ----------------------------------------------------------------------------------------------
# Backgrounds: a dim grey base with a lighter grey pattern, at a random phase
# ----------------------------------------------------------------------------------------------

STRIPE_PERIOD, STRIPE_WIDTH = 6, 2  # vertical or horizontal stripes
DOT_PERIOD, DOT_WIDTH = 6, 2  # 2x2 dots on a 6 px lattice
GRID_PERIOD = 8  # 1 px lines both ways


@lru_cache(maxsize=4096)
def _background_image(style: str, phase: tuple[int, int], vertical: bool, size: int):
    """(pattern bool [size, size], image float32 [size, size, 3]); read-only, shared."""
    pattern = background_pattern(style, phase, vertical, size)
    img = np.where(pattern[..., None], np.float32(V.BACKGROUND_PATTERN), np.float32(V.BACKGROUND_BASE))
    pattern.setflags(write=False)
    img.setflags(write=False)
    return pattern, img


def background_pattern(style: str, phase: tuple[int, int] = (0, 0), vertical: bool = True,
                       size: int = SIZE) -> np.ndarray:
    """bool [size, size]: True where the pattern grey goes. Periods scale with size / 32."""
    k = size / SIZE
    y, x = np.ogrid[:size, :size]
    y, x = y + phase[0], x + phase[1]
    if style == "plain":
        return np.zeros((size, size), bool)
    if style == "stripes":
        p, w = round(STRIPE_PERIOD * k), round(STRIPE_WIDTH * k)
        return np.broadcast_to((x if vertical else y) % p < w, (size, size)).copy()
    if style == "dots":
        p, w = round(DOT_PERIOD * k), round(DOT_WIDTH * k)
        return (y % p < w) & (x % p < w)
    if style == "grid":
        p, w = round(GRID_PERIOD * k), max(1, round(k))
        return (y % p < w) | (x % p < w)
    raise ValueError(f"unknown style {style!r}; known: {list(V.STYLES)}")


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------

@dataclass
class SceneObject:
    """One object. For a character, colour/shape are its body's and `parts` holds body and inner
    part as SceneObjects (body part mask excludes the inner part); `mask` covers the whole figure."""

    colour: str
    shape: str
    size: float  # radius r in px (a quarter-pixel multiple)
    centre: tuple[float, float]  # (y, x) in px
    mask: np.ndarray  # bool [H, W], coverage >= 0.5
    character: str | None = None
    parts: tuple[SceneObject, ...] = ()

    @property
    def label(self) -> str:
        return V.object_label(self.colour, self.shape, self.character)


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    objects: list[SceneObject]
    background: str  # style name
    caption: str
    pattern: np.ndarray = field(repr=False, default=None)  # bool [H, W]: pattern-grey pixels

    def items(self) -> tuple[str, ...]:
        """Sorted object labels ("red circle", "bobo"), the multiset the judge must reproduce."""
        return tuple(sorted(o.label for o in self.objects))


def _phrase(item, article: bool) -> str:
    if isinstance(item, SceneObject):
        item = item.character or (item.colour, item.shape)
    if isinstance(item, str):  # characters are names: no article
        return item
    colour, shape = item
    if not article:
        return f"{colour} {shape}"
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def _and_list(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_for(objects, background: str, rng: np.random.Generator) -> str:
    """A caption in one of several phrasings. `objects`: (colour, shape) tuples, character names or
    SceneObjects. A plain background is mentioned half of the time, any other style always."""
    adj = V.STYLE_ADJECTIVES[background]
    if not objects:
        return f"a {adj} background"
    listed = _and_list([_phrase(o, True) for o in objects])
    if background != "plain" or rng.random() < 0.5:
        forms = [
            f"{listed} on a {adj} background",
            f"{listed} with a {adj} background",
            ", ".join([_phrase(o, False) for o in objects] + [f"{V.STYLE_NOUNS[background]} background"]),
            f"a picture of {listed} on a {adj} background",
        ]
    else:
        forms = [listed, ", ".join(_phrase(o, False) for o in objects), f"a picture of {listed}"]
    return forms[rng.integers(len(forms))]


def random_scene_spec(rng: np.random.Generator, n_objects: int | None = None, background: str | None = None,
                      p_objects=(0.5, 0.3, 0.2), p_character: float = 0.15, p_style: float = 0.5,
                      colours=tuple(V.COLOURS), shapes=V.SHAPES, styles=V.STYLES,
                      characters=tuple(V.CHARACTERS)) -> tuple[list, str]:
    """Draw what a scene contains: ([(colour, shape) or character name, ...], style).

    p_objects: probabilities of 1, 2, 3 objects; p_character: chance each object is a character;
    p_style: chance of a non-plain background. Labels never repeat within a scene (so fewer than
    n_objects come back only if the allowed colours/shapes/characters cannot fill it).
    """
    colours, shapes, styles, characters = tuple(colours), tuple(shapes), tuple(styles), tuple(characters)
    if n_objects is None:
        cum = np.cumsum(p_objects) / np.sum(p_objects)
        n_objects = 1 + min(int(np.searchsorted(cum, rng.random(), side="right")), len(cum) - 1)
    if background is None:
        patterned = [s for s in styles if s != "plain"]
        use_style = patterned and ("plain" not in styles or rng.random() < p_style)
        background = patterned[rng.integers(len(patterned))] if use_style else "plain"
    items: list = []
    for _ in range(100 * n_objects):
        if len(items) == n_objects:
            break
        if characters and rng.random() < p_character:
            item = characters[rng.integers(len(characters))]
        else:
            item = (colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))])
        if item not in items:
            items.append(item)
    return items, background


def _layout(rng: np.random.Generator, items: list, size: int) -> list[tuple]:
    """Random non-overlapping placement, fully inside the image: [(item, radius, (cy, cx))] in the
    order of `items`. Biggest first (fewer dead ends); retries smaller when they do not fit."""
    k = size / SIZE
    single = len(items) == 1
    shapes = [V.CHARACTERS[it].body[1] if isinstance(it, str) else it[1] for it in items]
    ranges = [((SINGLE_CHAR_RADIUS if single else MULTI_CHAR_RADIUS) if isinstance(it, str) else
               (SINGLE_RADIUS if single else MULTI_RADIUS)) for it in items]
    pad = size  # the occupancy map has a margin, so a stamp never needs clipping
    for attempt in range(12):
        shrink = 0.92 ** attempt
        r4s = [round(rng.uniform(lo, hi) * shrink * k * 4) for lo, hi in ranges]
        occupied = np.zeros((size + 2 * pad, size + 2 * pad), bool)  # placed objects, grown by GAP
        placed = {}
        for i in sorted(range(len(items)), key=lambda j: -r4s[j] * SHAPE_REACH[shapes[j]]):
            shape, r4 = shapes[i], r4s[i]
            u = rng.random(2 + 2 * 30).tolist()  # centre phase, then 30 candidate centres
            fy4, fx4 = int(u[0] * 4), int(u[1] * 4)  # quarter-pixel phase of the centre
            touched, grown, e = _footprint(shape, r4, fy4, fx4)
            n = touched.shape[0]
            # Whole-pixel part of the centre, so that the shape stays 0.5 px inside the border.
            up, down, left, right = shape_extent(shape, r4 / 4)
            y_lo, y_hi = math.ceil(up + 0.5 - fy4 / 4), math.floor(size - down - 0.5 - fy4 / 4)
            x_lo, x_hi = math.ceil(left + 0.5 - fx4 / 4), math.floor(size - right - 0.5 - fx4 / 4)
            if y_lo > y_hi or x_lo > x_hi:
                break
            for uy, ux in zip(u[2::2], u[3::2]):  # the first free candidate wins
                iy, ix = y_lo + int(uy * (y_hi - y_lo + 1)), x_lo + int(ux * (x_hi - x_lo + 1))
                view = occupied[iy - e + pad:iy - e + pad + n, ix - e + pad:ix - e + pad + n]
                if not (view & touched).any():
                    view |= grown
                    placed[i] = (items[i], r4 / 4, (iy + fy4 / 4, ix + fx4 / 4))
                    break
            else:
                break  # this object did not fit: start over, smaller
        if len(placed) == len(items):
            return [placed[i] for i in range(len(items))]
    raise RuntimeError(f"could not place {items} in a {size}x{size} image")


_RGB = {name: np.float32(rgb) for name, rgb in V.COLOURS.items()}


def _draw(img: np.ndarray, placed: list, size: int) -> list[SceneObject]:
    """Composite the placed items onto img (float32 [H, W, 3], in place); return SceneObjects."""
    objects = []
    for item, r, centre in placed:
        if isinstance(item, str):
            ch = V.CHARACTERS[item]
            body = shape_coverage(ch.body[1], r, centre, size)
            r_in = round(r * ch.inner_scale * 4) / 4
            inner = shape_coverage(ch.inner[1], r_in, centre, size)
            cb, ci = _RGB[ch.body[0]], _RGB[ch.inner[0]]
            img += body[..., None] * (cb - img)
            img += inner[..., None] * (ci - cb)  # the inner part lies wholly on the body
            whole, inner_mask = body >= 0.5, inner >= 0.5
            parts = (SceneObject(*ch.body, r, centre, whole & ~inner_mask),
                     SceneObject(*ch.inner, r_in, centre, inner_mask))
            objects.append(SceneObject(*ch.body, r, centre, whole, character=item, parts=parts))
        else:
            cov = shape_coverage(item[1], r, centre, size)
            img += cov[..., None] * (_RGB[item[0]] - img)
            objects.append(SceneObject(item[0], item[1], r, centre, cov >= 0.5))
    return objects


def render_scene(rng_or_seed, n_objects: int | None = None, background: str | None = None,
                 objects: list | None = None, size: int = SIZE, **spec_kwargs) -> Scene:
    """Render one scene (deterministic given the seed).

    objects: explicit [(colour, shape) or character name, ...] (placed at random); otherwise drawn
    by `random_scene_spec(rng, n_objects, background, **spec_kwargs)`.
    """
    rng = np.random.default_rng(rng_or_seed)
    if objects is None:
        items, background = random_scene_spec(rng, n_objects, background, **spec_kwargs)
    else:
        items = [o if isinstance(o, str) else tuple(o) for o in objects]
        for o in items:
            if isinstance(o, str) and o not in V.CHARACTERS:
                raise ValueError(f"unknown character {o!r}; known: {list(V.CHARACTERS)}")
            if not isinstance(o, str) and (o[0] not in V.COLOURS or o[1] not in V.SHAPES):
                raise ValueError(f"unknown object {o!r}; colours {list(V.COLOURS)}, shapes {list(V.SHAPES)}")
        if background is None:
            background = "plain"
    placed = _layout(rng, items, size)
    phase = (int(rng.integers(GRID_PERIOD)), int(rng.integers(GRID_PERIOD)))
    pattern, img = _background_image(background, phase, bool(rng.random() < 0.5), size)
    img = img.copy()
    scene_objects = _draw(img, placed, size)
    caption = caption_for([p[0] for p in placed], background, rng)
    return Scene(np.rint(img).astype(np.uint8), scene_objects, background, caption, pattern)


@dataclass
class SceneSampler:
    """Training-scene distribution. Restrict colours/shapes/styles/characters to hold things out."""

    p_objects: tuple[float, ...] = (0.5, 0.3, 0.2)  # P(1, 2, 3 objects)
    p_character: float = 0.15  # per object
    p_style: float = 0.5  # P(background is not plain)
    colours: tuple[str, ...] = tuple(V.COLOURS)
    shapes: tuple[str, ...] = V.SHAPES
    styles: tuple[str, ...] = V.STYLES
    characters: tuple[str, ...] = tuple(V.CHARACTERS)
    size: int = SIZE

    def sample(self, rng_or_seed) -> Scene:
        rng = np.random.default_rng(rng_or_seed)
        return render_scene(rng, size=self.size, p_objects=self.p_objects, p_character=self.p_character,
                            p_style=self.p_style, colours=self.colours, shapes=self.shapes,
                            styles=self.styles, characters=self.characters)

    def scenes(self, seed: int):
        """Endless generator of scenes, deterministic given the seed."""
        rng = np.random.default_rng(seed)
        while True:
            yield self.sample(rng)


def render_batch(seed: int, n: int, sampler: SceneSampler | None = None):
    """n scenes from one seed: (images uint8 [n, H, W, 3], captions list[str], scenes list[Scene])."""
    sampler = sampler or SceneSampler()
    rng = np.random.default_rng(seed)
    scenes = [sampler.sample(rng) for _ in range(n)]
    images = np.stack([s.image for s in scenes]) if scenes else np.zeros((0, sampler.size, sampler.size, 3), np.uint8)
    return images, [s.caption for s in scenes], scenes


# ----------------------------------------------------------------------------------------------
# Display helpers: users see 128x128 (nearest x4); the model sees 32x32
# ----------------------------------------------------------------------------------------------

def upscale_for_display(image: np.ndarray, factor: int = 4) -> np.ndarray:
    """Nearest-neighbour upscale of [..., H, W, C] to [..., H*f, W*f, C]."""
    return np.repeat(np.repeat(image, factor, axis=-3), factor, axis=-2)


def downscale_from_display(image: np.ndarray, factor: int = 4) -> np.ndarray:
    """Area-mean downscale of [..., H*f, W*f, C] to [..., H, W, C]; uint8 in -> uint8 out (rounded)."""
    *lead, h, w, c = image.shape
    if h % factor or w % factor:
        raise ValueError(f"image {h}x{w} is not a multiple of {factor}")
    out = image.reshape(*lead, h // factor, factor, w // factor, factor, c).mean(axis=(-4, -2))
    return np.rint(out).astype(np.uint8) if image.dtype == np.uint8 else out.astype(image.dtype, copy=False)
