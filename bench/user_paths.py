"""Every shipped config as shipped, on an SD-1.5-sized model: steps/s and peak memory per training config,
seconds per image and peak memory per inference config: what users run, as they run it.

The base is an SD-1.5-sized pipeline with seeded random weights (`bench/train_step.py`'s
`build_sd15_random`), saved once as a local diffusers folder that every config's `base` then points at,
as a user's offline copy of the model would be. Each `configs/train/*.yaml` trains `--steps` optimizer
steps at its own resolution (512), precision, optimizer, caches, schedule and validation, through the same
Lightning path as `lrkit train`, and writes its bundle; steps/s is timed over the steps after the first
`--warmup`. DreamBooth's class images are cut to `--class-images` (the shipped 200 would take most of a
device call). Each `configs/infer/*.yaml` then generates with the LoRA bundle, with its shipped seeds and
steps. One script, one device call:

    python bench/user_paths.py --device cuda --out $OUT                 # GPU: the run RESULTS.md records
    python bench/user_paths.py --device cpu --model tiny --steps 3 --warmup 1 --out /tmp/up   # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import lrkit  # noqa: E402,F401  (first: lrkit.runtime's CPU thread settings apply)
import torch  # noqa: E402

INFER_EXTRA = {"dual_reference.yaml": {"style_reference": str(ROOT / "data" / "subjects" / "vase" / "03.jpg")}}
PROMPT = "a photo of {} on the beach"


def _memory(device: str) -> tuple[float, callable]:
    from _common import memory_now_and_peak, reset_peak

    reset_peak(device)
    return lambda: memory_now_and_peak(device)[1]


def build_base(model: str, folder: Path) -> str:
    """Save the base as a local diffusers folder; returns what `base:` is set to."""
    if model == "tiny":
        return "tiny-random"
    from train_step import build_sd15_random

    if not (folder / "model_index.json").is_file():
        build_sd15_random(0).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def train_one(path: Path, base: str, work: Path, args) -> dict:
    import lightning as L

    from lrkit.training.config import load_config
    from lrkit.training.module import ConceptDataModule, PersonalizationModule
    from lrkit.training.train import build_trainer, export_concept

    overrides = {"base": base, "output_dir": str(work / path.stem), "max_steps": args.steps, "overwrite": True,
                 "accelerator": "gpu" if args.device == "cuda" else "cpu",
                 "dreambooth": {"num_class_images": args.class_images}}
    if args.model == "tiny":
        overrides["data"] = {"resolution": 64}
    config = load_config(path, **overrides)
    times: dict[int, float] = {}

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, *_):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[trainer.global_step] = time.perf_counter()

    peak = _memory(args.device)
    started = time.perf_counter()
    L.seed_everything(config.seed, verbose=False)
    datamodule = ConceptDataModule(config)
    module = PersonalizationModule(config)
    trainer = build_trainer(config, extra_callbacks=[*module.model.method.callbacks(), Timer()])
    trainer.fit(module, datamodule=datamodule)
    bundle = export_concept(module.model, config, config.bundle_dir, photos=datamodule.photos, overwrite=True)
    timed = args.steps - args.warmup
    return {"config": f"configs/train/{path.name}", "method": config.method, "precision": config.precision,
            "optimizer": config.optim.optimizer, "resolution": config.data.resolution, "steps": args.steps,
            "steps_per_s": timed / (times[args.steps] - times[args.warmup]), "peak_mb": peak(),
            "wall_s": time.perf_counter() - started, "bundle": str(bundle)}


def infer_one(path: Path, base: str, bundle: str, work: Path, args) -> dict:
    from lrkit.cli import _generation_parser
    from lrkit.inference import LayoutRetouchPipeline
    from lrkit.jobs import fill_prompts, generate_to_folder

    parser = _generation_parser("bench", "")
    extra = [f"--options.{k}={v}" for k, v in INFER_EXTRA.get(path.name, {}).items()]
    if args.model == "tiny":
        extra += ["--options.num_inference_steps=4"]
    parsed = parser.instantiate(parser.parse_args(["--config", str(path), *extra]))
    peak = _memory(args.device)
    pipeline = LayoutRetouchPipeline.from_concept(base, bundle, device=args.device,
                                                  dtype="fp16" if args.device == "cuda" else None)
    prompts = fill_prompts([PROMPT], pipeline.concept)
    started = time.perf_counter()
    generate_to_folder(pipeline, prompts, parsed.seeds, work / path.stem, parsed.options,
                       intermediates=parsed.intermediates, skip_existing=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"config": f"configs/infer/{path.name}", "mode": parsed.options.mode,
            "steps": parsed.options.num_inference_steps, "images": len(parsed.seeds),
            "s_per_image": seconds / len(parsed.seeds), "peak_mb": peak(),
            "dtype": "fp16" if args.device == "cuda" else "fp32"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--class-images", type=int, default=8)
    parser.add_argument("--configs", nargs="*", default=None, help="config file names (default: all)")
    parser.add_argument("--out", required=True, help="folder for the JSON, the markdown table and the runs")
    args = parser.parse_args(argv)
    from _common import machine_info

    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.device)
    base = build_base(args.model, work / "sd15-random")
    rows, bundles = [], {}
    for path in sorted((ROOT / "configs" / "train").glob("*.yaml")):
        if args.configs and path.name not in args.configs:
            continue
        try:
            row = train_one(path, base, work, args)
            bundles[row["method"]] = row["bundle"]
        except Exception as err:  # one config's failure is a result too; the others still run
            row = {"config": f"configs/train/{path.name}", "error": f"{type(err).__name__}: {err}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for path in sorted((ROOT / "configs" / "infer").glob("*.yaml")):
        if args.configs and path.name not in args.configs or "lora" not in bundles:
            continue
        try:
            row = infer_one(path, base, bundles["lora"], work, args)
        except Exception as err:
            row = {"config": f"configs/infer/{path.name}", "error": f"{type(err).__name__}: {err}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [f"Device: {machine['gpu'] or machine['cpu']} · torch {machine['torch']} · diffusers {machine['diffusers']}",
             "", "| config | what | precision | steps/s or s/image | peak memory (MB) |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | **failed**: {r['error'][:120]} | | | |")
        elif "steps_per_s" in r:
            lines.append(f"| {r['config']} | {r['method']}, {r['optimizer']}, {r['resolution']} px, {r['steps']} steps "
                         f"| {r['precision']} | {r['steps_per_s']:.2f} steps/s | {r['peak_mb']:.0f} |")
        else:
            lines.append(f"| {r['config']} | {r['mode']}, {r['steps']} steps, {r['images']} images | {r['dtype']} "
                         f"| {r['s_per_image']:.2f} s/image | {r['peak_mb']:.0f} |")
    (out / "user_paths.md").write_text("\n".join(lines) + "\n")
    (out / "user_paths.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
