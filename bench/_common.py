"""What the benchmark scripts share: device sync, peak-memory probes, the machine a run was on, and the
writer of their sections in RESULTS.md. Imported as `_common` (the scripts run as `python bench/<x>.py`,
which puts bench/ on `sys.path`)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "bench" / "RESULTS.md"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- peak memory


def _status_kb(field: str) -> int:
    """A `/proc/self/status` field in KiB (VmRSS: resident now, VmHWM: peak resident)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1))


def memory_now_and_peak(device: str) -> tuple[float, float]:
    """MB held now and the peak since the last `reset_peak` (CUDA: allocated tensors; CPU: RSS)."""
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    return _status_kb("VmRSS") / 1024, _status_kb("VmHWM") / 1024


def reset_peak(device: str) -> None:
    """CUDA: reset the allocator's peak; CPU: writing 5 to /proc/self/clear_refs resets VmHWM.
    (`ru_maxrss` would not do: Linux carries it across fork+exec, so a spawned child would start
    with its parent's peak.)"""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def run_spawned(target: Callable, args: tuple, what: str):
    """Run `target(*args, queue)` in a fresh (spawned) process, so measurements cannot mix; return
    what it put on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"memory probe for {what} failed (exit code {proc.exitcode})")
    return queue.get()


# ---------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class CommonSpec:
    """What every benchmark configuration has (the scripts' `BenchSpec`s add their own fields; picklable:
    the memory probes rebuild everything from it)."""

    device: str = "cpu"
    model: str = "tiny"
    resolution: int = 64
    batch_size: int = 1
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None: torch's default)

    @property
    def device_label(self) -> str:
        """The device and thread count, as the RESULTS.md subsection headings start."""
        threads = f" ({self.threads} thread{'s' * (self.threads > 1)})" if self.threads else ""
        return f"{self.device}{threads}"


def common_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by `doc`'s first paragraph, with the options every benchmark script takes first
    (all `CommonSpec`'s fields but the batch size)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=["tiny", "tiny-xl", "sd15", "sdxl"], default="tiny",
                        help="tiny / tiny-xl: lrkit's tiny-random / tiny-random-xl models; sd15 / sdxl: SD-1.5- / "
                             "SDXL-sized, random weights")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default on CPU: 1; OpenMP stalls badly when the cores are shared)")
    return parser


def common_spec_fields(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Check the common options; return `CommonSpec`'s fields (one torch thread by default on the CPU)."""
    if args.resolution < 8 or args.resolution % 8:
        parser.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return dict(device=args.device, model=args.model, resolution=args.resolution, batch_size=args.batch_size,
                seed=args.seed, threads=args.threads or (1 if args.device == "cpu" else None))


def start_run(script: str, threads: int | None, argv: list[str] | None) -> str:
    """Logging (lrkit's and the libraries' quiet), the torch thread count; returns the command line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("lrkit", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if threads:
        torch.set_num_threads(threads)
    return " ".join([f"python bench/{script}", *(sys.argv[1:] if argv is None else argv)])


def write_json(path: Path, **content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


# ---------------------------------------------------------------------------- the machine


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "-"


def cpu_pressure() -> str:
    """Linux PSI: share of time some task waited for a CPU (10 s and 60 s averages)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "-"
    values = dict(kv.split("=") for kv in line.split()[1:])
    return f"{values['avg10']}% / {values['avg60']}%"


def machine_info(device: str, *, watched_paths: Sequence[str] = (),
                 dirty_note: str = "uncommitted changes") -> dict:
    """The machine, its load and the software at the start of a run. `lrkit_commit` is HEAD, with
    `dirty_note` in brackets when git sees changes under `watched_paths` (relative to the repository)."""
    cpu = platform.processor() or "unknown"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        if watched_paths:
            dirty = subprocess.run(["git", "status", "--porcelain", *watched_paths], cwd=ROOT,
                                   capture_output=True, text=True, check=True).stdout.strip()
            commit += f" ({dirty_note})" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "-"
    return dict(
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        cpu=cpu, cores=os.cpu_count(), usable_cores=len(os.sched_getaffinity(0)),
        torch_threads=torch.get_num_threads(), load_average=[round(x, 2) for x in os.getloadavg()],
        cpu_pressure=cpu_pressure(),
        gpu=torch.cuda.get_device_name() if device == "cuda" else None,
        python=platform.python_version(), torch=torch.__version__, diffusers=_version("diffusers"),
        peft=_version("peft"), transformers=_version("transformers"), lrkit_commit=commit,
    )


def finish_machine_info(machine: dict, started: float) -> None:
    """Add the load at the end of the run and its wall time (`started`: a `time.perf_counter()`)."""
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    machine["cpu_pressure_end"] = cpu_pressure()
    machine["wall_seconds"] = round(time.perf_counter() - started, 1)


def machine_line(machine: dict) -> str:
    """The one-line account of the machine under a results subsection's heading."""
    gpu = f", GPU {machine['gpu']}" if machine["gpu"] else ""
    return (f"{machine['date']} · CPU {machine['cpu']}, {machine['usable_cores']} cores usable "
            f"({machine['torch_threads']} torch thread(s); load average {machine['load_average']} at start, "
            f"{machine['load_average_end']} at end; CPU pressure 10 s/60 s {machine['cpu_pressure']} at start, "
            f"{machine['cpu_pressure_end']} at end){gpu} · "
            f"torch {machine['torch']}, diffusers {machine['diffusers']}, peft {machine['peft']}, "
            f"transformers {machine['transformers']} · lrkit {machine['lrkit_commit']} · "
            f"{machine['wall_seconds']:.0f} s")


# ---------------------------------------------------------------------------- RESULTS.md


def write_results_section(path: Path, heading: str, section: str, key: str, keep_from: str | None = None) -> None:
    """Put `section` (a "### `key`" subsection) under the "## `heading`" section of `path`, replacing the
    subsection of the same key, or appending it to the section (created at the end when missing).
    Text before the first subsection of the section (hand-written) is kept. With `keep_from`, the text of
    the replaced subsection from the line `keep_from` on (hand-written notes) is kept after the new one."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    heading_re = re.compile(rf"^## {re.escape(heading)}[ \t]*$", re.M)
    found = heading_re.search(text)
    if not found:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n"
        found = heading_re.search(text)
    start = found.start()
    end_match = re.compile(r"^## ", re.M).search(text, start + 1)
    end = end_match.start() if end_match else len(text)
    body = text[start:end]
    sub = re.compile(rf"^### {re.escape(key)}[ \t]*$", re.M).search(body)
    if sub:
        s = sub.start()
        nxt = re.compile(r"^### ", re.M).search(body, s + 1)
        old = body[s:nxt.start() if nxt else len(body)]
        kept = re.compile(rf"^{re.escape(keep_from)}", re.M).search(old) if keep_from else None
        notes = "\n" + old[kept.start():].rstrip("\n") + "\n" if kept else ""
        body = body[:s] + section.rstrip("\n") + "\n" + notes + ("\n" + body[nxt.start():] if nxt else "")
    else:
        body = body.rstrip("\n") + "\n\n" + section + "\n"
    text = text[:start] + body.rstrip("\n") + "\n" + ("\n" + text[end:] if end < len(text) else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
