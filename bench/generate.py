"""Generation benchmark: Layout-and-Retouch against a plain diffusers generation, side by side.

One process holds one base pipeline with a LoRA concept applied (random weights, built from config:
no download). It times, interleaved, seconds per image of

- **plain**: `StableDiffusionPipeline.__call__` on that pipeline (the concept applied, DDIM), the
  same prompt, steps, resolution and guidance: the yardstick;
- **layout-retouch** with `cache_attention=False` (one batched UNet call on [R, C_u, C_c, X_u, X_c]
  per retouch step) and `cache_attention=True` (C's swap-layer outputs recorded in stage 1, R's
  keys/values recorded once per reference; stage 2 runs [X_u, X_c] only), each in the cache states a
  user meets: *cold* (empty inversion cache, no stored reference mask: a first generation),
  *reference cached* (the inverted reference trajectory and its mask on disk: any later generation),
  and, with attention caching, *reference + R K/V cached* (the same reference again in one session).

Each layout-retouch call is broken down by timing the steps `LayoutRetouchPipeline` calls (wrapped for
timing only): stage 1 (`layout.draw_layout`), reference inversion + mask (`References.from_concept`), R K/V
recording (`References.keys_values`), stage 2 (`retouch.retouch` without the former two) and VAE decoding
(`PersonalizedModel.decode`). A forward pre-hook counts UNet calls and their batch rows: the ratio follows
the calls where a fixed cost per call dominates (a tiny model on a CPU), the rows where the UNet's
arithmetic does (SD-1.5 at 512 px on a GPU). Times are wall clock on CUDA and the process's CPU time on
the CPU (one torch thread by default; the wall clock is reported beside it). Peak memory is measured
per configuration in a fresh spawned process (CUDA: `max_memory_allocated`; CPU: peak RSS), and the
recorded attention caches are sized with `AttentionCache.nbytes()`.

    python bench/generate.py                                   # CPU, tiny-random, 64 px, 20 steps, fp32
    python bench/generate.py --device cuda --model sd15 --resolution 512 --steps 50 --dtype fp16 --repeats 8
    python bench/generate.py --model tiny-xl                   # CPU, tiny-random-xl (SDXL's pipeline)
    python bench/generate.py --device cuda --model sdxl --resolution 1024 --steps 50 --dtype fp16

Results: a markdown table on stdout and in bench/RESULTS.md (its "Generation" section), JSON at `--out`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built from config; never reach the Hub

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402

from lrkit.inference.processors import AttentionCache  # noqa: E402
from lrkit.concept import Concept, TokenSpec, write_bundle  # noqa: E402
from lrkit.inference import GenerationOptions, LayoutRetouchPipeline  # noqa: E402
from lrkit.lora_io import save_diffusers_lora  # noqa: E402
from lrkit.models import build_tiny_random, build_tiny_random_xl, fingerprint  # noqa: E402

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/ (already there for `python bench/...`)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, RESULTS_MD, CommonSpec, common_parser, common_spec_fields,  # noqa: E402
                     finish_machine_info, machine_info, machine_line, memory_now_and_peak, reset_peak, run_spawned,
                     start_run, synchronize, write_json, write_results_section)

logger = logging.getLogger("bench.generate")

REFERENCE_PHOTO = ROOT / "data" / "subjects" / "vase" / "00.jpg"
PROMPT = "a photo of sks vase on the beach"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What this benchmark runs of lrkit (a dirty tree here is flagged next to the commit).
LRKIT_PATHS = ["lrkit/inference", "lrkit/attention.py", "lrkit/masks.py", "lrkit/concept.py", "lrkit/models.py",
               "lrkit/lora_io.py"]
RESULTS_HEADING = "Generation (layout-retouch vs plain diffusers)"  # the "## " section of RESULTS.md this script writes
MARKDOWN_NOTES = "#### What the numbers mean"  # hand-written text from this heading on survives a re-run


@dataclass(frozen=True)
class BenchSpec(CommonSpec):
    """One benchmark configuration: `CommonSpec`'s fields (device, model, resolution, batch size, seed,
    threads) and the generation's."""

    steps: int = 20
    dtype: str = "fp32"
    repeats: int = 15
    warmup: int = 1
    guidance_scale: float = 7.5
    lam: float = 0.3

    @property
    def key(self) -> str:
        return (f"{self.device_label}, {self.model}, {self.resolution} px, {self.steps} steps, "
                f"batch {self.batch_size}, {self.dtype}")


