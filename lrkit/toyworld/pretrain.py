"""Pretraining the embedded toy base model on the toy world (DESIGN section 7, issue 4 item 2).

`pretrain(out, minutes=60, seed=0)` builds a tiny Stable-Diffusion-architecture model from config
and trains it on (rendered image, caption) pairs from `lrkit.toyworld.sample`, within a wall-clock
budget on a CPU:

1. Data: a pool of rendered samples (`pool_size` seeds), refreshed by `refresh_per_step` fresh
   seeds at every UNet step, so the model keeps seeing new pictures without paying the renderer
   for a whole batch each step.
2. VAE (`vae_fraction` of the budget): a plain autoencoder (L1 + MSE reconstruction, object pixels
   weighted up by the renderer's masks, plus a small KL term), then frozen. The latent scaling factor is 1 / std of the pool's latents, as in SD.
3. UNet + CLIP text encoder (the rest of the budget): epsilon-prediction DDPM loss with min-SNR
   weighting (Hang et al. 2023, gamma 5), SD's noise schedule, 10 % empty captions (so
   classifier-free guidance works), AdamW with warmup and cosine decay over the remaining time,
   EMA of both trained models (exported).

Checkpoints (safetensors + `state.json`) go to `OUT/checkpoint` every `checkpoint_minutes` and at
the end; `resume=True` continues from there, counting the time already spent. The exported
pipeline (fp16 safetensors, loaded back as float32) goes to `OUT/pipeline`. Training loss is
logged to `OUT/log.jsonl`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lrkit.toyworld.render import sample
from lrkit.toyworld.world import SCENE_NAMES, ObjectSpec, caption, compatible_colors

logger = logging.getLogger(__name__)

# The toy model's architecture: SD's layout at a small scale. A 4x VAE (64 px -> 16x16x4 latents, no mid-block attention);
# a UNet with cross-attention at the 16x16 and 8x8 levels (down and up) and in the 4x4 mid block,
# so Layout-and-Retouch's decoder swap layers (self-attention at the two highest resolutions with
# attention) and its cross-attention maps exist; a 3-layer CLIP text encoder with the real CLIP
# vocabulary (49408 tokens, 77 positions) and hidden size 64, which keeps the embedding table at
# 6.3 MB in fp16.
TOY_RESOLUTION = 64
TOY_TEXT_HIDDEN = 64
TOY_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TOY_TEXT_HIDDEN,
    attention_head_dim=2,  # diffusers reads this as the number of heads: 2 heads train 2x faster on a CPU than 8
    norm_num_groups=16,
)
TOY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=TOY_RESOLUTION,
    mid_block_add_attention=False,  # flat-coloured pictures need no global mixing; 2x faster to train
)
TOY_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=TOY_TEXT_HIDDEN,
    intermediate_size=4 * TOY_TEXT_HIDDEN,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=TOY_TEXT_HIDDEN,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
POOL_SEED_BASE = 1_000_003  # pool seeds are POOL_SEED_BASE * (seed + 1) + i: disjoint from small test seeds


@dataclass
class PretrainConfig:
    """Options of `pretrain`; every field is saved in `state.json`."""

    minutes: float = 60.0
    """Wall-clock budget for the whole run (all phases, export included)."""
    seed: int = 0
    """Seeds model initialisation, data seeds, noise and caption dropout."""
    max_steps: int | None = None
    """Stop the UNet phase after this many steps (smoke tests), whatever the time."""
    vae_steps: int | None = None
    """Stop the VAE phase after this many steps (smoke tests), whatever the time."""
    pool_size: int = 3072
    """Rendered samples kept in memory."""
    refresh_per_step: int = 3
    """Pool entries replaced by freshly rendered seeds at every UNet step."""
    render_workers: int = 0
    """Processes that render the pool (0: this process). With workers, fresh seeds are rendered in the
    background, `refresh_chunk_steps` steps' worth at a time, and enter the pool one chunk later, so
    the renderer keeps up with a GPU; which seeds land in which slots stays fixed by the seed."""
    refresh_chunk_steps: int = 25
    """With `render_workers`: steps between two background refreshes (each of
    `refresh_chunk_steps * refresh_per_step` seeds)."""
    two_object_fraction: float = 0.0
    """Share of rendered samples with two objects ("a red ball and a blue cube on the beach"), so the
    model sees prompts that combine objects (multi-concept generation); the rest have one."""
    extras_fraction: float = 0.0
    """Share of generic objects drawn with one of their class's subject-only features (`SUBJECT_EXTRAS`;
    the caption does not name it), so that a subject's features are not new to the model."""
    vae_fraction: float = 0.2
    """Share of the budget for the VAE phase."""
    vae_batch_size: int = 8
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_object_weight: float = 8.0
    """Extra reconstruction weight of object pixels (from the renderer's ground-truth masks)."""
    batch_size: int = 32
    lr: float = 8e-4
    """Peak learning rate of the UNet + text encoder (AdamW)."""
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    prediction_type: str = "epsilon"
    """What the UNet predicts: "epsilon" (SD 1.x) or "v_prediction" (SD 2.x). The loss weight in x0
    terms is min(SNR, gamma) for epsilon and min(SNR + 1, gamma) for v: the v model's loss keeps a weight
    of at least 1 at high noise, where the object's silhouette is laid out, instead of SNR << 1."""
    object_loss_weight: float = 0.0
    """Extra diffusion-loss weight of object latents (the renderer's masks at latent resolution):
    the per-pixel weight is 1 + object_loss_weight * object share, normalised to mean 1 per sample."""
    vae_from: str | None = None
    """Reuse the VAE (and its scaling factor) of this pipeline folder, or "toy" for the shipped one,
    and skip the VAE phase; the whole budget then goes to the UNet."""
    init_from: str | None = None
    """Start the UNet and text encoder from this pipeline folder ("toy": the shipped model) instead of random
    weights, to continue a model's training with another recipe; the VAE then comes from there too (`vae_from`).
    The UNet options must describe that folder's UNet."""
    timestep_focus: str = ""
    """"LO,HI": draw `timestep_focus_fraction` of each batch's timesteps uniformly from [LO, HI) instead of the
    whole schedule, for the range where an object's outline is laid out (see the model card)."""
    timestep_focus_fraction: float = 0.0
    token_lr_scale: float = 1.0
    """The text encoder's token table learns at `lr` times this (the rest of both models at `lr`)."""
    snr_shift: float = 1.0
    """Multiply the noise schedule's SNR by this at every timestep (`schedule_config`; 1.0: SD's schedule). The
    exported scheduler carries the schedule, and lrkit's training and inference read it from there."""
    unet_channels: str = "32,64,64"
    """The UNet's `block_out_channels`, comma-separated (three levels; the shipped model's by default)."""
    unet_layers_per_block: int = 1
    unet_heads: int = 2
    """Attention heads of the UNet (diffusers' `attention_head_dim`, which it reads as the number of heads)."""
    ema_decay: float = 0.995
    checkpoint_minutes: float = 5.0
    export_reserve_minutes: float = 0.5
    """Time kept at the end for the final checkpoint and the export."""
    num_threads: int = 2
    """CPU threads of torch (the CPU run's budget assumes the 2 cores it was made on)."""
    device: str = "cpu"
    """Where the models train ("cuda" on a GPU); rendering and the sample pool stay on the CPU."""
    bf16: bool = False
    """Run the UNet and text encoder forward passes under bfloat16 autocast (weights stay fp32)."""

    def unet_block_out_channels(self) -> tuple[int, ...]:
        return tuple(int(c) for c in str(self.unet_channels).split(","))

    def timestep_focus_range(self) -> tuple[int, int] | None:
        """`timestep_focus` as (LO, HI); None when unset."""
        if not self.timestep_focus:
            return None
        try:
            lo, hi = (int(v) for v in str(self.timestep_focus).split(","))
        except ValueError:
            raise ValueError(self._focus_error()) from None
        return lo, hi

    def _focus_error(self) -> str:
        return (f"pretrain: timestep_focus must be 'LO,HI' with 0 <= LO < HI <= 1000 and timestep_focus_fraction in "
                f"[0, 1] (> 0 only with a range); got {self.timestep_focus!r}, {self.timestep_focus_fraction}")

    def unet_overrides(self) -> dict:
        return dict(block_out_channels=self.unet_block_out_channels(), layers_per_block=self.unet_layers_per_block,
                    attention_head_dim=self.unet_heads)

    def __post_init__(self):
        if self.minutes <= 0:
            raise ValueError(f"pretrain: minutes must be > 0, got {self.minutes}")
        if not 0.0 < self.vae_fraction < 1.0:
            raise ValueError(f"pretrain: vae_fraction must be in (0, 1), got {self.vae_fraction}")
        if self.pool_size < self.batch_size or self.pool_size < self.vae_batch_size:
            raise ValueError(f"pretrain: pool_size ({self.pool_size}) must be >= the batch sizes")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"pretrain: caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"pretrain: prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}"
            )
        for name in ("two_object_fraction", "extras_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"pretrain: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.object_loss_weight < 0:
            raise ValueError(f"pretrain: object_loss_weight must be >= 0, got {self.object_loss_weight}")
        try:
            channels = self.unet_block_out_channels()
        except ValueError:
            channels = ()
        if len(channels) != 3 or any(c < 1 or c % 16 for c in channels) or self.unet_layers_per_block < 1 \
                or self.unet_heads < 1 or any(c % self.unet_heads for c in channels):
            raise ValueError(
                f"pretrain: unet_channels must be three multiples of 16 (the UNet's group norm) divisible by "
                f"unet_heads, and unet_layers_per_block >= 1; got {self.unet_channels!r}, {self.unet_heads} heads, "
                f"{self.unet_layers_per_block} layers per block"
            )
        lo, hi = self.timestep_focus_range() or (0, 1)
        if not (0 <= lo < hi <= 1000 and 0.0 <= self.timestep_focus_fraction <= 1.0) \
                or (self.timestep_focus_fraction > 0 and not self.timestep_focus):
            raise ValueError(self._focus_error())
        if not self.token_lr_scale > 0:
            raise ValueError(f"pretrain: token_lr_scale must be > 0, got {self.token_lr_scale}")
        if self.init_from is not None and self.vae_from is None:
            self.vae_from = self.init_from
        if not self.snr_shift > 0:
            raise ValueError(f"pretrain: snr_shift must be > 0, got {self.snr_shift}")
        if self.render_workers < 0 or self.refresh_chunk_steps < 1:
            raise ValueError(
                f"pretrain: render_workers must be >= 0 and refresh_chunk_steps >= 1, got {self.render_workers} "
                f"and {self.refresh_chunk_steps}"
            )


# ------------------------------------------------------------------------------------ models


def build_toy_components(seed: int = 0, unet_overrides: dict | None = None):
    """(vae, text_encoder, unet) of the toy architecture, randomly initialised from `seed`; `unet_overrides`
    change fields of `TOY_UNET_CONFIG` (a larger UNet: `block_out_channels`, `layers_per_block`, ...)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**TOY_VAE_CONFIG)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TOY_TEXT_CONFIG))
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(**{**TOY_UNET_CONFIG, **(unet_overrides or {})})
    return vae, text_encoder, unet


def schedule_config(snr_shift: float = 1.0) -> dict:
    """SD's noise schedule (`SD_SCHEDULER_CONFIG`) with its signal-to-noise ratio multiplied by `snr_shift` at
    every timestep (as explicit `trained_betas`; 1.0 gives SD's config itself). A shift > 1 leaves more of the
    signal at each timestep: SD's schedule was made for 64x64 latents, and on the toy model's 16x16 latents
    the same noise wipes out an object's outline at lower timesteps (fewer pixels average the noise away)."""
    from diffusers import DDPMScheduler

    from lrkit.models import SD_SCHEDULER_CONFIG

    if snr_shift == 1.0:
        return dict(SD_SCHEDULER_CONFIG)
    abar = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG).alphas_cumprod.double()
    snr = snr_shift * abar / (1 - abar)
    shifted = snr / (1 + snr)
    betas = 1 - shifted / torch.cat([torch.ones(1, dtype=shifted.dtype), shifted[:-1]])
    return {**SD_SCHEDULER_CONFIG, "trained_betas": betas.tolist()}


def assemble_pipeline(vae, text_encoder, unet, prediction_type: str = "epsilon", snr_shift: float = 1.0):
    """A `StableDiffusionPipeline` around the components, with the shipped CLIP tokenizer and DDIM
    (SD's schedule, shifted by `snr_shift` (`schedule_config`), predicting `prediction_type`)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lrkit.models import load_clip_tokenizer

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**{**schedule_config(snr_shift), "prediction_type": prediction_type}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def export_pipeline(vae, text_encoder, unet, out: str | Path, prediction_type: str = "epsilon",
                    snr_shift: float = 1.0) -> Path:
    """Save the pipeline to `out` with fp16 safetensors weights (the models are not changed)."""
    import copy

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    half = [copy.deepcopy(m).to("cpu", torch.float16) for m in (vae, text_encoder, unet)]
    assemble_pipeline(*half, prediction_type=prediction_type, snr_shift=snr_shift).save_pretrained(
        str(out), safe_serialization=True)
    return out


# ------------------------------------------------------------------------------------ data


class SamplePool:
    """Rendered toy-world samples: images in [-1, 1], caption token ids, and (after the VAE phase)
    latent posterior means and stds. Entries are replaced in place by fresh seeds."""

    def __init__(self, tokenizer, size: int, seed: int, two_object_fraction: float = 0.0,
                 extras_fraction: float = 0.0):
        self.tokenizer = tokenizer
        self.world = (two_object_fraction, extras_fraction)  # render_seeds' arguments after the seeds
        self.size = size
        self.base = POOL_SEED_BASE * (seed + 1)
        self.next_seed = 0
        self.images = torch.empty(size, 3, TOY_RESOLUTION, TOY_RESOLUTION)
        self.masks = torch.zeros(size, 1, TOY_RESOLUTION, TOY_RESOLUTION, dtype=torch.bool)
        self.ids = torch.empty(size, tokenizer.model_max_length, dtype=torch.long)
        self.latent_mean: torch.Tensor | None = None
        self.latent_std: torch.Tensor | None = None
        self.latent_masks: torch.Tensor | None = None  # object share of each latent pixel, in [0, 1]

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def _take_seeds(self, n: int) -> list[int]:
        seeds = [self.base + self.next_seed + i for i in range(n)]
        self.next_seed += n
        return seeds

    def _store(self, slots: list[int], rendered: tuple[np.ndarray, np.ndarray, list[str]]) -> None:
        images, masks, captions = rendered
        self.images[slots] = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        self.masks[slots, 0] = torch.from_numpy(masks)
        self.ids[slots] = self.tokenize(captions)

    def _render(self, slots: list[int]) -> None:
        self._store(slots, render_seeds(self._take_seeds(len(slots)), *self.world))

    def fill(self, progress: bool = True, executor=None) -> None:
        from tqdm.auto import tqdm

        chunk = 256
        jobs = [(list(range(start, min(start + chunk, self.size))), self._take_seeds(min(chunk, self.size - start)))
                for start in range(0, self.size, chunk)]
        if executor is None:
            rendered = (render_seeds(seeds, *self.world) for _, seeds in jobs)
        else:
            rendered = (f.result() for f in [executor.submit(render_seeds, seeds, *self.world)
                                             for _, seeds in jobs])
        for (slots, _), result in tqdm(zip(jobs, rendered), total=len(jobs), desc="render pool", disable=not progress):
            self._store(slots, result)

    def render_in_background(self, executor, workers: int, n: int) -> list:
        """Start rendering `n` fresh seeds on `executor`, split evenly between its `workers` (one task alone
        would leave the whole chunk to one process: a 2-3 s stall on a GPU run); give the futures to
        `refresh_from`."""
        seeds = self._take_seeds(n)
        size = -(-n // workers)
        return [executor.submit(render_seeds, seeds[i:i + size], *self.world) for i in range(0, n, size)]

    def refresh(self, n: int, rng: np.random.Generator, vae=None) -> None:
        """Replace `n` random entries with fresh seeds (and their latents, when encoded)."""
        if n <= 0:
            return
        slots = sorted(set(int(i) for i in rng.choice(self.size, size=n, replace=False)))
        self._render(slots)
        self._encode_slots(slots, vae)

    def refresh_from(self, futures: list, rng: np.random.Generator, vae=None) -> None:
        """Put the samples of `render_in_background`'s futures (waited for, in order) into random slots."""
        parts = [f.result() for f in futures]
        rendered = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                    [c for p in parts for c in p[2]])
        slots = [int(i) for i in rng.choice(self.size, size=len(rendered[2]), replace=False)]
        self._store(slots, rendered)
        self._encode_slots(slots, vae)

    def _encode_slots(self, slots: list[int], vae) -> None:
        if vae is not None and self.latent_mean is not None:
            mean, std = encode(vae, self.images[slots])
            device = self.latent_mean.device
            self.latent_mean[slots] = mean.to(device)
            self.latent_std[slots] = std.to(device)
            self.latent_masks[slots] = _latent_share(self.masks[slots], mean.shape[-1]).to(device)

    def latents_to(self, device: torch.device) -> None:
        """Keep the encoded latents on `device` (a GPU run then samples its batches there)."""
        self.latent_mean, self.latent_std = self.latent_mean.to(device), self.latent_std.to(device)
        self.latent_masks = self.latent_masks.to(device)

    def encode_all(self, vae, batch: int = 128) -> None:
        means, stds = [], []
        for start in range(0, self.size, batch):
            mean, std = encode(vae, self.images[start:start + batch])
            means.append(mean)
            stds.append(std)
        self.latent_mean, self.latent_std = torch.cat(means), torch.cat(stds)
        self.latent_masks = _latent_share(self.masks, self.latent_mean.shape[-1])


