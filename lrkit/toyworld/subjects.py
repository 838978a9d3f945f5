"""Subjects: unique objects of the toy world, photographed like a user's belongings.

A subject is one class member with a fixed shape (generic parameters plus one or two features
from `SUBJECT_EXTRAS` that generic members never have), a fixed colour and a fixed pattern.
`photos()` shows it large and centred on the plain studio background with small pose and light
changes; `render()` puts it into any scene (the ground truth for personalized generations).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from lrkit.toyworld.render import Sample, random_params, render
from lrkit.toyworld.world import (
    CLASSES,
    COLORS,
    PATTERNS,
    SCENE_NAMES,
    SUBJECT_EXTRAS,
    TINT_MAX,
    ObjectSpec,
    SceneSpec,
    color_contrast,
    MIN_CONTRAST,
    random_scene,
)

PHOTO_SCALE = (0.6, 0.75)
PHOTO_SHIFT = 0.05  # max centre offset from the middle, normalised
PHOTO_ROTATION = 10.0  # degrees
PHOTO_BRIGHTNESS = 0.1  # +-10 %


@dataclass(frozen=True)
class Subject:
    """A unique object: class, shape (generic parameters + subject-only extras), colour, pattern."""

    name: str
    cls: str
    color: str
    pattern: str
    params: tuple[tuple[str, float], ...] = ()
    extras: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.extras:
            raise ValueError(f"Subject {self.name!r}: needs at least one extra from {SUBJECT_EXTRAS.get(self.cls)}")
        self.spec()  # validates class, colour, pattern and extras

    @classmethod
    def from_seed(cls, seed: int, obj_cls: str | None = None, name: str | None = None) -> "Subject":
        """A random subject: class (unless given), colour, pattern, parameters and 1-2 extras."""
        rng = np.random.default_rng(seed)
        obj_cls = obj_cls or CLASSES[int(rng.integers(len(CLASSES)))]
        colors = tuple(COLORS)
        extras = SUBJECT_EXTRAS[obj_cls]
        chosen = rng.choice(len(extras), size=int(rng.integers(1, 3)), replace=False)
        return cls(
            name=name or f"subject_{seed}",
            cls=obj_cls,
            color=colors[int(rng.integers(len(colors)))],
            pattern=PATTERNS[int(rng.integers(len(PATTERNS)))],
            params=random_params(rng, obj_cls),
            extras=tuple(extras[i] for i in sorted(chosen)),
        )

    def spec(self, cx: float = 0.5, cy: float = 0.5, scale: float = 0.5, rotation: float = 0.0) -> ObjectSpec:
        """The subject as an object placed at (cx, cy) with bounding-box side `scale`."""
        return ObjectSpec(self.cls, self.color, self.pattern, cx, cy, scale, rotation, self.params, self.extras)

    @property
    def description(self) -> str:
        """Generic words for it ("purple dotted vase"), as a caption would name a class member."""
        return self.spec().description

    def compatible_scenes(self) -> tuple[str, ...]:
        """Scenes whose background stays clear of the subject's colours."""
        return tuple(s for s in SCENE_NAMES if color_contrast(self.color, s) >= MIN_CONTRAST)

    def _rng(self, seed: int) -> np.random.Generator:
        return np.random.default_rng([seed, zlib.crc32(self.name.encode())])

    def photos(self, n: int = 5, seed: int = 0, resolution: int = 64) -> list[Sample]:
        """`n` centred, large photos on the studio background, each slightly moved, turned and lit."""
        if n < 1:
            raise ValueError(f"Subject.photos: n must be >= 1, got {n}")
        rng = self._rng(seed)
        out = []
        for _ in range(n):
            scene = SceneSpec("studio", tint=tuple(float(t) for t in rng.uniform(-TINT_MAX, TINT_MAX, 3)))
            spec = self.spec(
                cx=0.5 + float(rng.uniform(-PHOTO_SHIFT, PHOTO_SHIFT)),
                cy=0.5 + float(rng.uniform(-PHOTO_SHIFT, PHOTO_SHIFT)),
                scale=float(rng.uniform(*PHOTO_SCALE)),
                rotation=float(rng.uniform(-PHOTO_ROTATION, PHOTO_ROTATION)),
            )
            brightness = 1.0 + float(rng.uniform(-PHOTO_BRIGHTNESS, PHOTO_BRIGHTNESS))
            text = f"a photo of a {self.description}"
            out.append(render(scene, [spec], resolution, caption_text=text, brightness=brightness))
        return out

    def render(
        self,
        scene: str | SceneSpec,
        cx: float = 0.5,
        cy: float = 0.5,
        scale: float = 0.5,
        rotation: float = 0.0,
        resolution: int = 64,
        seed: int = 0,
    ) -> Sample:
        """The subject in `scene` (a name draws the scene's details from `seed`)."""
        if isinstance(scene, str):
            scene = random_scene(self._rng(seed), scene)
        return render(scene, [self.spec(cx, cy, scale, rotation)], resolution)


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject("toy_vase", "vase", "purple", "dotted", (("body", 0.7), ("neck", 0.22)), ("ears",)),
        Subject("toy_teapot", "teapot", "yellow", "striped", (("aspect", 0.7),), ("tall_knob",)),
        Subject("toy_ball", "ball", "red", "checked", (("aspect", 1.0),), ("cap",)),
        Subject("toy_mug", "mug", "blue", "plain", (("body", 0.6),), ("spoon",)),
        Subject("toy_mushroom", "mushroom", "orange", "dotted", (("cap", 0.7), ("stem", 0.26)), ("skirt",)),
    )
}


def get_subject(name: str) -> Subject:
    """A built-in subject by name."""
    if name not in SUBJECTS:
        raise ValueError(f"get_subject: name must be one of {tuple(SUBJECTS)}, got {name!r}")
    return SUBJECTS[name]


def subject_pair(names: tuple[str, str], scene: str, resolution: int = 64) -> Sample:
    """Two built-in subjects side by side on `scene` (the concept_em bench's picture), with their object masks."""
    a, b = (get_subject(n) for n in names)
    return render(SceneSpec(scene), [a.spec(cx=0.28, cy=0.6, scale=0.42), b.spec(cx=0.72, cy=0.56, scale=0.45)],
                  resolution)


__all__ = ["SUBJECTS", "Subject", "get_subject", "subject_pair"]
