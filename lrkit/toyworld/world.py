"""The toy world's vocabulary and specs: scenes, object classes, colours, patterns, captions.

Everything here is data; `render.py` draws it and `scorers.py` judges images against it. All
positions are normalised to the image side (x right, y down, both in [0, 1]), so a spec renders
at any resolution.

Background models. Each scene is drawn from a few flat or gradient colours; `SceneStyle.segments`
lists the RGB segments (gradients, and blends across a horizon) that every background pixel lies
on or near. The scorers measure a pixel's distance to these segments, and the world never puts an
object on a scene whose background comes close to the object's colours (`compatible_colors`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

RGB = tuple[int, int, int]

# ------------------------------------------------------------------------------------ colours

COLORS: dict[str, RGB] = {
    "red": (215, 40, 40),
    "orange": (245, 135, 25),
    "yellow": (245, 210, 35),
    "green": (45, 165, 65),
    "blue": (40, 85, 215),
    "purple": (135, 60, 185),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHADE_FACTOR = 0.55  # pattern colour = SHADE_FACTOR * colour (black: a fixed grey)
_BLACK_SHADE: RGB = (105, 105, 105)


def shade_of(color: str) -> RGB:
    """The second colour of a patterned object: a darker shade (a grey for black)."""
    if color == "black":
        return _BLACK_SHADE
    return tuple(int(round(SHADE_FACTOR * c)) for c in COLORS[color])  # type: ignore[return-value]


PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checked")
# Pattern periods as a fraction of the class body (local [-1, 1]^2; coarse, so they survive 64 px).
PATTERN_PERIODS: dict[str, float] = {"striped": 1 / 3.5, "dotted": 1 / 3.0, "checked": 1 / 3.0}

# ------------------------------------------------------------------------------------ classes

# Generic shape parameters of each class: name -> (low, high), drawn uniformly.
CLASS_PARAMS: dict[str, dict[str, tuple[float, float]]] = {
    "ball": {"aspect": (0.94, 1.04)},
    "cube": {"aspect": (0.85, 1.15)},
    "cone": {"width": (0.6, 0.8)},
    "star": {"inner": (0.38, 0.5)},
    "vase": {"body": (0.6, 0.75), "neck": (0.2, 0.28)},
    "mug": {"body": (0.55, 0.68)},
    "teapot": {"aspect": (0.62, 0.75)},
    "mushroom": {"cap": (0.55, 0.75), "stem": (0.22, 0.3)},
}
# Features of subjects; a generic class member shows them only in pictures rendered with an
# `extras_fraction` (`render.sample`, the toy pretraining option); the shipped toy model was trained without
# them (see `shapes.py`).
SUBJECT_EXTRAS: dict[str, tuple[str, ...]] = {
    "ball": ("cap", "notch", "flat"),
    "cube": ("lid", "feet", "knob"),
    "cone": ("tip", "brim", "legs"),
    "star": ("six", "chubby", "hub"),
    "vase": ("ears", "foot", "tall"),
    "mug": ("lid", "base", "spoon"),
    "teapot": ("tall_knob", "feet", "long_spout"),
    "mushroom": ("skirt", "bulb", "pointed"),
}
CLASSES: tuple[str, ...] = tuple(CLASS_PARAMS)

# ------------------------------------------------------------------------------------ scenes


@dataclass(frozen=True)
class SceneStyle:
    """How one scene looks: its caption phrase, colours and background colour model."""

    name: str
    phrase: str
    """Caption phrase after the object ("on the beach"); empty for the plain studio."""
    colors: dict[str, RGB]
    """Named background colours the renderer draws with ("mid" ones only anchor blend segments)."""
    segments: tuple[tuple[str, str], ...]
    """Pairs of `colors` whose RGB segment holds every background pixel (gradients, blends)."""
    detail_segments: tuple[tuple[str, str], ...] = ()
    """Segments of small sparse details (stars): scored, but not kept away from object colours."""


SCENES: dict[str, SceneStyle] = {
    s.name: s
    for s in (
        SceneStyle(
            "beach",
            "on the beach",
            {"sky_top": (110, 180, 240), "sky_low": (170, 215, 245), "sea": (25, 105, 175),
             "sea_low": (45, 135, 190), "sand": (235, 212, 155), "sand_low": (220, 192, 132)},
            (("sky_top", "sky_low"), ("sea", "sea_low"), ("sand", "sand_low"), ("sky_low", "sea"),
             ("sea_low", "sand")),
        ),
        SceneStyle(
            "snow",
            "in the snow",
            {"sky_top": (165, 185, 220), "sky_low": (205, 218, 238), "snow": (250, 251, 253),
             "snow_low": (226, 233, 243)},
            (("sky_top", "sky_low"), ("snow", "snow_low"), ("sky_low", "snow")),
        ),
        SceneStyle(
            "grass",
            "on the grass",
            {"sky_top": (70, 140, 230), "sky_low": (150, 200, 245), "grass": (110, 185, 70),
             "grass_low": (55, 130, 40)},
            (("sky_top", "sky_low"), ("grass", "grass_low"), ("sky_low", "grass")),
        ),
        SceneStyle(
            "night",
            "under the night sky",
            {"top": (8, 12, 40), "mid": (18, 25, 64), "low": (28, 38, 88), "star": (255, 252, 225)},
            (("top", "low"),),
            (("top", "star"), ("mid", "star"), ("low", "star")),
        ),
        SceneStyle(
            "desert",
            "in the desert",
            {"sky_top": (250, 232, 190), "sky_low": (245, 215, 160), "dune_far": (225, 160, 95),
             "dune_near": (195, 125, 70)},
            (("sky_top", "sky_low"), ("dune_far", "dune_near"), ("sky_low", "dune_far")),
        ),
        SceneStyle(
            "brick",
            "in front of a brick wall",
            {"brick": (165, 62, 48), "brick_mid": (146, 54, 42), "brick_dark": (128, 45, 36),
             "mortar": (205, 195, 180)},
            (("brick", "brick_dark"), ("brick", "mortar"), ("brick_mid", "mortar"), ("brick_dark", "mortar")),
        ),
        SceneStyle(
            "studio",
            "",
            {"top": (70, 160, 160), "low": (50, 130, 135)},
            (("top", "low"),),
        ),
    )
}
SCENE_NAMES: tuple[str, ...] = tuple(SCENES)
TINT_MAX = 6.0  # per-channel jitter of a scene's colours (RGB units)


@dataclass(frozen=True)
class SceneSpec:
    """One drawn background: the scene and the random details that vary with the seed."""

    name: str
    horizon: float = 0.5
    """Normalised height of the main horizon (band scenes)."""
    tint: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Added to every background colour (RGB units, |tint| <= TINT_MAX)."""
    detail_seed: int = 0
    """Seeds stars, bricks, dune waves."""

    def __post_init__(self):
        if self.name not in SCENES:
            raise ValueError(f"SceneSpec: name must be one of {SCENE_NAMES}, got {self.name!r}")

    @property
    def style(self) -> SceneStyle:
        return SCENES[self.name]


