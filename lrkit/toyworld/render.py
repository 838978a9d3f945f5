"""Rasterising the toy world: backgrounds, objects, ground-truth masks, random samples.

Images are drawn at `supersample_factor` x the asked resolution with hard edges and box-averaged down,
so every edge is antialiased and a mask pixel is in the object when at least half of it is
covered. The same seed gives byte-identical images; the same spec at another resolution gives the
same picture, finer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import PIL.Image

from lrkit.toyworld.shapes import inside, rotated_box
from lrkit.toyworld.world import (
    CAPTION_TEMPLATES,
    CLASS_PARAMS,
    CLASSES,
    COLORS,
    PATTERN_PERIODS,
    PATTERNS,
    SUBJECT_EXTRAS,
    ObjectSpec,
    SceneSpec,
    caption,
    compatible_colors,
    random_scene,
    shade_of,
)

# Object size (larger bbox side / image side) of random samples. The floor keeps a silhouette of at least
# ~19 px (~5 latent px in the toy model's 4x VAE): smaller objects lose their class shape in the latents.
SCALE_RANGE = (0.3, 0.7)
MULTI_SCALE_RANGE = (0.25, 0.45)  # the same with two or more objects
MAX_ROTATION = 15.0  # degrees, random samples


@dataclass
class Sample:
    """A rendered picture with its caption and ground truth."""

    image: PIL.Image.Image
    """RGB, resolution x resolution."""
    caption: str
    scene: SceneSpec
    objects: tuple[ObjectSpec, ...]
    masks: tuple[np.ndarray, ...]
    """Per object, bool (H, W): visible pixels (covered at least half)."""

    @property
    def object_mask(self) -> np.ndarray:
        """Union of the object masks, bool (H, W)."""
        out = np.zeros((self.image.height, self.image.width), dtype=bool)
        for m in self.masks:
            out |= m
        return out


# ------------------------------------------------------------------------------------ backgrounds


def _lerp(a, b, t: np.ndarray) -> np.ndarray:
    """Colour a -> b by t (broadcast), (..., 3) float."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a + np.clip(t, 0.0, 1.0)[..., None] * (b - a)


def _band(y: np.ndarray, top, bottom, y0, y1) -> np.ndarray:
    return _lerp(top, bottom, (y - y0) / np.maximum(np.asarray(y1) - y0, 1e-6))


# Each scene: (colours, x, y, horizon, rng) -> (..., 3) float RGB at normalised points (x, y).


def _beach(c, x, y, h, rng):
    sea_top = 0.8 * h
    sand_top = sea_top + 0.17 + 0.015 * np.sin(2 * math.pi * 3 * x + rng.uniform(0, 2 * math.pi))
    img = _band(y, c["sky_top"], c["sky_low"], 0.0, sea_top)
    img = np.where((y >= sea_top)[..., None], _band(y, c["sea"], c["sea_low"], sea_top, sand_top), img)
    return np.where((y >= sand_top)[..., None], _band(y, c["sand"], c["sand_low"], sand_top, 1.0), img)


def _ground(ground: str):
    """Sky over a gently rolling ground (snow, grass)."""

    def draw(c, x, y, h, rng):
        top = h + 0.04 * np.sin(2 * math.pi * 1.2 * x + rng.uniform(0, 2 * math.pi))
        img = _band(y, c["sky_top"], c["sky_low"], 0.0, top)
        return np.where((y >= top)[..., None], _band(y, c[ground], c[ground + "_low"], top, 1.0), img)

    return draw


def _night(c, x, y, h, rng):
    img = _band(y, c["top"], c["low"], 0.0, 1.0)
    n = 40
    sx, sy, sr = rng.uniform(0, 1, n), rng.uniform(0, 1, n), rng.uniform(0.007, 0.014, n)
    star = np.zeros(x.shape, dtype=bool)
    for i in range(n):
        star |= (x - sx[i]) ** 2 + (y - sy[i]) ** 2 <= sr[i] ** 2
    return np.where(star[..., None], np.asarray(c["star"], np.float64), img)


