"""concept_em on the toy world: learned-mask IoU per EM round against the ground truth, versus the
baseline whose masks are estimated once and never updated, and whether generations combining the
two tokens show both subjects.

One picture holds two built-in subjects (`lrkit.toyworld.subjects`) on a scene background; its
ground-truth object masks come from the renderer. Both runs (EM and baseline) train the same
tokens with the same seeds and step budget; they differ only in `concept_em.update_masks`. Masks
are compared at latent resolution (the ground truth is area-downsampled and thresholded at 0.5).
Generations use the EM bundle with the prompt `a photo of <v1> and <v2> on the <scene>` and are
scored with the toy world's exact scorers: each subject must be found (`subject_identity` >= 0.5)
on its own connected object region; the relaxed count asks only for each subject's colour. Each
generation's scene (is it the prompted one?) and the scale of its largest object (`score_image`) show
whether a concept is painted over the whole frame.

    python bench/concept_em.py                       # toy model, writes bench/results/concept_em.json
    python bench/concept_em.py --steps 40 --samples 4 --out /tmp/em.json   # a quick look
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import ROOT, finish_machine_info, machine_info, start_run, write_json

logger = logging.getLogger("bench.concept_em")


def latent_truth(masks, grid: tuple[int, int]) -> list[torch.Tensor]:
    from lrkit.masks import resize_map

    return [resize_map(torch.from_numpy(m).float(), grid) >= 0.5 for m in masks]


def train(base: str, photos: Path, out: Path, args, *, update_masks: bool) -> Path:
    from lrkit.training.train import train_concept

    concepts = [dict(token=f"<v{i + 1}>", initializer=init, class_word=cls)
                for i, (init, cls) in enumerate(zip(args.initializers, args.class_words))]
    if args.background:  # DESIGN §6.3's "[v3] background": a token that competes for the scene's pixels
        concepts.append(dict(token=BACKGROUND_TOKEN, initializer=args.background, class_word="background"))
    config = dict(
        base=base, method="concept_em", output_dir=str(out), overwrite=True, resume=None, seed=args.seed,
        data=dict(photos=str(photos), resolution=args.resolution, repeats=1, random_flip=0.0,
                  caption_template=f"a photo of {{token}} {args.scene_phrase}"),
        concept_em=dict(concepts=concepts, images=[dict(file="scene.png", concepts=[c["token"] for c in concepts])],
                        steps_per_round=args.steps_per_round, update_masks=update_masks,
                        attention_timesteps=args.timesteps, attention_levels=args.levels,
                        attention_loss_weight=args.attention_loss_weight, convergence_iou=args.convergence_iou,
                        after_convergence=args.after_convergence,
                        train_lora=args.lora, **extra_options(args.em)),
        optim=dict(embedding_lr=args.embedding_lr, lr=1e-3), max_steps=args.steps, accelerator="cpu",
        precision="32", log_every_n_steps=10, checkpoint_every_n_epochs=10**6,
    )
    return train_concept(config)


def extra_options(pairs: list[str]) -> dict:
    """`--em KEY=VALUE ...` -> {KEY: VALUE parsed as YAML} (true, 0.5, joint, ...)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--em: expected KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


BACKGROUND_TOKEN = "<bg>"


def rounds_iou(out: Path, truth: list[torch.Tensor], tokens: list[str]) -> list[dict]:
    """Per EM round: step, IoU of each token's mask with the ground truth (from OUTPUT_DIR/em)."""
    import json

    from lrkit.masks import load_mask_png, mask_iou, resize_map
    from lrkit.training.em import _safe

    rounds = json.loads((out / "em" / "rounds.json").read_text())
    rows = []
    for r in rounds:
        folder = out / "em" / f"round{r['round']:02d}"
        ious = {}
        for t, gt in zip(tokens, truth):
            mask = load_mask_png(folder / f"img00-{_safe(t)}.png")
            ious[t] = round(mask_iou(resize_map(mask.float(), tuple(gt.shape)) >= 0.5, gt), 4)
        subjects = [v for t, v in ious.items() if t != BACKGROUND_TOKEN]  # the mean is over the subjects
        rows.append(dict(round=r["round"], step=r["step"], iou=ious, mean_iou=round(float(np.mean(subjects)), 4),
                         iou_with_previous_round=r.get("min_iou_change")))
    return rows


def both_subjects(image, subjects) -> tuple[bool, bool]:
    """(both found by identity on distinct regions, both found by colour on distinct regions)."""
    from lrkit.toyworld import IDENTITY_THRESHOLD, object_color, subject_identity
    from lrkit.toyworld.scorers import object_regions

    regions = object_regions(image, min_pixels=20)[:4]
    ident = [[subject_identity(image, s, r) >= IDENTITY_THRESHOLD for r in regions] for s in subjects]
    color = [[object_color(image, r) == s.color for r in regions] for s in subjects]

    def distinct(hit) -> bool:
        return any(hit[0][i] and hit[1][j] for i in range(len(regions)) for j in range(len(regions)) if i != j)

    return distinct(ident), distinct(color)


