"""Exact scorers for toy-world images: scene, object, colour, pattern, subject identity, layout.

No learned model: every judgement compares the image with what the procedural world can draw.

- Scene (`classify_scene`): each scene's background lies on a few RGB segments
  (`SceneStyle.segments`); a pixel counts for a scene by exp(-d^2 / 2 sigma^2) of its distance d
  to them, and the scene explaining most of the image wins.
- Segmentation (`segment_object`): pixels far from the background model seed the object's
  colour model (two colour centres, plus the nearest named colour's shade..colour segment);
  every pixel goes to whichever model is nearer (so antialiased edges split where coverage is
  one half), and the largest 8-connected component is kept.
- Object class (`classify_object`): the mask's bounding box, padded square and box-resized to
  16 x 16, against prototypes rendered over the class's poses, sizes and shape parameters
  (nearest neighbour, L1).
- Colour and pattern: pixel distances to each colour's segment (shade..colour, +-10 % light);
  the pattern from the share of shade pixels and the direction of their spectrum's energy.
- Identity (`subject_identity`): P(colour) * P(pattern) * P(shape), the shape part comparing the
  silhouette with renders of the subject and with generic prototypes of every class.
- Layout: `center_and_scale` of a mask, `layout_diversity` sigma^2_avg (DESIGN section 8).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import PIL.Image

from lrkit.toyworld.render import MAX_ROTATION, SCALE_RANGE, place, random_params, render, render_mask
from lrkit.toyworld.subjects import Subject
from lrkit.toyworld.world import CLASSES, COLORS, PATTERNS, SCENE_NAMES, SCENES, ObjectSpec, SceneSpec, shade_of

ImageLike = PIL.Image.Image | np.ndarray

BACKGROUND_SIGMA = 20.0
"""RGB distance scale of the scene scores: a pixel this far from a scene's model counts 0.61."""
SCENE_TEMPERATURE = 0.05
"""Softmax temperature over scene scores (fractions of the image) for `classify_scene`'s confidence."""
OBJECT_CORE = 40.0
"""Pixels this far (RGB) from the background model seed the object's colour model."""
OBJECT_FLOOR = 12.0
"""A pixel nearer than this to the background model never belongs to an object."""
DESCRIPTOR_SIZE = 16  # side of the normalised silhouette (`shape_descriptor`)
SHAPE_TEMPERATURE = 0.02  # softmax temperature over class distances (mean L1 per cell)
COLOR_TEMPERATURE = 8.0  # softmax temperature over colour distances (RGB units)
SHAPE_POWER = 3.0  # sharpness of P(shape) in `identity_components`
IDENTITY_THRESHOLD = 0.5
"""`is_subject` is true when `subject_identity` >= this."""
PROTOTYPES_PER_CLASS = 64  # generic silhouettes rendered per class
SUBJECT_PROTOTYPES = 64  # silhouettes rendered per subject
PATTERN_PROTOTYPES = 24  # renders per pattern fitting the pattern centroids
PATTERN_SHARE = 0.1
"""Objects with a smaller share of shade pixels count as plain."""
PATTERN_MIN_SPREAD = 0.03  # floor of the pattern centroids' per-feature spread


# ------------------------------------------------------------------------------------ helpers


def _pixels(image: ImageLike) -> np.ndarray:
    """(H, W, 3) float64 RGB from a PIL image or an array (uint8 or float 0..255)."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image must be PIL or an (H, W, 3) array, got shape {arr.shape}")
    return arr


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of points p (..., 3) to the RGB segment [a, b]."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


@lru_cache(maxsize=None)
def _scene_model(scene: str, details: bool) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The scene's background segments as RGB endpoint pairs."""
    style = SCENES[scene]
    pairs = style.segments + (style.detail_segments if details else ())
    return tuple((np.array(style.colors[a], float), np.array(style.colors[b], float)) for a, b in pairs)