@dataclass(frozen=True)
class Config:
    """One contender: plain diffusers, or layout-retouch with an attention-cache setting in a cache state."""

    name: str
    plain: bool = False
    cache_attention: bool = False
    state: str = "cold"  # cold | reference (inversion + mask cached) | all (also R's K/V memoized)


CONFIGS = [
    Config("plain diffusers", plain=True),
    Config("batched R/C/X, cold", cache_attention=False, state="cold"),
    Config("batched R/C/X, reference cached", cache_attention=False, state="reference"),
    Config("cached attention, cold", cache_attention=True, state="cold"),
    Config("cached attention, reference cached", cache_attention=True, state="reference"),
    Config("cached attention, reference + R K/V cached", cache_attention=True, state="all"),
]
PARTS = ("_layout", "_reference", "_reference_kv", "_retouch", "_decode")
PART_LABELS = {"_layout": "stage 1", "_reference": "reference", "_reference_kv": "R K/V", "_retouch": "stage 2",
               "_decode": "decode", "other": "other"}


def clock(device: str):
    """The clock the table reads: wall time on CUDA; on the CPU the process's CPU time, which the other
    jobs on a shared machine do not inflate (with one torch thread it is the wall time of an idle machine)."""
    return time.perf_counter if device == "cuda" else time.process_time


# ---------------------------------------------------------------------------- models and the concept


def build_base(spec: BenchSpec):
    """The base pipeline in fp32 on the CPU (same seeded weights every time), fingerprinted."""
    if spec.model in ("tiny", "tiny-xl"):
        pipe = build_tiny_random(spec.seed) if spec.model == "tiny" else build_tiny_random_xl(spec.seed)
        fingerprint(pipe)
        return pipe
    from train_step import BASE_IDS, build_sd15_random, build_sdxl_random  # random weights (one definition)

    pipe = build_sd15_random(spec.seed) if spec.model == "sd15" else build_sdxl_random(spec.seed)
    fingerprint(pipe, BASE_IDS[spec.model])
    return pipe


def _perturb_lora(module: torch.nn.Module, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def make_bundle(spec: BenchSpec, base, out: Path) -> Path:
    """A LoRA concept (UNet + text encoder, random weights, one reference photo) for `base`,
    as tests/test_layout_retouch.py builds one; the adapters are trained on copies of the base."""
    encoders = [copy.deepcopy(base.text_encoder)] + ([copy.deepcopy(base.text_encoder_2)]
                                                     if getattr(base, "text_encoder_2", None) is not None else [])
    unet = copy.deepcopy(base.unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    scale = 0.3 if spec.model.startswith("tiny") else 0.02  # a visible effect that keeps the activations finite
    _perturb_lora(unet, 1, scale)
    for i, encoder in enumerate(encoders):
        encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                       init_lora_weights="gaussian"))
        _perturb_lora(encoder, 2 + i, scale)
    concept = Concept(name="bench-lora", method="lora", tokens=[TokenSpec("sks")], class_word="vase",
                      base=fingerprint(base), resolution=spec.resolution,
                      files={"lora": "pytorch_lora_weights.safetensors"}, refs=["refs/00.jpg"])

    def write(tmp: Path) -> None:
        (tmp / "refs").mkdir()
        shutil.copy(REFERENCE_PHOTO, tmp / "refs" / "00.jpg")
        save_diffusers_lora(tmp, unet, encoders[0], text_encoder_2=encoders[1] if len(encoders) > 1 else None)

    write_bundle(concept, out, write)
    return out


# ---------------------------------------------------------------------------- the harness


class PartTimer:
    """Exclusive wall time of the wrapped pipeline methods (a method's time excludes the wrapped
    methods it calls), and the size of every `AttentionCache` they take or return."""

    def __init__(self, device: str):
        self.device = device
        self.clock = clock(device)
        self.active = False
        self.times: dict[str, float] = {}
        self.cache_bytes: dict[str, int] = {}
        self._stack: list[float] = []  # time spent in wrapped callees, per open frame

    def reset(self) -> None:
        self.times, self.cache_bytes = {}, {}

    def wrap(self, obj, attribute: str, name: str) -> None:
        """Time `obj.attribute` under the part `name`."""
        method = getattr(obj, attribute)

        def timed(*args, **kwargs):
            if not self.active:
                return method(*args, **kwargs)
            synchronize(self.device)
            start = self.clock()
            self._stack.append(0.0)
            try:
                result = method(*args, **kwargs)
                synchronize(self.device)
            finally:
                elapsed = self.clock() - start
                inner = self._stack.pop()
                if self._stack:
                    self._stack[-1] += elapsed
                self.times[name] = self.times.get(name, 0.0) + elapsed - inner
            for value in (*args, *kwargs.values(), *(result if isinstance(result, list) else [result])):
                if isinstance(value, AttentionCache):
                    self.cache_bytes[name] = max(self.cache_bytes.get(name, 0), value.nbytes())
            return result

        setattr(obj, attribute, timed)


