"""Dual-reference personalization (DESIGN §6.1) on the toy world: the plain concept and concept + style, side by side.

A toy subject -> a LoRA concept on the toy base model, trained with the demo's recipe (`lrkit.demo`:
`toy_training_data`, `TOY_LORA_RECIPE`; once per base-model fingerprint and step count, reused
afterwards) -> for every prompt x seed, one image per method:

- **personalized**: the plain concept (the yardstick);
- **dual-reference**: the concept as customization reference, plus a style reference with a distinct
  palette and texture: by default the night sky (navy, stars) with a yellow vase in front of it (the
  style image's content, named by `style_subject` so that it is masked out of the style;
  `--style-scene`, `--style-content`); the switch step from the entropy rule;
- **customize-only** and **stylize-only**: one phase each (the same switch step), to see what each does;
- **dual-reference, style_weight 10**: both phases, the style tokens' attention weights multiplied by 10.

Every image is scored with the toy world's exact scorers (`lrkit.toyworld.scorers`) on the subject found
by `segment_object` on the prompted scene: its colour (`color_scores`: probability of the subject's own
colour, of the style palette's colour and of the style content's colour; the mean RGB distance of its
pixels to the style scene's palette, `background_distance`), its shape (`identity_components`' P(shape) and
`classify_object`), the whole identity (`subject_identity`), and the background (`classify_scene` against
the prompted scene). The style should move the subject's colour towards the palette, keep its shape, and
leave the prompted scene in the background.

    python bench/dual_reference.py                       # toy_ball, 3 scenes x 8 seeds, 25 DDIM steps
    python bench/dual_reference.py --subject toy_vase --style-scene brick --style-content ball:yellow

Results: a markdown table on stdout, JSON at `--out` (default bench/results/dual_reference.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the toy model is embedded; never reach the Hub

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/ (already there for `python bench/...`)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, finish_machine_info, machine_info, start_run, write_json  # noqa: E402

logger = logging.getLogger("bench.dual_reference")

PROMPTS = (("a photo of {} on the beach", "beach"), ("a photo of {} in the snow", "snow"),
           ("a photo of {} on the grass", "grass"))
METHODS = {  # name -> GenerationOptions overrides (None: the plain concept)
    "personalized": None,
    "dual-reference": {},
    "customize-only": {"stylize": False},
    "stylize-only": {"customize": False},
    "dual-reference, style_weight 10": {"style_weight": 10.0},
    "dual-reference, style_shift 0.5": {"style_shift": 0.5},
    "dual-reference, style_shift 1": {"style_shift": 1.0},
    "dual-reference, style_shift 1 from the switch": {"style_shift": 1.0, "style_shift_start": 0.0},
}


def base_tag(base: str) -> str:
    """A short digest of the base model's fingerprint: a concept is reused only on the weights it was trained on."""
    from lrkit.models import fingerprint, load_base

    probe = fingerprint(load_base(base))
    text = json.dumps([probe.unet_config_sha256, [round(x, 6) for x in probe.weight_probe]])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def concept_for(subject, work: Path, base: str, train_steps: int) -> Path:
    """The subject's LoRA concept on `base` with the demo's recipe (trained unless already there for this base and
    step count)."""
    from lrkit.demo import TOY_LORA_RECIPE, toy_training_data
    from lrkit.jobs import train_or_reuse

    run = work / f"concept-{subject.name}-{base_tag(base)}-{train_steps}"
    photos, class_word = toy_training_data(subject, work / f"photos-{subject.name}")
    recipe = {**TOY_LORA_RECIPE, "max_steps": train_steps}
    return train_or_reuse(photos, class_word, run, base=base, method=recipe.pop("method"), train_overrides=recipe).path


def style_image(path: Path, scene: str, content: tuple[str, str]):
    """The style reference: a toy-world render of `scene` with one (class, colour) object; returns the image and
    the object's mask."""
    from lrkit.toyworld.render import render
    from lrkit.toyworld.world import ObjectSpec, SceneSpec

    cls, color = content
    sample = render(SceneSpec(scene), [ObjectSpec(cls, color, cx=0.5, cy=0.55, scale=0.45)], 64)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample.image.save(path)
    return sample.image, sample.masks[0]