def background_distance(image: ImageLike, scene: str, details: bool = True) -> np.ndarray:
    """RGB distance of each pixel to `scene`'s background model, (H, W).

    `details=False` leaves out sparse details (stars), which objects may share colours with.
    """
    p = _pixels(image)
    return np.min([_segment_distance(p, a, b) for a, b in _scene_model(scene, details)], axis=0)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool (H, W) mask: labels (0 = background, 1..n) and n."""
    h, w = mask.shape
    parent: list[int] = []

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    runs: list[tuple[int, int, int]] = []  # (row, start, end) of each horizontal run
    prev: list[int] = []
    for r in range(h):
        row = np.concatenate([[False], mask[r], [False]])
        edges = np.flatnonzero(row[1:] != row[:-1])
        cur = []
        for s, e in zip(edges[0::2], edges[1::2]):
            idx = len(runs)
            runs.append((r, int(s), int(e)))
            parent.append(idx)
            for j in prev:  # 8-connectivity: runs touching diagonally join too
                _, ps, pe = runs[j]
                if ps <= e and s <= pe:
                    ri, rj = find(idx), find(j)
                    if ri != rj:
                        parent[max(ri, rj)] = min(ri, rj)
            cur.append(idx)
        prev = cur
    labels = np.zeros((h, w), dtype=np.int64)
    roots: dict[int, int] = {}
    for idx, (r, s, e) in enumerate(runs):
        labels[r, s:e] = roots.setdefault(find(idx), len(roots) + 1)
    return labels, len(roots)


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion with a (2r+1)^2 square."""
    out = mask.copy()
    for _ in range(radius):
        m = np.pad(out, 1)
        h, w = out.shape
        for dy in range(3):
            for dx in range(3):
                out = out & m[dy : dy + h, dx : dx + w]
    return out


def _interior(mask: np.ndarray) -> np.ndarray:
    """The mask without its edge pixels (the whole mask when too thin to erode)."""
    radius = max(1, round(mask.shape[0] / 64))
    inner = _erode(mask, radius)
    return inner if inner.sum() >= 4 else mask


def _softmax(scores: dict[str, float], temperature: float) -> dict[str, float]:
    keys = list(scores)
    v = np.array([scores[k] for k in keys]) / temperature
    e = np.exp(v - v.max())
    return dict(zip(keys, (e / e.sum()).tolist()))


# ------------------------------------------------------------------------------------ scene


def scene_scores(image: ImageLike) -> dict[str, float]:
    """Per scene, the share of the image its background model explains (soft, in [0, 1]).

    Sparse details (stars) are left out: they cover a few percent of a night picture, but their
    segments run from the sky's blues to white through every grey, so with them the night model
    would explain the pale, greyish skies and snow of a generated snow picture.
    """
    p = _pixels(image)
    out = {}
    for scene in SCENE_NAMES:
        d = background_distance(p, scene, details=False)
        out[scene] = float(np.exp(-(d**2) / (2 * BACKGROUND_SIGMA**2)).mean())
    return out


def classify_scene(image: ImageLike) -> tuple[str, float]:
    """(scene, confidence): the scene whose background explains most pixels; the confidence is
    the softmax of `scene_scores` at SCENE_TEMPERATURE."""
    probs = _softmax(scene_scores(image), SCENE_TEMPERATURE)
    best = max(probs, key=probs.get)
    return best, probs[best]


# ------------------------------------------------------------------------------------ segmentation


def _color_segment(color: str) -> tuple[np.ndarray, np.ndarray]:
    """The RGB segment a colour's pixels lie on: its shade to itself, widened by +-10 % light."""
    c, s = np.array(COLORS[color], float), np.array(shade_of(color), float)
    dark, light = (c, s) if c.sum() < s.sum() else (s, c)
    return 0.9 * dark, np.minimum(1.1 * light, 255.0)


def _color_distances(p: np.ndarray) -> dict[str, float]:
    """Per named colour, the median distance of pixels p (n, 3) to its segment."""
    return {c: float(np.median(_segment_distance(p, *_color_segment(c)))) for c in COLORS}


