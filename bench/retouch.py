"""Does stage 2 carry the reference's appearance? A transfer measure on the toy world.

Zero-shot: a *reference concept* of a toy subject (its studio photos, no weights: the personalized model is
the base model), so whatever of the subject appears in a layout-retouch image came through the attention
swap. Layouts are the toy base's own objects of the subject's class in the prompted scene; only layouts whose
object has another colour than the subject count. For each image and its layout:

- colour / pattern / identity: the retouched object's colour is the subject's (`object_color`), its pattern
  (`object_pattern`), the subject's identity (`is_subject`);
- transfer score: with m_L, m_X the layout's and the image's mean object colour (RGB, inside
  `segment_object`) and m_R the reference photos' mean subject colour, d(m_X, m_L) / (d(m_X, m_L) + d(m_X, m_R)):
  0 = the layout's look, 1 = the reference's;
- scene kept: `classify_scene` of the image is the layout's;
- centre moved: distance between the object centres of the image and the layout (image widths).

Each variant is a set of `GenerationOptions` fields (e.g. `foreground=replace`, `reference_weight=8`,
`swap_levels=3`); all share the layouts (same seeds), so they differ only in stage 2.

    python bench/retouch.py                               # -> bench/results/retouch.json, RESULTS.md
    python bench/retouch.py --seeds 4 --no-write          # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

import _common

from lrkit.attention import attention_layers
from lrkit.demo import write_photos
from lrkit.inference import GenerationOptions, LayoutRetouchPipeline
from lrkit.reference import reference_concept
from lrkit.toyworld.scorers import (is_subject, mean_object_color, object_color, object_pattern, retouch_transfer,
                                    segment_object)
from lrkit.toyworld.subjects import get_subject
from lrkit.toyworld.world import SCENES

ROOT = _common.ROOT
RESULTS_JSON = ROOT / "bench" / "results" / "retouch.json"
RESULTS_HEADING = "Retouch transfer (toy world)"
VARIANTS: dict[str, tuple[str, dict]] = {  # --variants name -> (label, GenerationOptions fields)
    "off": ("swap off (the layout)", dict(swap=False)),
    "concatenate": ("concatenate (default)", {}),
    "weight8": ("concatenate, reference weight 8", dict(reference_weight=8.0)),
    "weight64": ("concatenate, reference weight 64", dict(reference_weight=64.0)),
    "replace": ("replace", dict(foreground="replace")),
    "replace3": ("replace, 3 swap levels", dict(foreground="replace", swap_levels=3)),
    "replace0": ("replace, λ = 0 (swap from step 0)", dict(foreground="replace", lam=0.0)),
    "late": ("concatenate, swap from 0.6 of the steps", dict(swap_start=0.6)),
    "replace-all": ("replace, every self-attention layer (encoder too)", dict(foreground="replace", swap_layers="all")),
}


def reference_color(photos: Path) -> np.ndarray:
    """The subject's mean colour over its studio photos (inside the toy segmenter's mask)."""
    colors = [mean_object_color(Image.open(path)) for path in sorted(photos.glob("*.png"))]
    return np.mean([c for c in colors if c is not None], axis=0)


def score(image: Image.Image, layout: Image.Image, subject, ref_rgb: np.ndarray) -> dict:
    x, lay = (np.asarray(i.convert("RGB")).astype(np.float64) for i in (image, layout))
    mx, ml = segment_object(x), segment_object(lay)
    return dict(layout_color=object_color(lay, ml) if ml.any() else None,
                color=object_color(x, mx) if mx.any() else None,
                pattern=object_pattern(x, mx) if mx.any() else None,
                subject=bool(is_subject(x, subject, mx)) if mx.any() else False,
                **retouch_transfer(x, lay, ref_rgb))


def summarize(records: list[dict], subject) -> dict:
    """Shares over the layouts whose object has another colour than the subject's."""
    other = [r for r in records if r["layout_color"] not in (None, subject.color)]
    n = len(other)

    def share(key, value=True) -> float:
        return sum(r[key] == value for r in other) / n if n else float("nan")

    transfer = [r["transfer"] for r in other if "transfer" in r]
    moved = [r["center_moved"] for r in other if "center_moved" in r]
    return dict(layouts=n, of=len(records), color=share("color", subject.color), pattern=share("pattern", subject.pattern),
                subject=share("subject"), transfer=float(np.mean(transfer)) if transfer else float("nan"),
                transfer_ci=float(1.96 * np.std(transfer) / np.sqrt(len(transfer))) if len(transfer) > 1 else float("nan"),
                scene_kept=share("scene_kept"), center_moved=float(np.mean(moved)) if moved else float("nan"))