class Bench:
    """One base pipeline with the concept applied, the layout-retouch pipeline on it, and the contenders."""

    def __init__(self, spec: BenchSpec, bundle: Path, work: Path):
        self.spec = spec
        base = build_base(spec)
        base.to(spec.device, DTYPES[spec.dtype])
        shutil.copytree(bundle, work / "concept")  # a private copy of the bundle
        self.cache_dir = work / "cache"
        self.pipeline = LayoutRetouchPipeline.from_concept(base, work / "concept", cache_dir=self.cache_dir)
        self.pipe = self.pipeline.pipe
        self.timer = PartTimer(spec.device)
        import lrkit.inference.pipeline as pipeline_module

        parts = {"_layout": (pipeline_module, "draw_layout"), "_reference": (self.pipeline.references, "from_concept"),
                 "_reference_kv": (self.pipeline.references, "keys_values"), "_retouch": (pipeline_module, "retouch"),
                 "_decode": (self.pipeline.model, "decode")}
        for name, (obj, attribute) in parts.items():
            self.timer.wrap(obj, attribute, name)
        self.unet_calls = self.unet_rows = 0
        self.pipe.unet.register_forward_pre_hook(self._count_rows, with_kwargs=True)
        self.seeds = list(range(spec.seed, spec.seed + spec.batch_size))

    def _count_rows(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.unet_calls += 1
        self.unet_rows += sample.shape[0]

    def options(self, config: Config) -> GenerationOptions:
        return GenerationOptions.of(mode="layout-retouch", num_inference_steps=self.spec.steps,
                                 guidance_scale=self.spec.guidance_scale, height=self.spec.resolution,
                                 width=self.spec.resolution, lam=self.spec.lam, cache_attention=config.cache_attention)

    def prepare(self, config: Config) -> None:
        """Put the caches in `config`'s state (untimed)."""
        if config.plain:
            return
        pipeline = self.pipeline
        if config.state == "cold":
            shutil.rmtree(self.cache_dir, ignore_errors=True)  # inversions and reference masks
            pipeline.clear_caches()
        else:
            reference_warm = any(self.cache_dir.rglob("*.safetensors")) and any(self.cache_dir.rglob("*.png"))
            if not reference_warm or (config.state == "all" and not pipeline.references.kv_memo_size):
                self.run(dataclasses.replace(config, cache_attention=True))  # fills all three caches
            if config.state == "reference":
                pipeline.references.clear_keys_values()
        gc.collect()

    def run(self, config: Config) -> list:
        """One generation of `batch_size` images (same prompt, consecutive seeds)."""
        generators = [torch.Generator().manual_seed(s) for s in self.seeds]
        if config.plain:
            return self.pipe([PROMPT] * len(self.seeds), num_inference_steps=self.spec.steps,
                             guidance_scale=self.spec.guidance_scale, height=self.spec.resolution,
                             width=self.spec.resolution, generator=generators, output_type="pil").images
        return [g.image for g in self.pipeline.generate(PROMPT, self.seeds, self.options(config))]

    def timed(self, config: Config) -> dict:
        """Seconds per image (`clock` and wall), the breakdown, UNet calls/rows and cache sizes of one generation."""
        self.prepare(config)
        self.timer.reset()
        self.timer.active, self.unet_calls, self.unet_rows = True, 0, 0
        synchronize(self.spec.device)
        start, wall_start = self.timer.clock(), time.perf_counter()
        self.run(config)
        synchronize(self.spec.device)
        total, wall = self.timer.clock() - start, time.perf_counter() - wall_start
        self.timer.active = False
        n = len(self.seeds)
        parts = {name: self.timer.times.get(name, 0.0) / n for name in PARTS} if not config.plain else {}
        if parts:
            parts["other"] = total / n - sum(parts.values())
        return dict(seconds=total / n, wall_seconds=wall / n, parts=parts, unet_calls=self.unet_calls,
                    unet_rows=self.unet_rows / n,
                    context_cache_bytes=self.timer.cache_bytes.get("_layout", 0),
                    reference_cache_bytes=self.timer.cache_bytes.get("_reference_kv", 0))


def bench_timings(spec: BenchSpec, bundle: Path) -> dict[str, list[dict]]:
    """Warm-up, then `repeats` rounds of one generation per contender, the order rotating every round."""
    with tempfile.TemporaryDirectory(prefix="lrkit-bench-") as work:
        bench = Bench(spec, bundle, Path(work))
        for config in CONFIGS:
            for _ in range(spec.warmup):
                bench.timed(config)
        rounds: dict[str, list[dict]] = {c.name: [] for c in CONFIGS}
        for r in range(spec.repeats):
            k = r % len(CONFIGS)
            for config in CONFIGS[k:] + CONFIGS[:k]:
                rounds[config.name].append(bench.timed(config))
            logger.info("round %d/%d: %s", r + 1, spec.repeats,
                        ", ".join(f"{name} {m[-1]['seconds']:.3f} s ({m[-1]['wall_seconds']:.3f} s wall)"
                                  for name, m in rounds.items()))
        return rounds


# ---------------------------------------------------------------------------- peak memory


def _memory_probe(spec: BenchSpec, bundle: str, config: Config, queue) -> None:
    """Child process: build, one warm-up generation, put the caches in `config`'s state, then one
    measured generation. `total`: peak over the memory held after imports (on CUDA: the whole
    `max_memory_allocated`); `call`: peak over the memory held just before the measured call."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    after_imports = memory_now_and_peak(spec.device)[0] if spec.device != "cuda" else 0.0
    with tempfile.TemporaryDirectory(prefix="lrkit-bench-mem-") as work:
        bench = Bench(spec, Path(bundle), Path(work))
        bench.run(config)
        bench.prepare(config)
        reset_peak(spec.device)
        before = memory_now_and_peak(spec.device)[0]
        bench.timer.active = True  # to size the attention caches
        bench.run(config)
        synchronize(spec.device)
        peak = memory_now_and_peak(spec.device)[1]
        queue.put(dict(total_mb=peak - after_imports, call_mb=peak - before,
                       context_cache_bytes=bench.timer.cache_bytes.get("_layout", 0),
                       reference_cache_bytes=bench.timer.cache_bytes.get("_reference_kv", 0)))


def peak_memory(spec: BenchSpec, bundle: Path, config: Config) -> dict:
    """Peak memory of one configuration, in a fresh (spawned) process so configurations cannot mix."""
    return run_spawned(_memory_probe, (spec, str(bundle), config), repr(config.name))


# ---------------------------------------------------------------------------- summary


def summarize(rounds: dict[str, list[dict]], memory: dict[str, dict]) -> list[dict]:
    """Per contender: median s/image, the per-round ratio to plain (median, min, max), median parts."""
    plain = rounds[CONFIGS[0].name]
    rows = []
    for config in CONFIGS:
        measured = rounds[config.name]
        ratios = [m["seconds"] / p["seconds"] for m, p in zip(measured, plain)]
        wall_ratios = [m["wall_seconds"] / p["wall_seconds"] for m, p in zip(measured, plain)]
        row = dict(config=config.name, plain=config.plain, cache_attention=config.cache_attention,
                   state=None if config.plain else config.state,
                   seconds_per_image=statistics.median(m["seconds"] for m in measured),
                   ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                   wall_seconds_per_image=statistics.median(m["wall_seconds"] for m in measured),
                   wall_ratio=statistics.median(wall_ratios), wall_ratio_min=min(wall_ratios),
                   wall_ratio_max=max(wall_ratios),
                   unet_calls=statistics.median(m["unet_calls"] for m in measured),
                   unet_rows_per_image=statistics.median(m["unet_rows"] for m in measured),
                   parts={k: statistics.median(m["parts"][k] for m in measured) for k in measured[0]["parts"]},
                   context_cache_bytes=max(m["context_cache_bytes"] for m in measured),
                   reference_cache_bytes=max(m["reference_cache_bytes"] for m in measured),
                   per_round_seconds=[m["seconds"] for m in measured],
                   per_round_wall_seconds=[m["wall_seconds"] for m in measured])
        if config.name in memory:
            row["memory"] = memory[config.name]
        rows.append(row)
    for row in rows:
        row["unet_calls_ratio"] = row["unet_calls"] / rows[0]["unet_calls"]
        row["unet_rows_ratio"] = row["unet_rows_per_image"] / rows[0]["unet_rows_per_image"]
    return rows


def caching_buys(rounds: dict[str, list[dict]]) -> dict[str, float]:
    """Median per-round speed-ups of the caches (time without / time with)."""
    def ratio(a: str, b: str) -> float:
        return statistics.median(x["seconds"] / y["seconds"] for x, y in zip(rounds[a], rounds[b]))

    return {
        "reference cache (batched)": ratio("batched R/C/X, cold", "batched R/C/X, reference cached"),
        "attention caches, R K/V recorded (reference cached)":
            ratio("batched R/C/X, reference cached", "cached attention, reference cached"),
        "attention caches, R K/V memoized (reference cached)":
            ratio("batched R/C/X, reference cached", "cached attention, reference + R K/V cached"),
    }


# ---------------------------------------------------------------------------- reporting


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}" if nbytes else "-"


def markdown_table(rows: list[dict], device: str) -> str:
    part_names = ["_layout", "_reference", "_reference_kv", "_retouch", "_decode", "other"]
    wall = device != "cuda"  # on the CPU the wall-clock figures come as extra columns
    header = ("| configuration | s/image | × plain [min-max] | "
              + ("wall s/image | × plain, wall [min-max] | " if wall else "")
              + "UNet calls (× plain) | UNet rows/image (× plain) | "
              + " | ".join(PART_LABELS[p] for p in part_names)
              + " | peak MB (call) | caches MB: C / R |")
    lines = [header, "|" + "---|" * (len(part_names) + 7 + 2 * wall)]
    for r in rows:
        parts = [f"{r['parts'][p]:.3f}" if r["parts"] else "" for p in part_names]
        mem = r.get("memory")
        mem_cell = f"{mem['total_mb']:.0f} ({mem['call_mb']:.0f})" if mem else "-"
        caches = f"{_mb(r['context_cache_bytes'])} / {_mb(r['reference_cache_bytes'])}" if not r["plain"] else "-"
        ratio = "1" if r["plain"] else f"**{r['ratio']:.2f}x** [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]"
        wall_cells = ""
        if wall:
            wall_ratio = "1" if r["plain"] else \
                f"{r['wall_ratio']:.2f}x [{r['wall_ratio_min']:.2f}-{r['wall_ratio_max']:.2f}]"
            wall_cells = f"| {r['wall_seconds_per_image']:.3f} | {wall_ratio} "
        lines.append(f"| {r['config']} | {r['seconds_per_image']:.3f} | {ratio} {wall_cells}"
                     f"| {r['unet_calls']:.0f} ({r['unet_calls_ratio']:.2f}x) "
                     f"| {r['unet_rows_per_image']:.0f} ({r['unet_rows_ratio']:.2f}x) | " + " | ".join(parts)
                     + f" | {mem_cell} | {caches} |")
    return "\n".join(lines)


def markdown_section(spec: BenchSpec, machine: dict, rows: list[dict], buys: dict[str, float], command: str) -> str:
    """This run's "### `spec.key`" subsection of the RESULTS.md section `RESULTS_HEADING`."""
    memory = ("torch.cuda.max_memory_allocated (all of it: weights included)" if spec.device == "cuda" else
              "peak RSS (VmHWM) over the RSS after imports")
    by = {r["config"]: r for r in rows}
    timing = ("Times: wall clock, CUDA synchronized." if spec.device == "cuda" else
              "Times: the process's CPU time (`time.process_time`), which the other jobs on a shared machine "
              "do not inflate while this one waits for a core; the wall-clock figures sit beside them (they "
              "also hold the I/O waits of the cold runs' cache writes).")
    summary = (
        f"Layout-retouch / plain: cold cache **{by['batched R/C/X, cold']['ratio']:.2f}x** batched, "
        f"**{by['cached attention, cold']['ratio']:.2f}x** with attention caching; reference cached "
        f"**{by['batched R/C/X, reference cached']['ratio']:.2f}x** batched, "
        f"**{by['cached attention, reference cached']['ratio']:.2f}x** with attention caching (target ≤ 2.5x); "
        f"reference + R K/V cached **{by['cached attention, reference + R K/V cached']['ratio']:.2f}x** "
        f"(toward 1.5x). What the caches buy (time without / with, median over rounds): "
        + ", ".join(f"{k} {v:.2f}x" for k, v in buys.items()) + "."
    )
    return "\n".join([
        f"### {spec.key}",
        "",
        machine_line(machine),
        "",
        f"`{command}`: prompt {PROMPT!r}, a random LoRA concept (UNet + text encoder), DDIM, "
        f"{spec.steps} steps, guidance {spec.guidance_scale}, λ = {spec.lam} (retouch and swap from step "
        f"{GenerationOptions.of(num_inference_steps=spec.steps, lam=spec.lam).step_index(spec.lam)}), swap levels 2, "
        f"no SAM checkpoint (attention-only masks), batch {spec.batch_size}. {spec.warmup} warm-up generation(s) "
        f"per contender, then {spec.repeats} interleaved rounds of one generation each, the order rotating. "
        f"{timing} s/image and the breakdown (s/image, exclusive: stage 2 excludes the reference and R K/V, "
        f"which it calls) are medians over rounds; × plain is the median over rounds of the ratio within a round, "
        f"[min-max] over rounds. UNet calls per generation and UNet rows per image (batch rows summed over "
        f"the calls): × plain would follow the calls where a fixed cost per call dominates (a tiny model), "
        f"the rows where the UNet's arithmetic does (a GPU at 512 px). Peak memory: {memory}, one fresh process "
        f"per configuration after one warm-up generation; in brackets the growth during the measured "
        f"generation alone. Caches: `AttentionCache.nbytes()` of the context (C) cache recorded in stage 1 "
        f"and of the memoized reference (R) K/V.",
        "",
        markdown_table(rows, spec.device),
        "",
        summary,
        "",
    ])


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> tuple[BenchSpec, argparse.Namespace]:
    parser = common_parser(__doc__)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (both sides)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds (medians over them)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed generations per contender first")
    parser.add_argument("--batch-size", type=int, default=1, help="images per generation (seeds)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--lam", type=float, default=0.3, help="λ: fraction of steps on the vanilla model")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/generate-<device>.json)")
    parser.add_argument("--markdown", type=Path, default=RESULTS_MD,
                        help=f"markdown file whose '{RESULTS_HEADING}' section gets this run's table "
                             f"(hand-written notes from '{MARKDOWN_NOTES}' on in the replaced subsection are kept)")
    args = parser.parse_args(argv)
    common = common_spec_fields(parser, args)
    if min(args.steps, args.repeats, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--steps, --repeats and --batch-size must be >= 1, --warmup >= 0")
    if not 0.0 <= args.lam < 1.0:
        parser.error(f"--lam must be in [0, 1) (λ = 1 leaves no retouch steps), got {args.lam}")
    spec = BenchSpec(**common, steps=args.steps, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
                     guidance_scale=args.guidance_scale, lam=args.lam)
    return spec, args


def main(argv: list[str] | None = None) -> int:
    spec, args = parse_args(argv)
    command = start_run("generate.py", spec.threads, argv)
    machine = machine_info(spec.device, watched_paths=LRKIT_PATHS,
                           dirty_note="uncommitted changes in the inference code")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lrkit-bench-bundle-") as tmp:
        bundle = make_bundle(spec, build_base(spec), Path(tmp) / "concept")
        memory = {}
        if not args.no_memory:  # first: a failing probe should not waste the timing rounds
            for config in CONFIGS:
                memory[config.name] = peak_memory(spec, bundle, config)
                logger.info("peak memory, %s: %s", config.name, memory[config.name])
        rounds = bench_timings(spec, bundle)
    finish_machine_info(machine, started)

    rows = summarize(rounds, memory)
    buys = caching_buys(rounds)
    section = markdown_section(spec, machine, rows, buys, command)
    print(section)
    write_results_section(args.markdown, RESULTS_HEADING, section, spec.key, keep_from=MARKDOWN_NOTES)
    out = args.out or ROOT / "bench" / "results" / f"generate-{spec.device}.json"
    write_json(out, spec=dataclasses.asdict(spec), command=command, machine=machine, results=rows,
               caching_buys=buys)
    logger.info("wrote %s and %s (%.0f s)", out, args.markdown, machine["wall_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