def _two_medians(p: np.ndarray, iters: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB centres of points p (n, 3) by k-medians, started at the 10th and 90th brightness
    percentiles (robust to the few antialiased edge pixels)."""
    order = np.argsort(p.sum(axis=1), kind="stable")
    c = np.stack([p[order[len(p) // 10]], p[order[(9 * len(p)) // 10]]])
    for _ in range(iters):
        near = np.linalg.norm(p[:, None] - c[None], axis=-1).argmin(axis=1)
        for k in range(2):
            if (near == k).any():
                c[k] = np.median(p[near == k], axis=0)
    return c[0], c[1]


def _nearer_object(p: np.ndarray, d_bg: np.ndarray, seeds: np.ndarray, scene: str) -> np.ndarray:
    """Bool (H, W): pixels nearer the colour model of the `seeds` pixels than the background, and past
    OBJECT_FLOOR.

    The object model: the segment between two colour centres of the seeds, joined by the segment of the
    nearest named colour (shade..colour), so a rare pattern colour is not lost. The background's sparse
    details join its model unless the object shares their colours (stray stars are then specks)."""
    a, b = _two_medians(p[seeds])
    dist = _color_distances(p[seeds])
    named = min(dist, key=dist.get)
    d_obj = np.minimum(_segment_distance(p, a, b), _segment_distance(p, *_color_segment(named)))
    d_near = d_bg
    if background_distance(np.stack([a, b])[None], scene, details=True).max() > OBJECT_CORE:
        d_near = np.minimum(d_bg, background_distance(p, scene, details=True))
    return (d_obj < d_near) & (d_bg > OBJECT_FLOOR)


def explained_share(image: ImageLike, num_colors: int = 2, tolerance: float = 20.0) -> float:
    """Share of pixels within `tolerance` (RGB) of the detected scene's background model or of one of the
    `num_colors` object colours (with their shades) that explain most of the rest, chosen greedily.

    Toy pictures are flat colours on a scene background: nearly all of their pixels are explained."""
    p = _pixels(image)
    distance = background_distance(p, classify_scene(p)[0])
    per_color = {c: _segment_distance(p, *_color_segment(c)) for c in COLORS}
    for _ in range(min(num_colors, len(per_color))):
        best = max(per_color, key=lambda c: float((np.minimum(distance, per_color[c]) < tolerance).mean()))
        distance = np.minimum(distance, per_color.pop(best))
    return float((distance < tolerance).mean())


def segment_object(image: ImageLike, scene: str | None = None) -> np.ndarray:
    """Bool (H, W) mask of the (largest) object; `scene` defaults to `classify_scene`'s answer.

    The pixels far from the background (without its sparse details: a white object at night is not a
    star) seed one object colour model (`_nearer_object`); the largest component of what it claims."""
    p = _pixels(image)
    scene = scene or classify_scene(p)[0]
    d_bg = background_distance(p, scene, details=False)
    seeds = d_bg > OBJECT_CORE
    if seeds.sum() < 3:
        return np.zeros(d_bg.shape, dtype=bool)
    from lrkit.masks import largest_component  # imports torch: on first use, so the toy world imports without it

    return largest_component(_nearer_object(p, d_bg, seeds, scene))


def object_regions(image: ImageLike, min_pixels: int = 20, scene: str | None = None) -> list[np.ndarray]:
    """Bool (H, W) masks of the separate objects, largest first, of at least `min_pixels` each; `scene`
    defaults to `classify_scene`'s answer.

    Each connected core of pixels far from the background seeds a colour model of its own
    (`_nearer_object`); a pixel belongs to an object when one of these models is nearer to it than the
    background. So a background drawn a little off the scene's colours (a generation's tinted sand) stays
    background instead of joining the objects into one region, as a plain distance floor would."""
    p = _pixels(image)
    scene = scene or classify_scene(p)[0]
    d_bg = background_distance(p, scene, details=False)
    cores, n = _components(d_bg > OBJECT_CORE)
    claimed = np.zeros(d_bg.shape, dtype=bool)
    for k in range(1, n + 1):
        seeds = cores == k
        if seeds.sum() >= 3:
            claimed |= _nearer_object(p, d_bg, seeds, scene)
    labels, n = _components(claimed)
    regions = [labels == k for k in range(1, n + 1)]
    return sorted([r for r in regions if r.sum() >= min_pixels], key=lambda r: -int(r.sum()))


def _on_distinct_regions(hits: list[list[bool]]) -> bool:
    """hits[k][i]: whether wanted item k is seen on region i. True when every item is seen on a region of
    its own (some assignment of distinct regions)."""
    from itertools import permutations

    n = len(hits[0]) if hits else 0
    return any(all(row[i] for row, i in zip(hits, order)) for order in permutations(range(n), len(hits)))


def objects_found(image: ImageLike, wanted: list[tuple[str, str]], max_regions: int = 4) -> dict[str, bool]:
    """Whether every (class, colour) in `wanted` is drawn, each on a region of its own.

    `regions`: at least len(wanted) object regions; `colours` / `classes`: the wanted colours / classes
    can be matched to distinct regions (`object_color`, `classify_object` per region)."""
    regions = object_regions(image)[:max_regions]
    colours = [object_color(image, r) for r in regions]
    classes = [classify_object(image, r)[0] for r in regions]
    return {"regions": len(regions) >= len(wanted),
            "colours": _on_distinct_regions([[c == colour for c in colours] for _, colour in wanted]),
            "classes": _on_distinct_regions([[c == cls for c in classes] for cls, _ in wanted])}


SUBJECT_LEVELS = ("regions", "colours", "appearance", "identity")
"""What `subjects_found` checks, from the weakest to the full identity."""


def subjects_found(image: ImageLike, subjects: list[Subject], max_regions: int = 4) -> dict[str, bool]:
    """Whether every subject is drawn, each on a region of its own, level by level (`SUBJECT_LEVELS`).

    `regions`: at least len(subjects) object regions; `colours`: each subject's colour on distinct regions;
    `appearance`: its colour and pattern; `identity`: `is_subject` (colour, pattern and the subject's own
    silhouette, subject-only features included). The object class is not a level: `classify_object` knows
    generic silhouettes only, and a subject's features can tip it (the toy teapot's tall knob reads as a vase)."""
    regions = object_regions(image)[:max_regions]
    colours = [object_color(image, r) for r in regions]
    looks = [(colour, object_pattern(image, r, colour)) for r, colour in zip(regions, colours)]
    return {
        "regions": len(regions) >= len(subjects),
        "colours": _on_distinct_regions([[c == s.color for c in colours] for s in subjects]),
        "appearance": _on_distinct_regions([[look == (s.color, s.pattern) for look in looks] for s in subjects]),
        "identity": _on_distinct_regions([[is_subject(image, s, r) for r in regions] for s in subjects]),
    }


# ------------------------------------------------------------------------------------ layout


def center_and_scale(mask: np.ndarray) -> tuple[float, float, float]:
    """(cx, cy, scale) of the mask's bounding box, normalised: centre, larger side / image side."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("center_and_scale: mask is empty")
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, max((x1 - x0) / w, (y1 - y0) / h)