def markdown(results: dict[str, dict]) -> str:
    lines = ["| variant | layouts (other colour / all) | subject's colour | pattern | identity | transfer score "
             "(0 layout, 1 reference) ±95 % | scene kept | centre moved |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        lines.append(f"| {name} | {s['layouts']} / {s['of']} | {s['color']:.0%} | {s['pattern']:.0%} | "
                     f"{s['subject']:.0%} | {s['transfer']:.3f} ± {s['transfer_ci']:.3f} | {s['scene_kept']:.0%} | "
                     f"{s['center_moved']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subject", default="toy_ball", help="a toy subject (lrkit.toyworld.SUBJECTS)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    parser.add_argument("--first-seed", type=int, default=100, help="first seed (the defaults were not tuned on them)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--lam", type=float, default=0.3, help="λ of stage 1 (the layout)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {','.join(VARIANTS)}")
    parser.add_argument("--work", default="/tmp/lrkit-bench-retouch", help="photos, the reference concept, caches")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true", help="print only (no results files)")
    args = parser.parse_args(argv)
    command = _common.start_run("retouch.py", args.threads, argv)
    machine = _common.machine_info("cpu")
    started = time.perf_counter()

    subject = get_subject(args.subject)
    work = Path(args.work)
    photos = write_photos(subject, work / "photos")
    bundle = work / "reference"
    if not (bundle / "concept.json").is_file():
        reference_concept(photos, subject.cls, bundle, base="toy")
    pipe = LayoutRetouchPipeline.from_concept("toy", bundle, cache_dir=work / "cache")
    ref_rgb = reference_color(photos)
    prompts = [f"a photo of a {subject.cls} {SCENES[s].phrase}" for s in subject.compatible_scenes()
               if SCENES[s].phrase]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: {unknown[0]!r} is not one of {list(VARIANTS)}")
    results: dict[str, dict] = {}
    for name in wanted:
        label, fields = VARIANTS[name]
        if fields.get("swap_layers") == "all":
            fields = {**fields, "swap_layers": [l.name for l in attention_layers(pipe.pipe.unet) if l.is_self]}
        options = GenerationOptions.of(mode="layout-retouch", num_inference_steps=args.steps,
                                       **{"lam": args.lam, **fields})
        records = []
        for prompt in prompts:
            for gen in pipe(prompt, seeds=seeds, options=options):
                records.append(score(gen.image, gen.layout, subject, ref_rgb))
        results[label] = summarize(records, subject)
        print(f"{label:<36} {json.dumps(results[label])}", flush=True)
    table = markdown(results)
    print(table)
    _common.finish_machine_info(machine, started)
    if args.no_write:
        return 0
    _common.write_json(RESULTS_JSON, command=command, machine=machine, subject=args.subject, seeds=seeds,
                       prompts=prompts, steps=args.steps, lam=args.lam, reference_rgb=ref_rgb.tolist(), results=results)
    key = (f"zero-shot, reference concept of `{args.subject}`, {len(prompts)} prompts x {len(seeds)} seeds, "
           f"{args.steps} DDIM steps, λ = {args.lam}")
    section = f"### {key}\n\n{_common.machine_line(machine)}\n\n`{command}`\n\n{table}\n"
    _common.write_results_section(ROOT / "bench" / "RESULTS.md", RESULTS_HEADING, section, key,
                                  keep_from="#### What the numbers mean")
    logging.getLogger("bench.retouch").info("wrote %s and bench/RESULTS.md", RESULTS_JSON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
