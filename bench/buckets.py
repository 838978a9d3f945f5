"""Aspect-ratio buckets versus square crops on the toy world: a subject photographed off-centre in wide pictures.

The pictures: a toy subject (default `toy_ball`) photographed off-centre, left or right of the middle, in 2:1
pictures (256x128 px: the band through the middle of a 256 px toy-world render), on the studio backdrop and on the
toy recipe's two backdrop scenes (captions name the scene). Each arm trains the toy LoRA recipe
(`lrkit.demo.TOY_LORA_RECIPE`, `--steps` steps) at 64 px on them:

- `centre crops`: `data.buckets: false` (a folder of one shape trains as square crops, `auto`'s choice), centre crop;
- `random square crops`: `data.buckets: false`, `data.center_crop: false`;
- `buckets`: `data.buckets: true`, `data.bucket_step: 16` (the toy base's latents halve twice): the 48x96 bucket.

For every training sample the run reads (its counters, from the run's own sampler) the share of the subject's
ground-truth mask inside the crop is measured; "cut off" is a sample showing less than 98 % of the subject. The
trained concept then generates `a photo of sks <class phrase> <scene>` on four unseen scenes and the studio, `--seeds`
seeds each, 25 DDIM steps, guidance 7.5, at the toy base's 64x64 and at the pictures' 48x96; the toy scorers give
identity (`is_subject`; the mean `subject_identity` and its colour, pattern and shape parts, `identity_components`:
a subject drawn cut off loses shape) and whether the prompted scene is drawn.

    python bench/buckets.py                        # toy_ball, 3 arms, 800 steps each, 8 seeds
    python bench/buckets.py --steps 400 --seeds 4 --arms "centre crops" buckets
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lrkit  # noqa: F401  (before torch: lrkit's OpenMP wait policy applies)
import numpy as np
import torch

from _common import RESULTS_MD, ROOT, finish_machine_info, machine_info, machine_line, start_run, \
    write_json, write_results_section

ARMS = {
    "centre crops": {"data": {"buckets": False, "center_crop": True}, "cache_latents": True},
    "random square crops": {"data": {"buckets": False, "center_crop": False}, "cache_latents": False},
    "buckets": {"data": {"buckets": True, "bucket_step": 16, "center_crop": True}, "cache_latents": True},
}
PICTURE = (256, 128)  # width, height of the wide pictures
SCENE_PROMPTS = (("beach", "on the beach"), ("snow", "in the snow"), ("grass", "on the grass"),
                 ("desert", "in the desert"), ("studio", ""))
VISIBLE = 0.98  # a sample showing less of the subject than this share has it cut off
SIZES = ((64, 64), (48, 96))  # generated at: the toy base's square, and the pictures' 2:1 bucket


def wide_pictures(subject, out: Path, *, per_scene: dict[str, int], seed: int = 0) -> list[np.ndarray]:
    """Write the wide pictures (PNG + caption) into `out`; return each one's subject mask, bool (128, 256)."""
    from PIL import Image

    from lrkit.toyworld.render import render
    from lrkit.toyworld.world import SCENES, SceneSpec, random_scene

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = PICTURE
    band = slice((width - height) // 2, (width + height) // 2)  # rows of the square render kept
    masks, k = [], 0
    for scene, count in per_scene.items():
        for _ in range(count):
            side = -1 if k % 2 == 0 else 1  # alternately left and right of the middle
            cx = 0.5 + side * float(rng.uniform(0.16, 0.32))
            spec = subject.spec(cx=cx, cy=0.5 + float(rng.uniform(-0.03, 0.03)), scale=float(rng.uniform(0.36, 0.42)),
                                rotation=float(rng.uniform(-10, 10)))
            backdrop = SceneSpec("studio") if scene == "studio" else random_scene(rng, scene)
            sample = render(backdrop, [spec], width, brightness=1.0 + float(rng.uniform(-0.1, 0.1)))
            picture = np.asarray(sample.image)[band]  # (128, 256, 3)
            name = f"{k:02d}_{scene}"
            Image.fromarray(picture).save(out / f"{name}.png")
            phrase = SCENES[scene].phrase
            (out / f"{name}.txt").write_text(f"a photo of {{token}} {{class}}{' ' + phrase if phrase else ''}\n")
            masks.append(sample.masks[0][band])
            k += 1
    return masks


def visible_share(item: dict, mask: np.ndarray) -> float:
    """The share of the subject's mask (in the picture's pixels) inside the sample's crop. The photo was resized to
    cover the crop (`lrkit.training.buckets.cover_scale`); the crop's top-left is in the resized (mirrored, when
    flipped) photo."""
    from lrkit.training.buckets import cover_scale

    height, width = item["original_size"]
    size = item["target_size"]
    scale = cover_scale(width, height, size)
    if item["flipped"]:
        mask = mask[:, ::-1]
    top, left = item["crop_top_left"]
    rows = slice(int(round(top / scale)), int(round((top + size[0]) / scale)))
    cols = slice(int(round(left / scale)), int(round((left + size[1]) / scale)))
    return float(mask[rows, cols].sum() / mask.sum())


def training_crops(config, masks: list[np.ndarray]) -> dict:
    """The visible share of the subject in every sample of the run's `max_steps` steps (one process)."""
    from lrkit.training.module import ConceptDataModule, PairedDataset, StepSampler

    dm = ConceptDataModule(config)
    dataset = PairedDataset(dm.instance, None, buckets=dm.buckets)
    groups = dm.buckets.groups(len(dataset)) if dm.buckets is not None else None
    sampler = StepSampler(len(dataset), batch_size=config.data.batch_size, seed=config.seed, groups=groups)
    shares = []
    for step in range(config.max_steps):
        for b in range(config.data.batch_size):
            item = dataset[sampler.counter(step, b)]
            shares.append(visible_share(item, masks[item["photo_index"]]))
    shares = np.array(shares)
    sizes = sorted({f"{h}x{w}" for h, w in (dm.buckets.sizes if dm.buckets is not None else [(64, 64)])})
    return {"samples": len(shares), "cut_off": float((shares < VISIBLE).mean()), "visible_mean": float(shares.mean()),
            "visible_min": float(shares.min()), "sizes": sizes}


@torch.no_grad()
def generations(bundle: Path | None, subject, class_word: str, seeds: int, work: Path) -> dict:
    """Identity and scene of the concept's generations at each of `SIZES` (stock pipeline over the toy base; no
    bundle: the toy base alone, the same prompts)."""
    from lrkit import Concept, load_base
    from lrkit.toyworld import score_image

    pipe = load_base("toy")
    if bundle is not None:
        Concept.load(bundle).apply(pipe)
    pipe.set_progress_bar_config(disable=True)
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for height, width in SIZES:
        records = []
        for scene, phrase in SCENE_PROMPTS:
            prompt = f"a photo of sks {class_word} {phrase}".strip()
            images = pipe([prompt] * seeds, num_inference_steps=25, guidance_scale=7.5, height=height, width=width,
                          generator=[torch.Generator().manual_seed(s) for s in range(seeds)]).images
            for seed, image in enumerate(images):
                image.save(work / f"{height}x{width}_{scene}_{seed}.png")
                record = score_image(image, subject, scene)
                records.append(dict(record, prompt_scene=scene, **identity_parts(image, subject, record["scene"])))
        scenes = [r for r in records if r["prompt_scene"] != "studio"]
        out[f"{height}x{width}"] = {"subject_rate": float(np.mean([r["is_subject"] for r in records])),
                                    "identity_mean": float(np.mean([r["identity"] for r in records])),
                                    "scene_rate": float(np.mean([r["scene_ok"] for r in scenes])),
                                    **{part: float(np.mean([r[part] for r in records]))
                                       for part in ("color", "pattern", "shape")},
                                    "images": len(records)}
    return out


def identity_parts(image, subject, scene: str) -> dict[str, float]:
    """`identity_components` of the object the toy segmenter finds against the detected `scene` (0 when none)."""
    from lrkit.toyworld import identity_components, segment_object

    mask = segment_object(image, scene)
    return identity_components(image, subject, mask) if mask.any() else {"color": 0.0, "pattern": 0.0, "shape": 0.0}


def share(p: float, n: int) -> str:
    """`p` as a percentage with its 95 % interval (normal approximation) over `n` samples."""
    return f"{p:.0%} ± {1.96 * (p * (1 - p) / n) ** 0.5:.0%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subject", default="toy_ball", help="a toy subject (lrkit.toyworld.SUBJECTS)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=800, help="training steps per arm")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lrkit-bench-buckets"))
    parser.add_argument("--no-results", action="store_true",
                        help="do not write bench/RESULTS.md and bench/results/buckets.json")
    args = parser.parse_args(argv)
    command = start_run("buckets.py", args.threads, argv)
    started = time.perf_counter()
    machine = machine_info("cpu", watched_paths=["lrkit", "bench/buckets.py"])

    from lrkit.demo import TOY_BACKDROPS, TOY_LORA_RECIPE
    from lrkit.toyworld.subjects import get_subject
    from lrkit.training import train_concept
    from lrkit.training.config import load_config, merge_nested

    subject = get_subject(args.subject)
    class_word = subject.description  # the toy recipe's class phrase
    photos = args.work / f"pictures-{subject.name}"
    masks = wide_pictures(subject, photos, per_scene={"studio": 6, **{s: 3 for s in TOY_BACKDROPS}})

    base = generations(None, subject, class_word, args.seeds, args.work / "toy-base" / "images")
    rows = [dict(arm="toy base, no concept", samples=0, cut_off=None, visible_mean=None, visible_min=None,
                 sizes=["-"], generations=base, train_seconds=None)]
    for arm in args.arms:
        recipe = merge_nested(TOY_LORA_RECIPE, ARMS[arm])
        out = args.work / arm.replace(" ", "-")
        recipe.update(max_steps=args.steps, resume=None, overwrite=True, output_dir=str(out))
        config = load_config({"base": "toy", "data": {"photos": str(photos), "class_word": class_word,
                                                      "resolution": 64}}, **recipe)
        crops = training_crops(config, masks)
        t0 = time.perf_counter()
        bundle = train_concept(config)
        train_seconds = time.perf_counter() - t0
        scores = generations(bundle, subject, class_word, args.seeds, out / "images")
        row = dict(arm=arm, **crops, generations=scores, train_seconds=round(train_seconds, 1))
        print(json.dumps(row), flush=True)
        rows.append(row)

    finish_machine_info(machine, started)
    labels = [f"{h}x{w}" for h, w in SIZES]
    header = (f"| arm | trains at | training samples with the subject cut off | subject visible (mean / min) | "
              f"generations recognised as the subject, {' / '.join(labels)} | mean identity (colour, pattern, shape) | "
              f"prompted scene | training |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        trained = r["train_seconds"] is not None
        crops = (f"{r['cut_off']:.0%} of {r['samples']} | {r['visible_mean']:.0%} / {r['visible_min']:.0%}"
                 if trained else "- | -")
        g = [r["generations"][label] for label in labels]
        subject_rates = " / ".join(share(x["subject_rate"], x["images"]) for x in g)
        identities = " / ".join(f"{x['identity_mean']:.2f} ({x['color']:.2f}, {x['pattern']:.2f}, {x['shape']:.2f})"
                                for x in g)
        scenes = " / ".join(f"{x['scene_rate']:.0%}" for x in g)
        seconds = f"{r['train_seconds']:.0f} s" if trained else "-"
        lines.append(f"| {r['arm']} | {', '.join(r['sizes'])} | {crops} | {subject_rates} | {identities} | {scenes} | "
                     f"{seconds} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_results:
        write_json(ROOT / "bench" / "results" / "buckets.json", command=command, machine=machine, rows=rows)
        key = f"`{subject.name}`, {len(masks)} wide pictures, {args.steps} steps, {args.seeds} seeds"
        section = f"### {key}\n\n{machine_line(machine)}\n\n`{command}`\n\n{table}\n"
        write_results_section(RESULTS_MD, "Aspect-ratio buckets (toy world)", section, key, keep_from="**Reading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
