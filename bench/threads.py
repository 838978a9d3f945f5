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
    "lrkit": ({}, ["--as-lrkit"], "what lrkit sets: OMP_WAIT_POLICY=PASSIVE, one thread for the toy base "
                                  "(`lrkit.runtime`)"),
    "1-thread": ({}, ["--import-torch-first", "--threads", "1"], "torch.set_num_threads(1), OpenMP defaults"),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["--import-torch-first"],
                "OMP_WAIT_POLICY=PASSIVE (waiting OpenMP threads sleep at once)"),
    "spin10k": ({"GOMP_SPINCOUNT": "10000"}, ["--import-torch-first"],
                "GOMP_SPINCOUNT=10000 (libgomp spins a short while, then sleeps)"),
}

COMPETITORS = {
    "python": "while True:\n    pass\n",  # one core, all the time
    # another torch job: OpenMP threads on every core, like a second training run or a test suite
    "torch": "import torch\na = torch.randn(256, 256)\nwhile True:\n    a = torch.tanh(a @ a)\n",
}


def worker(args: argparse.Namespace) -> None:
    """One timed training run in this process; prints one JSON line."""
    if args.import_torch_first:
        import torch  # noqa: F401  (OpenMP initialised before lrkit could set anything)
    import lrkit  # noqa: F401  (first, as the `lrkit` command imports it: its settings apply)
    import contextlib
    import logging
    import tempfile

    import lightning as L
    import torch

    from lrkit.demo import TOY_LORA_RECIPE, toy_training_data
    from lrkit.runtime import cpu_threads_for
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
        scope = cpu_threads_for(config.base, "cpu") if args.as_lrkit else contextlib.nullcontext()
        with scope:  # as train_concept runs the fit
            trainer.fit(module, datamodule=ConceptDataModule(config))
            threads = torch.get_num_threads()
    elapsed = timings[args.warmup + args.steps] - timings[args.warmup]
    print(json.dumps({"steps_per_s": args.steps / elapsed, "threads": threads,
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))


def run_one(setting: str, busy: bool, warmup: int, steps: int, competitor_kind: str = "python") -> dict:
    env_extra, argv, _ = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(env_extra)
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITORS[competitor_kind]]) if busy else None
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
    parser.add_argument("--competitor", choices=list(COMPETITORS), default="python",
                        help="python: a pure-Python busy loop (one core); torch: a torch matmul loop (every core)")
    parser.add_argument("--out", default=None, help="JSON (default: bench/results/threads-cpu-<competitor>.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--import-torch-first", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--as-lrkit", action="store_true", help=argparse.SUPPRESS)
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
                result = run_one(setting, busy, args.warmup, args.steps, args.competitor)
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
    out = Path(args.out or HERE / "results" / f"threads-cpu-{args.competitor}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                               "competitor": args.competitor, "settings": table}, indent=1) + "\n")
    key = f"`threads.py --competitor {args.competitor}` (CPU, demo training)"
    what = {"python": "one pure-Python busy loop", "torch": "one torch matmul loop on every core"}[args.competitor]
    section = (f"### {key}\n\n{machine_line(machine)}\n\nMedians over {args.rounds} rounds; busy = beside {what}."
               f"\n\n{markdown}\n")
    write_results_section(HERE / "RESULTS.md", "CPU threads under contention", section, key)


if __name__ == "__main__":
    main()
