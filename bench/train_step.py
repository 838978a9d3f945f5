"""Training-step benchmark: lrkit's step against a plain diffusers-example loop, side by side.

For each method (lora, dreambooth, textual_inversion, pivotal) it times one optimizer step of

- **reference**: what diffusers' `train_dreambooth_lora.py` does every step: VAE-encode the pixel
  batch, tokenize and encode the captions, draw noise and timesteps, UNet forward, MSE (plus the
  prior-preservation term for DreamBooth), backward, gradient clipping, torch AdamW (not fused),
  zero_grad. It drives the VAE/text encoder/UNet of a `ConceptModel` built exactly like lrkit's
  (same base weights, same trainable parameters, same dtypes) but never touches lrkit's caches.
- **lrkit**: `ConceptModel.loss` with the speed options a user sets (`cache_latents`,
  `cache_text_embeddings` where the text encoder is frozen, SDPA attention as diffusers installs
  it), the optimizer of `PersonalizationModule.configure_optimizers` (fused AdamW on CUDA), the same
  clipping; optionally `torch.compile` / channels-last UNet (`--compile`, `--channels-last`).
- **ablations**: lrkit with one option taken away at a time, so the table can say what bought the
  speed-up (`lrkit time without X / lrkit time`).

All contenders run in one process, interleaved: warm-up, then `--rounds` rounds of `--steps`
steps per contender (the order rotates every round), so machine load hits every side alike.
Ratios are medians of per-round ratios. Peak memory is measured per side in a fresh process
(`multiprocessing` spawn): `torch.cuda.max_memory_allocated` on CUDA, the peak RSS growth
(`VmHWM`) on CPU. `--flops` only counts the FLOPs of each part of a step (meta tensors, instant).

    python bench/train_step.py                                   # CPU, tiny-random, 64 px, fp32
    python bench/train_step.py --device cuda --model sd15 --resolution 512 --precision bf16 --batch-size 4
    python bench/train_step.py --model tiny-xl                   # CPU, tiny-random-xl (SDXL's conditioning)
    python bench/train_step.py --device cuda --model sdxl --resolution 1024 --precision bf16 --methods lora

Results: a markdown table on stdout and in bench/RESULTS.md, JSON at `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built from config; never reach the Hub

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

# diffusers and transformers import lazily; resolving the classes here keeps module imports out of
# the memory probes' measurements (their baseline is taken after the imports).
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.training_utils import compute_snr  # noqa: E402,F401  (ConceptModel.loss imports it)
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from lrkit.models import (SD_SCHEDULER_CONFIG, TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG,  # noqa: E402
                          TINY_XL_UNET_CONFIG,
                          build_tiny_random, build_tiny_random_xl, fingerprint, load_clip_tokenizer, seeded_modules)
from lrkit.training.config import METHOD_NAMES, TrainConfig, load_config  # noqa: E402

# The single-concept methods this benchmark compares (concept_em needs a multi-concept image config).
BENCH_METHODS = tuple(m for m in METHOD_NAMES if m != "concept_em")
from lrkit.training.model import ConceptModel, step_seed  # noqa: E402
from lrkit.training.module import ConceptDataModule, PairedDataset, PersonalizationModule, collate  # noqa: E402
from lrkit.training.tokens import expand_prompt  # noqa: E402

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/ (already there for `python bench/...`)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, RESULTS_MD, CommonSpec, common_parser, common_spec_fields,  # noqa: E402
                     finish_machine_info, machine_info, machine_line, memory_now_and_peak, reset_peak, run_spawned,
                     start_run, synchronize, write_json, write_results_section)

logger = logging.getLogger("bench.train_step")

PHOTOS = ROOT / "data" / "subjects" / "vase"
PRECISIONS = {"fp32": "32", "bf16": "bf16-mixed", "fp16": "16-mixed"}
RESULTS_HEADING = "Training step"  # the "## " section of RESULTS.md this script writes
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NUM_BATCHES = 8  # distinct batches cycled through (different photos and flips)


@dataclass(frozen=True)
class BenchSpec(CommonSpec):
    """One benchmark configuration: `CommonSpec`'s fields (device, model, resolution, batch size, seed,
    threads) and the training step's."""

    precision: str = "fp32"
    steps: int = 8
    rounds: int = 15
    warmup: int = 3
    compile: bool = False
    channels_last: bool = False
    control: bool = False  # time a second, identical reference too (A/A: the noise floor)

    @property
    def key(self) -> str:
        """The RESULTS.md subsection this configuration owns."""
        extras = "".join([", compile" if self.compile else "", ", channels-last" if self.channels_last else ""])
        return (f"{self.device_label}, {self.model}, {self.resolution} px, batch {self.batch_size}, "
                f"{self.precision}{extras}")


