"""concept_em on the toy world: learned-mask IoU per EM round against the ground truth, versus the
baseline whose masks are estimated once and never updated, and whether generations combining the
two tokens show both subjects.

One picture holds two built-in subjects (`lrkit.toyworld.subjects`) on a scene background; its
ground-truth object masks come from the renderer. Both runs (EM and baseline) train the same
tokens with the same seeds and step budget; they differ only in `concept_em.update_masks`. Masks
are compared at latent resolution (the ground truth is area-downsampled and thresholded at 0.5).
Generations use the EM bundle with the prompt `a photo of <v1> and <v2> on the <scene>` and are
scored with the toy world's exact scorers (`lrkit.toyworld.subjects_found`): each subject must be found on an
object region of its own, by identity (`subject_identity` >= 0.5, the acceptance target); the weaker levels
(regions, colours, appearance: colour + pattern) show how far a generation gets. Each
generation's scene (is it the prompted one?) and the scale of its largest object (`score_image`) show
whether a concept is painted over the whole frame; each token alone (`alone_identity`) shows how often the
concept draws its subject at all, the ceiling of the combined prompt, and `alone_other_subject` how often the
other subject comes along; with `layout_variance` (sigma^2 of the largest object's centre over the seeds, 0 when
every sample is the same picture) it tells two concepts that combine from a memorised training picture.
`--also-scenes` scores the same prompts in other scenes.

By default the bench picture is the only training image (the setting of the mask target). DESIGN §6.3's
other input, several images that each list the concepts they show, is `--subject-photos N` (each subject's
studio photos and `--backdrops` photos, listing its token only) and `--pair-scenes` (more pictures of both).

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


def write_images(photos: Path, sample, args) -> list[dict]:
    """The training pictures in PHOTOS and concept_em's image list: the bench picture first (image 0, whose
    masks are scored), then `--pair-scenes` pictures of both subjects and, with `--subject-photos`, each
    subject's studio and backdrop photos (`lrkit.demo.write_photos`), each listing only its own token."""
    import shutil

    from lrkit.demo import write_photos
    from lrkit.toyworld import SCENES, get_subject, subject_pair

    tokens = ["<v1>", "<v2>"] + ([BACKGROUND_TOKEN] if args.background else [])
    sample.image.save(photos / "scene.png")
    images = [dict(file="scene.png", concepts=tokens)]
    for scene in args.pair_scenes:
        subject_pair(tuple(args.subjects), scene, args.resolution).image.save(photos / f"pair_{scene}.png")
        (photos / f"pair_{scene}.txt").write_text(f"a photo of {{token}} {SCENES[scene].phrase}\n")
        images.append(dict(file=f"pair_{scene}.png", concepts=tokens[:2]))
    if args.subject_photos:
        for k, name in enumerate(args.subjects):
            own = write_photos(get_subject(name), photos.parent / f"subject{k}", n=args.subject_photos,
                               backdrops=args.backdrops, copies=1)
            for png in sorted(own.glob("*.png")):
                target = photos / f"s{k}_{png.name}"
                shutil.copy(png, target)
                caption = png.with_suffix(".txt")
                target.with_suffix(".txt").write_text(caption.read_text() if caption.is_file() else "a photo of {token}\n")
                images.append(dict(file=target.name, concepts=[tokens[k]]))
    return images