def _desert(c, x, y, h, rng):
    phase = rng.uniform(0, 2 * math.pi, size=2)
    top = h + 0.03 * np.sin(2 * math.pi * 0.8 * x + phase[0])
    near = h + 0.22 + 0.06 * np.sin(2 * math.pi * 1.3 * x + phase[1])
    img = _band(y, c["sky_top"], c["sky_low"], 0.0, top)
    img = np.where((y >= top)[..., None], np.asarray(c["dune_far"], np.float64), img)
    return np.where((y >= near)[..., None], np.asarray(c["dune_near"], np.float64), img)


def _brick(c, x, y, h, rng):
    row_h, brick_w, mortar = 0.125, 0.25, 0.018
    oy, ox = rng.uniform(0, row_h), rng.uniform(0, brick_w)
    row = np.floor((y + oy) / row_h)
    shift = (row % 2) * brick_w / 2 + ox  # every other row offset by half a brick
    col = np.floor((x + shift) / brick_w)
    shades = rng.uniform(0, 1, size=(16, 16))
    img = _lerp(c["brick"], c["brick_dark"], shades[row.astype(int) % 16, col.astype(int) % 16])
    in_mortar = (((y + oy) % row_h) < mortar) | (((x + shift) % brick_w) < mortar)
    return np.where(in_mortar[..., None], np.asarray(c["mortar"], np.float64), img)


def _studio(c, x, y, h, rng):
    return _band(y, c["top"], c["low"], 0.0, 1.0)


_BACKGROUNDS = {
    "beach": _beach,
    "snow": _ground("snow"),
    "grass": _ground("grass"),
    "night": _night,
    "desert": _desert,
    "brick": _brick,
    "studio": _studio,
}


