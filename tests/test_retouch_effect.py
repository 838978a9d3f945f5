"""The retouch retouches: on the toy world's ground truth, stage 2 measurably moves the layout's object
towards the reference's look, keeps the scene and leaves the object where the layout put it.

Zero-shot (a reference concept: the subject's photos, no weights), so whatever of the reference reaches the
image came through the attention swap. The bars sit below what `bench/retouch.py` measures on other seeds
(bench/RESULTS.md, "Retouch transfer"), so they fail when the swap stops carrying appearance, not on noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from lrkit.demo import write_photos
from lrkit.inference import GenerationOptions, LayoutRetouchPipeline
from lrkit.reference import reference_concept
from lrkit.toyworld.scorers import mean_object_color, object_color, retouch_transfer
from lrkit.toyworld.subjects import get_subject

SEEDS = [0, 1, 2, 3, 4, 5]
PROMPT = "a photo of a ball on the beach"


@pytest.fixture(scope="module")
def transfers(tmp_path_factory):
    from PIL import Image

    work = tmp_path_factory.mktemp("retouch-effect")
    subject = get_subject("toy_ball")
    photos = write_photos(subject, work / "photos")
    reference_concept(photos, subject.cls, work / "reference", base="toy")
    pipe = LayoutRetouchPipeline.from_concept("toy", work / "reference", cache_dir=work / "cache")
    ref_rgb = np.mean([mean_object_color(Image.open(p)) for p in sorted(photos.glob("*.png"))], axis=0)
    results = {}
    for name, fields in {"off": dict(swap=False), "concatenate": {}, "replace": dict(foreground="replace")}.items():
        options = GenerationOptions.of(mode="layout-retouch", num_inference_steps=20, lam=0.3, **fields)
        records = []
        for gen in pipe(PROMPT, seeds=SEEDS, options=options):
            if object_color(gen.layout) != subject.color:  # only layouts of another colour say anything
                records.append(retouch_transfer(gen.image, gen.layout, ref_rgb))
        results[name] = records
    return results


def _mean(records, key):
    values = [r[key] for r in records if key in r]
    assert len(values) >= len(SEEDS) // 2, f"too few objects found for {key!r}: {records}"
    return float(np.mean(values))


def test_the_swap_moves_the_object_towards_the_reference(transfers):
    off, concat, replace = (_mean(transfers[k], "transfer") for k in ("off", "concatenate", "replace"))
    assert off == 0.0  # swap off returns the layout itself
    assert concat > 0.05, f"concatenate transfer {concat:.3f}"
    assert replace > 0.3, f"replace transfer {replace:.3f}"
    assert replace > concat + 0.15, f"replace {replace:.3f} vs concatenate {concat:.3f}"


def test_the_retouch_keeps_the_scene_and_the_layout(transfers):
    for name in ("concatenate", "replace"):
        kept = np.mean([r["scene_kept"] for r in transfers[name]])
        assert kept >= 0.8, f"{name}: scene kept in {kept:.0%}"
        moved = _mean(transfers[name], "center_moved")
        assert moved <= 0.08, f"{name}: object centre moved {moved:.3f} of the image width"
