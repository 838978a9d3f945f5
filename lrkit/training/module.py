"""The Lightning side: a thin `LightningModule` around `ConceptModel`, the data module, callbacks.

Divergence: the loss (and, with clipping, the gradient norm) of every step is checked finite on its device,
without a host sync; the first non-finite step is reported at the next logging interval, checkpoint or the end
of training, whichever comes first, as a `TrainingError`. Nothing after it is saved: a checkpoint is refused
while the run has diverged or any trainable weight is not finite, so the last checkpoint written stays good.

Resumability: every random draw of a step (noise, timesteps, VAE sampling, dropout) comes from a
seed derived from (seed, global step, rank), the samples of a step from (seed, global step, rank)
through `StepSampler`, and augmentation from the sample's counter. A run killed after a checkpoint
and resumed repeats exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from torch.utils.data import DataLoader, Dataset, Sampler

from lrkit.io import atomic_save_png, atomic_write_bytes
from lrkit.photos import load_images
from lrkit.training.buckets import BucketPlan, buckets_for
from lrkit.training.config import TrainConfig
from lrkit.training.data import CaptionVariation
from lrkit.training.model import ConceptModel, step_seed
from lrkit.training.options import ConfigError, TrainingError
from lrkit.training.precision import autocast_for
from lrkit.training.sharding import is_fsdp

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- data


class StepSampler(Sampler[int]):
    """Sample counters as a pure function of the optimizer step, sharded over ranks.

    The samples 0..size-1 fall into groups (`groups`, e.g. `BucketPlan.groups`: one per bucket; default: one group
    of all). Each group is one endless stream: position q of group k holds a sample of the q // len(group)-th
    shuffled pass over the group (order from seed, pass and k). An epoch has ceil(len(group) / (batch_size *
    world_size)) steps of each group, in an order shuffled from seed and epoch; the c-th step of group k takes its
    positions c * batch_size * world_size + r * batch_size + b, b < batch_size, on rank r, so every step's samples
    come from one group, on every rank. With one group, step s on rank r takes positions (s * world_size + r) *
    batch_size + b of the one stream.

    Each iteration starts at the trainer's current global step, so a resumed run reads exactly the samples an
    uninterrupted run reads, whatever Lightning's epoch bookkeeping does on a restart. Yields counters
    `pass * size + index`: the dataset shows photo `counter % num_photos`, its augmentation seeded by the counter.
    """

    def __init__(self, size: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 current_step=lambda: 0, groups: list[list[int]] | None = None):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.current_step = rank, world_size, current_step
        self.groups = [list(range(size))] if groups is None else [list(g) for g in groups]
        if sorted(i for g in self.groups for i in g) != list(range(size)) or not all(self.groups):
            raise ValueError(f"StepSampler: groups must be non-empty and split 0..{size - 1} between them")
        samples_per_step = batch_size * world_size
        self.group_steps = [math.ceil(len(g) / samples_per_step) for g in self.groups]  # per epoch
        self._orders: dict[int, tuple[int, list[int]]] = {}  # group -> (pass, its order)
        self._epoch: tuple[int, list[tuple[int, int]]] | None = None  # (epoch, per step: (group, its count))

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.group_steps)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.batch_size

    def _order(self, group: int, data_pass: int) -> list[int]:
        if self._orders.get(group, (None,))[0] != data_pass:
            g = torch.Generator().manual_seed(step_seed(self.seed, -1 - data_pass, group))
            members = self.groups[group]
            self._orders[group] = (data_pass, [members[j] for j in torch.randperm(len(members), generator=g).tolist()])
        return self._orders[group][1]

    def step_group(self, step: int) -> tuple[int, int]:
        """(group k, c): step `step` is the c-th step of group k in the run."""
        epoch, j = divmod(step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            labels = [k for k, n in enumerate(self.group_steps) for _ in range(n)]
            if len(self.groups) > 1:
                g = torch.Generator().manual_seed(step_seed(self.seed, -1 - epoch, -1))
                labels = [labels[i] for i in torch.randperm(len(labels), generator=g).tolist()]
            seen = [0] * len(self.groups)
            steps = []
            for k in labels:
                steps.append((k, epoch * self.group_steps[k] + seen[k]))
                seen[k] += 1
            self._epoch = (epoch, steps)
        return self._epoch[1][j]

    def counter(self, step: int, b: int) -> int:
        group, count = self.step_group(step)
        position = (count * self.world_size + self.rank) * self.batch_size + b
        data_pass, offset = divmod(position, len(self.groups[group]))
        return data_pass * self.size + self._order(group, data_pass)[offset]

    def __iter__(self) -> Iterator[int]:
        start = self.current_step()
        end = (start // self.steps_per_epoch + 1) * self.steps_per_epoch
        for step in range(start, end):
            for b in range(self.batch_size):
                yield self.counter(step, b)


class PairedDataset(Dataset):
    """The run's samples by counter: item i is photo sample i (in its bucket with `buckets`, its caption varied by
    `captions`), paired with class image sample i cropped to the same size when there are class images (prior
    preservation): then item i -> {"instance": ..., "prior": ...}."""

    def __init__(self, instance: Dataset, prior: Dataset | None, *, buckets: BucketPlan | None = None,
                 captions: CaptionVariation | None = None):
        self.instance, self.prior, self.buckets, self.captions = instance, prior, buckets, captions

    def __len__(self) -> int:
        return len(self.instance)

    def __getitem__(self, i: int) -> dict:
        # without buckets, the dataset's own item (a method's dataset may add to it: concept_em's concepts)
        item = self.instance[i] if self.buckets is None else self.instance.sample(i, self.buckets.size_of(i))
        item = dict(item, source="instance", counter=i)
        if self.captions is not None and self.captions.active:
            item["caption"] = self.captions.apply(item["caption"], i)
        if self.prior is None:
            return item
        return {"instance": item, "prior": dict(self.prior.sample(i, item["target_size"]), source="class", counter=i)}


def collate(items: list[dict]) -> dict:
    """Stack samples; with prior preservation all instance samples come first. All must have one size (a bucket)."""
    if "instance" in items[0]:
        samples = [it["instance"] for it in items] + [it["prior"] for it in items]
        num_instance = len(items)
    else:
        samples, num_instance = items, len(items)
    shapes = sorted({tuple(s["pixel_values"].shape[-2:]) for s in samples})
    if len(shapes) > 1:
        raise ValueError(f"a batch must hold samples of one size (one bucket), got {shapes}")
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "photo_index": torch.tensor([s["photo_index"] for s in samples]),
        "flipped": torch.tensor([bool(s["flipped"]) for s in samples]),
        "original_size": torch.tensor([s["original_size"] for s in samples]),  # (batch, 2): height, width
        "crop_top_left": torch.tensor([s["crop_top_left"] for s in samples]),  # (batch, 2): top, left
        "target_size": torch.tensor([s["target_size"] for s in samples]),  # (batch, 2): height, width trained at
        "source": [s["source"] for s in samples],
        "counter": torch.tensor([s["counter"] for s in samples]),
        "num_instance": num_instance,
        **({"concepts": [s["concepts"] for s in samples]} if "concepts" in samples[0] else {}),
    }


class ConceptDataModule(L.LightningDataModule):
    """Photos (and class images for DreamBooth's prior preservation) as resumable epochs.

    The method (its own instance, built from the config) says which photos train, how they become samples,
    and which class images go with them. `buckets` (`lrkit.training.buckets.buckets_for`) is the bucket of each
    photo, or None for square crops; class images are cropped to the bucket of the photo they pair with.
    `captions` varies the photos' captions (data.caption_dropout, data.shuffle_caption)."""

    def __init__(self, config: TrainConfig):
        super().__init__()
        self.config = config
        self.method = config.method_class(config)
        data = config.data
        min_size = data.min_size if data.min_size is not None else data.resolution // 2
        photos = load_images(data.photos, min_size=min_size, image_column=data.image_column,
                             caption_column=data.caption_column)
        self.photos = self.method.select_photos(photos)
        self.instance = self.method.instance_dataset(self.photos)
        self.buckets = buckets_for(config, self.photos)
        self._report_sizes()
        self.captions = CaptionVariation(config.token, seed=config.seed, dropout=data.caption_dropout,
                                         shuffle=data.shuffle_caption, keep_tokens=data.keep_tokens)
        self.prior = None

    def _report_sizes(self) -> None:
        """Log the buckets in use; warn once, naming them, about the photos too small for what they train at."""
        data = self.config.data
        if self.buckets is None:
            small = [f"{p.name} ({p.image.width}x{p.image.height} px)" for p in self.photos
                     if min(p.image.size) < data.resolution]
            if small:
                logger.warning("%d photo(s) are smaller than data.resolution=%d px on their short side and are "
                               "upscaled (a larger photo trains better): %s", len(small), data.resolution,
                               ", ".join(small))
            return
        counts = {size: self.buckets.photo_sizes.count(size) for size in self.buckets.sizes}
        logger.info("aspect-ratio buckets (height x width: photos): %s",
                    ", ".join(f"{h}x{w}: {n}" for (h, w), n in counts.items()))
        if self.buckets.shrunk:
            logger.warning("%d photo(s) would need upscaling beyond data.max_upscale=%g to fill their bucket and "
                           "train in a smaller one (a larger photo trains better): %s",
                           len(self.buckets.shrunk), data.max_upscale, "; ".join(self.buckets.shrunk))

    def prepare_data(self) -> None:
        """Write what the method's data needs (DreamBooth: missing class images); local rank 0 only."""
        self.method.prepare_data(self.trainer.lightning_module.model)

    def setup(self, stage: str | None = None) -> None:
        if self.prior is None:
            self.prior = self.method.prior_dataset()
        if self.buckets is not None and self.trainer is not None:
            check_bucket_sizes(self.buckets, self.trainer.lightning_module.model, self.config)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        dataset = PairedDataset(self.instance, self.prior, buckets=self.buckets, captions=self.captions)
        groups = self.buckets.groups(len(dataset)) if self.buckets is not None else None
        sampler = StepSampler(len(dataset), batch_size=self.config.data.batch_size, seed=self.config.seed,
                              rank=trainer.global_rank, world_size=trainer.world_size,
                              current_step=lambda: trainer.global_step, groups=groups)
        return DataLoader(dataset, batch_size=self.config.data.batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=self.config.data.num_workers, drop_last=False,
                          persistent_workers=self.config.data.num_workers > 0)

    def transfer_batch_to_device(self, batch: dict, device, dataloader_idx: int) -> dict:
        """Only the pixels go to the device; indices and captions stay on the CPU (no syncs to read them).

        The hook lives here, beside `collate`, which decides the batch's layout (Lightning warns when a
        LightningModule overrides it while a datamodule supplies the batches)."""
        return dict(batch, pixel_values=batch["pixel_values"].to(device, non_blocking=True))

    def cacheable_items(self) -> list[dict]:
        """Deterministic variants (center crop, flipped or not) of every photo and class image, at every size they
        train at: a photo in its bucket, a class image in the bucket of each photo it pairs with."""
        if self.buckets is None:
            items = []
            for source, dataset in (("instance", self.instance), ("class", self.prior)):
                if dataset is None:
                    continue
                for i in range(len(dataset.photos)):
                    items += [dict(v, source=source) for v in dataset.deterministic_variants(i)]
            return items
        items = []
        for i in range(len(self.instance.photos)):
            items += [dict(v, source="instance")
                      for v in self.instance.deterministic_variants(i, self.buckets.size_of(i))]
        if self.prior is not None:
            num_photos, num_class = len(self.instance.photos), len(self.prior.photos)
            # counter i pairs class image i % num_class with photo i % num_photos: every pairing occurs within lcm
            pairs = sorted({(i % num_class, self.buckets.size_of(i)) for i in range(math.lcm(num_photos, num_class))})
            for k, size in pairs:
                items += [dict(v, source="class") for v in self.prior.deterministic_variants(k, size)]
        return items


def check_bucket_sizes(plan: BucketPlan, model, config: TrainConfig) -> None:
    """Raise `ConfigError` unless every bucket's sides are multiples of what the base's VAE and UNet divide evenly."""
    vae_factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    multiple = vae_factor * 2 ** (len(model.unet.config.down_block_types) - 1)
    bad = [f"{h}x{w}" for h, w in plan.sizes if h % multiple or w % multiple]
    if bad:
        raise ConfigError(f"bucket(s) {', '.join(bad)} px do not fit base {config.base!r}, whose UNet needs sides in "
                          f"multiples of {multiple} px; set data.bucket_step to a multiple of {multiple} (now "
                          f"{config.data.bucket_step})")


# ---------------------------------------------------------------------------- module


class PersonalizationModule(L.LightningModule):
    """Owns the loop around `ConceptModel`: steps, optimizer, adapter-only checkpoints."""

    def __init__(self, config: TrainConfig, pipe=None):
        super().__init__()
        self.config = config
        self.save_hyperparameters({"config": config.to_dict()})
        self.model = ConceptModel(config, pipe=pipe)
        self.strict_loading = False  # checkpoints hold only the trainable parameters
        self._first_nonfinite: dict[str, torch.Tensor] = {}  # what -> first step it was NaN/inf (NEVER: not yet)

    # -- the step -------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        seed = step_seed(self.config.seed, self.global_step, self.global_rank)
        torch.manual_seed(seed)  # dropout and anything else drawing from the global RNG

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # One generator per sample, seeded by its place in the sample stream: the same sample gets
        # the same noise whichever rank or batch it lands in.
        generators = [torch.Generator().manual_seed(step_seed(self.config.seed, counter, 1 + (source == "class")))
                      for counter, source in zip(batch["counter"].tolist(), batch["source"])]
        loss, logs = self.model.loss(batch, generators)
        self._note_nonfinite("loss", loss)
        self.log("loss", loss, prog_bar=True, on_step=True, batch_size=batch["num_instance"])
        for key, value in logs.items():
            self.log(key, value, on_step=True, batch_size=batch["num_instance"])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step % self.config.log_every_n_steps == 0:
            self.raise_if_diverged()

    def on_before_optimizer_step(self, optimizer) -> None:
        self.model.method.before_optimizer_step(self.model, self.global_step)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip here, not in Lightning's precision plugin: it refuses fused optimizers even under bf16-mixed.

        The total norm clipping returns is checked finite too, except under 16-mixed, whose gradient scaler
        expects overflowing steps now and then (it skips them). Without clipping no norm is computed: a
        non-finite gradient shows in the next step's loss and in the weights a checkpoint would hold."""
        if gradient_clip_val:
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            sharded = self.trainer.strategy.model if is_fsdp(self.trainer.strategy) else None
            norm = clip_grad_norm(optimizer, gradient_clip_val, scaler, sharded=sharded)
            if scaler is None:
                self._note_nonfinite("gradient norm", norm)

    # -- divergence -----------------------------------------------------------------
    def _note_nonfinite(self, what: str, value: torch.Tensor) -> None:
        """Remember the first step at which `value` is NaN or infinite, on its device (no host sync)."""
        first = self._first_nonfinite.get(what)
        if first is None:
            first = torch.full((), NEVER, dtype=torch.long, device=value.device)
        self._first_nonfinite[what] = torch.where(torch.isfinite(value.detach()), first,
                                                  first.clamp(max=self.global_step))

    def raise_if_diverged(self) -> None:
        """Raise `TrainingError` if the loss or the gradient norm has been NaN or infinite (on any rank).

        Called at the same steps on every rank (it reduces across them)."""
        for what, first in self._first_nonfinite.items():
            step = int(self.trainer.strategy.reduce(first.clone(), reduce_op="min"))
            if step != NEVER:
                last = self.config.checkpoint_dir / "last.ckpt"
                kept = (f"the last checkpoint, {last}, was written before it and is kept (`lrkit export` makes a "
                        f"bundle of it)" if last.is_file() else "no checkpoint was written")
                raise TrainingError(f"training diverged: the {what} became NaN or infinite at step {step} (stopped "
                                    f"at step {self.global_step}); {kept}; train again with {self._divergence_fix()}")

    def _divergence_fix(self) -> str:
        """`a lower optim.lr (now 0.1)`, naming the learning rates of what trains (and 16-mixed's alternatives)."""
        opt, method = self.config.optim, self.model.method
        groups = {g["name"] for g in method.param_groups(self.model) if g["params"]}
        rates = [f"optim.lr (now {opt.lr or method.default_lr})"] if groups - {"embeddings"} else []
        rates += [f"optim.embedding_lr (now {opt.embedding_lr})"] if "embeddings" in groups else []
        fix = "a lower " + " or ".join(rates)
        return fix + (", or precision bf16-mixed or 32" if self.config.precision == "16-mixed" else "")

    def on_train_end(self) -> None:
        self.raise_if_diverged()
        logger.info("rank %d/%d finished training at step %d", self.global_rank, self.trainer.world_size,
                    self.global_step)

    def on_fit_start(self) -> None:
        if self.config.cache_latents:
            datamodule = self.trainer.datamodule
            with autocast_for(self.model, self.config.precision):
                # in chunks of the training batch: the VAE's activation peak is then no higher than an
                # uncached step's, so the cache never raises the run's peak memory
                self.model.cache_latents(datamodule.cacheable_items(), batch_size=self.config.data.batch_size)

    # -- optimizer ------------------------------------------------------------------
    def configure_optimizers(self):
        opt = self.config.optim
        groups = [g for g in self.model.method.param_groups(self.model) if g["params"]]
        if opt.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ImportError("optim.optimizer=adamw8bit needs bitsandbytes: pip install 'lrkit[bnb]'") from err
            optimizer = bnb.optim.AdamW8bit(groups, betas=opt.betas, eps=opt.eps)
        else:
            # Fused AdamW (one kernel for all parameters) on CUDA and CPU.
            fused = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
            optimizer = torch.optim.AdamW(groups, betas=opt.betas, eps=opt.eps, fused=fused or None)
        schedule = _lr_lambda(opt.lr_scheduler, opt.warmup_steps, self.config.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- adapter-only checkpoints -----------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the trainable weights; refuse to save a diverged run (the last good checkpoint stays)."""
        self.raise_if_diverged()
        trainable = {f"model.{k}" for k in self.model.trainable_names()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        raise_if_nonfinite({k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()},
                           f"checkpoint at step {self.global_step} not written",
                           f"train again with {self._divergence_fix()} (the last checkpoint written is kept)")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" not in checkpoint:
            return  # FSDP loaded the weights itself; `check_resume` found the run's inputs (method, options) equal
        expected = {f"model.{k}" for k in self.model.trainable_names()}
        got = set(checkpoint["state_dict"])
        if got != expected:
            missing, extra = sorted(expected - got)[:3], sorted(got - expected)[:3]
            raise ValueError(
                f"checkpoint does not fit this configuration (missing {missing}, unexpected {extra}); "
                "was it written with another method or LoRA setting?"
            )


NEVER = torch.iinfo(torch.long).max  # `_first_nonfinite` before anything was NaN or infinite


def raise_if_nonfinite(tensors: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """Raise `TrainingError` naming the first floating-point tensor of `tensors` holding NaN or infinite values:
    `"<what>: <name> holds NaN or infinite values; <fix>"`. One reduction per tensor."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TrainingError(f"{what}: {name} holds NaN or infinite values; {fix}")


def clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float, scaler=None, *,
                   sharded: torch.nn.Module | None = None) -> torch.Tensor:
    """Clip the optimizer's gradients to total norm `max_norm`, with any optimizer and precision.

    Lightning's mixed-precision plugin unscales a 16-mixed run's gradients before clipping, except for
    optimizers that unscale inside their own step (fused AdamW): for those it refuses to clip at all,
    even under bf16-mixed, where nothing is scaled. Here such an optimizer's gradients are unscaled
    first (`GradScaler.step` then skips its own unscale, and still skips the step on inf/NaN);
    bf16-mixed and 32 have no scaler. Returns the total norm before clipping. `sharded`: the FSDP root
    (`strategy: fsdp`), whose norm is taken over every rank's shards (called on every rank).
    """
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)
    if sharded is not None:
        return sharded.clip_grad_norm_(max_norm)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def _lr_lambda(kind: str, warmup: int, total: int):
    def schedule(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return schedule


# ---------------------------------------------------------------------------- callbacks


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed, and read with `weights_only=True`."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        import io

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class StepProgressBar(TQDMProgressBar):
    """One bar over the run's optimizer steps, `training: 340/1200 [..., loss=0.02]`.

    Training is counted in steps (`max_steps`, `max_epochs=-1`), and a few photos make epochs of one or
    two steps: Lightning's bar would restart every epoch and read "Epoch 599/-2"."""

    def init_train_tqdm(self):
        """The bar as it first shows: `training`, out of max_steps, from the current step (a resumed run starts
        where it stopped). Lightning's own first shows `Training: 0/?`, then `Epoch 0`."""
        trainer = self.trainer
        return Tqdm(desc="training", total=trainer.max_steps if trainer.max_steps > 0 else None,
                    initial=trainer.global_step, position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # the one bar spans every epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # nothing to close or reset between epochs


class ValidationImages(L.Callback):
    """Generate the validation prompts every N steps and at the end; save PNGs, log them if possible."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.out_dir = Path(config.output_dir) / "validation"

    def _prompts(self) -> list[str]:
        cfg = self.config
        return [p.replace("{token}", cfg.token).replace("{class}", cfg.data.class_word) for p in cfg.validation.prompts]

    @torch.no_grad()
    def generate(self, module: PersonalizationModule, step: int, write: bool = True) -> list[Path]:
        cfg = self.config.validation
        pipe = module.model.pipeline()
        paths = []
        was_training = module.training
        module.eval()
        try:
            with autocast_for(module.model, self.config.precision):
                for i, prompt in enumerate(self._prompts()):
                    generator = torch.Generator().manual_seed(cfg.seed + i)
                    image = pipe(prompt, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                                 height=self.config.data.resolution, width=self.config.data.resolution,
                                 generator=generator).images[0]
                    if write:
                        path = self.out_dir / f"step{step:06d}_{i:02d}.png"
                        atomic_save_png(image, path)
                        paths.append(path)
                        _log_image(module, f"validation/{i:02d}", image, step)
        finally:
            module.train(was_training)
        return paths

    @staticmethod
    def _generates(trainer) -> bool:
        """Rank 0 generates; under FSDP every rank does (each call of the sharded UNet gathers its weights from
        all ranks), and rank 0 writes."""
        return trainer.is_global_zero or is_fsdp(trainer.strategy)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.config.validation.every_n_steps
        if every and self._generates(trainer) and self._prompts() and trainer.global_step % every == 0:
            self.generate(pl_module, trainer.global_step, write=trainer.is_global_zero)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._generates(trainer) and self._prompts():
            self.generate(pl_module, trainer.global_step, write=trainer.is_global_zero)


def _log_image(module, tag: str, image, step: int) -> None:
    experiment = getattr(module.logger, "experiment", None)
    if hasattr(experiment, "add_image"):  # TensorBoard
        import numpy as np

        experiment.add_image(tag, np.asarray(image), step, dataformats="HWC")
    elif hasattr(module.logger, "log_image"):  # W&B and others
        module.logger.log_image(key=tag, images=[image], step=step)


def world_from_environment(devices: str) -> str | int:
    """Under torchrun / accelerate launch, one device per local process, as their environment says."""
    if devices == "auto" and "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if devices.isdigit():
        return int(devices)
    return devices
