"""lrkit.toyworld: deterministic renderer, exact ground truth, and scorers near-perfect on it.

The scorer bench renders 200 random samples at 64 px once (module fixture) and checks every
scorer against the specs that drew them.
"""

import subprocess
import sys

import numpy as np
import PIL.ImageFilter
import pytest

from lrkit.masks import largest_component
from lrkit.toyworld import (
    CLASSES,
    COLORS,
    PATTERNS,
    SCENE_NAMES,
    SUBJECTS,
    ObjectSpec,
    SceneSpec,
    Subject,
    caption,
    caption_words,
    center_and_scale,
    classify_object,
    classify_scene,
    compatible_colors,
    is_subject,
    layout_diversity,
    object_color,
    object_pattern,
    render,
    render_mask,
    sample,
    segment_object,
)
from lrkit.toyworld.render import SCALE_RANGE, box_size, place, random_object
from lrkit.toyworld.scorers import background_distance, scene_scores
from lrkit.toyworld.world import MIN_CONTRAST, TINT_MAX, color_contrast, random_scene, shade_of


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Dilation by a (2r+1)^2 square (the frame counts as background)."""
    h, w = mask.shape
    padded = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


# ------------------------------------------------------------------------------------ renderer


@pytest.mark.parametrize("resolution", [64, 128])
def test_same_seed_gives_identical_bytes_and_other_seeds_differ(resolution):
    a, b, c = sample(11, resolution=resolution), sample(11, resolution=resolution), sample(12, resolution=resolution)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.caption == b.caption and a.objects == b.objects and a.scene == b.scene
    assert all(np.array_equal(m, n) for m, n in zip(a.masks, b.masks))
    assert a.image.tobytes() != c.image.tobytes()
    assert a.image.size == (resolution, resolution) and a.image.mode == "RGB"


def test_resolution_changes_the_grid_not_the_picture():
    small, big = sample(5, resolution=64), sample(5, resolution=256)
    assert small.objects == big.objects and small.scene == big.scene and small.caption == big.caption
    # The 256 px mask pooled 4x4 agrees with the 64 px one almost everywhere.
    pooled = big.masks[0].reshape(64, 4, 64, 4).mean(axis=(1, 3)) >= 0.5
    assert _iou(pooled, small.masks[0]) > 0.9


def _check_drawn(scene: SceneSpec, spec: ObjectSpec, resolution: int) -> None:
    """The image shows exactly the spec: object colours inside, the scene model outside, box where asked."""
    s = render(scene, [spec], resolution)
    mask = s.masks[0]
    assert np.array_equal(mask, render_mask(spec, resolution))
    pixels = np.asarray(s.image, dtype=np.float64)
    # Inside (away from the edge): exactly the colour or its shade.
    inner = ~_dilate(~mask, 1)
    if inner.any():
        # On the segment colour..shade (pattern edges blend the two).
        c, sh = np.array(COLORS[spec.color], float), np.array(shade_of(spec.color), float)
        t = np.clip(((pixels[inner] - c) @ (sh - c)) / ((sh - c) @ (sh - c)), 0, 1)
        d = np.linalg.norm(pixels[inner] - (c + t[:, None] * (sh - c)), axis=1)
        assert (d <= 2).mean() >= 0.95, f"{spec}: interior colours off"
    # Outside (away from the object): the scene's background model, up to its tint.
    outside = ~_dilate(mask, 2)
    d_bg = background_distance(s.image, scene.name)[outside]
    assert d_bg.max() <= TINT_MAX * np.sqrt(3) + 2, f"{scene.name}: background off its model"
    # Bounding box where the spec puts it (within a pixel and a half).
    cx, cy, scale = center_and_scale(mask)
    tol = 1.5 / resolution
    assert abs(cx - spec.cx) <= tol and abs(cy - spec.cy) <= tol, (cx, cy, spec)
    assert abs(scale - spec.scale) <= 2 * tol, (scale, spec.scale)


@pytest.mark.parametrize("resolution", [64, pytest.param(128, marks=pytest.mark.slow)])
def test_every_scene_class_colour_and_pattern_renders_as_specified(resolution):
    rng = np.random.default_rng(0)
    for i, (cls, pattern) in enumerate((c, p) for c in CLASSES for p in PATTERNS):
        scene = random_scene(rng, SCENE_NAMES[i % len(SCENE_NAMES)])
        colors = compatible_colors(scene.name)
        spec = ObjectSpec(cls, colors[i % len(colors)], pattern, scale=0.55, rotation=float(rng.uniform(-15, 15)))
        _check_drawn(scene, place(spec, rng), resolution)
    for color in COLORS:
        scene = next(s for s in SCENE_NAMES if color in compatible_colors(s))
        _check_drawn(random_scene(rng, scene), place(ObjectSpec("cube", color, "checked", scale=0.4), rng), resolution)


def test_every_scene_has_colours_and_objects_stay_in_frame():
    for scene in SCENE_NAMES:
        assert len(compatible_colors(scene)) >= 4, scene
    rng = np.random.default_rng(3)
    for i in range(100):
        spec = random_object(rng, SCENE_NAMES[i % len(SCENE_NAMES)])
        w, h = box_size(spec)
        assert SCALE_RANGE[0] <= spec.scale <= SCALE_RANGE[1] and abs(spec.rotation) <= 15
        assert w / 2 - 1e-9 <= spec.cx <= 1 - w / 2 + 1e-9 and h / 2 - 1e-9 <= spec.cy <= 1 - h / 2 + 1e-9
        assert color_contrast(spec.color, SCENE_NAMES[i % len(SCENE_NAMES)]) >= MIN_CONTRAST


@pytest.mark.slow
def test_extras_fraction_gives_generic_objects_subject_features_the_caption_does_not_name():
    from lrkit.toyworld.world import SUBJECT_EXTRAS

    plain = [sample(seed, num_objects=2) for seed in range(40)]
    assert all(not o.extras for s in plain for o in s.objects)
    # At 0 nothing is drawn: the pictures are the ones the shipped toy model was pretrained on (pinned
    # from the renderer before extras_fraction existed; PCG64 streams are stable across numpy versions).
    pinned = {
        0: ("a purple dotted mug in front of a brick wall", [("mug", 0.6289, 0.2763, 0.5918)]),
        1: ("a photo of a yellow striped teapot and an orange dotted cone under the night sky",
            [("teapot", 0.6694, 0.5309, 0.3318), ("cone", 0.5123, 0.2332, 0.3054)]),
        7: ("a white checked cone and a purple striped ball",
            [("cone", 0.3589, 0.3702, 0.4142), ("ball", 0.8275, 0.6944, 0.339)]),
    }
    for seed, (text, objects) in pinned.items():
        s = sample(seed, num_objects=1 + seed % 2, extras_fraction=0.0)
        placed = [(o.cls, round(o.cx, 4), round(o.cy, 4), round(o.scale, 4)) for o in s.objects]
        assert (s.caption, placed) == (text, objects)
    every = [sample(seed, extras_fraction=1.0) for seed in range(40)]
    objects = [o for s in every for o in s.objects]
    assert all(len(o.extras) == 1 and o.extras[0] in SUBJECT_EXTRAS[o.cls] for o in objects)
    assert len({(o.cls, o.extras[0]) for o in objects}) >= 10  # all kinds of extras, not one
    for s in every:
        (o,) = s.objects
        w, h = box_size(o)  # placed with the extra: the whole object stays in frame
        assert w / 2 - 1e-9 <= o.cx <= 1 - w / 2 + 1e-9 and h / 2 - 1e-9 <= o.cy <= 1 - h / 2 + 1e-9
        assert o.extras[0] not in s.caption and o.description in s.caption
    some = [o for seed in range(200) for o in sample(seed, extras_fraction=0.3).objects]
    assert 0.2 <= sum(bool(o.extras) for o in some) / len(some) <= 0.4
    with pytest.raises(ValueError, match="extras_fraction must be in"):
        sample(0, extras_fraction=1.5)


def test_two_objects_do_not_overlap_and_both_are_captioned():
    for seed in range(10):
        s = sample(seed, num_objects=2)
        assert len(s.objects) == 2 and len(s.masks) == 2
        assert not (s.masks[0] & s.masks[1]).any()
        assert all(m.any() for m in s.masks)
        assert " and " in s.caption
        for o in s.objects:
            assert o.description in s.caption
        assert np.array_equal(s.object_mask, s.masks[0] | s.masks[1])


def test_captions_name_the_scene_and_object():
    s = sample(4)
    o = s.objects[0]
    assert s.caption.endswith(s.scene.style.phrase)  # "" for the studio
    assert o.description in s.caption and o.cls in s.caption and o.color in s.caption
    red_vase = ObjectSpec("vase", "red", "striped")
    assert caption("beach", [red_vase]) == "a photo of a red striped vase on the beach"
    assert caption("studio", [red_vase.moved(color="orange", pattern="plain")], template=1) == "an orange vase"
    assert caption("brick", [red_vase, ObjectSpec("ball", "blue")]) == (
        "a photo of a red striped vase and a blue ball in front of a brick wall"
    )


def test_caption_words_are_single_clip_tokens():
    from lrkit.models import load_clip_tokenizer

    tok = load_clip_tokenizer()
    words = caption_words()
    for word in words:
        pieces = tok.tokenize(word)
        assert pieces == [word + "</w>"], f"{word!r} -> {pieces}"
        assert tok.unk_token_id not in tok(word, add_special_tokens=False).input_ids
    for seed in range(20):
        for num in (1, 2):
            assert set(sample(seed, num_objects=num).caption.split()) <= set(words)


def test_bad_specs_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="color"):
        ObjectSpec("vase", "teal")
    with pytest.raises(ValueError, match="cls"):
        ObjectSpec("sofa", "red")
    with pytest.raises(ValueError, match="extras"):
        ObjectSpec("vase", "red", extras=("cap",))
    with pytest.raises(ValueError, match="name"):
        SceneSpec("moon")
    with pytest.raises(ValueError, match="num_objects"):
        sample(0, num_objects=0)


def test_toyworld_imports_neither_training_inference_nor_torch():
    code = (
        "import sys, lrkit.toyworld, lrkit.toyworld.scorers; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers') "
        "or m.startswith(('lrkit.training', 'lrkit.inference'))]; print(bad); assert not bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------------ layout


def test_center_and_scale_of_a_hand_made_box():
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:20, 20:40] = True  # rows 10..19, columns 20..39
    assert center_and_scale(mask) == pytest.approx((30 / 64, 15 / 64, 20 / 64))
    with pytest.raises(ValueError, match="empty"):
        center_and_scale(np.zeros((8, 8), dtype=bool))


def test_layout_diversity_hand_computed():
    centers = {
        "a": [(0.0, 0.0), (1.0, 0.0)],  # Var x = 0.25, Var y = 0
        "b": [(0.5, 0.5)] * 3,  # 0
        "c": [(0.2, 0.4), (0.4, 0.8)],  # 0.01 + 0.04
    }
    assert layout_diversity(centers) == pytest.approx((0.25 + 0.0 + 0.05) / 3)
    with pytest.raises(ValueError, match="no centres"):
        layout_diversity({"a": []})


def test_largest_component_joins_diagonals_and_breaks_ties_in_raster_order():
    m = np.zeros((6, 6), dtype=bool)
    m[0, 0] = m[1, 1] = m[2, 2] = True  # 3 pixels, diagonal chain
    m[4, 3:6] = True  # 3 pixels, a row
    assert np.array_equal(largest_component(m), np.eye(6, dtype=bool) & (np.arange(6) < 3)[:, None])
    m[5, 0] = m[5, 1] = True
    m[0, 5] = True
    out = largest_component(m)
    assert out.sum() == 3 and out[0, 0]


# ------------------------------------------------------------------------------------ scorers


@pytest.fixture(scope="module")
def bench():
    """Scorer outputs vs ground truth over 200 random 64 px samples."""
    rows = []
    for seed in range(1000, 1200):
        s = sample(seed)
        o, gt = s.objects[0], s.masks[0]
        mask = segment_object(s.image)
        found = bool(mask.any())
        cx, cy, scale = center_and_scale(mask) if found else (np.nan, np.nan, np.nan)
        rows.append(
            dict(
                scale=o.scale,
                scene_ok=classify_scene(s.image)[0] == s.scene.name,
                iou=_iou(mask, gt),
                cls_ok=classify_object(s.image, mask)[0] == o.cls,
                color_ok=object_color(s.image, mask) == o.color,
                pattern_ok=object_pattern(s.image, mask) == o.pattern,
                center_err=float(np.hypot(cx - o.cx, cy - o.cy)),
                scale_err=abs(scale - o.scale),
            )
        )
    return rows


def _rate(rows, key, min_scale=0.0):
    sel = [r[key] for r in rows if r["scale"] >= min_scale]
    assert len(sel) >= 50
    return float(np.mean(sel))


@pytest.mark.slow
def test_scene_recognition_on_ground_truth(bench):
    assert _rate(bench, "scene_ok") >= 0.95


@pytest.mark.slow
def test_segmentation_matches_ground_truth_masks(bench):
    assert _rate(bench, "iou") >= 0.9
    assert min(r["iou"] for r in bench) >= 0.6
    assert _rate(bench, "center_err") <= 0.01
    assert _rate(bench, "scale_err") <= 0.02


@pytest.mark.slow
def test_object_class_colour_and_pattern_on_ground_truth(bench):
    assert _rate(bench, "cls_ok", min_scale=0.25) >= 0.95
    assert _rate(bench, "cls_ok") >= 0.9
    assert _rate(bench, "color_ok") >= 0.97
    assert _rate(bench, "pattern_ok", min_scale=0.3) >= 0.9


def test_stars_do_not_explain_grey_backgrounds():
    """Night's sparse stars are not part of its scene score: their segments (sky blue to white) pass
    through every grey, and used to make a greyish generated snow picture read as night."""
    grey = np.full((64, 64, 3), (186.0, 195.0, 200.0))
    assert scene_scores(grey)["night"] < 0.05
    rng = np.random.default_rng(0)
    for _ in range(10):  # a washed-out snow picture: 15 % grey, a little less blue
        snow = np.asarray(render(random_scene(rng, "snow"), [], 64).image.convert("RGB"), dtype=np.float64)
        washed = 0.85 * snow + 0.15 * np.array([150.0, 150.0, 150.0]) - np.array([0.0, 0.0, 15.0])
        assert classify_scene(washed)[0] == "snow"
    for _ in range(10):  # night pictures, stars and all, still read as night
        assert classify_scene(render(random_scene(rng, "night"), [], 64).image)[0] == "night"


@pytest.mark.slow
def test_scorers_work_at_128_px():
    rows = []
    for seed in range(3000, 3020):
        s = sample(seed, resolution=128)
        o, mask = s.objects[0], segment_object(s.image)
        scene_ok = classify_scene(s.image)[0] == s.scene.name
        rows.append((scene_ok, _iou(mask, s.masks[0]), object_color(s.image, mask) == o.color))
    scene_ok, iou, color_ok = np.mean(rows, axis=0)
    assert scene_ok >= 0.95 and iou >= 0.9 and color_ok >= 0.95


def _degrade(image, rng) -> np.ndarray:
    """Blur (Gaussian, radius 1 px) and noise (sigma 8), roughly a generated image's flaws."""
    blurred = np.asarray(image.filter(PIL.ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
    return np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).round().astype(np.uint8)


@pytest.mark.slow
def test_scorers_tolerate_blur_and_noise():
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(1000, 1060):
        s = sample(seed)
        o, image = s.objects[0], _degrade(s.image, rng)
        mask = segment_object(image)
        big = o.scale >= 0.25
        rows.append(
            (
                classify_scene(image)[0] == s.scene.name,
                _iou(mask, s.masks[0]),
                classify_object(image, mask)[0] == o.cls if big else np.nan,
                object_color(image, mask) == o.color,
            )
        )
    scene_ok, iou, cls_ok, color_ok = np.nanmean(np.array(rows, dtype=float), axis=0)
    assert scene_ok >= 0.95 and iou >= 0.8 and cls_ok >= 0.9 and color_ok >= 0.95
    own = []
    for sub in SUBJECTS.values():
        scenes = [s for s in sub.compatible_scenes() if s != "studio"]
        for i in range(4):
            spec = place(sub.spec(scale=float(rng.uniform(0.3, 0.6))), rng)
            shown = sub.render(scenes[i % len(scenes)], spec.cx, spec.cy, spec.scale, seed=i)
            own.append(is_subject(_degrade(shown.image, rng), sub))
    assert np.mean(own) >= 0.85


# ------------------------------------------------------------------------------------ subjects


def test_subject_photos_are_centred_large_and_varied():
    sub = SUBJECTS["toy_vase"]
    photos = sub.photos(5, seed=0)
    assert len(photos) == 5
    assert [p.image.tobytes() for p in photos] == [p.image.tobytes() for p in sub.photos(5, seed=0)]
    assert len({p.image.tobytes() for p in photos}) == 5
    assert photos[0].image.tobytes() != sub.photos(5, seed=1)[0].image.tobytes()
    for p in photos:
        cx, cy, scale = center_and_scale(p.masks[0])
        assert abs(cx - 0.5) <= 0.07 and abs(cy - 0.5) <= 0.07 and 0.58 <= scale <= 0.77
        assert p.scene.name == "studio" and p.objects[0].extras == sub.extras
        assert classify_scene(p.image)[0] == "studio"
        assert classify_object(p.image)[0] == sub.cls
        assert is_subject(p.image, sub)


def test_subject_from_seed_is_deterministic_and_has_extras():
    a, b = Subject.from_seed(3), Subject.from_seed(3)
    assert a == b and 1 <= len(a.extras) <= 2
    assert Subject.from_seed(4) != a
    with pytest.raises(ValueError, match="extra"):
        Subject("plain_vase", "vase", "red", "plain")


@pytest.mark.slow
def test_subject_identity_separates_the_subject_from_its_class():
    """Own renders in new scenes pass; generic class members fail, even in the subject's colour and pattern."""
    own, generic, lookalike = [], [], []
    rng = np.random.default_rng(5)
    for sub in SUBJECTS.values():
        scenes = [s for s in sub.compatible_scenes() if s != "studio"]
        for i in range(8):
            scene = scenes[i % len(scenes)]
            spec = place(sub.spec(scale=float(rng.uniform(0.3, 0.6)), rotation=float(rng.uniform(-10, 10))), rng)
            own.append(is_subject(render(random_scene(rng, scene), [spec], 64).image, sub))
            other = random_object(rng, scene, (0.3, 0.6), cls=sub.cls)
            generic.append(is_subject(render(random_scene(rng, scene), [other], 64).image, sub))
            other = other.moved(color=sub.color, pattern=sub.pattern)
            lookalike.append(is_subject(render(random_scene(rng, scene), [other], 64).image, sub))
    assert np.mean(own) >= 0.9
    assert np.mean(generic) <= 0.1
    assert np.mean(lookalike) <= 0.1


def test_subject_render_places_it_where_asked():
    sub = SUBJECTS["toy_teapot"]
    s = sub.render("grass", cx=0.3, cy=0.7, scale=0.4)
    assert s.scene.name == "grass" and s.objects[0].extras == sub.extras
    cx, cy, scale = center_and_scale(segment_object(s.image))
    assert abs(cx - 0.3) <= 0.02 and abs(cy - 0.7) <= 0.02 and abs(scale - 0.4) <= 0.03


def test_scene_of_reads_the_scene_phrase_back_from_captions():
    from lrkit.toyworld import scene_of

    rng = np.random.default_rng(0)
    for scene in SCENE_NAMES:
        obj = random_object(rng, scene, (0.3, 0.6))
        text = caption(scene, [obj], template=1)
        assert scene_of(text) == (None if scene == "studio" else scene), text
    assert scene_of("a photo of <sks> vase in front of a brick wall") == "brick"
    assert scene_of("a photo of <sks> vase") is None


def test_score_image_reports_the_subject_scene_and_placement():
    from lrkit.toyworld import score_image

    sub = SUBJECTS["toy_ball"]
    s = sub.render("snow", cx=0.35, cy=0.6, scale=0.45)
    record = score_image(s.image, sub, "snow")
    assert record["scene"] == "snow" and record["scene_ok"] and record["is_subject"]
    assert record["object_class"] == "ball" and abs(record["scale"] - 0.45) <= 0.03
    assert abs(record["center"][0] - 0.35) <= 0.02 and abs(record["center"][1] - 0.6) <= 0.02
    # another object of the subject's class is not the subject; a wrong prompted scene is not a hit
    other = render(random_scene(np.random.default_rng(1), "grass"),
                   [random_object(np.random.default_rng(2), "grass", (0.4, 0.5), cls="cube")], 64)
    record = score_image(other.image, sub, "beach")
    assert record["scene_ok"] is False and record["is_subject"] is False and record["object_class"] == "cube"
    # an empty scene: nothing found, identity 0
    empty = render(random_scene(np.random.default_rng(3), "desert"), [], 64)
    record = score_image(empty.image, sub, "desert")
    assert record["center"] is None and record["identity"] == 0.0 and record["scene_ok"]


@pytest.mark.slow
def test_objects_found_on_two_object_ground_truth():
    from lrkit.toyworld.scorers import object_regions, objects_found

    hits = {"regions": 0, "colours": 0, "classes": 0}
    false_colours, ious = 0, []
    for seed in range(2000, 2040):
        s = sample(seed, num_objects=2)
        for key, ok in objects_found(s.image, [(o.cls, o.color) for o in s.objects]).items():
            hits[key] += ok
        swapped = [(o.cls, "black" if o.color != "black" else "white") for o in s.objects]  # colours not drawn
        false_colours += objects_found(s.image, swapped)["colours"]
        regions = object_regions(s.image)
        ious += [max(_iou(r, gt) for r in regions) for gt in s.masks]
    assert hits["regions"] == hits["colours"] == 40 and hits["classes"] >= 38, hits
    assert false_colours == 0
    assert np.mean(ious) >= 0.85 and min(ious) >= 0.7


@pytest.mark.slow
def test_object_regions_keep_a_tinted_background_out():
    """A generation's background is often drawn a little off the scene's colours (a LoRA's tinted sand).
    Such pixels are nearer the background than any object's colours, so they must not join the objects:
    a distance floor alone (OBJECT_FLOOR) merged both objects and half the sand into one region."""
    from lrkit.toyworld.scorers import OBJECT_FLOOR, object_regions, objects_found

    u, v = np.array([1.0, -1.0, 0.0]) / np.sqrt(2), np.array([1.0, 1.0, -2.0]) / np.sqrt(6)  # hues, not light
    ious, found = [], 0
    for seed in range(2000, 2016):
        s = sample(seed, num_objects=2, scene="beach")
        objects = np.logical_or.reduce(s.masks)
        angle = 2 * np.pi * (0, 3, 4, 7)[seed % 4] / 8  # hues that lie off every segment of the beach's model
        tint = 1.5 * OBJECT_FLOOR * (np.cos(angle) * u + np.sin(angle) * v)
        pixels = np.asarray(s.image, dtype=np.float64)
        pixels[~_dilate(objects, 1)] += tint  # the background only; the objects keep their colours
        image = np.clip(pixels, 0, 255).round().astype(np.uint8)
        off = background_distance(image, "beach", details=False)[~_dilate(objects, 1)] > OBJECT_FLOOR
        assert off.mean() > 0.5  # most of the background is past the floor
        regions = object_regions(image, scene="beach")
        ious += [max(_iou(r, gt) for r in regions) for gt in s.masks]
        found += objects_found(image, [(o.cls, o.color) for o in s.objects])["colours"]
    assert found == 16 and np.mean(ious) >= 0.85 and min(ious) >= 0.6, (found, np.round(ious, 2))


def test_subjects_found_levels_on_rendered_pairs():
    """The two subjects rendered side by side pass every level; the same objects without their subject-only
    features pass up to `appearance` but not `identity`; other subjects fail from `colours` on; one subject
    alone is not two regions."""
    from lrkit.toyworld import SceneSpec, get_subject, render, subject_pair, subjects_found
    from lrkit.toyworld.scorers import SUBJECT_LEVELS

    for names, scene in ((("toy_ball", "toy_teapot"), "beach"), (("toy_ball", "toy_vase"), "grass"),
                         (("toy_mug", "toy_mushroom"), "snow")):
        subs = [get_subject(n) for n in names]
        assert subjects_found(subject_pair(names, scene).image, subs) == dict.fromkeys(SUBJECT_LEVELS, True)
        plain = [s.spec(cx=cx, cy=0.58, scale=0.42).moved(extras=()) for s, cx in zip(subs, (0.28, 0.72))]
        found = subjects_found(render(SceneSpec(scene), plain).image, subs)
        assert found == dict(regions=True, colours=True, appearance=True, identity=False), (names, found)
    others = [get_subject("toy_mug"), get_subject("toy_mushroom")]
    found = subjects_found(subject_pair(("toy_ball", "toy_teapot"), "beach").image, others)
    assert found == dict(regions=True, colours=False, appearance=False, identity=False)
    alone = get_subject("toy_ball").render("beach", cx=0.3, scale=0.45).image
    assert subjects_found(alone, [get_subject("toy_ball"), get_subject("toy_teapot")]) == dict.fromkeys(
        SUBJECT_LEVELS, False)


def test_two_object_fidelity_of_a_perfect_and_a_blank_model():
    from types import SimpleNamespace

    from lrkit.toyworld import ObjectSpec, SceneSpec, render, scene_of
    from lrkit.toyworld.pretrain import measure_two_object_fidelity, two_object_prompts

    items = two_object_prompts(6, seed=1)
    assert items == two_object_prompts(6, seed=1) and items != two_object_prompts(6, seed=2)
    for prompt, ((cls_a, col_a), (cls_b, col_b)) in items:
        assert cls_a != cls_b and col_a != col_b and f"{col_a} {cls_a}" in prompt and f"{col_b} {cls_b}" in prompt

    def model(draw: bool):
        def pipe(prompt, **kwargs):
            wanted = dict(items)[prompt]
            objects = [ObjectSpec(cls=k, color=c, scale=0.4, cx=x, cy=0.6) for (k, c), x in zip(wanted, (0.27, 0.73))]
            return SimpleNamespace(images=[render(SceneSpec(scene_of(prompt) or "studio"), objects if draw else [],
                                                  64).image])
        return pipe

    perfect = measure_two_object_fidelity(model(True), n=6, seed=1)
    assert (perfect["two_regions"], perfect["two_colours"], perfect["two_classes"]) == (1.0, 1.0, 1.0)
    blank = measure_two_object_fidelity(model(False), n=6, seed=1)
    assert (blank["two_regions"], blank["two_colours"], blank["two_classes"]) == (0.0, 0.0, 0.0)
