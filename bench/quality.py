"""Quality bench on the toy world: the vanilla model with the class phrase, personalized LoRA, DreamBooth and
Textual Inversion concepts, layout only and layout-retouch, on the same prompts and seeds, scored with the
toy world's exact scorers (subject identity, prompted scene, object class, layout diversity sigma^2_avg)
plus a centre-point heatmap per method. `--sweep` also scores layout-retouch over its inference options
(lambda, s0, swap levels and start, sam_weight, mask_threshold) to choose the defaults in configs/infer/.

    python bench/quality.py                  # comparison -> bench/results/quality.json, heatmaps, RESULTS.md
    python bench/quality.py --sweep          # + the option sweep

Concepts are trained once into --work and reused; generated images stay there too (re-runs skip them).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import _common

from lrkit.demo import DEMO_SUBJECT, TOY_BACKDROPS, TOY_LORA_RECIPE, toy_training_data
from lrkit.evaluation import report
from lrkit.inference import GenerationOptions, LayoutRetouchPipeline
from lrkit.jobs import fill_prompts, generate_to_folder, train_or_reuse
from lrkit.toyworld import layout_diversity, scene_of, score_image, segment_object
from lrkit.toyworld.subjects import get_subject
from lrkit.toyworld.world import SCENES

ROOT = _common.ROOT
RESULTS_JSON = ROOT / "bench" / "results" / "quality.json"
HEATMAP_DIR = ROOT / "bench" / "results" / "quality"

# Toy recipes of the other two methods (the LoRA one is the demo's). DreamBooth fine-tunes the whole
# UNet with prior preservation on class images the toy model draws; TI learns two new token vectors.
RECIPES: dict[str, dict] = {
    "lora": TOY_LORA_RECIPE,
    "dreambooth": {
        "method": "dreambooth",
        "dreambooth": {"prior_preservation": True, "num_class_images": 32, "class_inference_steps": 20},
        "optim": {"lr": 2e-4},
        "data": {"repeats": 1, "random_flip": 0.0, "batch_size": 4},
        "max_steps": 300,
        "accelerator": "cpu",
        "cache_latents": True,
    },
    "textual_inversion": {
        "method": "textual_inversion",
        "textual_inversion": {"num_vectors": 2},
        "optim": {"embedding_lr": 2e-2},
        "data": {"repeats": 1, "random_flip": 0.0, "batch_size": 4},
        "max_steps": 400,
        "accelerator": "cpu",
        "cache_latents": True,
    },
}


class ToySegmenter:
    """A stand-in for SAM on the toy world: the exact object segmenter, restricted to the box's surroundings.

    SAM weights cannot be loaded offline, and random SAM weights segment nothing; the toy world's own
    segmenter plays SAM's part so that sam_weight (SAM mask vs cross-attention) can be measured at all.
    """

    def __call__(self, image: Image.Image, box=None) -> torch.Tensor:
        mask = torch.from_numpy(segment_object(image.convert("RGB")))
        if box is not None:  # as SAM with a box prompt: nothing outside the box
            x0, y0, x1, y1 = (int(v) for v in box)
            inside = torch.zeros_like(mask)
            inside[max(y0, 0):y1, max(x0, 0):x1] = True
            mask = mask & inside
        return mask


def bench_prompts(subject) -> list[str]:
    """'a photo of {} <phrase>' for every scene the subject's colours are visible on, except the studio and the
    scenes of the training backdrops (TOY_BACKDROPS): the concepts are judged on scenes they never saw."""
    return [f"a photo of {{}} {SCENES[s].phrase}" for s in subject.compatible_scenes()
            if SCENES[s].phrase and s not in TOY_BACKDROPS]


def score_folder(done, subject) -> list[dict]:
    records = []
    for prompt, paths in done:
        for path in paths:
            with Image.open(path) as image:
                record = score_image(image.convert("RGB"), subject, scene_of(prompt))
            records.append({"prompt": prompt, "image": path.name, **record})
    return records


def summarize(records: list[dict], subject) -> dict:
    """Rates over all images; sigma^2_avg over the images where an object was found."""
    centers: dict[str, list] = {}
    for r in records:
        if r["center"] is not None:
            centers.setdefault(r["prompt"], []).append(r["center"])
    n = len(records)
    return {
        "images": n,
        "subject_rate": sum(r["is_subject"] for r in records) / n,
        "identity_mean": float(np.mean([r["identity"] for r in records])),
        "scene_rate": sum(r["scene_ok"] for r in records) / n,
        "class_rate": sum(r["object_class"] == subject.cls for r in records) / n,
        "object_found": sum(r["center"] is not None for r in records) / n,
        "sigma2_avg": layout_diversity(centers) if centers else float("nan"),
        "mean_scale": float(np.mean([r["scale"] for r in records if r["scale"] is not None] or [np.nan])),
    }


def run_method(pipeline, prompts, seeds, options: GenerationOptions, out: Path, subject) -> list[dict]:
    done = generate_to_folder(pipeline, prompts, seeds, out, options)
    return score_folder(done, subject)


METHODS = (  # (name, concept, generation overrides)
    ("vanilla (class phrase)", "lora", {"mode": "vanilla"}),
    ("LoRA", "lora", {"mode": "personalized"}),
    ("DreamBooth", "dreambooth", {"mode": "personalized"}),
    ("Textual Inversion", "textual_inversion", {"mode": "personalized"}),
    ("layout (LoRA)", "lora", {"mode": "layout"}),
    ("layout-retouch (LoRA)", "lora", {"mode": "layout-retouch"}),
)


def sweep_grid(defaults: GenerationOptions) -> list[tuple[str, dict]]:
    """One option varied at a time around the defaults (lambda also moves s0 and the swap start with it)."""
    grid = [("defaults", {})]
    grid += [(f"lam={v}", {"lam": v}) for v in (0.1, 0.2, 0.4, 0.5) if v != defaults.layout.lam]
    grid += [(f"retouch_start={v}", {"retouch_start": v}) for v in (0.5,)]
    grid += [(f"swap_start={v}", {"swap_start": v}) for v in (0.6,)]
    grid += [(f"swap_levels={v}", {"swap_levels": v}) for v in (1, 2) if v != defaults.retouch.swap_levels]
    grid += [(f"sam_weight={v}", {"sam_weight": v}) for v in (0.0, 1.0) if v != defaults.retouch.sam_weight]
    grid += [(f"mask_threshold={v}", {"mask_threshold": v}) for v in (0.3, 0.7)
             if v != defaults.retouch.mask_threshold]
    grid += [("foreground=replace", {"foreground": "replace"}), ("reference_weight=8", {"reference_weight": 8.0})]
    # At a lambda where the layout loses identity: layout only, and the retouch with each way of reading R.
    grid += [("lam=0.5, layout only", {"lam": 0.5, "mode": "layout"}), ("lam=0.5", {"lam": 0.5}),
             ("lam=0.5, foreground=replace", {"lam": 0.5, "foreground": "replace"}),
             ("lam=0.5, reference_weight=8", {"lam": 0.5, "reference_weight": 8.0})]
    return grid


def markdown(rows: list[tuple[str, dict]], vanilla_sigma: float) -> str:
    lines = ["| method | subject | identity | scene | class | object found | sigma^2_avg | vs vanilla | scale |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in rows:
        ratio = s["sigma2_avg"] / vanilla_sigma if vanilla_sigma > 0 else float("nan")
        lines.append(f"| {name} | {s['subject_rate']:.0%} | {s['identity_mean']:.2f} | {s['scene_rate']:.0%} | "
                     f"{s['class_rate']:.0%} | {s['object_found']:.0%} | {s['sigma2_avg']:.4f} | {ratio:.2f} | "
                     f"{s['mean_scale']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subject", default=DEMO_SUBJECT)
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt (0..N-1)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--work", default="outputs/bench-quality", help="concepts and images (reused)")
    parser.add_argument("--methods", default="lora,dreambooth,textual_inversion",
                        help="concepts to train and compare (comma-separated)")
    parser.add_argument("--sweep", action="store_true", help="also sweep layout-retouch's inference options")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only (no results files)")
    args = parser.parse_args(argv)
    command = _common.start_run("quality.py", args.threads, argv)
    logging.getLogger("lrkit").setLevel(logging.WARNING)
    started = time.perf_counter()
    machine = _common.machine_info("cpu", watched_paths=("lrkit", "bench/quality.py"))

    subject = get_subject(args.subject)
    work = Path(args.work)
    photos, class_word = toy_training_data(subject, work / "photos")  # every method trains on the same data
    wanted = [m for m in args.methods.split(",") if m]
    concepts, train_seconds = {}, {}
    for method in wanted:
        recipe = dict(RECIPES[method])
        t0 = time.perf_counter()
        concepts[method] = train_or_reuse(photos, class_word, work / "concepts" / method, base="toy",
                                          method=recipe.pop("method"), train_overrides=recipe)
        train_seconds[method] = round(time.perf_counter() - t0, 1)
    seeds = list(range(args.seeds))
    prompts = bench_prompts(subject)
    base = GenerationOptions.of(num_inference_steps=args.steps, height=64, width=64)
    pipelines: dict[str, LayoutRetouchPipeline] = {}

    def pipeline_for(method: str) -> LayoutRetouchPipeline:
        if method not in pipelines:
            pipelines[method] = LayoutRetouchPipeline.from_concept("toy", concepts[method],
                                                                  cache_dir=work / "cache")
        return pipelines[method]

    results: dict[str, dict] = {}
    all_records: dict[str, list[dict]] = {}
    for name, method, overrides in METHODS:
        if method not in concepts:
            continue
        pipe = pipeline_for(method)
        filled = fill_prompts(prompts, pipe.concept)
        options = base.replace(**overrides)
        slug = name.split(" ")[0].lower() + ("" if method == "lora" else f"-{method}")
        records = run_method(pipe, filled, seeds, options, work / "images" / slug, subject)
        all_records[name] = records
        results[name] = summarize(records, subject)
        print(f"{name:<24} {json.dumps(results[name])}", flush=True)

    sweep: dict[str, dict] = {}
    if args.sweep and "lora" in concepts:
        pipe = pipeline_for("lora")
        pipe.segmenter = ToySegmenter()
        filled = fill_prompts(prompts, pipe.concept)
        for label, overrides in sweep_grid(base):
            options = base.replace(**{"mode": "layout-retouch", **overrides})
            folder = work / "sweep" / label.replace("=", "_")
            sweep[label] = summarize(run_method(pipe, filled, seeds, options, folder, subject), subject)
            print(f"sweep {label:<20} {json.dumps(sweep[label])}", flush=True)

    vanilla_sigma = results.get("vanilla (class phrase)", {}).get("sigma2_avg", float("nan"))
    table = markdown(list(results.items()), vanilla_sigma)
    print(table)
    if sweep:
        print(markdown(list(sweep.items()), vanilla_sigma))
    _common.finish_machine_info(machine, started)
    if args.no_write:
        return 0
    HEATMAP_DIR.mkdir(parents=True, exist_ok=True)
    tiles = []
    for name, records in all_records.items():
        centers = [r["center"] for r in records if r["center"] is not None]
        path = report.center_heatmap(name, centers, HEATMAP_DIR / f"{name.split(' ')[0].lower()}.png", cell=10)
        tiles.append(Image.open(path).convert("RGB"))
    strip = Image.new("RGB", (sum(t.width + 4 for t in tiles), max(t.height for t in tiles)), "white")
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + 4
    strip.save(HEATMAP_DIR / "centre_heatmaps.png")
    _common.write_json(RESULTS_JSON, command=command, machine=machine, subject=args.subject, seeds=seeds,
                       prompts=prompts, steps=args.steps, train_seconds=train_seconds, results=results, sweep=sweep,
                       options=asdict(base))
    key = f"toy world, subject `{args.subject}`, {len(prompts)} prompts x {len(seeds)} seeds, {args.steps} DDIM steps"
    section = (f"### {key}\n\n{_common.machine_line(machine)}\n\n`{command}`\n\n{table}\n\n"
               f"![centre points](results/quality/centre_heatmaps.png)\n")
    if sweep:
        section += "\nlayout-retouch (LoRA) option sweep, one option at a time around the defaults, SAM played by "
        section += "the toy segmenter:\n\n" + markdown(list(sweep.items()), vanilla_sigma) + "\n"
    # the key is the whole heading: a re-run with the same setup replaces its subsection (notes kept)
    _common.write_results_section(_common.RESULTS_MD, "Quality (toy world)", section, key, keep_from="#### Reading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
