"""Where a training step's time goes: a shipped config trained through `train_concept` (the Lightning loop users
run), a few steps profiled with torch.profiler.

The run trains `--warmup` + `--steps` optimizer steps of a training config as shipped (its method, precision,
optimizer, caches, gradient checkpointing; the base and its resolution as `bench/user_paths.py` sets them) and
profiles the last `--steps`. Each step is split by wall time on the host into

- **forward**: `ConceptModel.loss` (the text conditioning, the UNet forward, the loss);
- **backward**: `LightningModule.backward`;
- **optimizer**: gradient clipping, the optimizer's update (torch annotates `Optimizer.step`; Lightning runs the
  forward and backward inside it, as the step's closure, and they are not counted twice) and `zero_grad`;
- **the rest**: everything else between two steps: Lightning's loop and hooks, the callbacks, logging, the data
  path (the loader, collation, the transfer to the device).

On a GPU the parts are host time (kernels run asynchronously): a step whose device is busy for a small share of
its wall time is bound by the host, and the table says which part of the host work to take. It also counts, per
step, the kernel launches and the points where the host waits for the device (synchronisations, `.item()` /
scalar reads, device-to-host copies), and lists the operators with the most self time on the host and on the
device. The trace (`trace.json`, for chrome://tracing or Perfetto) and the tables go to `--out`.

    python bench/profile_step.py --device cuda --model sd15 --config configs/train/lora.yaml --out $OUT/profile
    python bench/profile_step.py --model tiny --config configs/train/lora.yaml --out /tmp/profile   # CPU
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import lrkit  # noqa: E402,F401  (first: lrkit.runtime's CPU thread settings apply)
import torch  # noqa: E402

from _common import (RESULTS_MD, common_parser, finish_machine_info, machine_info, machine_line,  # noqa: E402
                     start_run, write_json, write_results_section)

PARTS = ("forward", "backward", "optimizer")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
SCALAR_READS = ("aten::_local_scalar_dense",)  # what .item(), bool(tensor) and float(tensor) run
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


@contextlib.contextmanager
def labelled_parts():
    """Label the forward, the backward and the zero_grad of every step (the optimizer's step labels itself)."""
    from lrkit.training.model import ConceptModel
    from lrkit.training.module import PersonalizationModule

    patched = [(ConceptModel, "loss", "forward"), (PersonalizationModule, "backward", "backward"),
               (PersonalizationModule, "optimizer_zero_grad", "optimizer")]
    own = [name in cls.__dict__ for cls, name, _ in patched]
    originals = [getattr(cls, name) for cls, name, _ in patched]

    def labelled(part, fn):
        def run(*args, **kwargs):
            with torch.profiler.record_function(f"lrkit:{part}"):
                return fn(*args, **kwargs)
        return run

    for (cls, name, part), fn in zip(patched, originals):
        setattr(cls, name, labelled(part, fn))
    try:
        yield
    finally:
        for (cls, name, _), fn, was_own in zip(patched, originals, own):
            if was_own:
                setattr(cls, name, fn)
            else:
                delattr(cls, name)


def profiler_callback(device: str, warmup: int, steps: int, times: dict[int, float], out: Path):
    """A Lightning callback that profiles steps warmup+1 .. warmup+steps and times every step's end."""
    import lightning as L
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])

    class Profile(L.Callback):
        prof = None

        def on_train_start(self, trainer, pl_module):
            self.prof = profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1),
                                acc_events=True)
            self.prof.__enter__()

        def on_train_batch_end(self, trainer, *_):
            if device == "cuda":
                torch.cuda.synchronize()
            times[trainer.global_step] = time.perf_counter()
            if self.prof is not None:
                self.prof.step()

        def on_train_end(self, trainer, pl_module):
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                self.prof.export_chrome_trace(str(out / "trace.json"))

    return Profile()


