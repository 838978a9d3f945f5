"""Silhouettes of the object classes, as inside-tests on local coordinates.

A shape lives in its own frame (x right, y down, roughly [-1, 1]^2, a few extras reach further);
`render.py` rotates, scales and places it. Each class draws its generic parameters from
`world.CLASS_PARAMS`; subjects add features from `world.SUBJECT_EXTRAS` that generic members of
the class never have.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import numpy as np

from lrkit.toyworld.world import ObjectSpec

Mask = np.ndarray  # bool, same shape as the coordinate arrays


def ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> Mask:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def rect(x: np.ndarray, y: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> Mask:
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def polygon(x: np.ndarray, y: np.ndarray, pts: list[tuple[float, float]]) -> Mask:
    """Even-odd point-in-polygon test."""
    inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % n]
        if y0 == y1:
            continue
        crosses = (y0 > y) != (y1 > y)
        xc = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < xc)
    return inside


def ring(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r_out: float, r_in: float) -> Mask:
    return ellipse(x, y, cx, cy, r_out, r_out) & ~ellipse(x, y, cx, cy, r_in, r_in)


def _ball(x, y, s: ObjectSpec) -> Mask:
    m = ellipse(x, y, 0, 0, 1.0, s.param("aspect"))
    if "cap" in s.extras:
        m |= rect(x, y, -0.25, -s.param("aspect") - 0.32, 0.25, -s.param("aspect") + 0.1)
    if "notch" in s.extras:
        m &= ~polygon(x, y, [(0.15, 0.0), (1.2, -0.6), (1.2, 0.6)])
    if "flat" in s.extras:
        m &= y <= 0.55
    return m


def _cube(x, y, s: ObjectSpec) -> Mask:
    w = s.param("aspect")
    m = rect(x, y, -w, -1, w, 1)
    if "lid" in s.extras:
        m |= rect(x, y, -w - 0.22, -1.25, w + 0.22, -0.8)
    if "feet" in s.extras:
        m |= rect(x, y, -w, 0.9, -w + 0.4, 1.4) | rect(x, y, w - 0.4, 0.9, w, 1.4)
    if "knob" in s.extras:
        m |= ellipse(x, y, 0, -1.2, 0.32, 0.32)
    return m


def _cone(x, y, s: ObjectSpec) -> Mask:
    w = s.param("width")
    m = polygon(x, y, [(0, -1), (w, 0.85), (-w, 0.85)]) | ellipse(x, y, 0, 0.85, w, 0.15)
    if "tip" in s.extras:
        m |= ellipse(x, y, 0, -1.05, 0.25, 0.25)
    if "brim" in s.extras:
        m |= rect(x, y, -w - 0.3, 0.78, w + 0.3, 1.02)
    if "legs" in s.extras:
        m &= ~polygon(x, y, [(-0.3, 1.05), (0, 0.4), (0.3, 1.05)])
    return m


def _star(x, y, s: ObjectSpec) -> Mask:
    points = 6 if "six" in s.extras else 5
    inner = 0.68 if "chubby" in s.extras else s.param("inner")
    pts = []
    for i in range(2 * points):
        r = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + i * math.pi / points
        pts.append((r * math.cos(a), r * math.sin(a)))
    m = polygon(x, y, pts)
    if "hub" in s.extras:
        m |= ellipse(x, y, 0, 0, 0.62, 0.62)
    return m


def _vase(x, y, s: ObjectSpec) -> Mask:
    bw, nw = s.param("body"), s.param("neck")
    top = -1.45 if "tall" in s.extras else -1.0
    m = ellipse(x, y, 0, 0.35, bw, 0.65) | rect(x, y, -nw, top + 0.2, nw, 0)  # body, neck
    m |= rect(x, y, -nw - 0.14, top, nw + 0.14, top + 0.22)  # lip
    if "ears" in s.extras:
        for side in (-1, 1):
            m |= ring(x, y, side * (nw + 0.3), -0.3, 0.3, 0.15) & (side * x > nw)
    if "foot" in s.extras:
        m |= polygon(x, y, [(-0.25, 0.85), (0.25, 0.85), (0.5, 1.2), (-0.5, 1.2)])
    return m


def _mug(x, y, s: ObjectSpec) -> Mask:
    bw = s.param("body")
    m = rect(x, y, -bw, -0.85, bw, 0.85) | (ring(x, y, bw, 0, 0.5, 0.25) & (x > bw))
    if "lid" in s.extras:
        m |= rect(x, y, -bw - 0.12, -1.1, bw + 0.12, -0.8) | ellipse(x, y, 0, -1.15, 0.2, 0.18)
    if "base" in s.extras:
        m |= rect(x, y, -bw - 0.25, 0.75, bw + 0.25, 1.05)
    if "spoon" in s.extras:
        m |= rect(x, y, 0.0, -1.5, 0.25, -0.8) | ellipse(x, y, 0.125, -1.55, 0.22, 0.16)
    return m


def _teapot(x, y, s: ObjectSpec) -> Mask:
    ry = s.param("aspect")
    m = ellipse(x, y, 0, 0.2, 1.0, ry)
    m |= ellipse(x, y, 0, 0.2 - ry + 0.02, 0.45, 0.2) | ellipse(x, y, 0, 0.2 - ry - 0.22, 0.13, 0.13)
    m |= ring(x, y, 0.95, 0.15, 0.42, 0.2) & (x > 0.8)
    tip = (-1.75, -0.75) if "long_spout" in s.extras else (-1.4, -0.5)
    m |= polygon(x, y, [(-0.7, 0.35), (tip[0], tip[1]), (tip[0] + 0.18, tip[1] - 0.08), (-0.6, 0.0)])
    if "tall_knob" in s.extras:
        m |= rect(x, y, -0.12, 0.2 - ry - 0.7, 0.12, 0.2 - ry) | ellipse(x, y, 0, 0.2 - ry - 0.75, 0.22, 0.22)
    if "feet" in s.extras:
        base = 0.2 + ry
        m |= rect(x, y, -0.7, base - 0.2, -0.4, base + 0.28) | rect(x, y, 0.4, base - 0.2, 0.7, base + 0.28)
    return m


def _mushroom(x, y, s: ObjectSpec) -> Mask:
    ch, sw = s.param("cap"), s.param("stem")
    m = (ellipse(x, y, 0, -0.1, 1.0, ch) & (y <= -0.1)) | rect(x, y, -sw, -0.15, sw, 0.95)
    if "skirt" in s.extras:
        m |= rect(x, y, -sw - 0.3, 0.15, sw + 0.3, 0.4)
    if "bulb" in s.extras:
        m |= ellipse(x, y, 0, 0.85, sw + 0.25, 0.25)
    if "pointed" in s.extras:
        m |= polygon(x, y, [(-0.35, -0.1 - ch + 0.15), (0, -0.1 - ch - 0.5), (0.35, -0.1 - ch + 0.15)])
    return m


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray, ObjectSpec], Mask]] = {
    "ball": _ball,
    "cube": _cube,
    "cone": _cone,
    "star": _star,
    "vase": _vase,
    "mug": _mug,
    "teapot": _teapot,
    "mushroom": _mushroom,
}

_EXTENT = 2.0  # local frames are searched over [-_EXTENT, _EXTENT]^2
_GRID = 400


def inside(spec: ObjectSpec, x: np.ndarray, y: np.ndarray) -> Mask:
    """Whether local points (x, y) are inside the object's silhouette."""
    return SHAPES[spec.cls](x, y, spec)


