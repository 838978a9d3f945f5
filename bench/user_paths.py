"""Every shipped config as shipped, on an SD-1.5- or SDXL-sized model: steps/s and peak memory per training
config, seconds per image and peak memory per inference config: what users run, as they run it.

The base is a pipeline of the model's size with seeded random weights (`bench/train_step.py`'s
`build_sd15_random` / `build_sdxl_random`), saved once as a local diffusers folder that every config's `base`
then points at, as a user's offline copy of the model would be. The configs of the model's family run
(`--model sdxl`: those with `family: sdxl`, the others for SD). Each `configs/train/*.yaml` trains `--steps`
optimizer steps at its own resolution (512 / 1024), precision, optimizer, caches, gradient checkpointing,
schedule and validation, through the same Lightning path as `lrkit train`, and writes its bundle; steps/s is
timed over the steps after the first `--warmup`. DreamBooth's class images are cut to `--class-images` (the
shipped 200 would take most of a device call). Each `configs/infer/*.yaml` of the family then generates with
the family's LoRA bundle, with its shipped seeds and steps. One script, one device call:

    python bench/user_paths.py --device cuda --out $OUT                 # GPU: the run RESULTS.md records
    python bench/user_paths.py --device cuda --model sdxl --configs sdxl_lora.yaml layout_retouch_sdxl.yaml \
        --steps 10 --warmup 3 --out $OUT                                # GPU: does the SDXL LoRA fit 24 GB?
    python bench/user_paths.py --device cpu --model tiny --steps 3 --warmup 1 --out /tmp/up   # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import shutil
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


TINY = {"tiny": "tiny-random", "tiny-xl": "tiny-random-xl"}
FAMILY = {"tiny": "sd", "sd15": "sd", "tiny-xl": "sdxl", "sdxl": "sdxl"}


def build_base(model: str, folder: Path) -> str:
    """Save the base as a local diffusers folder; returns what `base:` is set to."""
    if model in TINY:
        return TINY[model]
    from train_step import build_sd15_random, build_sdxl_random

    if not (folder / "model_index.json").is_file():
        build = build_sdxl_random if model == "sdxl" else build_sd15_random
        build(0).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def family_of_config(path: Path) -> str:
    """The family a shipped config trains or generates on: its `family`, else SD."""
    import yaml

    return (yaml.safe_load(path.read_text()) or {}).get("family") or "sd"


def train_one(path: Path, base: str, work: Path, args) -> dict:
    """`train_concept` on the config (what `lrkit train --config` runs), timed by a callback."""
    import lightning as L

    from lrkit.training import train_concept
    from lrkit.training.config import load_config

    overrides = {"base": base, "output_dir": str(work / path.stem), "max_steps": args.steps, "overwrite": True,
                 "accelerator": "gpu" if args.device == "cuda" else "cpu",
                 "dreambooth": {"num_class_images": args.class_images}}
    if args.model in TINY:
        overrides["data"] = {"resolution": 64}
    config = load_config(path, **overrides)
    times: dict[int, float] = {}

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, *_):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[trainer.global_step] = time.perf_counter()

    shutil.rmtree(config.output_dir, ignore_errors=True)  # a fresh run: train_concept would resume an earlier one
    peak = _memory(args.device)
    started = time.perf_counter()
    bundle = train_concept(config, callbacks=[Timer()])
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
    if args.model in TINY:
        extra += ["--options.num_inference_steps=4", "--options.height=64", "--options.width=64"]
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
    parser.add_argument("--model", choices=sorted(FAMILY), default="sd15",
                        help="sd15 / sdxl: random weights at full size; tiny / tiny-xl: lrkit's tiny models (dry run)")
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
    base = build_base(args.model, work / f"{args.model}-random")
    family = FAMILY[args.model]
    rows, bundles = [], {}
    for path in sorted((ROOT / "configs" / "train").glob("*.yaml")):
        if args.configs and path.name not in args.configs or family_of_config(path) != family:
            continue
        try:
            row = train_one(path, base, work, args)
            bundles[row["method"]] = row["bundle"]
        except Exception as err:  # one config's failure is a result too; the others still run
            row = {"config": f"configs/train/{path.name}", "error": f"{type(err).__name__}: {err}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for path in sorted((ROOT / "configs" / "infer").glob("*.yaml")):
        if args.configs and path.name not in args.configs or "lora" not in bundles or family_of_config(path) != family:
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