def layout_diversity(centers_by_prompt: dict[str, list[tuple[float, float]]]) -> float:
    """sigma^2_avg: over prompts, the mean of Var(cx) + Var(cy) over seeds (population variance)."""
    if not centers_by_prompt:
        raise ValueError("layout_diversity: centers_by_prompt is empty")
    per_prompt = []
    for prompt, centers in centers_by_prompt.items():
        if len(centers) == 0:
            raise ValueError(f"layout_diversity: prompt {prompt!r} has no centres")
        c = np.asarray(centers, dtype=np.float64).reshape(-1, 2)  # (seeds, xy)
        per_prompt.append(float(c[:, 0].var() + c[:, 1].var()))
    return float(np.mean(per_prompt))


# ------------------------------------------------------------------------------------ shape


def shape_descriptor(mask: np.ndarray, size: int = DESCRIPTOR_SIZE) -> np.ndarray:
    """The mask's bounding box, padded square (centred) and box-resized to size x size, flat."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("shape_descriptor: mask is empty")
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    h, w = crop.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = np.zeros((side, side), dtype=np.float32)
    square[top : top + h, left : left + w] = crop
    small = PIL.Image.fromarray(square).resize((size, size), PIL.Image.BOX)
    return np.asarray(small, dtype=np.float64).ravel()


def _random_pose(rng: np.random.Generator, spec: ObjectSpec, scale_range: tuple[float, float]) -> ObjectSpec:
    spec = spec.moved(scale=float(rng.uniform(*scale_range)), rotation=float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)))
    return place(spec, rng)


@lru_cache(maxsize=None)
def _class_bank() -> tuple[np.ndarray, np.ndarray]:
    """Generic prototypes: descriptors (n, size^2) and class indices (n,), rendered at 64 px."""
    rng = np.random.default_rng(20240604)
    descs, labels = [], []
    for k, cls in enumerate(CLASSES):
        for _ in range(PROTOTYPES_PER_CLASS):
            spec = ObjectSpec(cls, "red", params=random_params(rng, cls))
            descs.append(shape_descriptor(render_mask(_random_pose(rng, spec, SCALE_RANGE), 64)))
            labels.append(k)
    return np.stack(descs), np.array(labels)


@lru_cache(maxsize=64)
def _subject_bank(subject: Subject) -> np.ndarray:
    """Descriptors of the subject over poses and sizes, (n, size^2), rendered at 64 px."""
    rng = np.random.default_rng(7)
    poses = [_random_pose(rng, subject.spec(), (0.25, 0.75)) for _ in range(SUBJECT_PROTOTYPES)]
    return np.stack([shape_descriptor(render_mask(spec, 64)) for spec in poses])


def _l1(bank: np.ndarray, desc: np.ndarray) -> np.ndarray:
    return np.abs(bank - desc[None]).mean(axis=1)


def _mask_or_segment(image: ImageLike, mask: np.ndarray | None) -> np.ndarray:
    return segment_object(image) if mask is None else np.asarray(mask, dtype=bool)


def class_distances(mask: np.ndarray) -> dict[str, float]:
    """Per class, the L1 distance of the mask's descriptor to its nearest prototype."""
    desc = shape_descriptor(mask)
    bank, labels = _class_bank()
    d = _l1(bank, desc)
    return {cls: float(d[labels == k].min()) for k, cls in enumerate(CLASSES)}