def random_scene(rng: np.random.Generator, name: str | None = None) -> SceneSpec:
    """A scene (uniform over SCENE_NAMES unless named) with random horizon, tint and details."""
    if name is None:
        name = SCENE_NAMES[int(rng.integers(len(SCENE_NAMES)))]
    return SceneSpec(
        name=name,
        horizon=float(rng.uniform(0.38, 0.55)),
        tint=tuple(float(t) for t in rng.uniform(-TINT_MAX, TINT_MAX, size=3)),  # type: ignore[arg-type]
        detail_seed=int(rng.integers(2**31)),
    )


# ------------------------------------------------------------------------------------ objects


@dataclass(frozen=True)
class ObjectSpec:
    """One object: class, look, and placement (centre and size of its bounding box)."""

    cls: str
    color: str
    pattern: str = "plain"
    cx: float = 0.5
    """Bounding-box centre, normalised x."""
    cy: float = 0.5
    """Bounding-box centre, normalised y."""
    scale: float = 0.5
    """Larger side of the bounding box / image side."""
    rotation: float = 0.0
    """Degrees, counter-clockwise on screen."""
    params: tuple[tuple[str, float], ...] = ()
    """Shape parameters (`CLASS_PARAMS` names); missing ones take the middle of their range."""
    extras: tuple[str, ...] = ()
    """Subject-only features (`SUBJECT_EXTRAS`)."""

    def __post_init__(self):
        if self.cls not in CLASS_PARAMS:
            raise ValueError(f"ObjectSpec: cls must be one of {CLASSES}, got {self.cls!r}")
        if self.color not in COLORS:
            raise ValueError(f"ObjectSpec: color must be one of {tuple(COLORS)}, got {self.color!r}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"ObjectSpec: pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"ObjectSpec: scale must be in (0, 1], got {self.scale}")
        bad = [e for e in self.extras if e not in SUBJECT_EXTRAS[self.cls]]
        if bad:
            raise ValueError(f"ObjectSpec: extras {bad} not in {SUBJECT_EXTRAS[self.cls]} for {self.cls}")

    def param(self, name: str) -> float:
        """A shape parameter, defaulting to the middle of the class range."""
        for key, value in self.params:
            if key == name:
                return value
        lo, hi = CLASS_PARAMS[self.cls][name]
        return (lo + hi) / 2

    def moved(self, **changes) -> "ObjectSpec":
        """A copy with some fields changed (placement, colour...)."""
        return replace(self, **changes)

    @property
    def description(self) -> str:
        """"red striped vase": colour, pattern adjective (none for plain), class word."""
        words = [self.color] + ([self.pattern] if self.pattern != "plain" else []) + [self.cls]
        return " ".join(words)