def _background(scene: SceneSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Background colours at normalised points (x, y), (..., 3) float RGB, tint included."""
    draw = _BACKGROUNDS[scene.name]
    img = draw(scene.style.colors, x, y, scene.horizon, np.random.default_rng(scene.detail_seed))
    return img + np.asarray(scene.tint, np.float64)


# ------------------------------------------------------------------------------------ objects


def _pattern_shade(spec: ObjectSpec, lx: np.ndarray, ly: np.ndarray) -> np.ndarray:
    """Whether local points take the pattern's second colour (bool)."""
    if spec.pattern == "plain":
        return np.zeros(lx.shape, dtype=bool)
    # Anchored to the class body (local [-1, 1]^2), so extras do not change the pattern.
    q = 2.0 * PATTERN_PERIODS[spec.pattern]
    if spec.pattern == "striped":
        return ((ly + 1.0) / q) % 1.0 >= 0.5
    if spec.pattern == "checked":
        return (np.floor((lx + 1.0) / q) + np.floor((ly + 1.0) / q)) % 2 == 1
    u, v = lx / q, ly / q  # dotted, a dot at the body centre
    return (u - np.round(u)) ** 2 + (v - np.round(v)) ** 2 <= 0.3**2


def object_transform(spec: ObjectSpec) -> tuple[float, float, float]:
    """(k, rcx, rcy): normalised image units per local unit, and the rotated box centre (local)."""
    rx0, ry0, rx1, ry1 = rotated_box(spec)
    k = spec.scale / max(rx1 - rx0, ry1 - ry0)
    return k, (rx0 + rx1) / 2, (ry0 + ry1) / 2


def _to_local(spec: ObjectSpec, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image points -> the object's local frame."""
    k, rcx, rcy = object_transform(spec)
    xr, yr = (x - spec.cx) / k + rcx, (y - spec.cy) / k + rcy
    c, s = math.cos(math.radians(spec.rotation)), math.sin(math.radians(spec.rotation))
    return c * xr - s * yr, s * xr + c * yr


def box_size(spec: ObjectSpec) -> tuple[float, float]:
    """Normalised (width, height) of the placed object's bounding box."""
    rx0, ry0, rx1, ry1 = rotated_box(spec)
    k = spec.scale / max(rx1 - rx0, ry1 - ry0)
    return k * (rx1 - rx0), k * (ry1 - ry0)


def _object_layer(spec: ObjectSpec, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage bool, colour (..., 3) float) of one object at normalised points."""
    lx, ly = _to_local(spec, x, y)
    cover = inside(spec, lx, ly)
    shade = _pattern_shade(spec, lx, ly)
    main, second = np.asarray(COLORS[spec.color], np.float64), np.asarray(shade_of(spec.color), np.float64)
    color = np.where(shade[..., None], second, main)
    return cover, color


# ------------------------------------------------------------------------------------ rendering


def supersample_factor(resolution: int) -> int:
    """Sub-pixels per pixel side: 4 up to 128 px, 2 above."""
    return 4 if resolution <= 128 else 2


def render(
    scene: SceneSpec,
    objects: list[ObjectSpec] | tuple[ObjectSpec, ...],
    resolution: int = 64,
    *,
    caption_text: str | None = None,
    brightness: float = 1.0,
) -> Sample:
    """Draw `objects` (later ones in front) on `scene` at `resolution` px square.

    The caption defaults to `caption(scene, objects)` ("" without objects); `brightness`
    multiplies the whole picture (the light changes of subject photos).
    """
    if resolution < 8:
        raise ValueError(f"render: resolution must be >= 8, got {resolution}")
    ss = supersample_factor(resolution)
    n = resolution * ss
    g = (np.arange(n, dtype=np.float64) + 0.5) / n
    x, y = np.meshgrid(g, g)
    img = _background(scene, x, y)
    covers = []
    for spec in objects:
        cover, color = _object_layer(spec, x, y)
        img = np.where(cover[..., None], color, img)
        covers = [c & ~cover for c in covers] + [cover]
    img = np.clip(img * brightness, 0, 255)
    img = img.reshape(resolution, ss, resolution, ss, 3).mean(axis=(1, 3))  # (H, W, 3)
    pixels = np.clip(np.round(img), 0, 255).astype(np.uint8)
    masks = tuple(c.reshape(resolution, ss, resolution, ss).mean(axis=(1, 3)) >= 0.5 for c in covers)
    if caption_text is None:
        caption_text = caption(scene.name, list(objects)) if objects else ""
    return Sample(PIL.Image.fromarray(pixels), caption_text, scene, tuple(objects), masks)


def render_mask(spec: ObjectSpec, resolution: int = 64) -> np.ndarray:
    """Ground-truth mask of one object alone, bool (resolution, resolution)."""
    ss = supersample_factor(resolution)
    n = resolution * ss
    w, h = box_size(spec)
    # Only the bounding box region needs evaluating.
    i0, i1 = max(0, int((spec.cx - w / 2) * n) - 1), min(n, int(math.ceil((spec.cx + w / 2) * n)) + 1)
    j0, j1 = max(0, int((spec.cy - h / 2) * n) - 1), min(n, int(math.ceil((spec.cy + h / 2) * n)) + 1)
    i0, j0 = i0 - i0 % ss, j0 - j0 % ss
    i1, j1 = min(n, i1 + (-i1) % ss), min(n, j1 + (-j1) % ss)
    gx = (np.arange(i0, i1, dtype=np.float64) + 0.5) / n
    gy = (np.arange(j0, j1, dtype=np.float64) + 0.5) / n
    x, y = np.meshgrid(gx, gy)
    cover = inside(spec, *_to_local(spec, x, y))
    full = np.zeros((n, n), dtype=bool)
    full[j0:j1, i0:i1] = cover
    return full.reshape(resolution, ss, resolution, ss).mean(axis=(1, 3)) >= 0.5


# ------------------------------------------------------------------------------------ random samples


def random_params(rng: np.random.Generator, cls: str) -> tuple[tuple[str, float], ...]:
    """Generic shape parameters of `cls`, uniform in their `CLASS_PARAMS` ranges."""
    return tuple((name, float(rng.uniform(lo, hi))) for name, (lo, hi) in CLASS_PARAMS[cls].items())


def place(spec: ObjectSpec, rng: np.random.Generator) -> ObjectSpec:
    """`spec` at a uniform random centre that keeps its bounding box inside the frame."""
    w, h = box_size(spec)
    return spec.moved(cx=float(rng.uniform(w / 2, 1 - w / 2)), cy=float(rng.uniform(h / 2, 1 - h / 2)))


def random_object(
    rng: np.random.Generator,
    scene: str,
    scale_range: tuple[float, float] = SCALE_RANGE,
    cls: str | None = None,
    extras_fraction: float = 0.0,
) -> ObjectSpec:
    """A generic object that suits `scene`'s colours, randomly posed, sized and placed.

    With probability `extras_fraction` it also has one of its class's `SUBJECT_EXTRAS` (so a model
    trained on such pictures has seen the feature, as a real base model has seen handles on vases;
    a subject is then a particular combination). At 0 no extra is drawn and `rng` is used as before.
    """
    if cls is None:
        cls = CLASSES[int(rng.integers(len(CLASSES)))]
    colors = compatible_colors(scene)
    spec = ObjectSpec(
        cls=cls,
        color=colors[int(rng.integers(len(colors)))],
        pattern=PATTERNS[int(rng.integers(len(PATTERNS)))],
        scale=float(rng.uniform(*scale_range)),
        rotation=float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)),
        params=random_params(rng, cls),
    )
    if extras_fraction > 0 and rng.random() < extras_fraction:
        options = SUBJECT_EXTRAS[cls]
        spec = replace(spec, extras=(options[int(rng.integers(len(options)))],))
    return place(spec, rng)


def _overlaps(a: ObjectSpec, b: ObjectSpec, gap: float = 0.02) -> bool:
    (aw, ah), (bw, bh) = box_size(a), box_size(b)
    return abs(a.cx - b.cx) < (aw + bw) / 2 + gap and abs(a.cy - b.cy) < (ah + bh) / 2 + gap


def sample(seed: int, num_objects: int = 1, resolution: int = 64, scene: str | None = None,
           extras_fraction: float = 0.0) -> Sample:
    """A random scene with `num_objects` generic objects (non-overlapping boxes) and a caption.

    Deterministic in `seed`; the resolution changes only the pixel grid, not the picture.
    `extras_fraction`: share of objects with a subject-only feature (`random_object`); the caption
    does not name it.
    """
    if not 0.0 <= extras_fraction <= 1.0:
        raise ValueError(f"sample: extras_fraction must be in [0, 1], got {extras_fraction}")
    if num_objects < 1:
        raise ValueError(f"sample: num_objects must be >= 1, got {num_objects}")
    rng = np.random.default_rng(seed)
    spec = random_scene(rng, scene)
    scale_range = SCALE_RANGE if num_objects == 1 else MULTI_SCALE_RANGE
    objects: list[ObjectSpec] = []
    while len(objects) < num_objects:
        for _ in range(100):
            obj = random_object(rng, spec.name, scale_range, extras_fraction=extras_fraction)
            if not any(_overlaps(obj, o) for o in objects):
                break
        else:
            raise RuntimeError(f"sample: could not place {num_objects} objects apart (seed {seed})")
        objects.append(obj)
    template = int(rng.integers(len(CAPTION_TEMPLATES)))
    return render(spec, objects, resolution, caption_text=caption(spec.name, objects, template))


__all__ = [
    "MAX_ROTATION",
    "SCALE_RANGE",
    "Sample",
    "box_size",
    "place",
    "random_object",
    "random_params",
    "render",
    "render_mask",
    "sample",
]