def train(base: str, photos: Path, images: list[dict], out: Path, args, *, update_masks: bool) -> Path:
    from lrkit.training.train import train_concept

    concepts = [dict(token=f"<v{i + 1}>", initializer=init, class_word=cls)
                for i, (init, cls) in enumerate(zip(args.initializers, args.class_words))]
    if args.background:  # DESIGN §6.3's "[v3] background": a token that competes for the scene's pixels
        concepts.append(dict(token=BACKGROUND_TOKEN, initializer=args.background, class_word="background"))
    config = dict(
        base=base, method="concept_em", output_dir=str(out), overwrite=True, resume=None, seed=args.seed,
        data=dict(photos=str(photos), resolution=args.resolution, repeats=1, random_flip=args.flip,
                  batch_size=args.batch_size, caption_template=f"a photo of {{token}} {args.scene_phrase}"),
        concept_em=dict(concepts=concepts, images=images,
                        steps_per_round=args.steps_per_round, update_masks=update_masks,
                        attention_timesteps=args.timesteps, attention_levels=args.levels,
                        attention_loss_weight=args.attention_loss_weight, convergence_iou=args.convergence_iou,
                        after_convergence=args.after_convergence,
                        train_lora=args.lora, **extra_options(args.em)),
        lora=dict(rank=args.lora_rank, alpha=args.lora_rank, train_text_encoder=args.lora_text_encoder,
                  **(dict(unet_targets=args.lora_targets) if args.lora_targets else {})),
        optim=dict(embedding_lr=args.embedding_lr, lr=args.lr), max_steps=args.steps, accelerator="cpu",
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
    from lrkit.training.em import token_file_name

    rounds = json.loads((out / "em" / "rounds.json").read_text())
    rows = []
    for r in rounds:
        folder = out / "em" / f"round{r['round']:02d}"
        ious = {}
        for t, gt in zip(tokens, truth):
            mask = load_mask_png(folder / f"img00-{token_file_name(t)}.png")
            ious[t] = round(mask_iou(resize_map(mask.float(), tuple(gt.shape)) >= 0.5, gt), 4)
        subjects = [v for t, v in ious.items() if t != BACKGROUND_TOKEN]  # the mean is over the subjects
        rows.append(dict(round=r["round"], step=r["step"], iou=ious, mean_iou=round(float(np.mean(subjects)), 4),
                         iou_with_previous_round=r.get("min_iou_change")))
    return rows


@torch.no_grad()
def generations(base: str, bundle: Path, subjects, args) -> dict:
    """The scores of the combined prompt on the picture's scene; with `--also-scenes`, `elsewhere` holds the same
    scores on those scenes (can the tokens be combined in a new context, or only in their picture's?)."""
    from lrkit.concept import Concept
    from lrkit.models import load_base
    from lrkit.toyworld import get_subject

    pipe = load_base(base)
    pipe.set_progress_bar_config(disable=True)
    Concept.load(bundle).apply(pipe)
    subs = [get_subject(s) for s in subjects]
    result = scene_generations(pipe, subs, args.scene, args)
    if args.also_scenes:
        result["elsewhere"] = {scene: scene_generations(pipe, subs, scene, args, folder=scene)
                               for scene in args.also_scenes}
    return result


def scene_generations(pipe, subs, scene: str, args, folder: str = "") -> dict:
    from lrkit.toyworld import SCENES, is_subject, layout_diversity, score_image, subjects_found
    from lrkit.toyworld.scorers import SUBJECT_LEVELS, object_regions

    phrase = SCENES[scene].phrase
    save = args.save_images / folder if args.save_images else None
    if save:
        save.mkdir(parents=True, exist_ok=True)

    def generate(prompt: str, seed: int):
        return pipe(prompt, num_inference_steps=args.gen_steps, guidance_scale=args.guidance, height=args.resolution,
                    width=args.resolution, generator=torch.Generator().manual_seed(seed)).images[0]

    prompt = f"a photo of <v1> and <v2> {phrase}"
    hits = dict.fromkeys(SUBJECT_LEVELS, 0)
    scenes = 0
    scales, centers = [], []
    for seed in range(args.samples):
        image = generate(prompt, seed)
        for level, ok in subjects_found(image, subs).items():
            hits[level] += ok
        record = score_image(image, scene=scene)  # the largest object's scale: does a concept fill the frame?
        scenes += record["scene_ok"]
        if record["scale"] is not None:
            scales.append(record["scale"])
            centers.append(record["center"])
        if save:
            image.save(save / f"gen{seed:02d}.png")
    # each token alone: how often its subject is drawn at all (the ceiling of the combined prompt), and how often
    # the other subject comes with it (a LoRA that memorised the pair picture draws both for either token)
    alone, alone_with_other = {}, {}
    for k, token in enumerate(("<v1>", "<v2>")):
        found = other = 0
        for seed in range(args.samples):
            image = generate(f"a photo of {token} {phrase}", seed)
            regions = object_regions(image)[:4]
            found += any(is_subject(image, subs[k], r) for r in regions)
            other += any(is_subject(image, subs[1 - k], r) for r in regions)
        alone[token] = found / args.samples
        alone_with_other[token] = other / args.samples
    return dict(prompt=prompt, samples=args.samples,
                both_subjects={level: n / args.samples for level, n in hits.items()}, alone_identity=alone,
                alone_other_subject=alone_with_other,
                scene_rate=scenes / args.samples,
                median_object_scale=round(float(np.median(scales)), 3) if scales else None,
                # sigma^2 of the largest object's centre over the seeds: ~0 when every sample is the same picture
                layout_variance=round(layout_diversity({prompt: centers}), 5) if centers else None,
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
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--lora-text-encoder", action="store_true", help="with --lora: text-encoder LoRA too")
    parser.add_argument("--lora-targets", nargs="*", default=None, metavar="MODULE",
                        help="with --lora: lora.unet_targets (default: the attention projections)")
    parser.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--flip", type=float, default=0.0, help="data.random_flip")
    parser.add_argument("--pair-scenes", nargs="*", default=[], metavar="SCENE",
                        help="more training pictures of both subjects, one per scene (the bench picture stays image 0)")
    parser.add_argument("--subject-photos", type=int, default=0, metavar="N",
                        help="add each subject's N studio photos (and --backdrops photos), listing its token only")
    parser.add_argument("--backdrops", nargs="*", default=["night", "brick"], metavar="SCENE",
                        help="with --subject-photos: the subject cut out onto these scenes, one copy per photo")
    parser.add_argument("--background", default=None, metavar="WORD",
                        help=f"add a background concept {BACKGROUND_TOKEN} initialised from WORD (e.g. beach)")
    parser.add_argument("--em", nargs="*", default=[], metavar="KEY=VALUE",
                        help="further concept_em options, e.g. estep_captions=joint relative_maps=true (YAML values)")
    parser.add_argument("--skip-baseline", action="store_true", help="train the EM run only")
    parser.add_argument("--also-scenes", nargs="*", default=[], metavar="SCENE",
                        help="also score the combined prompt (and each token alone) on these scenes")
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
        images = write_images(photos, sample, args)
        for name, update in (("em", True), ("baseline_fixed_masks", False))[: 1 if args.skip_baseline else 2]:
            t0 = time.perf_counter()
            out = Path(tmp) / name
            bundle = train(args.base, photos, images, out, args, update_masks=update)
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
                          lora_rank=args.lora_rank, lora_targets=args.lora_targets, lora_text_encoder=args.lora_text_encoder, lr=args.lr,
                          embedding_lr=args.embedding_lr, batch_size=args.batch_size, flip=args.flip,
                          pair_scenes=args.pair_scenes, subject_photos=args.subject_photos,
                          backdrops=args.backdrops if args.subject_photos else [], images=len(images),
                          background=args.background, also_scenes=args.also_scenes, after_convergence=args.after_convergence,
                          options=extra_options(args.em)),
               acceptance=dict(mask_iou_target=0.7, both_subjects_target=0.5),
               results=results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