@torch.no_grad()
def generations(base: str, bundle: Path, subjects, args) -> dict:
    from lrkit.concept import Concept
    from lrkit.models import load_base
    from lrkit.toyworld import get_subject, score_image

    pipe = load_base(base)
    pipe.set_progress_bar_config(disable=True)
    Concept.load(bundle).apply(pipe)
    subs = [get_subject(s) for s in subjects]
    prompt = f"a photo of <v1> and <v2> {args.scene_phrase}"
    hits_id = hits_color = scenes = 0
    scales = []
    for seed in range(args.samples):
        image = pipe(prompt, num_inference_steps=args.gen_steps, guidance_scale=args.guidance, height=args.resolution,
                     width=args.resolution, generator=torch.Generator().manual_seed(seed)).images[0]
        ident, color = both_subjects(image, subs)
        hits_id += ident
        hits_color += color
        record = score_image(image, scene=args.scene)  # the largest object's scale: does a concept fill the frame?
        scenes += record["scene_ok"]
        if record["scale"] is not None:
            scales.append(record["scale"])
        if args.save_images:
            image.save(args.save_images / f"gen{seed:02d}.png")
    return dict(prompt=prompt, samples=args.samples, both_subjects_identity=hits_id / args.samples,
                both_subjects_colour=hits_color / args.samples, scene_rate=scenes / args.samples,
                median_object_scale=round(float(np.median(scales)), 3) if scales else None,
                steps=args.gen_steps, guidance=args.guidance)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="toy")
    parser.add_argument("--subjects", nargs=2, default=["toy_ball", "toy_vase"])
    parser.add_argument("--initializers", nargs=2, default=["red ball", "purple vase"])
    parser.add_argument("--class-words", nargs=2, default=["ball", "vase"])
    parser.add_argument("--scene", default="beach")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200, help="optimizer-step budget of each run")
    parser.add_argument("--steps-per-round", type=int, default=25)
    parser.add_argument("--timesteps", type=int, default=50, help="E-step: noised timesteps averaged")
    parser.add_argument("--levels", type=int, nargs="*", default=[0],
                        help="cross-attention levels; default 0 (16x16): the toy model's latents are 16x16 and lrkit's "
                             "default level (the second-lowest, 8x8 here) is too coarse for objects 4-7 latent px wide")
    parser.add_argument("--attention-loss-weight", type=float, default=0.1)
    parser.add_argument("--convergence-iou", type=float, default=0.95)
    parser.add_argument("--after-convergence", choices=("stop", "freeze"), default="freeze",
                        help="once the masks converge: stop, or keep them and train the tokens to --steps")
    parser.add_argument("--embedding-lr", type=float, default=5e-3)
    parser.add_argument("--lora", action="store_true", help="train LoRA with the tokens")
    parser.add_argument("--background", default=None, metavar="WORD",
                        help=f"add a background concept {BACKGROUND_TOKEN} initialised from WORD (e.g. beach)")
    parser.add_argument("--em", nargs="*", default=[], metavar="KEY=VALUE",
                        help="further concept_em options, e.g. estep_captions=joint relative_maps=true (YAML values)")
    parser.add_argument("--samples", type=int, default=16, help="generations scored")
    parser.add_argument("--gen-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the runs here (masks per round under <work>/em/em/round*/); default: a temp folder")
    parser.add_argument("--save-images", type=Path, default=None, help="folder for the generated images")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "concept_em.json")
    args = parser.parse_args(argv)
    command = start_run("concept_em.py", args.threads, argv)
    from lrkit.toyworld import SCENES

    args.scene_phrase = SCENES[args.scene].phrase
    if args.save_images:
        args.save_images.mkdir(parents=True, exist_ok=True)
    machine = machine_info("cpu", watched_paths=["lrkit", "bench/concept_em.py"])
    started = time.perf_counter()
    from lrkit.toyworld import subject_pair

    sample = subject_pair(tuple(args.subjects), args.scene, args.resolution)
    tokens = ["<v1>", "<v2>"] + ([BACKGROUND_TOKEN] if args.background else [])
    results = {}
    work = contextlib.nullcontext(str(args.work)) if args.work else tempfile.TemporaryDirectory(prefix="lrkit-bench-em-")
    with work as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir(parents=True, exist_ok=True)
        sample.image.save(photos / "scene.png")
        for name, update in (("em", True), ("baseline_fixed_masks", False)):
            t0 = time.perf_counter()
            out = Path(tmp) / name
            bundle = train(args.base, photos, out, args, update_masks=update)
            from lrkit.masks import load_mask_png

            grid = tuple(load_mask_png(out / "em" / "round00" / "img00-v1.png").shape)  # latent resolution
            truth = latent_truth(sample.masks, grid)
            if args.background:
                truth.append(~(truth[0] | truth[1]))
            rows = rounds_iou(out, truth, tokens)
            results[name] = dict(rounds=rows, final_iou=rows[-1]["iou"], final_mean_iou=rows[-1]["mean_iou"],
                                 train_seconds=round(time.perf_counter() - t0, 1))
            logger.info("%s: mean IoU per round %s", name, [r["mean_iou"] for r in rows])
            if args.samples:
                results[name]["generation"] = generations(args.base, bundle, args.subjects, args)
                logger.info("generation: %s", results[name]["generation"])
    finish_machine_info(machine, started)
    write_json(args.out, command=command, machine=machine,
               setup=dict(base=args.base, subjects=args.subjects, initializers=args.initializers, scene=args.scene,
                          resolution=args.resolution, steps=args.steps, steps_per_round=args.steps_per_round,
                          attention_timesteps=args.timesteps, attention_levels=args.levels,
                          attention_loss_weight=args.attention_loss_weight, lora=args.lora, seed=args.seed,
                          background=args.background, after_convergence=args.after_convergence,
                          options=extra_options(args.em)),
               acceptance=dict(mask_iou_target=0.7, both_subjects_target=0.5),
               results=results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