def classify_object(image: ImageLike, mask: np.ndarray | None = None) -> tuple[str | None, float]:
    """(class, confidence) of the object's silhouette; (None, 0.0) when no object is found."""
    mask = _mask_or_segment(image, mask)
    if not mask.any():
        return None, 0.0
    probs = _softmax({c: -d for c, d in class_distances(mask).items()}, SHAPE_TEMPERATURE)
    best = max(probs, key=probs.get)
    return best, probs[best]


# ------------------------------------------------------------------------------------ colour, pattern


def color_scores(image: ImageLike, mask: np.ndarray | None = None) -> dict[str, float]:
    """Per named colour, its probability for the object (softmax of median pixel distances)."""
    mask = _mask_or_segment(image, mask)
    if not mask.any():
        return {c: 1.0 / len(COLORS) for c in COLORS}
    dist = _color_distances(_pixels(image)[_interior(mask)])
    return _softmax({c: -d for c, d in dist.items()}, COLOR_TEMPERATURE)


def object_color(image: ImageLike, mask: np.ndarray | None = None) -> str:
    """The object's named colour."""
    scores = color_scores(image, mask)
    return max(scores, key=scores.get)


def mean_object_color(image: ImageLike, mask: np.ndarray | None = None) -> np.ndarray | None:
    """The object's mean RGB (inside `mask`, by default `segment_object`); None under 8 pixels."""
    p = _pixels(image)
    mask = segment_object(p) if mask is None else np.asarray(mask, dtype=bool)
    return p[mask].mean(0) if mask.sum() >= 8 else None