def inside(event, prefix: str) -> bool:
    """Whether `event` runs inside an event whose name starts with `prefix`."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return True
        parent = parent.cpu_parent
    return False


def part_of(event) -> str:
    """The step part `event` belongs to: its nearest labelled ancestor (an `Optimizer.step` outside the forward and
    backward is the optimizer's), else the rest."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("lrkit:"):
            return parent.name.removeprefix("lrkit:")
        if parent.name.startswith("Optimizer.step#"):
            return "optimizer"
        parent = parent.cpu_parent
    return "the rest"


def part_times(events, steps: int) -> dict[str, float]:
    """Host ms per step of each part from the profiled events' time ranges: an `Optimizer.step` counts without the
    forward and backward that run inside it (Lightning's closure)."""
    def span(e) -> float:
        return (e.time_range.end - e.time_range.start) / 1e3

    labelled = {part: [e for e in events if e.name == f"lrkit:{part}"] for part in PARTS}
    parts = {part: sum(span(e) for e in found) / steps for part, found in labelled.items()}
    inner = labelled["forward"] + labelled["backward"]
    for step in (e for e in events if e.name.startswith("Optimizer.step#")):
        nested = sum(span(e) for e in inner
                     if e.time_range.start >= step.time_range.start and e.time_range.end <= step.time_range.end)
        parts["optimizer"] += (span(step) - nested) / steps
    return parts


def summarise(prof, steps: int, step_ms: float, device: str) -> dict:
    """Per-step figures from the profiler's events (the active steps only)."""
    events = prof.key_averages()
    by_name = {e.key: e for e in events}

    def count(names) -> float:
        return sum(by_name[n].count for n in names if n in by_name) / steps

    parts = part_times(prof.events(), steps)
    operators = dict.fromkeys([*PARTS, "the rest"], 0.0)
    for e in prof.events():
        if e.name.startswith("aten::"):
            operators[part_of(e)] += 1 / steps
    reads = [e for e in prof.events() if e.name in SCALAR_READS]
    in_optimizer = sum(inside(e, "Optimizer.step#") for e in reads)
    parts["the rest"] = max(0.0, step_ms - sum(parts.values()))
    device_busy = None
    if device == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        device_busy = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
    top_host = sorted((e for e in events if not e.key.startswith(("lrkit:", "ProfilerStep"))),
                      key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    top_device = sorted((e for e in events if getattr(e, "self_device_time_total", 0) > 0),
                        key=lambda e: e.self_device_time_total, reverse=True)[:15] if device == "cuda" else []
    return {
        "step_ms": step_ms, "parts_ms": parts, "part_operators": operators, "device_busy_ms": device_busy,
        "launches": count(LAUNCHES), "syncs": count(SYNC_CALLS),
        "scalar_reads": (len(reads) - in_optimizer) / steps, "optimizer_scalar_reads": in_optimizer / steps,
        "device_to_host_copies": count(["cudaMemcpyAsync"]) if device == "cuda" else None,
        "operators": sum(e.count for e in events if e.key.startswith("aten::")) / steps,
        "top_host": [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in top_host],
        "top_device": [(e.key, e.self_device_time_total / 1e3 / steps, e.count / steps) for e in top_device],
    }


def markdown(summary: dict, config: str, spec_line: str) -> str:
    step = summary["step_ms"]
    lines = [f"One step of `{config}` through the Lightning loop: {step:.1f} ms (the mean wall time of the profiled "
             f"steps; the parts below are host time).", "",
             "| part | ms per step | share of the step | aten operators per step |", "|---|---|---|---|"]
    for part, ms in summary["parts_ms"].items():
        lines.append(f"| {part} | {ms:.1f} | {ms / step:.0%} | {summary['part_operators'][part]:.0f} |")
    lines += ["", "| per step | count |", "|---|---|",
              f"| aten operators | {summary['operators']:.0f} |",
              f"| scalar reads outside the optimizer (`.item()` and the like: on a GPU the host waits for the device) "
              f"| {summary['scalar_reads']:.1f} |",
              f"| scalar reads inside the optimizer's step (the CPU's fused AdamW reads each parameter's step count; "
              f"on a GPU its kernels read them on the device) | {summary['optimizer_scalar_reads']:.1f} |"]
    if summary["device_busy_ms"] is not None:
        lines += [f"| kernel launches | {summary['launches']:.0f} |",
                  f"| device synchronisations | {summary['syncs']:.1f} |",
                  f"| `cudaMemcpyAsync` calls | {summary['device_to_host_copies']:.1f} |",
                  f"| device busy (sum of kernel times), ms | {summary['device_busy_ms']:.1f} "
                  f"({summary['device_busy_ms'] / step:.0%} of the step) |"]
    lines += ["", "Operators with the most self time on the host (ms per step, calls per step):", "",
              "| operator | ms | calls |", "|---|---|---|"]
    lines += [f"| `{name}` | {ms:.2f} | {calls:.0f} |" for name, ms, calls in summary["top_host"]]
    if summary["top_device"]:
        lines += ["", "On the device:", "", "| kernel or operator | ms | calls |", "|---|---|---|"]
        lines += [f"| `{name[:80]}` | {ms:.2f} | {calls:.0f} |" for name, ms, calls in summary["top_device"]]
    return f"{spec_line}\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--config", default="configs/train/lora.yaml", help="the training config, as shipped")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the profiled ones")
    parser.add_argument("--class-images", type=int, default=8,
                        help="DreamBooth's class images (the shipped 200 take most of a run to generate)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the run, the trace and the tables")
    parser.set_defaults(resolution=None)  # the config's own (tiny models: 64 px); give it to train smaller
    parser.add_argument("--markdown", type=Path, default=None, help="also write the section into this RESULTS.md "
                        f"(e.g. {RESULTS_MD.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    threads = args.threads or (1 if args.device == "cpu" else None)
    command = start_run("profile_step.py", threads, argv)
    from user_paths import TINY, build_base

    from lrkit.training import train_concept
    from lrkit.training.config import load_config

    started = time.perf_counter()
    machine = machine_info(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.out / "run", ignore_errors=True)  # a fresh run: train_concept would resume an earlier one
    base = build_base(args.model, args.out / f"{args.model}-random")
    overrides = {"base": base, "output_dir": str(args.out / "run"), "max_steps": args.warmup + args.steps,
                 "overwrite": True, "accelerator": "gpu" if args.device == "cuda" else "cpu",
                 "validation": {"prompts": []}, "dreambooth": {"num_class_images": args.class_images}}
    if args.resolution or args.model in TINY:
        overrides["data"] = {"resolution": args.resolution or 64}
    config = load_config(ROOT / args.config, **overrides)
    times: dict[int, float] = {}
    callback = profiler_callback(args.device, args.warmup, args.steps, times, args.out)
    with labelled_parts():
        train_concept(config, callbacks=[callback])
    step_ms = statistics.mean(times[s + 1] - times[s] for s in range(args.warmup, args.warmup + args.steps)) * 1e3
    summary = summarise(callback.prof, args.steps, step_ms, args.device)
    finish_machine_info(machine, started)
    cpu = f" ({threads} thread{'s' if threads > 1 else ''})" if args.device == "cpu" else ""
    key = (f"{args.device}{cpu}, {args.model}, "
           f"{config.data.resolution} px, `{Path(args.config).name}`")
    section = f"### {key}\n\n" + markdown(summary, args.config, f"{machine_line(machine)}\n\n`{command}`")
    (args.out / "profile.md").write_text(section)
    write_json(args.out / "profile.json", machine=machine, command=command, summary=summary)
    if args.markdown:
        write_results_section(args.markdown, "Where a training step's time goes", section, key)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