def _segment_distance(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, n: int = 21) -> float:
    """Smallest RGB distance between segments [a, b] and [c, d] (sampled)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    p = a + t * (b - a)
    q = c + t * (d - c)
    return float(np.sqrt(((p[:, None] - q[None]) ** 2).sum(-1)).min())


MIN_CONTRAST = 60.0  # RGB distance between an object's colours and its scene's background model


def color_contrast(color: str, scene: str) -> float:
    """Smallest RGB distance from the object colour segment (colour..shade) to the scene's model."""
    style = SCENES[scene]
    c, s = np.array(COLORS[color], float), np.array(shade_of(color), float)
    return min(
        _segment_distance(c, s, np.array(style.colors[a], float), np.array(style.colors[b], float))
        for a, b in style.segments
    )


def compatible_colors(scene: str) -> tuple[str, ...]:
    """Colours the world puts on `scene` (far enough from every background colour)."""
    return tuple(c for c in COLORS if color_contrast(c, scene) >= MIN_CONTRAST)


# ------------------------------------------------------------------------------------ captions

CAPTION_TEMPLATES: tuple[str, ...] = ("a photo of {objects}{scene}", "{objects}{scene}")


def _with_article(description: str) -> str:
    return ("an " if description[0] in "aeiou" else "a ") + description


def caption(scene: str, objects: list[ObjectSpec] | tuple[ObjectSpec, ...], template: int = 0) -> str:
    """"a photo of a red vase on the beach"; objects joined with "and"; studio has no phrase."""
    if not 0 <= template < len(CAPTION_TEMPLATES):
        raise ValueError(f"caption: template must be in [0, {len(CAPTION_TEMPLATES)}), got {template}")
    phrase = SCENES[scene].phrase
    objs = " and ".join(_with_article(o.description) for o in objects)
    return CAPTION_TEMPLATES[template].format(objects=objs, scene=(" " + phrase) if phrase else "")


def scene_of(text: str) -> str | None:
    """The scene whose caption phrase `text` contains ("... on the beach" -> "beach"), else None."""
    found = [name for name, style in SCENES.items() if style.phrase and style.phrase in text]
    return max(found, key=lambda name: len(SCENES[name].phrase)) if found else None


def caption_words() -> list[str]:
    """Every word a caption can contain."""
    words = {"a", "an", "and"}
    for t in CAPTION_TEMPLATES:
        words |= set(t.replace("{objects}", " ").replace("{scene}", " ").split())
    for s in SCENES.values():
        words |= set(s.phrase.split())
    words |= set(COLORS) | {p for p in PATTERNS if p != "plain"} | set(CLASSES)
    return sorted(words)


__all__ = [
    "CAPTION_TEMPLATES",
    "CLASSES",
    "CLASS_PARAMS",
    "COLORS",
    "MIN_CONTRAST",
    "ObjectSpec",
    "PATTERNS",
    "PATTERN_PERIODS",
    "SCENES",
    "SCENE_NAMES",
    "SUBJECT_EXTRAS",
    "SceneSpec",
    "SceneStyle",
    "caption",
    "scene_of",
    "caption_words",
    "color_contrast",
    "compatible_colors",
    "random_scene",
    "shade_of",
]
