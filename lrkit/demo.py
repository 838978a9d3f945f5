"""`lrkit demo`: the whole path on the embedded toy world, offline, on a CPU, in minutes.

A toy subject's photos -> a LoRA concept on the toy base model -> personalized and
Layout-and-Retouch images of it in several scenes -> one grid PNG, scored by the toy world's exact
scorers (is it the subject? is it the prompted scene? where is it?).

Re-running reuses the photos, the concept bundle and every finished image in OUT.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from lrkit.io import atomic_write_text

logger = logging.getLogger(__name__)

DEMO_SUBJECT = "toy_ball"
DEMO_PROMPTS: tuple[str, ...] = (
    "a photo of {} on the beach",
    "a photo of {} in the snow",
    "a photo of {} on the grass",
)
DEMO_SEEDS: tuple[int, ...] = (0, 1, 2, 3)
DEMO_MODES: tuple[str, ...] = ("personalized", "layout-retouch")
TOY_BACKDROPS: tuple[str, ...] = ("night", "brick")
"""Scenes the toy recipes also show the subject on (`write_photos`); none of the prompts' scenes."""
# The toy LoRA recipe, trained on `toy_training_data` (studio and backdrop photos, the subject's description as
# class phrase); what it gives: bench/RESULTS.md, "Why the toy LoRA does not reach the subject".
TOY_LORA_RECIPE: dict = {
    "method": "lora",
    "lora": {"rank": 16, "alpha": 16, "train_text_encoder": True},
    "optim": {"lr": 5e-4},
    "data": {"repeats": 1, "random_flip": 0.0, "batch_size": 4},
    "max_steps": 1200,
    "accelerator": "cpu",
    "cache_latents": True,
}


@dataclass
class DemoResult:
    """Where the demo wrote its outputs, and its scores per mode."""

    out_dir: Path
    grid: Path
    bundle: Path
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{'mode':<16} {'subject':>8} {'scene':>8}   (toy scorers, {self.out_dir / 'scores.json'})"]
        for mode, s in self.scores.items():
            lines.append(f"{mode:<16} {s['subject_rate']:>8.0%} {s['scene_rate']:>8.0%}")
        return "\n".join(lines + [f"grid: {self.grid}"])


def write_photos(subject, out_dir: Path, n: int = 5, *, backdrops: tuple[str, ...] | list[str] = (), copies: int = 3,
                 seed: int = 0) -> Path:
    """The subject's `n` studio photos as PNGs in OUT_DIR, plus its backdrop photos (files already there are kept).

    Backdrop photos: per scene in `backdrops`, per copy and per studio photo, the subject cut out of the
    photo and pasted on a fresh render of that scene (`{scene}_{copy}_{photo}.png`), with a caption file
    `a photo of {token} {class} <scene phrase>`. The cut-out is the toy segmenter's mask, which plays
    SAM here. Training on them teaches the subject apart from the studio backdrop: the scene words in
    their captions keep the scenes that a LoRA trained on studio photos alone paints over
    (bench/RESULTS.md, "Why the toy LoRA does not reach the subject").
    """
    import numpy as np

    from lrkit.io import atomic_save_png
    from lrkit.toyworld.render import render
    from lrkit.toyworld.scorers import segment_object
    from lrkit.toyworld.world import SCENES, random_scene

    unknown = [s for s in backdrops if s not in SCENES or not SCENES[s].phrase]
    if unknown:
        raise ValueError(f"write_photos: backdrops {unknown} are not scenes with a phrase; choose from "
                         f"{', '.join(s for s in SCENES if SCENES[s].phrase)}")
    if copies < 1:
        raise ValueError(f"write_photos: copies must be >= 1, got {copies}")
    out_dir.mkdir(parents=True, exist_ok=True)
    photos = subject.photos(n)
    for i, photo in enumerate(photos):
        path = out_dir / f"photo_{i}.png"
        if not path.is_file():
            atomic_save_png(photo.image, path)
    rng = np.random.default_rng(seed)
    masks = [segment_object(photo.image, scene="studio")[..., None] for photo in photos] if backdrops else []
    for copy in range(copies if backdrops else 0):
        for scene in backdrops:
            for i, (photo, mask) in enumerate(zip(photos, masks)):
                size = photo.image.size[0]
                backdrop = np.asarray(render(random_scene(rng, scene), [], size).image.convert("RGB"), np.float32)
                path = out_dir / f"{scene}_{copy}_{i}.png"
                if not path.is_file():  # the caption first: a picture on disk always has its caption
                    path.with_suffix(".txt").write_text(f"a photo of {{token}} {{class}} {SCENES[scene].phrase}\n")
                    pixels = np.where(mask, np.asarray(photo.image.convert("RGB"), np.float32), backdrop)
                    atomic_save_png(Image.fromarray(pixels.round().astype(np.uint8)), path)
    return out_dir