# ---------------------------------------------------------------------------- models

# Stable Diffusion 1.5's architecture (diffusers configs of stable-diffusion-v1-5), random weights.
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
SD15_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


SDXL_UNET_CONFIG = dict(  # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, the sizes that matter
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_TEXT_2_CONFIG = dict(  # OpenCLIP ViT-bigG's text tower (text_encoder_2); the first encoder is CLIP-L
    SD15_TEXT_CONFIG, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    hidden_act="gelu", projection_dim=1280)


def build_sd15_random(seed: int = 0):
    """An SD-1.5-sized `StableDiffusionPipeline` with seeded random weights, built offline from config."""
    unet, vae, text_encoder = seeded_modules(
        seed, lambda: UNet2DConditionModel(**SD15_UNET_CONFIG), lambda: AutoencoderKL(**SD15_VAE_CONFIG),
        lambda: CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl_random(seed: int = 0):
    """An SDXL-sized `StableDiffusionXLPipeline` with seeded random weights, built offline from config (the VAE has
    SD's architecture; SDXL's differs only in its scaling factor)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    unet, vae, text_encoder, text_encoder_2 = seeded_modules(
        seed, lambda: UNet2DConditionModel(**SDXL_UNET_CONFIG),
        lambda: AutoencoderKL(**dict(SD15_VAE_CONFIG, scaling_factor=0.13025, sample_size=1024)),
        lambda: CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)),
        lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2_CONFIG)))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(), unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        add_watermarker=False)


BASE_IDS = {"tiny": "tiny-random", "tiny-xl": "tiny-random-xl", "sd15": "sd15-random", "sdxl": "sdxl-random"}
"""`--model` -> the base id the runs record."""


def build_pipe(spec: BenchSpec):
    """A fresh base pipeline for one side (the same seeded weights every time)."""
    if spec.model == "tiny":
        return build_tiny_random(spec.seed)
    if spec.model == "tiny-xl":
        return build_tiny_random_xl(spec.seed)
    pipe = build_sd15_random(spec.seed) if spec.model == "sd15" else build_sdxl_random(spec.seed)
    fingerprint(pipe, BASE_IDS[spec.model])
    return pipe


def train_config(spec: BenchSpec, method: str, *, lrkit_options: bool) -> TrainConfig:
    """The run's `TrainConfig`: defaults, plus lrkit's caches when `lrkit_options`."""
    return load_config(
        None,
        base=BASE_IDS[spec.model],
        method=method,
        seed=spec.seed,
        precision=PRECISIONS[spec.precision],
        cache_latents=lrkit_options,
        cache_text_embeddings=lrkit_options,
        data=dict(photos=str(PHOTOS), class_word="vase", resolution=spec.resolution, batch_size=spec.batch_size),
        # DreamBooth's prior preservation: the class images are the vase photos with the class prompt.
        dreambooth=dict(class_dir=str(PHOTOS), num_class_images=len(list(PHOTOS.glob("*.jpg")))),
    )


def autocast(spec: BenchSpec):
    """The mixed-precision context both sides run under (what Lightning's precision plugin does)."""
    if spec.precision == "fp32":
        return nullcontext()
    return torch.autocast(spec.device, dtype=AUTOCAST_DTYPES[spec.precision])


# ---------------------------------------------------------------------------- data


def to_device(batch: dict, device: str) -> dict:
    """Move every tensor of a batch, as Lightning's `transfer_batch_to_device` does."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def build_batches(config: TrainConfig, spec: BenchSpec) -> tuple[list[dict], list[dict]]:
    """`NUM_BATCHES` collated batches (instance photos, plus class images for DreamBooth) and the
    deterministic items `cache_latents` encodes, built by lrkit's data module as a training run does."""
    datamodule = ConceptDataModule(config)
    datamodule.setup("fit")  # loads the class images when prior preservation is on
    dataset = PairedDataset(datamodule.instance, datamodule.prior)
    batches = []
    for b in range(NUM_BATCHES):
        counters = range(b * spec.batch_size, (b + 1) * spec.batch_size)  # sample counters
        batches.append(to_device(collate([dataset[i % len(dataset)] for i in counters]), spec.device))
    return batches, datamodule.cacheable_items()


# ---------------------------------------------------------------------------- the two steps


def reference_loss(model: ConceptModel, batch: dict) -> torch.Tensor:
    """The per-step work of diffusers' train_dreambooth_lora.py (SDXL: train_dreambooth_lora_sdxl.py): the
    yardstick, without caches.

    VAE encode, tokenize + text encode (SDXL: both encoders' penultimate states, the second's pooled output, and
    the time ids of each photo's original size, crop and the target size), noise and timesteps, UNet, MSE
    (instance + prior term).
    """
    vae, unet, scheduler = model.vae, model.unet, model.noise_scheduler
    pixels = batch["pixel_values"]
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
    latents = latents.float()
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)

    states, added = [], None
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
        captions = [expand_prompt(c, tokenizer) for c in batch["caption"]]  # multi-vector tokens
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(latents.device)
        if not model.family.time_conditioned:
            states.append(encoder(ids)[0])
            continue
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's pooled (projected) output is the one SDXL reads
    states = torch.cat(states, dim=-1)
    if model.family.time_conditioned:
        size = pixels.shape[-1]
        target = torch.tensor([size, size], device=latents.device).expand(len(pixels), 2)
        time_ids = torch.cat([batch["original_size"].to(latents.device), batch["crop_top_left"].to(latents.device),
                              target], dim=1).to(unet.dtype)
        added = {"text_embeds": pooled.to(unet.dtype), "time_ids": time_ids}

    pred = unet(noisy.to(unet.dtype), timesteps, states.to(unet.dtype), added_cond_kwargs=added).sample.float()
    n = int(batch["num_instance"])
    loss = torch.nn.functional.mse_loss(pred[:n], noise[:n])
    if n < len(pred):  # prior preservation: class images follow the instance photos
        loss = loss + model.config.dreambooth.prior_loss_weight * torch.nn.functional.mse_loss(pred[n:], noise[n:])
    return loss


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   params: list[torch.nn.Parameter], max_grad_norm: float | None,
                   before_step: Callable[[], None] = lambda: None) -> float:
    """Backward, clip, step, zero_grad: the same code for every contender. Returns the loss.

    Reading the loss back every step is what diffusers' example does for its progress bar (and
    lrkit's loss does for its logs), so every contender pays that synchronisation.
    """
    scaler.scale(loss).backward()
    before_step()
    scaler.unscale_(optimizer)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@contextmanager
def lrkit_options(model: ConceptModel, *, cache_latents: bool = True, cache_text: bool = True,
                  unet: torch.nn.Module | None = None):
    """Run `model` with some speed options taken away (the ablations): both caches follow `config`
    (with `cache_latents` on, `ConceptModel.loss` requires every latent to be cached, so the ablation turns
    the option off rather than emptying the cache)."""
    saved = model.config, model.unet
    off = {}
    if not cache_text:
        off["cache_text_embeddings"] = False
    if not cache_latents:
        off["cache_latents"] = False
    if off:
        model.config = dataclasses.replace(model.config, **off)
    if unet is not None:
        model.unet = unet
    try:
        yield
    finally:
        model.config, model.unet = saved


@dataclass
class Contender:
    """A named training step: `step(i)` runs optimizer step i (loss, backward, clip, AdamW), returns the loss."""

    name: str
    step: Callable[[int], float]
    removed: str | None = None  # for ablations: the lrkit option taken away


def build_model(spec: BenchSpec, method: str, *, lrkit_side: bool):
    """A `ConceptModel` on the device and lrkit's optimizer for it (`PersonalizationModule`'s own)."""
    config = train_config(spec, method, lrkit_options=lrkit_side)
    module = PersonalizationModule(config, pipe=build_pipe(spec))
    model = module.model.to(spec.device)
    if lrkit_side and spec.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    model.train()
    return config, module, model


def reference_contender(spec: BenchSpec, method: str) -> Contender:
    """The yardstick: `reference_loss` and a torch AdamW over the method's parameter groups."""
    config, _, model = build_model(spec, method, lrkit_side=False)
    batches, _ = build_batches(config, spec)
    groups = [g for g in model.method.param_groups(model) if g["params"]]
    optimizer = torch.optim.AdamW(groups, betas=config.optim.betas, eps=config.optim.eps)  # torch default, not fused
    scaler = torch.amp.GradScaler(spec.device, enabled=spec.precision == "fp16")
    params = model.trainable_parameters()

    def step(i: int) -> float:
        with autocast(spec):
            loss = reference_loss(model, batches[i % len(batches)])
        return optimizer_step(loss, optimizer, scaler, params, config.optim.max_grad_norm)

    return Contender("reference", step)


def lrkit_contenders(spec: BenchSpec, method: str, *, ablations: bool) -> list[Contender]:
    """lrkit with all its speed options, then (if `ablations`) once without each of them."""
    config, module, model = build_model(spec, method, lrkit_side=True)
    batches, items = build_batches(config, spec)
    with autocast(spec):
        model.cache_latents(items, batch_size=config.data.batch_size)  # as PersonalizationModule.on_fit_start
    optimizer = module.configure_optimizers()["optimizer"]
    scaler = torch.amp.GradScaler(spec.device, enabled=spec.precision == "fp16")
    params = model.trainable_parameters()
    raw_unet = model.unet
    if spec.compile:
        model.unet = torch.compile(raw_unet)
    # Pivotal tuning: time phase 2 (tokens and LoRA train), the step the reference's parameter set matches.
    phase_step = config.max_steps - 1

    def make_step(opt: torch.optim.Optimizer, **options) -> Callable[[int], float]:
        def step(i: int) -> float:
            batch = batches[i % len(batches)]
            torch.manual_seed(step_seed(config.seed, i))  # as PersonalizationModule.on_train_batch_start
            # One generator per sample, seeded by its place in the sample stream (as training_step).
            generators = [torch.Generator().manual_seed(step_seed(config.seed, counter, 1 + (source == "class")))
                          for counter, source in zip(batch["counter"].tolist(), batch["source"])]
            with lrkit_options(model, **options), autocast(spec):
                loss, _ = model.loss(batch, generators)
            return optimizer_step(loss, opt, scaler, params, config.optim.max_grad_norm,
                                  lambda: model.method.before_optimizer_step(model, phase_step))
        return step

    contenders = [Contender("lrkit", make_step(optimizer))]
    if not ablations:
        return contenders
    contenders.append(Contender("lrkit - latent cache", make_step(optimizer, cache_latents=False), "latent cache"))
    if model.cache_text:
        contenders.append(Contender("lrkit - text cache", make_step(optimizer, cache_text=False), "text cache"))
    if optimizer.defaults.get("fused"):
        groups = [g for g in model.method.param_groups(model) if g["params"]]
        plain = torch.optim.AdamW(groups, betas=config.optim.betas, eps=config.optim.eps)
        contenders.append(Contender("lrkit - fused AdamW", make_step(plain), "fused AdamW"))
    if spec.compile:
        contenders.append(Contender("lrkit - compile", make_step(optimizer, unet=raw_unet), "torch.compile"))
    return contenders


# ---------------------------------------------------------------------------- timing


def time_contenders(contenders: list[Contender], spec: BenchSpec) -> dict[str, list[float]]:
    """Seconds per step of each contender, one value per round; rounds interleave the contenders."""
    counters = {c.name: 0 for c in contenders}
    losses: dict[str, list[float]] = {c.name: [] for c in contenders}

    def run(c: Contender, n: int) -> float:
        synchronize(spec.device)
        start = time.perf_counter()
        for _ in range(n):
            losses[c.name].append(c.step(counters[c.name]))
            counters[c.name] += 1
        synchronize(spec.device)
        return (time.perf_counter() - start) / n

    for c in contenders:
        if spec.warmup:  # (--warmup 0 is allowed)
            run(c, spec.warmup)
    per_round: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(spec.rounds):
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
        for c in order:
            per_round[c.name].append(run(c, spec.steps))
        logger.info("round %d/%d: %s", r + 1, spec.rounds,
                    ", ".join(f"{name} {t[-1] * 1e3:.1f} ms" for name, t in per_round.items()))
    for name, values in losses.items():
        if not all(math.isfinite(v) for v in values):  # NaN/inf arithmetic would make the timings meaningless
            raise FloatingPointError(f"{name}: non-finite loss during the benchmark ({values[-3:]})")
    return per_round


def median_ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median, min and max over rounds of num[r] / den[r]."""
    ratios = [a / b for a, b in zip(num, den)]
    return statistics.median(ratios), min(ratios), max(ratios)


# ---------------------------------------------------------------------------- peak memory


class _PeakMemory:
    """Peak memory since `reset()`, over what was held at the reset, in MB.

    CUDA: `torch.cuda.max_memory_allocated`. CPU: the peak RSS (`VmHWM`); writing 5 to
    /proc/self/clear_refs resets it. (`ru_maxrss` would not do: Linux carries it across fork+exec,
    so a spawned child would start with its parent's peak.)
    """

    def __init__(self, device: str):
        self.device = device

    def reset(self) -> None:
        reset_peak(self.device)
        self.base = memory_now_and_peak(self.device)[0]

    def growth(self) -> float:
        synchronize(self.device)
        return memory_now_and_peak(self.device)[1] - self.base


def _peak_memory_probe(spec: BenchSpec, method: str, side: str, queue) -> None:
    """Child process: build one side, run warm-up + `steps` steps; report its peak memory in MB.

    `total`: over the memory held after imports (weights, caches, optimizer state, activations);
    `steps`: over the memory held once the side is built (optimizer state and activations).
    On CUDA the total is the whole `max_memory_allocated` (nothing is on the GPU before the build).
    """
    if spec.threads:
        torch.set_num_threads(spec.threads)
    total, steps = _PeakMemory(spec.device), _PeakMemory(spec.device)
    total.reset()
    contender = reference_contender(spec, method) if side == "reference" else \
        lrkit_contenders(spec, method, ablations=False)[0]
    if spec.device != "cuda":  # CUDA has one peak counter: measure the steps' growth by difference
        steps.reset()
    else:
        steps.base = torch.cuda.memory_allocated() / 2**20
    for i in range(spec.warmup + spec.steps):
        contender.step(i)
    queue.put(dict(total=total.growth(), steps=steps.growth()))


def peak_memory_mb(spec: BenchSpec, method: str, side: str) -> dict[str, float]:
    """Peak memory of one side, measured in a fresh (spawned) process so the sides cannot mix."""
    return run_spawned(_peak_memory_probe, (spec, method, side), f"{method}/{side}")


# ---------------------------------------------------------------------------- one method


def bench_method(spec: BenchSpec, method: str, *, measure_memory: bool = True) -> dict:
    """Time the reference, lrkit and its ablations side by side; then each side's peak memory."""
    logger.info("%s: building the reference and lrkit models", method)
    contenders = [reference_contender(spec, method), *lrkit_contenders(spec, method, ablations=True)]
    if spec.control:
        contenders.append(Contender("reference copy", reference_contender(spec, method).step))
    per_round = time_contenders(contenders, spec)
    ref, full = per_round["reference"], per_round["lrkit"]
    ratio = median_ratio(ref, full)
    options = {}
    for c in contenders:
        if c.removed is not None:
            options[c.removed] = dict(zip(("median", "min", "max"), median_ratio(per_round[c.name], full)))
    result = dict(
        method=method,
        ref_steps_per_s=1.0 / statistics.median(ref),
        lrkit_steps_per_s=1.0 / statistics.median(full),
        ratio=ratio[0], ratio_min=ratio[1], ratio_max=ratio[2],
        options=options,
        seconds_per_step=per_round,
    )
    if spec.control:
        result["control"] = dict(zip(("median", "min", "max"), median_ratio(per_round["reference copy"], ref)))
    if measure_memory:
        logger.info("%s: measuring peak memory (one process per side)", method)
        ref_mem, lrkit_mem = peak_memory_mb(spec, method, "reference"), peak_memory_mb(spec, method, "lrkit")
        result.update(ref_peak_mb=ref_mem["total"], lrkit_peak_mb=lrkit_mem["total"],
                      ref_steps_peak_mb=ref_mem["steps"], lrkit_steps_peak_mb=lrkit_mem["steps"])
    return result


def what_bought_it(result: dict, spec: BenchSpec) -> str:
    """The ablation factors, largest first ("latent cache 1.10x": the step is 1.10x slower without it)."""
    options = sorted(result["options"].items(), key=lambda kv: -kv[1]["median"])
    parts = [f"{name} {o['median']:.2f}x" for name, o in options]
    if spec.channels_last:
        parts.append("channels-last (not ablated)")
    text = ", ".join(parts) or "-"
    if "control" in result:
        c = result["control"]
        text += f"; A/A noise: {c['median']:.2f}x [{c['min']:.2f}-{c['max']:.2f}]"
    return text


# ---------------------------------------------------------------------------- FLOP count


def count_gflops(fn: Callable[[], object]) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def flop_estimate(spec: BenchSpec, methods: list[str]) -> tuple[list[dict], dict]:
    """Per-image GFLOPs of the parts of a step, counted on meta tensors (no weights, no time), and each part's
    parameter count.

    `if_time_follows_flops` is the speed-up the caches would buy if time were proportional to FLOPs:
    step FLOPs over step FLOPs without what lrkit caches (VAE encode; the text encoders where they are frozen).
    SDXL's step runs both text encoders (penultimate states) and gives the UNet the pooled embedding and time ids.
    """
    from transformers import CLIPTextModelWithProjection

    configs = {"sd15": (SD15_UNET_CONFIG, SD15_VAE_CONFIG, [SD15_TEXT_CONFIG]),
               "sdxl": (SDXL_UNET_CONFIG, SD15_VAE_CONFIG, [SD15_TEXT_CONFIG, SDXL_TEXT_2_CONFIG]),
               "tiny": (TINY_UNET_CONFIG, TINY_VAE_CONFIG, [TINY_TEXT_CONFIG]),
               "tiny-xl": (TINY_XL_UNET_CONFIG, TINY_VAE_CONFIG, [TINY_TEXT_CONFIG, TINY_TEXT_CONFIG])}
    unet_config, vae_config, text_configs = configs[spec.model]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config).requires_grad_(False)
        vae = AutoencoderKL(**vae_config).requires_grad_(False)
        classes = [CLIPTextModel] + [CLIPTextModelWithProjection] * (len(text_configs) - 1)
        encoders = [cls(CLIPTextConfig(**c)).requires_grad_(False) for cls, c in zip(classes, text_configs)]
    r, down = spec.resolution, 2 ** (len(vae.config.block_out_channels) - 1)
    pixels = torch.empty(1, 3, r, r, device="meta")
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    latents = torch.empty(1, unet.config.in_channels, r // down, r // down, device="meta", requires_grad=True)
    states = torch.empty(1, 77, unet.config.cross_attention_dim, device="meta")
    timestep = torch.tensor([500], device="meta")
    added = ({"added_cond_kwargs": {"text_embeds": torch.empty(1, text_configs[-1]["projection_dim"], device="meta"),
                                    "time_ids": torch.empty(1, 6, device="meta")}}
             if unet.config.addition_embed_type == "text_time" else {})

    def encode():  # SD reads the last hidden states, SDXL each encoder's penultimate ones
        if len(encoders) == 1:
            return [encoders[0](ids)[0]]
        return [encoder(ids, output_hidden_states=True).hidden_states[-2] for encoder in encoders]

    vae_gf = count_gflops(lambda: vae.encode(pixels))
    text_gf = count_gflops(encode)
    for encoder in encoders:  # TI: gradients flow to the token rows
        encoder.get_input_embeddings().weight.requires_grad_(True)
    text_train_gf = count_gflops(lambda: sum(h.sum() for h in encode()).backward())
    unet_in_gf = count_gflops(lambda: unet(latents, timestep, states, **added).sample.sum().backward())  # LoRA-like
    unet.requires_grad_(True)
    unet_full_gf = count_gflops(lambda: unet(latents, timestep, states, **added).sample.sum().backward())  # DreamBooth

    rows = []
    for method in methods:
        text_frozen = method in ("lora", "dreambooth")
        text = text_gf if text_frozen else text_train_gf
        unet_step = unet_full_gf if method == "dreambooth" else unet_in_gf
        step = vae_gf + text + unet_step
        cached = vae_gf + (text if text_frozen else 0.0)
        rows.append(dict(method=method, vae_encode=vae_gf, text_encoder=text, unet=unet_step, step=step,
                         cached_share=cached / step, if_time_follows_flops=step / (step - cached)))
    params = {"unet": sum(p.numel() for p in unet.parameters()), "vae": sum(p.numel() for p in vae.parameters()),
              "text_encoders": sum(p.numel() for e in encoders for p in e.parameters())}
    return rows, params


def flop_section(spec: BenchSpec, rows: list[dict], params: dict, command: str, machine: dict) -> str:
    lines = [
        f"### FLOP count: {spec.model}, {spec.resolution} px (no timing)",
        "",
        f"{machine['date']} · torch {machine['torch']}, diffusers {machine['diffusers']} · `{command}`: "
        "per-image GFLOPs counted by `torch.utils.flop_counter` on meta tensors (forward, and backward where the "
        "step has one: to the inputs for LoRA/TI/pivotal, with weight gradients for DreamBooth; LoRA adapters "
        "and the optimizer are negligible and left out). The last column is what the caches would buy if "
        "time were proportional to FLOPs: an expectation, not a measurement.",
        "",
        "| method | VAE encode | text encoder | UNet fwd+bwd | step | cacheable share | lrkit/ref if time follows FLOPs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['vae_encode']:.4g} | {r['text_encoder']:.4g} | {r['unet']:.4g} "
                     f"| {r['step']:.4g} | {r['cached_share']:.0%} | {r['if_time_follows_flops']:.2f}x |")
    frozen = sum(params.values()) * 2 / 1e9
    lines += ["", "| parameters | UNet | VAE | text encoder(s) | frozen weights in bf16 |", "|---|---|---|---|---|",
              f"| {spec.model} | {params['unet'] / 1e6:,.1f} M | {params['vae'] / 1e6:,.1f} M | "
              f"{params['text_encoders'] / 1e6:,.1f} M | {frozen:.2f} GB |"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- reporting


def markdown_table(results: list[dict]) -> str:
    header = ("| method | ref steps/s | lrkit steps/s | ratio (lrkit/ref) [min-max] | ref peak MB (steps) "
              "| lrkit peak MB (steps) | what bought it (lrkit time without it / with it) |")
    lines = [header, "|" + "---|" * 7]
    for r in results:
        mem = [f"{r[f'{side}_peak_mb']:.0f} ({r[f'{side}_steps_peak_mb']:.0f})" if f"{side}_peak_mb" in r else "-"
               for side in ("ref", "lrkit")]
        lines.append(f"| {r['method']} | {r['ref_steps_per_s']:.2f} | {r['lrkit_steps_per_s']:.2f} "
                     f"| {r['ratio']:.2f}x [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] | {mem[0]} | {mem[1]} "
                     f"| {r['what_bought_it']} |")
    return "\n".join(lines)


def markdown_section(spec: BenchSpec, machine: dict, results: list[dict], command: str) -> str:
    memory = "torch.cuda.max_memory_allocated" if spec.device == "cuda" else "peak RSS (VmHWM) over the RSS after imports"
    return "\n".join([
        f"### {spec.key}",
        "",
        machine_line(machine),
        "",
        f"`{command}`: {spec.rounds} interleaved rounds of {spec.steps} step(s) per contender after "
        f"{spec.warmup} warm-up step(s). Ratio: median over rounds of (reference time / lrkit time) in the same "
        f"round, [min-max] over rounds; steps/s: each contender's own median, so under changing load they "
        f"need not divide to the ratio. Peak memory: {memory}, one fresh process per side; in brackets the "
        f"growth during the training steps alone (over the memory held once the side is built).",
        "",
        markdown_table(results),
        "",
    ])


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> tuple[BenchSpec, argparse.Namespace]:
    parser = common_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (the ratio is their median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    parser.add_argument("--methods", default=",".join(BENCH_METHODS),
                        help="comma-separated subset of " + ", ".join(BENCH_METHODS))
    parser.add_argument("--compile", action="store_true", help="torch.compile lrkit's UNet (also ablated)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format for lrkit's UNet")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--control", action="store_true",
                        help="also time a second, identical reference (A/A): how far apart two equal sides land")
    parser.add_argument("--flops", action="store_true",
                        help="only count each part's FLOPs on meta tensors (instant; no timing, no weights)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/train_step-<device>.json)")
    parser.add_argument("--markdown", type=Path, default=RESULTS_MD,
                        help=f"markdown file whose '{RESULTS_HEADING}' section gets this run's table")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in BENCH_METHODS]
    if unknown or not methods:
        parser.error(f"--methods: {unknown or 'none given'} not in {list(BENCH_METHODS)}")
    common = common_spec_fields(parser, args)
    if min(args.steps, args.rounds, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds and --batch-size must be >= 1, --warmup >= 0")
    args.methods = methods
    spec = BenchSpec(**common, precision=args.precision, steps=args.steps, rounds=args.rounds, warmup=args.warmup,
                     compile=args.compile, channels_last=args.channels_last, control=args.control)
    return spec, args


def main(argv: list[str] | None = None) -> int:
    spec, args = parse_args(argv)
    command = start_run("train_step.py", spec.threads, argv)
    machine = machine_info(spec.device)
    if args.flops:
        rows, params = flop_estimate(spec, args.methods)
        section = flop_section(spec, rows, params, command, machine)
        print(section)
        write_results_section(args.markdown, RESULTS_HEADING, section, section.splitlines()[0][4:])
        return 0
    started = time.perf_counter()
    results = []
    for method in args.methods:
        result = bench_method(spec, method, measure_memory=not args.no_memory)
        result["what_bought_it"] = what_bought_it(result, spec)
        results.append(result)
        logger.info("%s: ratio %.2fx (%s)", method, result["ratio"], result["what_bought_it"])
    finish_machine_info(machine, started)

    section = markdown_section(spec, machine, results, command)
    print(section)
    write_results_section(args.markdown, RESULTS_HEADING, section, spec.key)
    out = args.out or ROOT / "bench" / "results" / f"train_step-{spec.device}.json"
    write_json(out, spec=dataclasses.asdict(spec), command=command, machine=machine, results=results)
    logger.info("wrote %s and %s (%.0f s)", out, args.markdown, machine["wall_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