@lru_cache(maxsize=1024)
def _outline_points(spec: ObjectSpec) -> np.ndarray:
    """Points of a dense grid on the edge of the (unrotated) silhouette, (n, 2) local (x, y).

    The edge holds every extreme point of the shape in any rotation, so bounding boxes need no more.
    """
    g = np.linspace(-_EXTENT, _EXTENT, _GRID)
    x, y = np.meshgrid(g, g)
    m = inside(spec, x, y)
    if m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any():
        raise ValueError(f"shape of {spec.cls} reaches beyond the local frame")
    inner = m.copy()
    inner[1:-1, 1:-1] &= m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    edge = m & ~inner
    return np.stack([x[edge], y[edge]], axis=1)


def rotated_box(spec: ObjectSpec) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of the silhouette rotated by `spec.rotation`, local units."""
    p = _outline_points(_shape_key(spec))
    c, s = math.cos(math.radians(spec.rotation)), math.sin(math.radians(spec.rotation))
    # Counter-clockwise on screen (y down): x' = c x + s y, y' = -s x + c y.
    xr = c * p[:, 0] + s * p[:, 1]
    yr = -s * p[:, 0] + c * p[:, 1]
    return float(xr.min()), float(yr.min()), float(xr.max()), float(yr.max())


def _shape_key(spec: ObjectSpec) -> ObjectSpec:
    """The spec stripped of everything that does not change the silhouette (cache key)."""
    return ObjectSpec(cls=spec.cls, color="red", params=spec.params, extras=spec.extras)


__all__ = ["SHAPES", "inside", "rotated_box", "ellipse", "rect", "polygon", "ring"]