def retouch_transfer(image: ImageLike, layout: ImageLike, reference_rgb: np.ndarray) -> dict:
    """How far stage 2 moved the layout's object towards a reference's look, and what it kept.

    With m_L, m_X the layout's and the image's mean object colour and m_R the reference's,
    `transfer` = d(m_X, m_L) / (d(m_X, m_L) + d(m_X, m_R)): 0 is the layout's look, 1 the reference's.
    `scene_kept`: the image's scene is the layout's; `center_moved`: distance between the two objects'
    centres in image widths. A key is absent where an object is not found.
    """
    x, lay = _pixels(image), _pixels(layout)
    mx, ml = segment_object(x), segment_object(lay)
    record: dict = dict(scene_kept=classify_scene(x)[0] == classify_scene(lay)[0])
    cx, cl = mean_object_color(x, mx), mean_object_color(lay, ml)
    if cx is not None and cl is not None:
        d_layout, d_ref = np.linalg.norm(cx - cl), np.linalg.norm(cx - np.asarray(reference_rgb, float))
        record["transfer"] = float(d_layout / (d_layout + d_ref)) if d_layout + d_ref > 0 else 0.0
    if mx.any() and ml.any():
        (x0, y0, _), (x1, y1, _) = center_and_scale(mx), center_and_scale(ml)
        record["center_moved"] = float(np.hypot(x0 - x1, y0 - y1))
    return record


def pattern_features(image: ImageLike, mask: np.ndarray, color: str) -> np.ndarray:
    """[shade share, energy share near vertical / horizontal / diagonal frequencies] of the object.

    A pixel is "shade" when it lies nearer the colour's shade than the colour itself. The spectrum
    of the shade map (bounding box, mean removed) is read between 1.8 and 8 cycles per object
    side: horizontal stripes put their energy on the vertical frequency axis, dots on both axes,
    checks on the diagonals.
    """
    inner = _interior(np.asarray(mask, dtype=bool))
    p = _pixels(image)
    c, s = np.array(COLORS[color], float), np.array(shade_of(color), float)
    t = ((p - c) @ (s - c)) / float((s - c) @ (s - c))
    shade = (t > 0.5) & inner
    share = float(shade.sum() / max(inner.sum(), 1))
    ys, xs = np.nonzero(inner)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0)
    n = max(32, 1 << int(math.ceil(math.log2(2 * side))))
    sig = np.zeros((n, n))
    sig[: y1 - y0, : x1 - x0] = np.where(inner[y0:y1, x0:x1], shade[y0:y1, x0:x1] - share, 0.0)
    power = np.abs(np.fft.fft2(sig)) ** 2
    f = np.fft.fftfreq(n) * side  # cycles per object side
    fy, fx = np.meshgrid(f, f, indexing="ij")
    radius = np.hypot(fx, fy)
    band = (radius >= 1.8) & (radius <= 8.0)
    angle = np.degrees(np.arctan2(fy, fx)) % 180.0
    vertical = band & (np.abs(angle - 90.0) < 22.5)
    horizontal = band & ((angle < 22.5) | (angle > 157.5))
    diagonal = band & ~vertical & ~horizontal
    total = float(power[band].sum()) + 1e-9
    return np.array([share] + [power[sector].sum() / total for sector in (vertical, horizontal, diagonal)])


@lru_cache(maxsize=None)
def _pattern_bank() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per non-plain pattern, mean and spread of `pattern_features` over studio renders at 64 px."""
    rng = np.random.default_rng(20240605)
    stats = {}
    for pattern in PATTERNS[1:]:
        feats = []
        for _ in range(PATTERN_PROTOTYPES):
            cls = CLASSES[int(rng.integers(len(CLASSES)))]
            color = tuple(COLORS)[int(rng.integers(len(COLORS)))]
            spec = _random_pose(rng, ObjectSpec(cls, color, pattern, params=random_params(rng, cls)), (0.3, 0.6))
            sample = render(SceneSpec("studio"), [spec], 64)
            feats.append(pattern_features(sample.image, sample.masks[0], color))
        f = np.stack(feats)
        stats[pattern] = (f.mean(axis=0), np.maximum(f.std(axis=0), PATTERN_MIN_SPREAD))
    return stats


def pattern_scores(image: ImageLike, mask: np.ndarray | None = None, color: str | None = None) -> dict[str, float]:
    """Per pattern, its probability for the object.

    P(patterned) = sigmoid((shade share - PATTERN_SHARE) / 0.02); among the patterns, a Gaussian
    nearest-centroid over `pattern_features`, fitted on renders.
    """
    mask = _mask_or_segment(image, mask)
    if not mask.any():
        return {p: 1.0 / len(PATTERNS) for p in PATTERNS}
    color = color or object_color(image, mask)
    f = pattern_features(image, mask, color)
    patterned = 1.0 / (1.0 + math.exp(-(f[0] - PATTERN_SHARE) / 0.02))
    loglik = {
        p: float(-0.5 * (((f - mu) / sd) ** 2).sum() - np.log(sd).sum()) for p, (mu, sd) in _pattern_bank().items()
    }
    given = _softmax(loglik, 1.0)
    return {"plain": 1.0 - patterned, **{p: patterned * q for p, q in given.items()}}


def object_pattern(image: ImageLike, mask: np.ndarray | None = None, color: str | None = None) -> str:
    """The object's pattern name."""
    scores = pattern_scores(image, mask, color)
    return max(scores, key=scores.get)


