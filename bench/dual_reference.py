"""Dual-reference personalization (DESIGN §6.1) on the toy world: the plain concept and concept + style, side by side.

A toy subject's studio photos -> a LoRA concept on the toy base model (trained once per base-model
fingerprint, reused afterwards) -> for every prompt x seed, one image per method:

- **personalized**: the plain concept (the yardstick);
- **dual-reference**: the concept as customization reference, plus a style reference with a distinct
  palette and texture: a brick wall (red-brown bricks, pale mortar lines) with a yellow ball in front
  of it (the style image's content, named by `style_subject="ball"` so that it is masked out of the
  style); the switch step from the entropy rule;
- **customize-only** and **stylize-only**: one phase each (the same switch step), to see what each does;
- **dual-reference, style_weight 10**: both phases, the style tokens' attention weights multiplied by 10.

Every image is scored with the toy world's exact scorers (`lrkit.toyworld.scorers`) on the subject found
by `segment_object` on the prompted scene: its colour (`color_scores`: probability of the subject's own
colour, of the style palette's colour and of the style content's colour; the mean RGB distance of its
pixels to the brick palette, `background_distance`), its shape (`identity_components`' P(shape) and
`classify_object`), the whole identity (`subject_identity`), and the background (`classify_scene` against
the prompted scene). The style should move the subject's colour towards the palette, keep its shape, and
leave the prompted scene in the background.

    python bench/dual_reference.py                       # toy_vase, 3 scenes x 4 seeds, 25 DDIM steps
    python bench/dual_reference.py --subject toy_ball --seeds 0 1 --train-steps 200

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
STYLE_SCENE, STYLE_CONTENT = "brick", ("ball", "yellow")
# The toy LoRA recipe: UNet + text-encoder LoRA, rank 8, on the 5 subject photos at 64 px (CPU minutes).
TOY_LORA = {"method": "lora", "lora": {"rank": 8, "alpha": 8, "train_text_encoder": True}, "optim": {"lr": 1e-3},
            "data": {"repeats": 1, "random_flip": 0.0, "batch_size": 4}, "accelerator": "cpu", "cache_latents": True}
METHODS = {  # name -> GenerationOptions overrides (None: the plain concept)
    "personalized": None,
    "dual-reference": {},
    "customize-only": {"stylize": False},
    "stylize-only": {"customize": False},
    "dual-reference, style_weight 10": {"style_weight": 10.0},
    "dual-reference, style_shift 0.5": {"style_shift": 0.5},
    "dual-reference, style_shift 1": {"style_shift": 1.0},
}


def base_tag(base: str) -> str:
    """A short digest of the base model's fingerprint: a concept is reused only on the weights it was trained on."""
    from lrkit.models import fingerprint, load_base

    probe = fingerprint(load_base(base))
    text = json.dumps([probe.unet_config_sha256, [round(x, 6) for x in probe.weight_probe]])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def concept_for(subject, work: Path, base: str, train_steps: int) -> Path:
    """The subject's LoRA concept on `base` (trained unless already there for this base and step count)."""
    from lrkit.concept import MANIFEST
    from lrkit.inference.outputs import save_png
    from lrkit.training import train_concept

    run = work / f"concept-{subject.name}-{base_tag(base)}-{train_steps}"
    bundle = run / "concept"
    if (bundle / MANIFEST).is_file():
        logger.info("reusing the concept %s", bundle)
        return bundle
    photos = work / f"photos-{subject.name}"
    photos.mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(subject.photos(5)):
        save_png(photo.image, photos / f"photo_{i}.png")
    logger.info("training a LoRA concept of %s on %s (%d steps)", subject.name, base, train_steps)
    recipe = json.loads(json.dumps(TOY_LORA))
    recipe["data"].update(photos=str(photos), class_word=subject.cls, resolution=64)
    train_concept({**recipe, "base": base, "output_dir": str(run), "max_steps": train_steps, "overwrite": True})
    return bundle


def style_image(path: Path, seed: int = 0):
    """The style reference: a brick wall with a yellow ball (a toy-world render); returns the image and its masks."""
    from lrkit.toyworld.render import render
    from lrkit.toyworld.world import ObjectSpec, SceneSpec

    cls, color = STYLE_CONTENT
    sample = render(SceneSpec(STYLE_SCENE), [ObjectSpec(cls, color, cx=0.5, cy=0.55, scale=0.45)], 64)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample.image.save(path)
    return sample.image, sample.masks[0]


