"""The embedded synthetic sets: ``synthetic:shapes`` and ``synthetic:textures``.

``synthetic:shapes``: each image holds 1 to 3 filled shapes (circle, square, triangle, diamond,
cross, ring, star) of random size, colour, position and tilt, painted in order over a gradient,
stripe, checker or value-noise background, so later shapes occlude earlier ones. No shape is left
less than half visible. The label is the class of the shape covering the most pixels.

``synthetic:textures``: a grey image whose large central shape (about 70% of the image) is filled
with a binary texture over a smooth, untextured background (a ramp or blend of two grey levels).
The classes are texture *coarseness*: the period of the texture is 3-4.2 px (``fine``), 10-14 px
(``medium``) or 19-27 px (``coarse``) at 64 px, scaling with the image side. Everything else is
drawn at random and carries no label information: the texture kind (stripes at any orientation,
checkerboard, dots or thresholded value noise), its rotation and phase, its two grey levels (at
least 0.3 apart), the outline (any of the seven shapes), the background. ``objects=2`` or ``3``
adds smaller textured shapes, each of another coarseness class.

Why the second set: three minutes of CPU pretraining (the demo recipes: MAE ViT-Ti/8 at 64 px,
320 steps of 64 images) leave frozen features on ``synthetic:shapes`` near a random init's
(k-NN 16.8 vs 12.4, chance 14.3). A random-init ViT's cls token is close to a random projection
of the average patch, i.e. of global intensity and colour statistics; a label that those do not
carry but local structure does is what separates a trained encoder from one that is not. On this
set the mean colour is at chance (see the tests) while the texture period decides the label, and
the MAE demo took k-NN (k = 20, cls) from 39.2% (random init, chance 33%) to 70.6% and in-context
segmentation from 40.5 to 49.8 mIoU (71.2% and 53.0 with another training seed). Measured with the
same recipe, three choices decide it. Grey images: with random RGB colours, 320 steps learn to
inpaint hue, 71% of the patch tokens' variance is the patch's mean colour, and no texture label
gained more than 7.4 k-NN points. Coarseness as the label: texture kind or orientation (stripes,
checker, dots, noise) gained at most 8.8 points in grey, and in colour 7.8 at three times the steps;
reconstructions at 320 steps are flat inside textures, so what the encoder learns first is,
presumably, how predictable a patch is, which the period decides. Periods far apart and away from
the 8 px patch: with a fourth class at 5.5-7.5 px, which a random init reads from a single patch,
segmentation came out level with the random init.

Both sets give every sample

- ``mask``: per-pixel class, 0 for background and ``k + 1`` for ``class_names[k]``;
- ``label``: the index into ``class_names`` of the class covering the most pixels of the mask
  (ties go to the lower index), so ``mask == label + 1`` marks the labelled pixels.

Sample ``i`` of a split is drawn on the fly from its own generator seeded by ``(seed, split, i)``:
no files, any sample can be regenerated alone, and train and val come from disjoint seed streams.
All drawing is vectorised numpy over a coordinate grid: well under 1 ms for a 64x64 image (shapes
0.35 ms, textures 0.3 ms on one core).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from mimkit.data.sample import SPLITS, Transform, check_split, make_sample

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star")
BACKGROUNDS = ("gradient", "stripes", "checker", "noise")
MAX_OBJECTS = 3
MIN_SIZE = 16

# Placement rules: a shape's radius is a fraction of the image side (but at least a few pixels so
# small images still show recognisable shapes), and every shape keeps half its pixels visible.
_RADIUS_RANGE = (0.12, 0.3)
_MIN_RADIUS_PX = 3.0
_MIN_VISIBLE = 0.5
_PLACEMENT_TRIES = 20
_MIN_COLOUR_DISTANCE = 0.4


# Shape tests on object-frame coordinates (u, v), in units of the object's radius. Each shape is
# scaled to an area of about 2 r^2 so that no class wins the "largest area" label by its geometry.
def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 0.8**2


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.71


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Equilateral, circumradius 1.24: inside all three edges at apothem 0.62.
    inside = v <= 0.62
    for angle in (math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
        inside &= u * math.cos(angle) + v * math.sin(angle) <= 0.62
    return inside


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(u) + np.abs(v) <= 1.0


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.98) & (av <= 0.3)) | ((au <= 0.3) & (av <= 0.98))


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    rr = u * u + v * v
    return (rr <= 0.96**2) & (rr >= (0.55 * 0.96) ** 2)


_STAR_POINTS, _STAR_OUTER, _STAR_INNER = 5, 1.17, 0.58


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Fold the angle into [0, half a sector] (0 at an outer tip), then test against the straight edge
    # from the tip (outer, 0) to the notch (inner * cos h, inner * sin h).
    half = math.pi / _STAR_POINTS
    folded = np.abs(np.mod(np.arctan2(v, u), 2 * half) - half)
    folded = half - folded
    rho = np.hypot(u, v)
    x, y = rho * np.cos(folded), rho * np.sin(folded)
    nx, ny = _STAR_INNER * math.sin(half), _STAR_OUTER - _STAR_INNER * math.cos(half)
    return nx * x + ny * y <= nx * _STAR_OUTER


_SHAPE_TESTS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "diamond": _diamond,
    "cross": _cross,
    "ring": _ring,
    "star": _star,
}
# Squares, diamonds and crosses only tilt a little so that a square never turns into a diamond.
_MAX_TILT = {"square": 0.26, "diamond": 0.26, "cross": 0.26}
# No shape reaches farther from its centre than this, in radii (the triangle's corners: 1.24).
_REACH = 1.25


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape: class, centre (x, y) and radius in pixels, tilt in radians, RGB in [0, 1]."""

    shape: str
    center: tuple[float, float]
    radius: float
    angle: float
    color: tuple[float, float, float]
    visible_pixels: int = 0


