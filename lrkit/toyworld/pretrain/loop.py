"""The pretraining run, `pretrain`: the VAE phase, the UNet + text encoder phase, the export of the EMA weights."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lrkit.losses import min_snr_weight
from lrkit.toyworld.pretrain.checkpoint import EMA, Checkpoint, RunState, load_optimizer_tensors, optimizer_tensors
from lrkit.toyworld.pretrain.config import PretrainConfig
from lrkit.toyworld.pretrain.models import (
    build_toy_components,
    export_pipeline,
    load_init_weights,
    part_weights,
    schedule_config,
    vae_scaling_factor,
)
from lrkit.toyworld.pretrain.pool import PoolRefresher, SamplePool

logger = logging.getLogger(__name__)


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

    `overrides` are further `PretrainConfig` fields (batch_size, lr, pool_size, ...). Checkpoints go to
    `OUT/checkpoint` every `checkpoint_minutes` and at the end; `resume=True` continues from there, counting the
    time already spent. The training loss is logged to `OUT/log.jsonl`.
    """
    cfg = PretrainConfig(minutes=minutes, seed=seed, max_steps=max_steps, vae_steps=vae_steps, **overrides)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    executor = _render_executor(cfg.render_workers)
    try:
        return _pretrain(Path(out), cfg, resume, executor)
    finally:
        torch.set_num_threads(previous_threads)
        if executor is not None:
            executor.shutdown(cancel_futures=True)


def _render_executor(workers: int):
    """`workers` processes for the renderer, or None for none."""
    if not workers:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent holds torch (and maybe CUDA) state that a forked child must not inherit
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