# ------------------------------------------------------------------------------------ identity


def identity_components(image: ImageLike, subject: Subject, mask: np.ndarray | None = None) -> dict[str, float]:
    """P(colour), P(pattern) and P(shape) that the object is `subject`.

    P(shape) = d_g^3 / (d_g^3 + d_s^3), d_s the distance to the nearest render of the subject and
    d_g to the nearest generic prototype of any class.
    """
    mask = _mask_or_segment(image, mask)
    if not mask.any():
        return {"color": 0.0, "pattern": 0.0, "shape": 0.0}
    desc = shape_descriptor(mask)
    d_s = float(_l1(_subject_bank(subject), desc).min())
    d_g = float(_l1(_class_bank()[0], desc).min())
    shape = d_g**SHAPE_POWER / max(d_g**SHAPE_POWER + d_s**SHAPE_POWER, 1e-12)
    return {
        "color": color_scores(image, mask)[subject.color],
        "pattern": pattern_scores(image, mask, subject.color)[subject.pattern],
        "shape": shape,
    }


def subject_identity(image: ImageLike, subject: Subject, mask: np.ndarray | None = None) -> float:
    """In [0, 1]: P(colour) * P(pattern) * P(shape) of `identity_components`."""
    parts = identity_components(image, subject, mask)
    return float(parts["color"] * parts["pattern"] * parts["shape"])


def is_subject(
    image: ImageLike, subject: Subject, mask: np.ndarray | None = None, threshold: float = IDENTITY_THRESHOLD
) -> bool:
    """Whether `subject_identity` reaches `threshold` (IDENTITY_THRESHOLD = 0.5)."""
    return subject_identity(image, subject, mask) >= threshold


def score_image(image: ImageLike, subject: Subject | None = None, scene: str | None = None) -> dict:
    """Everything the bench reads off one generation, as plain numbers.

    `scene` (prompted scene) adds `scene_ok`; `subject` adds `identity` (`subject_identity`) and
    `is_subject`. The object is segmented against the detected scene's background (a generation
    that drew another scene than the prompted one still has its object found); `center` and
    `scale` are None when no object is found.
    """
    detected, _ = classify_scene(image)
    mask = segment_object(image, detected)
    record: dict = {"scene": detected, "center": None, "scale": None, "object_class": None}
    if scene is not None:
        record["scene_ok"] = detected == scene
    if mask.any():
        cx, cy, scale = center_and_scale(mask)
        record.update(center=(cx, cy), scale=scale, object_class=classify_object(image, mask)[0])
    if subject is not None:
        identity = subject_identity(image, subject, mask) if mask.any() else 0.0
        record.update(identity=identity, is_subject=identity >= IDENTITY_THRESHOLD)
    return record


__all__ = [
    "IDENTITY_THRESHOLD",
    "SUBJECT_LEVELS",
    "background_distance",
    "center_and_scale",
    "class_distances",
    "classify_object",
    "classify_scene",
    "color_scores",
    "explained_share",
    "identity_components",
    "is_subject",
    "layout_diversity",
    "mean_object_color",
    "object_regions",
    "objects_found",
    "object_color",
    "object_pattern",
    "pattern_features",
    "pattern_scores",
    "retouch_transfer",
    "scene_scores",
    "score_image",
    "segment_object",
    "shape_descriptor",
    "subject_identity",
    "subjects_found",
]