def score(image, subject, scene: str, style_scene: str, style_color: str, content_color: str) -> dict:
    """The toy scorers' judgement of one generation (module docstring)."""
    from lrkit.toyworld import scorers

    detected, _ = scorers.classify_scene(image)
    mask = scorers.segment_object(image, scene)
    record = {"scene": detected, "scene_ok": detected == scene, "found": bool(mask.any())}
    if not mask.any():
        return record
    colors = scorers.color_scores(image, mask)
    parts = scorers.identity_components(image, subject, mask)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)[mask]
    record.update(
        object_class=scorers.classify_object(image, mask)[0],
        color=max(colors, key=colors.get),
        p_subject_color=colors[subject.color], p_style_color=colors[style_color],
        p_content_color=colors[content_color],
        palette_distance=float(scorers.background_distance(image, style_scene)[mask].mean()),
        mean_rgb=[round(float(c), 1) for c in pixels.mean(axis=0)],
        shape=parts["shape"], identity=scorers.subject_identity(image, subject, mask),
    )
    record["class_ok"] = record["object_class"] == subject.cls
    return record


def summarize(records: list[dict]) -> dict:
    """Rates over all images; colour and shape means over the images where a subject was found."""
    found = [r for r in records if r["found"]]
    mean = lambda key: float(np.mean([r[key] for r in found])) if found else None  # noqa: E731
    return {
        "images": len(records), "found_rate": len(found) / len(records),
        "scene_rate": float(np.mean([r["scene_ok"] for r in records])),
        "class_rate": float(np.mean([r["class_ok"] for r in found])) if found else None,
        **{key: mean(key) for key in ("p_subject_color", "p_style_color", "p_content_color", "palette_distance",
                                       "shape", "identity")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subject", default="toy_ball", help="a toy subject (lrkit.toyworld.SUBJECTS)")
    parser.add_argument("--base", default="toy", help="base model (the embedded toy model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="LoRA training steps of the concept (default: the demo recipe's)")
    parser.add_argument("--style-scene", default="night", help="the style image's scene (its palette and texture)")
    parser.add_argument("--style-content", default="vase:yellow", metavar="CLASS:COLOUR",
                        help="the object in front of the style scene (masked out of the style by style_subject)")
    parser.add_argument("--switch", type=float, default=None, help="override the entropy rule (fraction of T)")
    parser.add_argument("--work", default=str(ROOT / "outputs" / "bench-dual-reference"),
                        help="concepts, inversion cache and images")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--sam-weight", type=float, default=0.5,
                        help="weight of the segmenter's mask against cross-attention in the target mask "
                             "(GenerationOptions.retouch.sam_weight)")
    parser.add_argument("--segmenter", choices=("toy", "none"), default="toy",
                        help="toy: the toy world's exact segmenter plays SAM (target masks from the switch step on, "
                             "as with sam_checkpoint); none: cross-attention masks only")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "dual_reference.json"))
    args = parser.parse_args(argv)
    command = start_run("dual_reference.py", args.threads, argv)
    started = time.perf_counter()
    machine = machine_info("cpu", watched_paths=["lrkit", "bench/dual_reference.py"])

    from lrkit.inference import GenerationOptions, LayoutRetouchPipeline
    from lrkit.inference.dual_reference import entropy_switch, image_entropy
    from lrkit.inference.inversion import center_square
    from lrkit.toyworld import scorers
    from lrkit.toyworld.subjects import get_subject

    from lrkit.demo import TOY_LORA_RECIPE
    from lrkit.toyworld.world import CLASSES, COLORS, SCENES

    subject = get_subject(args.subject)
    content = tuple(args.style_content.split(":"))
    if len(content) != 2 or content[0] not in CLASSES or content[1] not in COLORS:
        raise SystemExit(f"--style-content: expected CLASS:COLOUR with CLASS in {CLASSES} and COLOUR in "
                         f"{tuple(COLORS)}, got {args.style_content!r}")
    if args.style_scene not in SCENES:
        raise SystemExit(f"--style-scene: one of {tuple(SCENES)}, got {args.style_scene!r}")
    args.train_steps = args.train_steps or TOY_LORA_RECIPE["max_steps"]
    work = Path(args.work)
    bundle = concept_for(subject, work, args.base, args.train_steps)
    style_path = work / f"style_{args.style_scene}_{content[1]}_{content[0]}.png"
    style, content_mask = style_image(style_path, args.style_scene, content)
    style_colors = scorers.color_scores(style, ~content_mask)  # the scene alone
    style_color = max(style_colors, key=style_colors.get)  # the named colour nearest to the style palette
    if style_color == subject.color:
        raise SystemExit(f"--style-scene {args.style_scene}: its palette reads as {style_color}, the subject's own "
                         f"colour; choose a scene with another palette")
    pipeline = LayoutRetouchPipeline.from_concept(args.base, bundle, cache_dir=work / "cache")
    if args.segmenter == "toy":
        from quality import ToySegmenter

        pipeline.segmenter = ToySegmenter()
    prompts = [p.format(pipeline.concept.subject_phrase()) for p, _ in PROMPTS]
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, sam_weight=args.sam_weight)
    with PIL.Image.open(pipeline.reference_photo(0)) as photo:
        custom = center_square(photo.convert("RGB"), 64)  # what the customization reference's entropy is read from
    h_c, h_s = image_entropy(custom), image_entropy(style)
    switch = args.switch if args.switch is not None else entropy_switch(h_c, h_s)

    records, timings = [], {}
    images_dir = work / "images"
    for method, overrides in METHODS.items():
        if overrides is None:
            options = GenerationOptions.of(mode="personalized", **common)
        else:
            options = GenerationOptions.of(mode="dual-reference", style_reference=str(style_path),
                                        style_subject=content[0], switch=args.switch, **common, **overrides)
        t0 = time.perf_counter()
        generations = pipeline(prompts, seeds=args.seeds, options=options)
        timings[method] = round(time.perf_counter() - t0, 1)
        for gen in generations:
            scene = PROMPTS[gen.prompt_index][1]
            path = images_dir / method.replace(", ", "_").replace(" ", "") / f"{gen.stem}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            gen.image.save(path)
            records.append({"method": method, "prompt": gen.prompt, "seed": gen.seed, "image": str(path),
                            **score(gen.image, subject, scene, args.style_scene, style_color, content[1])})
        logger.info("%s: %d images in %.1f s", method, len(generations), timings[method])

    summary = {m: summarize([r for r in records if r["method"] == m]) for m in METHODS}
    finish_machine_info(machine, started)
    write_json(Path(args.out), command=command, machine=machine,
               setup={"subject": subject.name, "subject_color": subject.color, "subject_class": subject.cls,
                      "style": f"{args.style_scene} with a {content[1]} {content[0]}",
                      "style_color": style_color, "style_content_color": content[1],
                      "entropy_custom_bits": round(h_c, 4), "entropy_style_bits": round(h_s, 4),
                      "switch_fraction": switch, "switch_step": GenerationOptions.of(
                          num_inference_steps=args.steps).step_index(switch),
                      "steps": args.steps, "guidance": args.guidance, "seeds": args.seeds,
                      "train_steps": args.train_steps, "concept": str(bundle), "segmenter": args.segmenter,
                      "sam_weight": args.sam_weight,
                      "prompts": [p for p, _ in PROMPTS]},
               seconds=timings, summary=summary, images=records)

    columns = ("scene_rate", "found_rate", "class_rate", "shape", "identity", "p_subject_color", "p_style_color",
               "p_content_color", "palette_distance")
    lines = [f"| method | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    for method, s in summary.items():
        cells = ["-" if s[c] is None else f"{s[c]:.3f}" if c != "palette_distance" else f"{s[c]:.1f}" for c in columns]
        lines.append(f"| {method} | {' | '.join(cells)} |")
    print(f"subject {subject.name} ({subject.color} {subject.pattern} {subject.cls}); style: {args.style_scene} "
          f"(palette colour {style_color}) with a {content[1]} {content[0]}; entropy H_C = {h_c:.2f}, "
          f"H_S = {h_s:.2f} bits -> switch {switch:.3f} of {args.steps} steps")
    print("\n".join(lines))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
