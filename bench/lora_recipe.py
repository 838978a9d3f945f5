"""The toy LoRA recipe, measured along its training curve: is the subject learned, and are the scenes kept?

One training run of a toy subject's concept (the demo's LoRA settings, `lrkit.demo.TOY_LORA_RECIPE`, changed
by `--set`; on the 5 studio photos unless `--backdrops` / `--photos` say otherwise) stops at every snapshot step to generate, with the model as it stands (a stock diffusers
pipeline over the training modules, 25 DDIM steps), `a photo of <token> <class> <scene phrase>` for four
scenes and plain `a photo of <token> <class>` (the photos' studio: does the model reproduce its training
photos at all?), N seeds each, at each guidance scale asked for. The toy world's exact scorers then give
the share of generations recognised as the subject (`is_subject`) and drawn in the prompted scene.

    python bench/lora_recipe.py                                          # toy_vase, studio photos only
    python bench/lora_recipe.py --subject toy_ball --class-word "red checked ball" --backdrops night,brick \
        --snapshots 800,1000,1200 --guidance 4 7.5 --seeds 16               # the demo's data and settings
    python bench/lora_recipe.py --subject toy_ball --snapshots 800,1200 --guidance 4 7.5
    python bench/lora_recipe.py --set '{"optim": {"lr": 1e-3}}' --snapshots 400,800,1200,1600,2000
    python bench/lora_recipe.py --backdrops night,brick                  # + the subject on other backdrops
    python bench/lora_recipe.py --class-word "purple dotted vase"        # a descriptive class phrase

Snapshot images go to WORK/<run>/s<step>g<guidance>/; a JSON line per snapshot and guidance is appended
to --out. Training time (without the snapshots) is reported per snapshot, against a budget of
5 CPU minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import torch

from _common import ROOT, start_run

SCENE_PROMPTS = (("beach", "on the beach"), ("snow", "in the snow"), ("grass", "on the grass"),
                 ("desert", "in the desert"), ("studio", ""))


class Snapshots(L.Callback):
    """At each snapshot step: generate the prompts x seeds x guidance scales and score them."""

    def __init__(self, subject, token: str, class_word: str, steps: list[int], guidance: list[float], seeds: int,
                 work: Path, out: Path, label: dict):
        self.subject, self.token, self.class_word = subject, token, class_word
        self.steps, self.guidance, self.seeds = set(steps), guidance, seeds
        self.work, self.out, self.label = work, out, label
        self.done: set[int] = set()
        self.train_seconds, self.t0 = 0.0, time.perf_counter()

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from lrkit.toyworld import score_image

        step = trainer.global_step
        if step not in self.steps or step in self.done:
            return
        self.done.add(step)
        self.train_seconds += time.perf_counter() - self.t0
        model = pl_module.model
        pipe = model.pipeline()
        pl_module.eval()
        for guidance in self.guidance:
            records = []
            for scene, phrase in SCENE_PROMPTS:
                prompt = f"a photo of {self.token} {self.class_word} {phrase}".strip()
                generators = [torch.Generator().manual_seed(s) for s in range(self.seeds)]
                images = pipe([prompt] * self.seeds, num_inference_steps=25, guidance_scale=guidance,
                              generator=generators, height=64, width=64).images
                folder = self.work / f"s{step}g{guidance:g}"
                folder.mkdir(parents=True, exist_ok=True)
                for seed, image in enumerate(images):
                    image.save(folder / f"{scene}_{seed}.png")
                    records.append(dict(score_image(image, self.subject, scene), prompt_scene=scene))
            scenes = [r for r in records if r["prompt_scene"] != "studio"]
            studio = [r for r in records if r["prompt_scene"] == "studio"]
            row = dict(self.label, step=step, guidance=guidance, train_seconds=round(self.train_seconds, 1),
                       subject_rate=float(np.mean([r["is_subject"] for r in scenes])),
                       scene_rate=float(np.mean([r["scene_ok"] for r in scenes])),
                       identity_mean=float(np.mean([r["identity"] for r in scenes])),
                       studio_subject_rate=float(np.mean([r["is_subject"] for r in studio])))
            print(json.dumps(row), flush=True)
            with self.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        pl_module.train()
        self.t0 = time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subject", default="toy_vase", help="a toy subject (lrkit.toyworld.SUBJECTS)")
    parser.add_argument("--base", default="toy",
                        help="base model: the shipped toy model, or a pretrained pipeline folder")
    parser.add_argument("--set", default="{}", help="JSON merged into the demo's LoRA recipe")
    parser.add_argument("--photos", type=Path, default=None,
                        help="train on this photo folder (same-stem .txt captions allowed) instead of the subject's "
                             "5 studio photos")
    parser.add_argument("--class-word", default=None,
                        help="the class phrase in captions and prompts (default: the subject's class, e.g. 'vase'; "
                             "try its description, 'purple dotted vase')")
    parser.add_argument("--backdrops", default="",
                        help="comma-separated scenes: add the photos' subject cut out and pasted on each scene, "
                             "with the scene's phrase in the caption (background variety)")
    parser.add_argument("--backdrop-copies", type=int, default=3, help="fresh backdrops per scene and photo")
    parser.add_argument("--snapshots", default="400,800,1200", help="steps to generate at (the last ends training)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[7.5])
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench-lora-recipe")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-lora-recipe" / "results.jsonl")
    args = parser.parse_args(argv)
    command = start_run("lora_recipe.py", args.threads, argv)

    from lrkit.demo import TOY_LORA_RECIPE, write_photos
    from lrkit.toyworld.subjects import get_subject
    from lrkit.training.config import load_config, merge_nested
    from lrkit.training.module import ConceptDataModule, PersonalizationModule
    from lrkit.training.train import build_trainer

    subject = get_subject(args.subject)
    changes = json.loads(args.set)
    steps = sorted(int(s) for s in args.snapshots.split(","))
    backdrops = [s for s in args.backdrops.split(",") if s]
    if args.photos and backdrops:
        raise SystemExit("--photos and --backdrops: give one or the other")
    class_word = args.class_word or subject.cls
    key = [args.base, changes] + ([str(args.photos)] if args.photos else []) + (
        [backdrops, args.backdrop_copies] if backdrops else []) + ([class_word] if args.class_word else [])
    run = f"{subject.name}-{zlib.crc32(json.dumps(key, sort_keys=True).encode()):08x}"
    recipe = merge_nested(TOY_LORA_RECIPE, changes)
    recipe["max_steps"] = steps[-1]
    photos = args.photos or write_photos(subject, args.work / f"{run}-photos" if backdrops else args.work / f"photos-{subject.name}",
                                         backdrops=backdrops, copies=args.backdrop_copies)
    config = load_config({"base": args.base, "output_dir": str(args.work / run), "resume": None, "overwrite": True,
                          "data": {"photos": str(photos), "class_word": class_word, "resolution": 64}}, **recipe)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    label = dict(command=command, base=args.base, subject=subject.name, class_word=class_word, changes=changes,
                 photos=str(args.photos) if args.photos else None, backdrops=backdrops,
                 backdrop_copies=args.backdrop_copies if backdrops else None)
    L.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = ConceptDataModule(config)
    module = PersonalizationModule(config)
    snapshots = Snapshots(subject, config.token, class_word, steps, args.guidance, args.seeds, args.work / run,
                          args.out, label)
    trainer = build_trainer(config, extra_callbacks=[snapshots, *module.model.method.callbacks()],
                            enable_progress_bar=False)
    trainer.fit(module, datamodule=datamodule)
    return 0


if __name__ == "__main__":
    sys.exit(main())