@dataclass(frozen=True)
class Scene:
    """A rendered image (H, W, 3) uint8, its class mask (H, W) uint8, label and objects in draw order."""

    image: np.ndarray
    mask: np.ndarray
    label: int
    objects: tuple[ShapeObject, ...] | tuple[TexturedRegion, ...]


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as a row (1, W) and a column (H, 1) that broadcast to (H, W)."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    return coords[None, :], coords[:, None]


@functools.lru_cache(maxsize=8)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_grid` divided by the image side."""
    x, y = _grid(size)
    return x / size, y / size


@functools.lru_cache(maxsize=32)
def _upsample_taps(k: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The left tap, the right tap and their weights of a bilinear upsampling from ``k`` to ``size``."""
    pos = (np.arange(size, dtype=np.float32) + 0.5) / size * (k - 1)
    i0 = np.minimum(pos.astype(np.int64), k - 2)
    frac = pos - i0
    return i0, i0 + 1, 1 - frac, frac


def _upsample(field: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly upsample a square (k, k) field to (size, size)."""
    i0, i1, w0, w1 = _upsample_taps(field.shape[0], size)
    rows = field[i0] * w0[:, None] + field[i1] * w1[:, None]
    return rows[:, i0] * w0 + rows[:, i1] * w1


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A two-colour textured background as channel planes (3, H, W), floats in [0, 1]."""
    x, y = _unit_grid(size)
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    c0 = rng.uniform(0.0, 1.0, 3).astype(np.float32)
    c1 = np.clip(c0 + rng.normal(0.0, 0.3, 3), 0.0, 1.0).astype(np.float32)
    angle = rng.uniform(0.0, 2 * math.pi)
    along = x * math.cos(angle) + y * math.sin(angle)
    if kind == "gradient":
        t = (along - along.min()) / (along.max() - along.min())
    elif kind == "stripes":
        t = 0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(2.0, 8.0) * along + rng.uniform(0, 2 * math.pi))
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32)
    elif kind == "checker":
        cells = rng.integers(2, 9)
        across = y * math.cos(angle) - x * math.sin(angle)
        t = ((np.floor(along * cells) + np.floor(across * cells)) % 2).astype(np.float32)
    else:
        t = _upsample(rng.random((int(rng.integers(3, 9)),) * 2, dtype=np.float32), size)
    # Planes, not (H, W, 3): every later pass then runs over whole contiguous planes instead of
    # 3-element rows, the same per-pixel arithmetic at a fraction of the cost.
    planes = np.multiply.outer(c1 - c0, t)
    planes += c0[:, None, None]
    return planes


def _pixel_mean(planes: np.ndarray) -> np.ndarray:
    """Each plane's mean, bit for bit what ``image.mean(axis=(0, 1))`` gives for the (H, W, 3) image.

    numpy sums that image's pixels one after another into the three channel totals (no pairwise
    summation: the channel is the innermost axis); a running sum along each plane repeats those
    additions in the same order, where ``planes.mean(axis=(1, 2))`` would round differently.
    """
    flat = planes.reshape(len(planes), -1)
    totals = np.cumsum(flat, axis=1)[:, -1]
    return (totals / np.intp(flat.shape[1])).astype(planes.dtype)


def _sample_object(rng: np.random.Generator, size: int, backdrop: np.ndarray) -> ShapeObject:
    """Draw a shape's class, placement and a colour that stands out from the backdrop's mean."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    radius = max(float(rng.uniform(*_RADIUS_RANGE)) * size, _MIN_RADIUS_PX)
    cx, cy = rng.uniform(radius, size - radius, 2)
    tilt = _MAX_TILT.get(shape, math.pi)
    angle = float(rng.uniform(-tilt, tilt))
    for _ in range(10):
        color = rng.uniform(0.0, 1.0, 3)
        away = color - backdrop
        if math.sqrt(away.dot(away)) >= _MIN_COLOUR_DISTANCE:  # np.linalg.norm's own sum, without its checks
            break
    else:
        color = 1.0 - backdrop
    return ShapeObject(shape, (float(cx), float(cy)), radius, angle, tuple(color.tolist()))


def _rasterise(obj: ShapeObject | TexturedRegion, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The object's boolean mask (H, W) and its vertical object-frame coordinate, used for shading."""
    x, y = _grid(size)
    return _shape_test(obj, x, y)


def _rasterise_near(obj: ShapeObject, size: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """:func:`_rasterise` within the rows and columns the shape can reach: those, the mask and ``v``.

    A shape covers a quarter of the image or less, so testing only its box does a fraction of
    the work; each pixel's test is the same arithmetic on the same coordinates as on the whole
    grid, so the pixels come out identical.
    """
    reach = _REACH * obj.radius + 1.0  # a pixel more than the farthest point of any shape
    cx, cy = obj.center
    rows = slice(max(0, int(cy - reach)), min(size, int(cy + reach) + 2))
    cols = slice(max(0, int(cx - reach)), min(size, int(cx + reach) + 2))
    x, y = _grid(size)
    drawn, v = _shape_test(obj, x[:, cols], y[rows])
    return (rows, cols), drawn, v


def _shape_test(
    obj: ShapeObject | TexturedRegion, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The shape's mask over the pixel centres ``x`` (1, w) by ``y`` (h, 1), and ``v`` there."""
    dx, dy = (x - obj.center[0]) / obj.radius, (y - obj.center[1]) / obj.radius
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    u, v = dx * cos + dy * sin, dy * cos - dx * sin
    return _SHAPE_TESTS[obj.shape](u, v), v


def _uncovered(owner: np.ndarray, drawn: np.ndarray, visible: list[int]) -> list[int]:
    """The pixels each earlier shape would keep visible if ``drawn`` were painted over them."""
    if not visible:
        return []
    covered = np.bincount(owner[drawn] + 1, minlength=len(visible) + 1)[1:]
    return [n - int(c) for n, c in zip(visible, covered)]


def _paint(planes: np.ndarray, obj: ShapeObject, drawn: np.ndarray, v: np.ndarray) -> None:
    """Paint the shape's shaded colour over its pixels, lit from above."""
    shade = 1.0 - 0.12 * np.clip(v, -1.0, 1.0)
    np.copyto(planes, np.asarray(obj.color, np.float32)[:, None, None] * shade, where=drawn)


def _to_uint8(planes: np.ndarray) -> np.ndarray:
    """Planes of floats in about [0, 1] as an (H, W, 3) uint8 image, rounded to nearest."""
    np.clip(planes, 0.0, 1.0, out=planes)
    planes *= 255.0
    planes += 0.5
    levels = planes.astype(np.uint8)
    image = np.empty((*planes.shape[1:], len(planes)), dtype=np.uint8)
    for channel, plane in enumerate(levels):  # plane by plane: numpy's transposing copy is 3x slower
        image[..., channel] = plane
    return image


def render_shapes(rng: np.random.Generator, size: int = 64) -> Scene:
    """Render one scene of 1 to :data:`MAX_OBJECTS` shapes, drawing every random number from ``rng``."""
    planes = _background(rng, size)
    backdrop = _pixel_mean(planes)
    owner = np.full((size, size), -1, dtype=np.int64)
    areas: list[int] = []
    visible: list[int] = []
    objects: list[ShapeObject] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _ in range(_PLACEMENT_TRIES):
            obj = _sample_object(rng, size, backdrop)
            box, drawn, v = _rasterise_near(obj, size)
            area = int(np.count_nonzero(drawn))
            left = _uncovered(owner[box], drawn, visible)
            if area > 0 and all(n >= _MIN_VISIBLE * a for n, a in zip(left, areas)):
                break
        else:
            continue  # no placement leaves the earlier shapes visible; draw fewer shapes
        owner[box][drawn] = len(objects)
        areas.append(area)
        visible = [*left, area]
        objects.append(obj)
        _paint(planes[(slice(None), *box)], obj, drawn, v)
    assert objects, "the first shape always fits an empty canvas"

    grain = 0.02 * rng.standard_normal((size, size, 1), dtype=np.float32)  # luminance grain
    planes += grain.reshape(1, size, size)
    image = _to_uint8(planes)
    classes = np.array([SHAPES.index(o.shape) + 1 for o in objects] + [0], dtype=np.uint8)
    mask = classes[owner]  # owner -1 (background) picks the trailing 0
    objects = [
        ShapeObject(o.shape, o.center, o.radius, o.angle, o.color, n) for o, n in zip(objects, visible)
    ]
    return Scene(image, mask, _largest_class(objects), tuple(objects))


def _largest_class(objects: list[ShapeObject]) -> int:
    """The index of the class whose shapes show the most pixels (ties: the lower index)."""
    pixels = [0] * len(SHAPES)
    for o in objects:
        pixels[SHAPES.index(o.shape)] += o.visible_pixels
    return pixels.index(max(pixels))


class _SceneSet(Dataset):
    """What the embedded sets share: split lengths, option checks, per-sample seeding, the cache."""

    uri = "synthetic:?"

    def __init__(
        self,
        split: str,
        *,
        size: int,
        train: int,
        val: int,
        seed: int,
        cache: int,
        segmentation: int,
        transform: Transform | None,
    ) -> None:
        self.split = check_split(split)
        if size < MIN_SIZE:
            raise ValueError(f"{self.uri} size={size} is too small; the minimum is {MIN_SIZE}")
        for name, count in (("train", train), ("val", val)):
            if count < 1:
                raise ValueError(f"{self.uri} {name}={count} must be at least 1")
        if seed < 0:
            raise ValueError(f"{self.uri} seed={seed} must be non-negative")
        if cache not in (0, 1):
            raise ValueError(f"{self.uri} cache={cache} must be 0 (render every time) or 1 (keep scenes)")
        if segmentation not in (0, 1):
            raise ValueError(f"{self.uri} segmentation={segmentation} must be 0 (no mask) or 1")
        self._cache: dict[int, Scene] | None = {} if cache else None
        self.segmentation = bool(segmentation)
        self.size = size
        self.seed = seed
        self.lengths = {"train": train, "val": val}
        self.transform = transform

    def _render(self, rng: np.random.Generator) -> Scene:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.lengths[self.split]

    def scene(self, index: int) -> Scene:
        """The untransformed scene behind sample ``index``, with its object list."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for the {self.split} split of length {n}")
        index %= n
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        scene = self._render(rng)
        if self._cache is not None:
            self._cache[index] = scene
        return scene

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        scene = self.scene(index)
        image = torch.from_numpy(scene.image).permute(2, 0, 1)
        mask = torch.from_numpy(scene.mask) if self.segmentation else None
        return make_sample(image, label=scene.label, mask=mask, transform=self.transform)

    def _repr_options(self) -> str:
        return ""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, size={self.size}, train={self.lengths['train']}, "
            f"val={self.lengths['val']}, seed={self.seed}{self._repr_options()})"
        )


class SyntheticShapes(_SceneSet):
    """Map-style dataset ``synthetic:shapes``: samples ``{"image", "label", "mask"}`` drawn on the fly.

    ``train`` and ``val`` are the lengths of the two splits and ``split`` picks one; ``size`` is the
    image side in pixels and ``seed`` selects the whole set. See the module docstring for the label
    and mask conventions.

    ``cache=1`` keeps every rendered scene in memory (per DataLoader worker), so epochs after the
    first skip rendering: at 64 px rendering is 0.35 ms of the 0.92 ms a sample costs, and a
    4096-image split holds 67 MB. ``segmentation=0`` leaves the per-pixel class mask out of the
    samples: pretraining never reads it, and cropping and collating it doubled the cost of a
    cached sample (0.40 vs 0.22 ms). The CPU pretraining demos set both; at ImageNet sizes leave
    the cache off.
    """

    uri = "synthetic:shapes"
    class_names = SHAPES
    seg_class_names = ("background", *SHAPES)
    ignore_index = None

    def __init__(
        self,
        split: str = "train",
        *,
        size: int = 64,
        train: int = 10000,
        val: int = 1000,
        seed: int = 0,
        cache: int = 0,
        segmentation: int = 1,
        transform: Transform | None = None,
    ) -> None:
        super().__init__(
            split, size=size, train=train, val=val, seed=seed, cache=cache, segmentation=segmentation,
            transform=transform,
        )  # fmt: skip

    def _render(self, rng: np.random.Generator) -> Scene:
        return render_shapes(rng, self.size)


# --------------------------------------------------------------------------------------------------
# synthetic:textures

COARSENESS = ("fine", "medium", "coarse")
TEXTURE_KINDS = ("stripes", "checker", "dots", "noise")
MAX_TEXTURED_OBJECTS = 3
MIN_TEXTURE_SIZE = 48

# The period (one dark plus one light band, or one lattice step) of each coarseness class as a
# fraction of the image side: 3-4.2, 10-14 and 19-27 px at 64 px. Neighbouring classes are a factor
# of 2.4 and 1.36 apart at their nearest, so the evaluation's resizing (1.14x) cannot carry one into
# another (pretraining's random crops, up to 2.2x, do, which the labels never see); the smallest
# image side keeps the finest period at 2.25 px or more.
_COARSENESS_PERIODS = ((3.0 / 64, 4.2 / 64), (10.0 / 64, 14.0 / 64), (19.0 / 64, 27.0 / 64))
# The first region is a large shape near the centre (radius 0.55-0.8 of the side, centre within
# 0.1 of the side of the image centre; it covers about 70% of the image); further ones are smaller
# and anywhere, and each keeps half its pixels visible.
_SURFACE_RADIUS = (0.55, 0.8)
_SURFACE_CENTRE = (0.4, 0.6)
_EXTRA_RADIUS = (0.2, 0.35)
_MIN_GREY_CONTRAST = 0.3  # the two grey levels of a texture differ at least this much
_GREY_CANDIDATES = 32
_DOT_RADIUS = 0.32  # in lattice steps: dots cover a third of a dotted region


@dataclass(frozen=True)
class TexturedRegion:
    """One textured shape: outline (a :data:`SHAPES` name), coarseness class, texture kind, period (px),
    centre (x, y) and radius in pixels, tilt in radians, grey levels in [0, 1], visible pixels."""

    shape: str
    coarseness: str
    kind: str
    period: float
    center: tuple[float, float]
    radius: float
    angle: float
    greys: tuple[float, float]
    visible_pixels: int = 0


def _grey_pair(rng: np.random.Generator) -> tuple[float, float]:
    """Two random grey levels in [0, 1] at least :data:`_MIN_GREY_CONTRAST` apart."""
    pairs = rng.uniform(0.0, 1.0, (_GREY_CANDIDATES, 2))
    ok = np.abs(pairs[:, 0] - pairs[:, 1]) >= _MIN_GREY_CONTRAST
    g0, g1 = pairs[int(np.argmax(ok))]
    if not ok.any():  # (0.51 ** 32, about 4e-10 of draws)
        g1 = g0 - 0.5 if g0 > 0.5 else g0 + 0.5
    return float(g0), float(g1)


def _texture_field(rng: np.random.Generator, kind: str, period: float, size: int) -> np.ndarray:
    """A binary texture (H, W) float32 in {0, 1}: ``kind`` at ``period`` pixels, random rotation and phase."""
    x, y = _grid(size)
    angle = float(rng.uniform(0.0, math.pi))
    phase = rng.uniform(0.0, 1.0, 2)
    cos, sin = math.cos(angle), math.sin(angle)
    a = (x * cos + y * sin) / period + phase[0]
    b = (y * cos - x * sin) / period + phase[1]
    if kind == "stripes":
        t = a - np.floor(a) < 0.5
    elif kind == "checker":
        t = (np.floor(2 * a) + np.floor(2 * b)) % 2 > 0.5
    elif kind == "dots":
        fa, fb = a - np.floor(a) - 0.5, b - np.floor(b) - 0.5
        t = fa * fa + fb * fb < _DOT_RADIUS**2
    elif kind == "noise":  # value noise with cells of half a period, cut at its median level
        cells = max(2, round(2 * size / period))
        t = _upsample(rng.random((cells, cells), dtype=np.float32), size) > 0.5
    else:
        raise ValueError(f"unknown texture kind {kind!r}; valid: {', '.join(TEXTURE_KINDS)}")
    return t.astype(np.float32)


def _smooth_grey_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """An untextured grey background (H, W): a linear ramp or a smooth blend of two random levels."""
    g0, g1 = rng.uniform(0.0, 1.0, 2).astype(np.float32)
    if rng.random() < 0.5:
        x, y = _grid(size)
        angle = rng.uniform(0.0, 2 * math.pi)
        along = x * math.cos(angle) + y * math.sin(angle)
        t = (along - along.min()) / (along.max() - along.min())
    else:
        t = _upsample(rng.random((int(rng.integers(2, 4)),) * 2, dtype=np.float32), size)
    return g0 + t * (g1 - g0)


def _place_region(
    rng: np.random.Generator, size: int, first: bool, coarseness: int
) -> tuple[TexturedRegion, np.ndarray]:
    shape = SHAPES[rng.integers(len(SHAPES))]
    if first:
        radius = float(rng.uniform(*_SURFACE_RADIUS)) * size
        cx, cy = rng.uniform(_SURFACE_CENTRE[0] * size, _SURFACE_CENTRE[1] * size, 2)
    else:
        radius = float(rng.uniform(*_EXTRA_RADIUS)) * size
        cx, cy = rng.uniform(radius, size - radius, 2)
    tilt = _MAX_TILT.get(shape, math.pi)
    kind = TEXTURE_KINDS[rng.integers(len(TEXTURE_KINDS))]
    period = float(rng.uniform(*_COARSENESS_PERIODS[coarseness])) * size
    region = TexturedRegion(
        shape, COARSENESS[coarseness], kind, period, (float(cx), float(cy)), radius,
        float(rng.uniform(-tilt, tilt)), _grey_pair(rng),
    )  # fmt: skip
    drawn, _ = _rasterise(region, size)  # reads shape, center, radius and angle, as of a ShapeObject
    return region, drawn


def render_textures(rng: np.random.Generator, size: int = 64, objects: int = 1) -> Scene:
    """Render 1 to ``objects`` textured shapes on a smooth grey background, every number from ``rng``.

    Each shape takes a different coarseness class and a random texture kind, period, rotation,
    phase and pair of grey levels; later shapes occlude earlier ones, which keep half their pixels.
    """
    grey = _smooth_grey_background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int64)
    areas: list[int] = []
    regions: list[TexturedRegion] = []
    classes = rng.permutation(len(COARSENESS))[:objects]
    for coarseness in classes:
        for _ in range(_PLACEMENT_TRIES):
            region, drawn = _place_region(rng, size, not regions, int(coarseness))
            area = int(drawn.sum())
            trial = np.where(drawn, len(regions), owner)
            visible = np.bincount(trial.ravel() + 1, minlength=len(regions) + 2)[1:]
            if area > 0 and all(visible[i] >= _MIN_VISIBLE * a for i, a in enumerate(areas)):
                break
        else:
            continue  # no placement leaves the earlier shapes visible; draw fewer shapes
        owner = trial
        areas.append(area)
        regions.append(region)
        g0, g1 = region.greys
        t = _texture_field(rng, region.kind, region.period, size)
        grey = np.where(drawn, g0 + t * (g1 - g0), grey)
    assert regions, "the first shape always fits an empty canvas"

    grey = (np.clip(grey, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    image = np.repeat(grey[..., None], 3, axis=2)
    class_ids = np.array([COARSENESS.index(r.coarseness) + 1 for r in regions] + [0])
    mask = class_ids[owner].astype(np.uint8)  # owner -1 (background) picks the trailing 0
    visible = np.bincount(owner.ravel() + 1, minlength=len(regions) + 1)[1:]
    regions = [replace(r, visible_pixels=int(n)) for r, n in zip(regions, visible)]
    label = int(np.argmax(np.bincount(mask.ravel(), minlength=len(COARSENESS) + 1)[1:]))
    return Scene(image, mask, label, tuple(regions))


class SyntheticTextures(_SceneSet):
    """Map-style dataset ``synthetic:textures``: textured grey shapes, labelled by texture coarseness.

    Images are RGB uint8 with equal channels (grey), so every consumer of ``synthetic:shapes``
    reads them unchanged. The options are those of ``synthetic:shapes`` (``size`` at least
    :data:`MIN_TEXTURE_SIZE`, ``train``, ``val``, ``seed``, ``cache``, ``segmentation``, with the
    same meaning and costs), plus ``objects``: at most this many textured shapes per image (1 to
    :data:`MAX_TEXTURED_OBJECTS`, default 1; each takes a different coarseness class, and the label
    is the class covering most pixels). ``class_names`` are the coarseness classes;
    ``seg_class_names`` prepend ``background`` (mask value 0, the smooth untextured part). See the
    module docstring for what the set is and why it exists.
    """

    uri = "synthetic:textures"
    class_names = COARSENESS
    seg_class_names = ("background", *COARSENESS)
    ignore_index = None

    def __init__(
        self,
        split: str = "train",
        *,
        size: int = 64,
        train: int = 10000,
        val: int = 1000,
        seed: int = 0,
        objects: int = 1,
        cache: int = 0,
        segmentation: int = 1,
        transform: Transform | None = None,
    ) -> None:
        if size < MIN_TEXTURE_SIZE:
            raise ValueError(
                f"{self.uri} size={size} is too small; the minimum is {MIN_TEXTURE_SIZE} (the finest "
                "texture period is 3/64 of the side)"
            )
        if not 1 <= objects <= MAX_TEXTURED_OBJECTS:
            raise ValueError(
                f"{self.uri} objects={objects} must be between 1 and {MAX_TEXTURED_OBJECTS} "
                f"(one coarseness class each: {', '.join(COARSENESS)})"
            )
        super().__init__(
            split, size=size, train=train, val=val, seed=seed, cache=cache, segmentation=segmentation,
            transform=transform,
        )  # fmt: skip
        self.objects = objects

    def _render(self, rng: np.random.Generator) -> Scene:
        return render_textures(rng, self.size, self.objects)

    def _repr_options(self) -> str:
        return f", objects={self.objects}"


SYNTHETIC_SETS: dict[str, type[Dataset]] = {"shapes": SyntheticShapes, "textures": SyntheticTextures}