@dataclass
class Run:
    """What the phases of one run share."""

    out: Path
    cfg: PretrainConfig
    state: RunState
    checkpoint: Checkpoint
    pool: SamplePool
    rng: np.random.Generator
    """Draws batches, pool slots and caption dropout (torch's global RNG draws the noise and timesteps)."""
    device: torch.device
    executor: object | None
    spent_before: float
    """Seconds that earlier processes of the run spent (resume)."""
    started: float
    """`time.monotonic()` when this process began the run."""

    @property
    def budget(self) -> float:
        """The run's wall-clock budget in seconds."""
        return self.cfg.minutes * 60.0

    def elapsed(self) -> float:
        """Seconds of the run so far."""
        return self.spent_before + time.monotonic() - self.started

    def save(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        state = replace(self.state, elapsed=self.elapsed(), pool_next_seed=self.pool.next_seed)
        self.checkpoint.save(tensors, state, asdict(self.cfg))
        logger.info("checkpoint at phase %s step %d (%.1f min)", state.phase, state.step, state.elapsed / 60)

    def log(self, record: dict) -> None:
        with open(self.out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _pretrain(out: Path, cfg: PretrainConfig, resume: bool, executor) -> Path:
    from lrkit.models import load_clip_tokenizer

    started = time.monotonic()
    checkpoint = Checkpoint(out / "checkpoint")
    state = _starting_state(out, checkpoint, resume)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.path.mkdir(exist_ok=True)
    device = torch.device(cfg.device)
    vae, text_encoder, unet = (m.to(device) for m in build_toy_components(cfg.seed, cfg.unet_overrides()))
    if cfg.init_from is not None and state.step == 0:
        load_init_weights(cfg.init_from, cfg.prediction_type, unet, text_encoder)
    pool = SamplePool(load_clip_tokenizer(), cfg.pool_size, cfg.seed, cfg.two_object_fraction, cfg.extras_fraction)
    rng = np.random.default_rng([cfg.seed, state.step, state.vae_step])
    torch.manual_seed(cfg.seed * 7919 + state.step + state.vae_step)
    run = Run(out, cfg, state, checkpoint, pool, rng, device, executor, spent_before=state.elapsed, started=started)

    # phase 1: the VAE, then frozen; the pool is encoded with it
    if state.phase == "vae" and cfg.vae_from is not None:
        _take_vae(run, vae)
    elif state.phase == "vae":
        _train_vae(run, vae, resume)
    else:
        _restore_vae(run, vae)
    vae.register_to_config(scaling_factor=state.scaling_factor)
    pool.latents_to(device)

    # phase 2: the UNet and the text encoder
    trainer = DiffusionTrainer(cfg, unet, text_encoder)
    if checkpoint.has("unet"):
        trainer.restore(checkpoint, device)
    _train_unet(run, trainer, vae)

    # export of the EMA weights
    trainer.use_ema_weights()
    pipeline_dir = export_pipeline(vae, text_encoder.eval(), unet.eval(), out / "pipeline", cfg.prediction_type,
                                   cfg.snr_shift)
    logger.info("exported %s after %d UNet steps (%.1f min, loss %s)", pipeline_dir, state.step,
                run.elapsed() / 60, state.final_loss)
    return pipeline_dir


def _starting_state(out: Path, checkpoint: Checkpoint, resume: bool) -> RunState:
    """A new run's state, or with `resume` the checkpoint's; refuse to start a second run in `out`."""
    if resume:
        if not checkpoint.state_path.is_file():
            raise FileNotFoundError(f"pretrain: resume=True but {checkpoint.state_path} does not exist")
        state = checkpoint.read_state()
        logger.info("resuming from %s: phase %s, step %d, %.1f min spent", checkpoint.path, state.phase, state.step,
                    state.elapsed / 60)
        return state
    if checkpoint.state_path.exists():
        raise FileExistsError(f"pretrain: {out} already holds a run; pass resume=True (--resume) or a new --out")
    return RunState()


def _phase_over(step: int, max_steps: int | None, elapsed: float, deadline: float) -> bool:
    """A phase ends after `max_steps` when set, else at the `deadline` (seconds of the run)."""
    return step >= max_steps if max_steps is not None else elapsed >= deadline


# ------------------------------------------------------------------------------------ phase 1: the VAE


def _take_vae(run: Run, vae) -> None:
    """`vae_from`: load that pipeline's VAE and scaling factor instead of training one."""
    cfg, state, pool = run.cfg, run.state, run.pool
    vae.load_state_dict(part_weights("vae_from", cfg.vae_from, "vae"))
    vae.eval().requires_grad_(False)
    pool.fill(executor=run.executor)
    pool.encode_all(vae)
    state.phase, state.scaling_factor, state.vae_seconds = "unet", vae_scaling_factor(cfg.vae_from), run.elapsed()
    logger.info("VAE from %s (scaling factor %.4f), no VAE phase", cfg.vae_from, state.scaling_factor)
    run.save({"vae": vae.state_dict(), "pool": pool.latent_tensors()})


def _train_vae(run: Run, vae, resume: bool) -> None:
    """Train the VAE for `vae_fraction` of the budget (or `vae_steps`), then freeze it and encode the pool."""
    from tqdm.auto import tqdm

    cfg, state, pool = run.cfg, run.state, run.pool
    pool.fill(executor=run.executor)
    deadline = cfg.vae_fraction * run.budget
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    names = {p: n for n, p in vae.named_parameters()}
    if resume and run.checkpoint.has("vae"):
        vae.load_state_dict(run.checkpoint.load("vae"))
        load_optimizer_tensors(optimizer, names, run.checkpoint.load("vae_optimizer"))
    vae.train()
    bar = tqdm(desc="vae", unit="step")
    last_save = time.monotonic()
    while not _phase_over(state.vae_step, cfg.vae_steps, run.elapsed(), deadline):
        idx = torch.from_numpy(run.rng.choice(cfg.pool_size, size=cfg.vae_batch_size, replace=False))
        loss, rec = vae_loss(vae, pool.images[idx].to(run.device), pool.masks[idx].float().to(run.device), cfg)
        for group in optimizer.param_groups:
            group["lr"] = cfg.vae_lr * min(1.0, (state.vae_step + 1) / 30)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.vae_step += 1
        bar.update(1)
        bar.set_postfix(rec=f"{rec.item():.4f}")
        if state.vae_step % 20 == 0:
            run.log({"phase": "vae", "step": state.vae_step, "rec": rec.item(), "t": run.elapsed()})
        if time.monotonic() - last_save > cfg.checkpoint_minutes * 60:
            run.save({"vae": vae.state_dict(), "vae_optimizer": optimizer_tensors(optimizer, names)})
            last_save = time.monotonic()
    bar.close()
    vae.eval().requires_grad_(False)
    pool.encode_all(vae)
    state.phase, state.scaling_factor, state.vae_seconds = "unet", pool.latent_scaling_factor(), run.elapsed()
    logger.info("VAE: %d steps, latent scaling factor %.4f", state.vae_step, state.scaling_factor)
    run.save({"vae": vae.state_dict(), "pool": pool.latent_tensors()})


def vae_loss(vae, images: torch.Tensor, masks: torch.Tensor, cfg: PretrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reconstruction term) of the VAE on images in [-1, 1] with their (B, 1, H, W) object masks: L1 + MSE
    with object pixels weighted `1 + vae_object_weight` (the objects are small and carry class, colour and pattern,
    which a background texture would otherwise outweigh), plus `vae_kl_weight` times the KL term."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample()).sample
    weight = 1.0 + cfg.vae_object_weight * masks
    err = (recon - images).abs()
    rec = (weight * (err + err**2)).mean() / weight.mean()
    return rec + cfg.vae_kl_weight * posterior.kl().mean(), rec


def _restore_vae(run: Run, vae) -> None:
    """Resume in the UNet phase: the frozen VAE and the encoded pool from the checkpoint."""
    vae.load_state_dict(run.checkpoint.load("vae"))
    vae.eval().requires_grad_(False)
    run.pool.restore_latents(run.checkpoint.load("pool"), run.state.pool_next_seed)


# ------------------------------------------------------------------------------------ phase 2: UNet + text encoder


@dataclass
class Batch:
    """One UNet-phase batch from the pool."""

    latents: torch.Tensor
    """(B, 4, h, w) latent samples, scaled by the VAE's scaling factor."""
    ids: torch.Tensor
    """(B, 77) caption token ids, `caption_dropout` of them emptied."""
    object_share: torch.Tensor
    """(B, 1, h, w) share of object pixels under each latent pixel."""


def draw_batch(run: Run, empty_ids: torch.Tensor) -> Batch:
    """`batch_size` random pool entries: a latent sample of each (torch's RNG) and its caption, emptied with
    probability `caption_dropout`."""
    cfg, pool = run.cfg, run.pool
    idx = torch.from_numpy(run.rng.choice(cfg.pool_size, size=cfg.batch_size, replace=False))
    didx = idx.to(run.device)
    std = pool.latent_std[didx]
    latents = (pool.latent_mean[didx] + std * torch.randn_like(std)) * run.state.scaling_factor
    ids = pool.ids[idx].clone()
    ids[torch.from_numpy(run.rng.random(cfg.batch_size) < cfg.caption_dropout)] = empty_ids
    return Batch(latents, ids.to(run.device), pool.latent_masks[didx])


def draw_timesteps(cfg: PretrainConfig, num_train_timesteps: int = 1000) -> torch.Tensor:
    """A batch's training timesteps: uniform over the schedule, except that the first
    round(timestep_focus_fraction * batch_size) come from the `timestep_focus` range."""
    t = torch.randint(0, num_train_timesteps, (cfg.batch_size,))
    focus = cfg.timestep_focus_range()
    n_focus = round(cfg.timestep_focus_fraction * cfg.batch_size)
    if focus is not None and n_focus:
        t[:n_focus] = torch.randint(focus[0], min(focus[1], num_train_timesteps), (n_focus,))
    return t


def lr_at(step: int, progress: float, cfg: PretrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to 10 % over the phase (`progress` in [0, 1])."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class DiffusionTrainer:
    """The UNet and text encoder of the UNet phase, with their AdamW, EMAs and DDPM noise schedule."""

    def __init__(self, cfg: PretrainConfig, unet, text_encoder):
        from diffusers import DDPMScheduler

        self.cfg, self.unet, self.text_encoder = cfg, unet, text_encoder
        self.params = list(unet.parameters()) + list(text_encoder.parameters())
        self.names = {p: f"unet.{n}" for n, p in unet.named_parameters()}
        self.names.update({p: f"text_encoder.{n}" for n, p in text_encoder.named_parameters()})
        # the token table learns at its own rate (`token_lr_scale`): a word's row gets a gradient only from the
        # captions that hold it
        table = text_encoder.get_input_embeddings().weight
        self.optimizer = torch.optim.AdamW([{"params": [p for p in self.params if p is not table], "lr_scale": 1.0},
                                            {"params": [table], "lr_scale": cfg.token_lr_scale}],
                                           lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.ema_unet, self.ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
        self.noise_scheduler = DDPMScheduler.from_config(schedule_config(cfg.snr_shift))

    def restore(self, checkpoint: Checkpoint, device: torch.device) -> None:
        """Weights, optimizer state and EMAs of a UNet-phase checkpoint (`checkpoint_tensors`)."""
        self.unet.load_state_dict(checkpoint.load("unet"))
        self.text_encoder.load_state_dict(checkpoint.load("text_encoder"), strict=False)
        load_optimizer_tensors(self.optimizer, self.names, checkpoint.load("optimizer"))
        ema = checkpoint.load("ema")
        self.ema_unet.shadow = {k[5:]: v.to(device) for k, v in ema.items() if k.startswith("unet.")}
        self.ema_text.shadow.update({k[13:]: v.to(device) for k, v in ema.items() if k.startswith("text_encoder.")})

    def checkpoint_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "unet": self.unet.state_dict(),
            "text_encoder": {k: v for k, v in self.text_encoder.state_dict().items() if v.is_floating_point()},
            "optimizer": optimizer_tensors(self.optimizer, self.names),
            "ema": {**{f"unet.{k}": v for k, v in self.ema_unet.shadow.items()},
                    **{f"text_encoder.{k}": v for k, v in self.ema_text.shadow.items()}},
        }

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, per-sample MSE) of the DDPM objective at random timesteps (`draw_timesteps`), weighted per
        sample by Min-SNR-γ (`lrkit.losses.min_snr_weight`) and per latent pixel by `object_loss_weight`."""
        from diffusers.training_utils import compute_snr

        cfg, scheduler = self.cfg, self.noise_scheduler
        noise = torch.randn_like(batch.latents)
        t = draw_timesteps(cfg, scheduler.config.num_train_timesteps).to(batch.latents.device)
        noisy = scheduler.add_noise(batch.latents, noise, t)
        with torch.autocast(batch.latents.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            encoder_hidden_states = self.text_encoder(batch.ids)[0]
            pred = self.unet(noisy, t, encoder_hidden_states).sample.float()
        target = scheduler.get_velocity(batch.latents, noise, t) if cfg.prediction_type == "v_prediction" else noise
        weight = min_snr_weight(compute_snr(scheduler, t), cfg.min_snr_gamma, cfg.prediction_type)  # (B,)
        err = F.mse_loss(pred, target, reduction="none").mean(dim=1, keepdim=True)  # (B, 1, h, w)
        if cfg.object_loss_weight > 0:
            pixel = 1.0 + cfg.object_loss_weight * batch.object_share
            err = err * pixel / pixel.mean(dim=(2, 3), keepdim=True)
        mse = err.mean(dim=(1, 2, 3))
        return (weight * mse).mean(), mse

    def update(self, loss: torch.Tensor, lr: float, step: int) -> None:
        """One AdamW step at `lr` (gradients clipped to norm 1), then the EMAs."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.ema_unet.update(self.unet, step)
        self.ema_text.update(self.text_encoder, step)

    def use_ema_weights(self) -> None:
        self.ema_unet.copy_to(self.unet)
        self.ema_text.copy_to(self.text_encoder)


def _train_unet(run: Run, trainer: DiffusionTrainer, vae) -> None:
    """Train until `max_steps` or the budget less `export_reserve_minutes`, refreshing the pool before each step
    and checkpointing every `checkpoint_minutes` and at the end."""
    from tqdm.auto import tqdm

    cfg, state, pool = run.cfg, run.state, run.pool
    refresher = PoolRefresher(pool, cfg.refresh_per_step, run.executor, cfg.render_workers, cfg.refresh_chunk_steps)
    empty_ids = pool.tokenize([""])[0]
    start, deadline = state.vae_seconds, run.budget - cfg.export_reserve_minutes * 60.0
    trainer.unet.train()
    trainer.text_encoder.train()
    bar = tqdm(desc="unet", unit="step", initial=state.step)
    last_save = time.monotonic()
    running = None  # running mean of the MSE, a device tensor: read (a GPU sync) every 10 steps only
    while not _phase_over(state.step, cfg.max_steps, run.elapsed(), deadline):
        step = state.step
        if cfg.max_steps is not None:
            progress = step / cfg.max_steps
        else:
            progress = (run.elapsed() - start) / max(1.0, deadline - start)
        refresher.before_step(step, run.rng, vae)
        loss, mse = trainer.loss(draw_batch(run, empty_ids))
        lr = lr_at(step, progress, cfg)
        trainer.update(loss, lr, step)
        state.step += 1
        batch_mse = mse.detach().mean()
        running = batch_mse if running is None else 0.98 * running + 0.02 * batch_mse
        bar.update(1)
        if state.step % 10 == 0:
            bar.set_postfix(loss=f"{running.item():.4f}", lr=f"{lr:.1e}")
            run.log({"phase": "unet", "step": state.step, "loss": running.item(), "lr": lr, "t": run.elapsed()})
        if time.monotonic() - last_save > cfg.checkpoint_minutes * 60:
            run.save({"vae": vae.state_dict(), "pool": pool.latent_tensors(), **trainer.checkpoint_tensors()})
            last_save = time.monotonic()
    bar.close()
    if running is not None:
        state.final_loss = running.item()
    run.save({"vae": vae.state_dict(), "pool": pool.latent_tensors(), **trainer.checkpoint_tensors()})


__all__ = ["DiffusionTrainer", "draw_batch", "draw_timesteps", "lr_at", "pretrain", "vae_loss"]