def score(image, subject, scene: str, style_color: str) -> dict:
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
        p_content_color=colors[STYLE_CONTENT[1]],
        palette_distance=float(scorers.background_distance(image, STYLE_SCENE)[mask].mean()),
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
    parser.add_argument("--subject", default="toy_vase", help="a toy subject (lrkit.toyworld.SUBJECTS)")
    parser.add_argument("--base", default="toy", help="base model (the embedded toy model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale")
    parser.add_argument("--train-steps", type=int, default=400, help="LoRA training steps of the concept")
    parser.add_argument("--switch", type=float, default=None, help="override the entropy rule (fraction of T)")
    parser.add_argument("--work", default=str(ROOT / "outputs" / "bench-dual-reference"),
                        help="concepts, inversion cache and images")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="weight of the segmenter's mask against cross-attention in the target mask (GenerationOptions.alpha)")
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

    subject = get_subject(args.subject)
    work = Path(args.work)
    bundle = concept_for(subject, work, args.base, args.train_steps)
    style_path = work / "style_brick_ball.png"
    style, content_mask = style_image(style_path)
    style_colors = scorers.color_scores(style, ~content_mask)  # the brick wall alone
    style_color = max(style_colors, key=style_colors.get)  # the named colour nearest to the brick palette
    pipeline = LayoutRetouchPipeline.from_concept(args.base, bundle, cache_dir=work / "cache")
    if args.segmenter == "toy":
        from quality import ToySegmenter

        pipeline.segmenter = ToySegmenter()
    prompts = [p.format(pipeline.concept.subject_phrase()) for p, _ in PROMPTS]
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, alpha=args.alpha)
    with PIL.Image.open(pipeline.reference_photo(0)) as photo:
        custom = center_square(photo.convert("RGB"), 64)  # what the customization reference's entropy is read from
    h_c, h_s = image_entropy(custom), image_entropy(style)
    switch = args.switch if args.switch is not None else entropy_switch(h_c, h_s)

    records, timings = [], {}
    images_dir = work / "images"
    for method, overrides in METHODS.items():
        if overrides is None:
            options = GenerationOptions(mode="personalized", **common)
        else:
            options = GenerationOptions(mode="dual-reference", style_reference=str(style_path),
                                        style_subject=STYLE_CONTENT[0], switch=args.switch, **common, **overrides)
        t0 = time.perf_counter()
        generations = pipeline(prompts, seeds=args.seeds, options=options)
        timings[method] = round(time.perf_counter() - t0, 1)
        for gen in generations:
            scene = PROMPTS[gen.prompt_index][1]
            path = images_dir / method.replace(", ", "_").replace(" ", "") / f"{gen.stem}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            gen.image.save(path)
            records.append({"method": method, "prompt": gen.prompt, "seed": gen.seed, "image": str(path),
                            **score(gen.image, subject, scene, style_color)})
        logger.info("%s: %d images in %.1f s", method, len(generations), timings[method])

    summary = {m: summarize([r for r in records if r["method"] == m]) for m in METHODS}
    finish_machine_info(machine, started)
    write_json(Path(args.out), command=command, machine=machine,
               setup={"subject": subject.name, "subject_color": subject.color, "subject_class": subject.cls,
                      "style": f"{STYLE_SCENE} wall with a {' '.join(reversed(STYLE_CONTENT))}",
                      "style_color": style_color, "style_content_color": STYLE_CONTENT[1],
                      "entropy_custom_bits": round(h_c, 4), "entropy_style_bits": round(h_s, 4),
                      "switch_fraction": switch, "switch_step": GenerationOptions(
                          num_inference_steps=args.steps).step_index(switch),
                      "steps": args.steps, "guidance": args.guidance, "seeds": args.seeds,
                      "train_steps": args.train_steps, "concept": str(bundle), "segmenter": args.segmenter,
                      "alpha": args.alpha,
                      "prompts": [p for p, _ in PROMPTS]},
               seconds=timings, summary=summary, images=records)

    columns = ("scene_rate", "found_rate", "class_rate", "shape", "identity", "p_subject_color", "p_style_color",
               "p_content_color", "palette_distance")
    lines = [f"| method | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    for method, s in summary.items():
        cells = ["-" if s[c] is None else f"{s[c]:.3f}" if c != "palette_distance" else f"{s[c]:.1f}" for c in columns]
        lines.append(f"| {method} | {' | '.join(cells)} |")
    print(f"subject {subject.name} ({subject.color} {subject.pattern} {subject.cls}); style: {STYLE_SCENE} wall "
          f"(palette colour {style_color}) with a {STYLE_CONTENT[1]} {STYLE_CONTENT[0]}; entropy H_C = {h_c:.2f}, "
          f"H_S = {h_s:.2f} bits -> switch {switch:.3f} of {args.steps} steps")
    print("\n".join(lines))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