def render_seeds(seeds: list[int], two_object_fraction: float,
                 extras_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render the pool samples of `seeds`: uint8 images (N, H, W, 3), bool object masks (N, H, W), captions.
    A plain function of its arguments, so worker processes can run it."""
    rendered = [sample(seed, num_objects=1 + (two_objects(seed) < two_object_fraction), resolution=TOY_RESOLUTION,
                       extras_fraction=extras_fraction) for seed in seeds]
    return (np.stack([np.asarray(r.image.convert("RGB"), dtype=np.uint8) for r in rendered]),
            np.stack([r.object_mask for r in rendered]), [r.caption for r in rendered])


def _latent_share(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, H, W) bool masks -> (B, 1, size, size) share of object pixels under each latent pixel."""
    return F.adaptive_avg_pool2d(masks.float(), size)


def two_objects(data_seed: int) -> float:
    """A uniform number in [0, 1) fixed by the data seed: the sample has two objects when it is below
    `two_object_fraction` (so a seed's picture does not depend on the order of rendering)."""
    return float(np.random.default_rng([data_seed, 2]).random())


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of the VAE for images in [-1, 1] (unscaled latent space)."""
    dist = vae.encode(images.to(vae.device)).latent_dist
    return dist.mean.cpu(), dist.std.cpu()


# ------------------------------------------------------------------------------------ checkpoints


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]) -> dict:
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                out[f"{names[p]}::{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str], tensors: dict) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            keys = [k for k in ("step", "exp_avg", "exp_avg_sq") if f"{names[p]}::{k}" in tensors]
            if keys:
                optimizer.state[p] = {k: tensors[f"{names[p]}::{k}"].to(p.device, copy=True) for k in keys}


class EMA:
    """Exponential moving average of a module's float parameters (decay warmed up as (1+n)/(10+n))."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        live = module.state_dict()
        keys = [k for k in self.shadow if k in live]
        # shadow <- shadow + (1 - d) (live - shadow): one fused call per module instead of one per tensor
        torch._foreach_lerp_([self.shadow[k] for k in keys], [live[k].detach() for k in keys], 1 - d)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict({**module.state_dict(), **self.shadow})


# ------------------------------------------------------------------------------------ training


def _snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[t]
    return a / (1 - a)


def draw_timesteps(cfg: PretrainConfig, num_train_timesteps: int = 1000) -> torch.Tensor:
    """A batch's training timesteps: uniform over the schedule, except that the first
    round(timestep_focus_fraction * batch_size) come from the `timestep_focus` range."""
    t = torch.randint(0, num_train_timesteps, (cfg.batch_size,))
    focus = cfg.timestep_focus_range()
    n_focus = round(cfg.timestep_focus_fraction * cfg.batch_size)
    if focus is not None and n_focus:
        t[:n_focus] = torch.randint(focus[0], min(focus[1], num_train_timesteps), (n_focus,))
    return t


def _lr_at(step: int, frac: float, cfg: PretrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to 10 % over the phase's time fraction."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _log(out: Path, record: dict) -> None:
    with open(out / "log.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


def pretrain(
    out: str | Path,
    minutes: float = 60.0,
    seed: int = 0,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    vae_steps: int | None = None,
    **overrides,
) -> Path:
    """Pretrain the toy base model within `minutes` of wall clock; returns `OUT/pipeline`.

    `overrides` are further `PretrainConfig` fields (batch_size, lr, pool_size, ...).
    """
    cfg = PretrainConfig(minutes=minutes, seed=seed, max_steps=max_steps, vae_steps=vae_steps, **overrides)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    executor = None
    if cfg.render_workers:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the parent holds torch (and maybe CUDA) state that a forked child must not inherit
        executor = ProcessPoolExecutor(cfg.render_workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        return _pretrain(Path(out), cfg, resume, executor)
    finally:
        torch.set_num_threads(previous_threads)
        if executor is not None:
            executor.shutdown(cancel_futures=True)


def _pretrain(out: Path, cfg: PretrainConfig, resume: bool, executor=None) -> Path:
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from lrkit.models import load_clip_tokenizer

    ckpt = out / "checkpoint"
    state_path = ckpt / "state.json"
    start = time.monotonic()
    state = {"phase": "vae", "vae_step": 0, "step": 0, "elapsed": 0.0, "scaling_factor": None,
             "pool_next_seed": 0, "vae_seconds": 0.0}
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"pretrain: resume=True but {state_path} does not exist")
        state.update(json.loads(state_path.read_text())["state"])
        logger.info("resuming from %s: phase %s, step %d, %.1f min spent", ckpt, state["phase"], state["step"],
                    state["elapsed"] / 60)
    elif state_path.exists():
        raise FileExistsError(f"pretrain: {out} already holds a run; pass resume=True (--resume) or a new --out")
    out.mkdir(parents=True, exist_ok=True)
    ckpt.mkdir(exist_ok=True)
    budget = cfg.minutes * 60.0

    def elapsed() -> float:
        return state["elapsed"] + time.monotonic() - start

    device = torch.device(cfg.device)
    vae, text_encoder, unet = (m.to(device) for m in build_toy_components(cfg.seed, cfg.unet_overrides()))
    if cfg.init_from is not None and state["step"] == 0:
        _init_weights(cfg, unet, text_encoder)
    tokenizer = load_clip_tokenizer()
    pool = SamplePool(tokenizer, cfg.pool_size, cfg.seed, cfg.two_object_fraction, cfg.extras_fraction)
    rng = np.random.default_rng([cfg.seed, state["step"], state["vae_step"]])
    torch.manual_seed(cfg.seed * 7919 + state["step"] + state["vae_step"])

    def save_checkpoint(extra: dict[str, dict[str, torch.Tensor]]) -> None:
        tmp = out / "checkpoint.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, tensors in extra.items():
            _save_tensors(tensors, tmp / f"{name}.safetensors")
        saved = {**state, "elapsed": elapsed(), "pool_next_seed": pool.next_seed}
        (tmp / "state.json").write_text(json.dumps({"state": saved, "config": asdict(cfg)}, indent=1))
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
        logger.info("checkpoint at phase %s step %d (%.1f min)", state["phase"], state["step"], elapsed() / 60)

    # ---------------------------------------------------------------- phase 1: the VAE
    if state["phase"] == "vae" and cfg.vae_from is not None:
        vae.load_state_dict(_part_weights("vae_from", cfg.vae_from, "vae"))
        vae.eval().requires_grad_(False)
        pool.fill(executor=executor)
        pool.encode_all(vae)
        state.update(phase="unet", scaling_factor=_vae_scaling(cfg.vae_from), vae_seconds=elapsed())
        logger.info("VAE from %s (scaling factor %.4f), no VAE phase", cfg.vae_from, state["scaling_factor"])
        save_checkpoint({"vae": vae.state_dict(), "pool": _pool_tensors(pool)})
    elif state["phase"] == "vae":
        pool.fill(executor=executor)
        vae_deadline = cfg.vae_fraction * budget
        optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        names = {p: n for n, p in vae.named_parameters()}
        if resume and (ckpt / "vae.safetensors").is_file():
            vae.load_state_dict(_load_tensors(ckpt / "vae.safetensors"))
            _load_optimizer_tensors(optimizer, names, _load_tensors(ckpt / "vae_optimizer.safetensors"))
        vae.train()
        bar = tqdm(desc="vae", unit="step")
        last_ckpt = time.monotonic()
        while True:
            if cfg.vae_steps is not None:
                if state["vae_step"] >= cfg.vae_steps:
                    break
            elif elapsed() >= vae_deadline:
                break
            idx = torch.from_numpy(rng.choice(cfg.pool_size, size=cfg.vae_batch_size, replace=False))
            images = pool.images[idx].to(device)
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample()).sample
            # Object pixels weigh `vae_object_weight` times more: the objects are small and carry the
            # class, colour and pattern, while a background texture (bricks) would otherwise win.
            weight = 1.0 + cfg.vae_object_weight * pool.masks[idx].float().to(device)
            err = (recon - images).abs()
            rec = (weight * (err + err**2)).mean() / weight.mean()
            loss = rec + cfg.vae_kl_weight * posterior.kl().mean()
            for group in optimizer.param_groups:
                group["lr"] = cfg.vae_lr * min(1.0, (state["vae_step"] + 1) / 30)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["vae_step"] += 1
            bar.update(1)
            bar.set_postfix(rec=f"{rec.item():.4f}")
            if state["vae_step"] % 20 == 0:
                _log(out, {"phase": "vae", "step": state["vae_step"], "rec": rec.item(), "t": elapsed()})
            if time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
                save_checkpoint({"vae": vae.state_dict(), "vae_optimizer": _optimizer_tensors(optimizer, names)})
                last_ckpt = time.monotonic()
        bar.close()
        vae.eval().requires_grad_(False)
        pool.encode_all(vae)
        scaling = float(1.0 / pool.latent_mean.add(pool.latent_std * torch.randn_like(pool.latent_std)).std())
        state.update(phase="unet", scaling_factor=scaling, vae_seconds=elapsed())
        logger.info("VAE: %d steps, latent scaling factor %.4f", state["vae_step"], scaling)
        del optimizer
        save_checkpoint({"vae": vae.state_dict(), "pool": _pool_tensors(pool)})
    else:
        vae.load_state_dict(_load_tensors(ckpt / "vae.safetensors"))
        vae.eval().requires_grad_(False)
        tensors = _load_tensors(ckpt / "pool.safetensors")
        pool.ids, pool.latent_mean, pool.latent_std = tensors["ids"], tensors["latent_mean"], tensors["latent_std"]
        pool.latent_masks = tensors.get("latent_masks", torch.zeros_like(pool.latent_mean[:, :1]))
        pool.images.zero_()  # the UNet phase needs only latents; refreshed entries are re-rendered
        pool.next_seed = state["pool_next_seed"]
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    scaling = state["scaling_factor"]
    pool.latents_to(device)

    # ---------------------------------------------------------------- phase 2: UNet + text encoder
    params = list(unet.parameters()) + list(text_encoder.parameters())
    names = {p: f"unet.{n}" for n, p in unet.named_parameters()}
    names.update({p: f"text_encoder.{n}" for n, p in text_encoder.named_parameters()})
    # the token table learns at its own rate (`token_lr_scale`): a word's row gets a gradient only from the
    # captions that hold it, and at the shared rate the class words stayed close together (model card)
    table = text_encoder.get_input_embeddings().weight
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p is not table], "lr_scale": 1.0},
                                   {"params": [table], "lr_scale": cfg.token_lr_scale}],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
    if state["phase"] == "unet" and (ckpt / "unet.safetensors").is_file():
        unet.load_state_dict(_load_tensors(ckpt / "unet.safetensors"))
        text_encoder.load_state_dict(_load_tensors(ckpt / "text_encoder.safetensors"), strict=False)
        _load_optimizer_tensors(optimizer, names, _load_tensors(ckpt / "optimizer.safetensors"))
        ema = _load_tensors(ckpt / "ema.safetensors")
        ema_unet.shadow = {k[5:]: v.to(device) for k, v in ema.items() if k.startswith("unet.")}
        ema_text.shadow.update({k[13:]: v.to(device) for k, v in ema.items() if k.startswith("text_encoder.")})

    def unet_checkpoint() -> dict:
        return {
            "vae": vae.state_dict(),
            "pool": _pool_tensors(pool),
            "unet": unet.state_dict(),
            "text_encoder": {k: v for k, v in text_encoder.state_dict().items() if v.is_floating_point()},
            "optimizer": _optimizer_tensors(optimizer, names),
            "ema": {**{f"unet.{k}": v for k, v in ema_unet.shadow.items()},
                    **{f"text_encoder.{k}": v for k, v in ema_text.shadow.items()}},
        }

    noise_scheduler = DDPMScheduler.from_config(schedule_config(cfg.snr_shift))
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    empty_ids = pool.tokenize([""])[0]
    unet_start = state["vae_seconds"]
    unet_deadline = budget - cfg.export_reserve_minutes * 60.0
    unet.train()
    text_encoder.train()
    bar = tqdm(desc="unet", unit="step", initial=state["step"])
    last_ckpt = time.monotonic()
    running = None  # running mean of the MSE, a device tensor: read (a GPU sync) every 10 steps only
    pending = None  # with render workers: the chunk of fresh seeds rendering in the background
    while state["phase"] == "unet":
        if cfg.max_steps is not None:
            if state["step"] >= cfg.max_steps:
                break
        elif elapsed() >= unet_deadline:
            break
        step = state["step"]
        frac = (elapsed() - unet_start) / max(1.0, unet_deadline - unet_start)
        if cfg.max_steps is not None:
            frac = step / cfg.max_steps
        if executor is None:
            pool.refresh(cfg.refresh_per_step, rng, vae)
        elif step % cfg.refresh_chunk_steps == 0:
            # the chunk asked for `refresh_chunk_steps` ago enters the pool now; the next one starts rendering
            if pending is not None:
                pool.refresh_from(pending, rng, vae)
            pending = pool.render_in_background(executor, cfg.render_workers,
                                                cfg.refresh_chunk_steps * cfg.refresh_per_step)
        idx = torch.from_numpy(rng.choice(cfg.pool_size, size=cfg.batch_size, replace=False))
        didx = idx.to(device)
        latents = (pool.latent_mean[didx] + pool.latent_std[didx] * torch.randn_like(pool.latent_std[didx])) * scaling
        ids = pool.ids[idx].clone()
        drop = torch.from_numpy(rng.random(cfg.batch_size) < cfg.caption_dropout)
        ids[drop] = empty_ids
        noise = torch.randn_like(latents)
        t = draw_timesteps(cfg, noise_scheduler.config.num_train_timesteps).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            encoder_hidden_states = text_encoder(ids.to(device))[0]
            pred = unet(noisy, t, encoder_hidden_states).sample.float()
        snr = _snr(alphas_cumprod, t)
        if cfg.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, t)
            weight = torch.clamp(snr + 1, max=cfg.min_snr_gamma) / (snr + 1)  # x0 weight min(SNR + 1, gamma)
        else:
            target = noise
            weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR-gamma: x0 weight min(SNR, gamma)
        err = F.mse_loss(pred, target, reduction="none").mean(dim=1, keepdim=True)
        if cfg.object_loss_weight > 0:
            pixel = 1.0 + cfg.object_loss_weight * pool.latent_masks[didx]
            err = err * pixel / pixel.mean(dim=(2, 3), keepdim=True)
        mse = err.mean(dim=(1, 2, 3))
        loss = (weight * mse).mean()
        lr = _lr_at(step, frac, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_unet.update(unet, step)
        ema_text.update(text_encoder, step)
        state["step"] += 1
        batch_mse = mse.detach().mean()
        running = batch_mse if running is None else 0.98 * running + 0.02 * batch_mse
        bar.update(1)
        if state["step"] % 10 == 0:
            bar.set_postfix(loss=f"{running.item():.4f}", lr=f"{lr:.1e}")
            _log(out, {"phase": "unet", "step": state["step"], "loss": running.item(), "lr": lr, "t": elapsed()})
        if time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
            save_checkpoint(unet_checkpoint())
            last_ckpt = time.monotonic()
    bar.close()
    state["final_loss"] = running.item() if running is not None else state.get("final_loss")
    save_checkpoint(unet_checkpoint())

    # ---------------------------------------------------------------- export (EMA weights)
    ema_unet.copy_to(unet)
    ema_text.copy_to(text_encoder)
    pipeline_dir = export_pipeline(vae, text_encoder.eval(), unet.eval(), out / "pipeline", cfg.prediction_type,
                                   cfg.snr_shift)
    logger.info("exported %s after %d UNet steps (%.1f min, loss %s)", pipeline_dir, state["step"],
                elapsed() / 60, state["final_loss"])
    return pipeline_dir


def parse_config_overrides(pairs: list[str]) -> dict:
    """["pool_size=49152", "bf16=true", ...] -> PretrainConfig overrides, each value parsed as its field's type."""
    from dataclasses import fields

    known = {f.name: f for f in fields(PretrainConfig)}
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise ValueError(f"pretrain: --set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        default = known[key].default
        try:
            if raw.lower() in ("none", "null") and (default is None or key in ("max_steps", "vae_steps", "vae_from")):
                value = None
            elif isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError("expected true or false")
                value = raw.lower() in ("true", "1")
            elif isinstance(default, int) or key in ("max_steps", "vae_steps"):
                value = int(raw)
            elif isinstance(default, float):
                value = float(raw)
            else:
                value = raw
        except ValueError as err:
            raise ValueError(f"pretrain: --set {pair!r}: {err}") from None
        out[key] = value
    return out


def _pipeline_root(source: str) -> Path:
    """The folder of `source`: a diffusers pipeline folder, or "toy" (the shipped model)."""
    from lrkit.models import toy_model_dir

    return toy_model_dir() if source == "toy" else Path(source)


def _pipeline_part(option: str, source: str, name: str) -> Path:
    """`source`'s (`_pipeline_root`) `name` subfolder, which must hold its config.json and safetensors weights;
    `option` names the setting in the error."""
    folder = _pipeline_root(source)
    if not (folder / name / "config.json").is_file() or not any((folder / name).glob("*.safetensors")):
        raise FileNotFoundError(
            f"pretrain: {option}={source!r}: no {name}/config.json with {name}/*.safetensors in {folder}; give a "
            "diffusers pipeline folder (such as a previous run's OUT/pipeline) or 'toy'"
        )
    return folder / name


def _part_weights(option: str, source: str, name: str) -> dict[str, torch.Tensor]:
    """The float32 weights of `_pipeline_part(option, source, name)`."""
    from safetensors.torch import load_file

    files = sorted(_pipeline_part(option, source, name).glob("*.safetensors"))
    return {k: v.float() for k, v in load_file(str(files[0])).items()}


def _init_weights(cfg: PretrainConfig, unet, text_encoder) -> None:
    """Load `cfg.init_from`'s UNet and text encoder weights into the freshly built modules."""
    for name, module in (("unet", unet), ("text_encoder", text_encoder)):
        weights = _part_weights("init_from", cfg.init_from, name)
        own = module.state_dict()
        bad = sorted(k for k in weights if k not in own or own[k].shape != weights[k].shape)
        missing = sorted(k for k, v in own.items() if k not in weights and v.is_floating_point())
        if bad or missing:
            raise ValueError(
                f"pretrain: init_from={cfg.init_from!r}: its {name} does not match this run's architecture "
                f"({len(bad)} unexpected or mis-shaped tensors, e.g. {(bad or missing)[0]!r}); set unet_channels, "
                "unet_layers_per_block and unet_heads to that model's"
            )
        module.load_state_dict(weights, strict=False)
    scheduler = json.loads((_pipeline_root(cfg.init_from) / "scheduler" / "scheduler_config.json").read_text())
    if scheduler.get("prediction_type", "epsilon") != cfg.prediction_type:
        raise ValueError(f"pretrain: init_from={cfg.init_from!r} predicts {scheduler.get('prediction_type')!r}, "
                         f"but prediction_type is {cfg.prediction_type!r}")


def _vae_scaling(source: str) -> float:
    return float(json.loads((_pipeline_part("vae_from", source, "vae") / "config.json").read_text())["scaling_factor"])


def _pool_tensors(pool: SamplePool) -> dict[str, torch.Tensor]:
    return {"ids": pool.ids, "latent_mean": pool.latent_mean, "latent_std": pool.latent_std,
            "latent_masks": pool.latent_masks}


# ------------------------------------------------------------------------------------ fidelity


def fidelity_prompts(n: int, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """`n` (prompt, scene, class, colour): "a photo of a {colour} {class} {scene phrase}", from the
    world's caption builder, with a colour the world puts on that scene."""
    from lrkit.toyworld.world import CLASSES

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = SCENE_NAMES[int(rng.integers(len(SCENE_NAMES)))]
        colors = compatible_colors(scene)
        color = colors[int(rng.integers(len(colors)))]
        cls = CLASSES[int(rng.integers(len(CLASSES)))]
        out.append((caption(scene, [ObjectSpec(cls=cls, color=color)], 0), scene, cls, color))
    return out


@torch.no_grad()
def measure_fidelity(pipe, n: int = 56, seed: int = 0, steps: int = 25, guidance: float = 6.0,
                     batch: int = 8) -> dict:
    """Generate `n` prompt x seed samples and score scene, class and colour with the exact scorers."""
    from lrkit.toyworld.scorers import classify_object, classify_scene, object_color, segment_object

    items = fidelity_prompts(n, seed)
    hits = {"scene": 0, "class": 0, "color": 0}
    rows = []
    for start in range(0, n, batch):
        chunk = items[start:start + batch]
        gens = [torch.Generator().manual_seed(seed * 100_000 + start + i) for i in range(len(chunk))]
        images = pipe([c[0] for c in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      height=TOY_RESOLUTION, width=TOY_RESOLUTION, generator=gens).images
        for (prompt, scene, cls, color), image in zip(chunk, images):
            got_scene = classify_scene(image)[0]
            mask = segment_object(image, got_scene)
            got_cls = classify_object(image, mask)[0]
            got_color = object_color(image, mask) if mask.any() else None
            hits["scene"] += got_scene == scene
            hits["class"] += got_cls == cls
            hits["color"] += got_color == color
            rows.append({"prompt": prompt, "scene": got_scene, "class": got_cls, "color": got_color})
    return {"n": n, "steps": steps, "guidance": guidance,
            **{f"{k}_accuracy": v / n for k, v in hits.items()}, "samples": rows}


@torch.no_grad()
def measure_class_retention(pipe, strengths: tuple[float, ...] = (0.5, 0.7), n: int = 48, seed: int = 0,
                            steps: int = 25, guidance: float = 6.0, batch: int = 16) -> dict:
    """How long the model keeps an object's class while it denoises: rendered pictures, noised to each
    img2img `strength` and denoised with their own captions; the share whose object still scores as the
    rendered class. Where plain generation (strength 1) loses the class but strength 0.5 keeps it, the
    class is lost at the high timesteps, where the outline is laid out."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from lrkit.toyworld.scorers import classify_object, segment_object

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    samples = [sample(POOL_SEED_BASE * (seed + 1) - 1 - i) for i in range(n)]  # below every pool's seeds
    out = {"n": n, "steps": steps, "guidance": guidance}
    for strength in strengths:
        hits = 0
        for start in range(0, n, batch):
            chunk = samples[start:start + batch]
            images = img2img([s.caption for s in chunk], image=[s.image for s in chunk], strength=strength,
                             num_inference_steps=steps, guidance_scale=guidance,
                             generator=[torch.Generator().manual_seed(seed * 100_000 + start + i)
                                        for i in range(len(chunk))]).images
            for s, image in zip(chunk, images):
                mask = segment_object(image, s.scene.name)
                hits += bool(mask.any()) and classify_object(image, mask)[0] == s.objects[0].cls
        out[f"class_kept_{strength:g}"] = hits / n
    return out


def two_object_prompts(n: int, seed: int = 0) -> list[tuple[str, list[tuple[str, str]]]]:
    """`n` (prompt, [(class, colour), (class, colour)]): two objects of distinct classes and colours that the
    scene allows, "a photo of a red ball and a blue cube on the beach"."""
    from lrkit.toyworld.world import CLASSES

    rng = np.random.default_rng([seed, 2])
    out = []
    for _ in range(n):
        scene = SCENE_NAMES[int(rng.integers(len(SCENE_NAMES)))]
        colours = [str(c) for c in rng.choice(compatible_colors(scene), 2, replace=False)]
        classes = [str(c) for c in rng.choice(CLASSES, 2, replace=False)]
        wanted = list(zip(classes, colours))
        out.append((caption(scene, [ObjectSpec(cls=k, color=c) for k, c in wanted], 0), wanted))
    return out


@torch.no_grad()
def measure_two_object_fidelity(pipe, n: int = 24, seed: int = 0, steps: int = 25, guidance: float = 6.0) -> dict:
    """Generate `n` two-object prompts (`two_object_prompts`), one seed each, and count how often the picture holds
    two object regions, both prompted colours, both prompted classes (`lrkit.toyworld.scorers.objects_found`)."""
    from lrkit.toyworld.scorers import objects_found

    hits = {"regions": 0, "colours": 0, "classes": 0}
    for k, (prompt, wanted) in enumerate(two_object_prompts(n, seed)):
        image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=TOY_RESOLUTION,
                     width=TOY_RESOLUTION, generator=torch.Generator().manual_seed(seed * 100_000 + k)).images[0]
        for key, ok in objects_found(image, wanted).items():
            hits[key] += ok
    return {"n": n, "steps": steps, "guidance": guidance, **{f"two_{k}": v / n for k, v in hits.items()}}


__all__ = [
    "PretrainConfig",
    "TOY_TEXT_CONFIG",
    "TOY_UNET_CONFIG",
    "TOY_VAE_CONFIG",
    "assemble_pipeline",
    "build_toy_components",
    "draw_timesteps",
    "export_pipeline",
    "fidelity_prompts",
    "measure_class_retention",
    "measure_fidelity",
    "measure_two_object_fidelity",
    "parse_config_overrides",
    "pretrain",
    "render_seeds",
    "schedule_config",
    "two_object_prompts",
]
