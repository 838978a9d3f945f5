"""CPU thread settings under contention: the demo's training steps/s on an idle machine and beside one
competing CPU-bound process, per thread setting, measured side by side in one run.

Each (setting, machine state) runs in a fresh process: OpenMP reads its wait policy when torch is first
imported, so a setting cannot change inside one process. The training is the demo's (`lrkit.demo`'s toy
LoRA recipe: toy base, rank 16 on the UNet and the text encoder, batch 4, 64 px, cached latents) through
`PersonalizationModule` and Lightning, as `lrkit demo` runs it; steps/s is timed over `--steps` steps after
`--warmup`. The competitor is one pure-Python busy loop. Rounds interleave the settings and the two machine
states, and the table gives medians.

    python bench/threads.py                       # all settings, 3 rounds (about 10 minutes on 2 cores)
    python bench/threads.py --settings torch lrkit --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SETTINGS = {
    # name: (environment for the worker, worker arguments, description)
    "torch": ({}, ["--import-torch-first"], "torch's defaults (torch imported before lrkit: lrkit sets nothing)"),
    "lrkit": ({}, [], "what lrkit sets: OMP_WAIT_POLICY=PASSIVE (`lrkit.runtime.configure_cpu_threads`)"),
    "1-thread": ({}, ["--import-torch-first", "--threads", "1"], "torch.set_num_threads(1), OpenMP defaults"),
    "spin10k": ({"GOMP_SPINCOUNT": "10000"}, ["--import-torch-first"],
                "GOMP_SPINCOUNT=10000 (libgomp spins a short while, then sleeps)"),
}

BUSY_LOOP = "while True:\n    pass\n"


def worker(args: argparse.Namespace) -> None:
    """One timed training run in this process; prints one JSON line."""
    if args.import_torch_first:
        import torch  # noqa: F401  (OpenMP initialised before lrkit could set anything)
    import lrkit  # noqa: F401  (first, as the `lrkit` command imports it: its settings apply)
    import logging
    import tempfile

    import lightning as L
    import torch

    from lrkit.demo import TOY_LORA_RECIPE, toy_training_data
    from lrkit.toyworld.subjects import get_subject
    from lrkit.training.config import load_config, merge_nested
    from lrkit.training.module import ConceptDataModule, PersonalizationModule
    from lrkit.training.train import build_trainer

    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    timings: dict[int, float] = {}

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, *_):
            timings[trainer.global_step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        photos, class_word = toy_training_data(get_subject("toy_ball"), Path(tmp) / "photos")
        recipe = merge_nested(TOY_LORA_RECIPE, {
            "base": "toy", "output_dir": str(Path(tmp) / "run"), "max_steps": args.warmup + args.steps,
            "data": {"photos": str(photos), "class_word": class_word, "resolution": 64}, "validation": {"prompts": []},
            "checkpoint_every_n_epochs": 10**6})
        config = load_config(recipe)
        L.seed_everything(0, verbose=False)
        module = PersonalizationModule(config)
        trainer = build_trainer(config, extra_callbacks=[Timer()], enable_progress_bar=False, logger=False)
        trainer.fit(module, datamodule=ConceptDataModule(config))
    elapsed = timings[args.warmup + args.steps] - timings[args.warmup]
    print(json.dumps({"steps_per_s": args.steps / elapsed, "threads": torch.get_num_threads(),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))


def run_one(setting: str, busy: bool, warmup: int, steps: int) -> dict:
    env_extra, argv, _ = SETTINGS[setting]
    env = dict(os.environ, **env_extra)
    competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", "--warmup", str(warmup), "--steps", str(steps),
                              *argv], env=env, capture_output=True, text=True, check=True).stdout
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=str(HERE / "results" / "threads-cpu.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--import-torch-first", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(HERE))
    from _common import finish_machine_info, machine_info, machine_line, write_results_section

    started = time.perf_counter()
    machine = machine_info("cpu")
    runs: dict[tuple[str, bool], list[dict]] = {}
    for r in range(args.rounds):
        for setting in args.settings:
            for busy in (False, True):
                result = run_one(setting, busy, args.warmup, args.steps)
                runs.setdefault((setting, busy), []).append(result)
                print(f"round {r + 1}/{args.rounds} {setting:<9} {'busy' if busy else 'idle'}: "
                      f"{result['steps_per_s']:.2f} steps/s ({result['threads']} thread(s))", flush=True)
    finish_machine_info(machine, started)

    def median(setting: str, busy: bool) -> float:
        return statistics.median(r["steps_per_s"] for r in runs[(setting, busy)])

    base_idle = median(args.settings[0], False)
    rows = ["| setting | threads | idle steps/s | busy steps/s | busy / idle | idle vs first row | what it is |",
            "|---|---|---|---|---|---|---|"]
    table = {}
    for setting in args.settings:
        idle, busy = median(setting, False), median(setting, True)
        threads = runs[(setting, False)][0]["threads"]
        table[setting] = {"idle": idle, "busy": busy, "busy_over_idle": busy / idle, "threads": threads,
                          "runs": {"idle": runs[(setting, False)], "busy": runs[(setting, True)]}}
        rows.append(f"| {setting} | {threads} | {idle:.2f} | {busy:.2f} | {busy / idle:.2f} | "
                    f"{idle / base_idle:.2f} | {SETTINGS[setting][2]} |")
    markdown = "\n".join(rows)
    print(markdown)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "warmup": args.warmup, "steps": args.steps,
                                          "rounds": args.rounds, "settings": table}, indent=1) + "\n")
    section = (f"### `threads.py` (CPU, demo training, {args.rounds} rounds)\n\n{machine_line(machine)}\n\n"
               f"Medians over the rounds; busy = beside one pure-Python busy loop.\n\n{markdown}\n")
    write_results_section(HERE / "RESULTS.md", "CPU threads under contention", section,
                          f"`threads.py` (CPU, demo training, {args.rounds} rounds)")


if __name__ == "__main__":
    main()