def toy_training_data(subject, out_dir: Path) -> tuple[Path, str]:
    """(photo folder, class phrase) that the toy recipes train on: `write_photos` with TOY_BACKDROPS, and
    the subject's generic description (`Subject.description`) as the class phrase."""
    return write_photos(subject, out_dir, backdrops=TOY_BACKDROPS), subject.description


def _grid(photo: Path, rows: list[tuple[str, dict[str, list[Path]]]], tile: int = 96) -> Image.Image:
    """Per prompt one row: the first photo, then per mode its images (one per seed), labelled."""
    modes = list(rows[0][1]) if rows else []
    seeds = max((len(paths) for _, by_mode in rows for paths in by_mode.values()), default=1)
    label, gap = 14, 6
    width = tile + len(modes) * (seeds * tile + gap)
    sheet = Image.new("RGB", (width, label + len(rows) * (tile + label)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 1), "photo", fill="black")
    for m, mode in enumerate(modes):
        draw.text((tile + m * (seeds * tile + gap) + gap, 1), mode, fill="black")
    with Image.open(photo) as image:
        reference = image.convert("RGB").resize((tile, tile), Image.NEAREST)
    for r, (prompt, by_mode) in enumerate(rows):
        y = label + r * (tile + label)
        draw.text((2, y + 1), prompt, fill="black")
        sheet.paste(reference, (0, y + label))
        for m, mode in enumerate(modes):
            x0 = tile + m * (seeds * tile + gap) + gap
            for c, path in enumerate(by_mode[mode]):
                with Image.open(path) as image:
                    sheet.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (x0 + c * tile, y + label))
    return sheet


def run_demo(out_dir: str | os.PathLike = "outputs/demo", *, subject: str = DEMO_SUBJECT,
             prompts: tuple[str, ...] | list[str] = DEMO_PROMPTS, seeds: tuple[int, ...] | list[int] = DEMO_SEEDS,
             base: str = "toy", modes: tuple[str, ...] | list[str] = DEMO_MODES, train_overrides: dict | None = None,
             options: dict | None = None) -> DemoResult:
    """Photos of a toy subject -> LoRA concept -> personalized and layout-retouch images, grid and scores.

    `train_overrides` change the toy LoRA recipe (`TOY_LORA_RECIPE`), `options` the generation
    options (`GenerationOptions` fields).
    """
    from lrkit.inference import GenerationOptions, LayoutRetouchPipeline
    from lrkit.io import atomic_save_png
    from lrkit.jobs import fill_prompts, generate_to_folder, train_or_reuse
    from lrkit.training.config import merge_nested
    from lrkit.toyworld import scene_of, score_image
    from lrkit.toyworld.subjects import get_subject

    if not prompts or not seeds or not modes:
        raise ValueError("run_demo: prompts, seeds and modes must not be empty")
    toy_subject = get_subject(subject)
    out = Path(out_dir)
    photos, class_word = toy_training_data(toy_subject, out / "photos")
    recipe = merge_nested(TOY_LORA_RECIPE, train_overrides or {})
    concept = train_or_reuse(photos, class_word, out / toy_subject.name, base=base, method=recipe.pop("method"),
                             train_overrides=recipe)
    filled = fill_prompts(list(prompts), concept)
    pipeline = LayoutRetouchPipeline.from_concept(base, concept, cache_dir=out / "cache")
    rows: list[tuple[str, dict[str, list[Path]]]] = [(p, {}) for p in filled]
    scores: dict[str, dict[str, float]] = {}
    records = []
    for mode in modes:
        opts = GenerationOptions.of(**{**(options or {}), "mode": mode})
        logger.info("demo: %s, %d prompts x %d seeds", mode, len(filled), len(seeds))
        done = generate_to_folder(pipeline, filled, list(seeds), out / mode, opts)
        hits = subject_hits = 0
        for (prompt, paths), row in zip(done, rows):
            row[1][mode] = paths
            scene = scene_of(prompt)
            for seed, path in zip(seeds, paths):
                with Image.open(path) as image:
                    record = score_image(image.convert("RGB"), toy_subject, scene)
                records.append({"mode": mode, "prompt": prompt, "seed": seed, "image": str(path), **record})
                hits += int(record.get("scene_ok", False))
                subject_hits += int(record["is_subject"])
        n = len(filled) * len(seeds)
        scores[mode] = {"subject_rate": subject_hits / n, "scene_rate": hits / n, "images": n}
    grid = atomic_save_png(_grid(photos / "photo_0.png", rows), out / "demo_grid.png")
    atomic_write_text(out / "scores.json", json.dumps({"summary": scores, "images": records}, indent=1, default=str))
    return DemoResult(out_dir=out, grid=grid, bundle=concept.path, scores=scores)


__all__ = ["DEMO_PROMPTS", "DEMO_SEEDS", "DEMO_SUBJECT", "DemoResult", "TOY_BACKDROPS", "TOY_LORA_RECIPE", "run_demo",
           "toy_training_data", "write_photos"]
