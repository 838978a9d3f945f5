"""The sample pool: rendered toy-world pictures, their captions' token ids and (after the VAE phase) their
latents, refreshed by fresh seeds while the UNet trains."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lrkit.toyworld.pretrain.models import TOY_RESOLUTION
from lrkit.toyworld.render import sample

POOL_SEED_BASE = 1_000_003  # pool seeds are POOL_SEED_BASE * (seed + 1) + i: disjoint from small test seeds


class SamplePool:
    """Rendered toy-world samples: images in [-1, 1], caption token ids, and (after the VAE phase) latent
    posterior means and stds. Entries are replaced in place by fresh seeds."""

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
        """Render every entry (on `executor`'s workers, when given)."""
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
        would leave the whole chunk to one process); give the futures to `refresh_from`."""
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

    def encode_all(self, vae, batch: int = 128) -> None:
        """Encode every entry with the (frozen) VAE."""
        means, stds = [], []
        for start in range(0, self.size, batch):
            mean, std = encode(vae, self.images[start:start + batch])
            means.append(mean)
            stds.append(std)
        self.latent_mean, self.latent_std = torch.cat(means), torch.cat(stds)
        self.latent_masks = _latent_share(self.masks, self.latent_mean.shape[-1])

    def latents_to(self, device: torch.device) -> None:
        """Keep the encoded latents on `device` (a GPU run then samples its batches there)."""
        self.latent_mean, self.latent_std = self.latent_mean.to(device), self.latent_std.to(device)
        self.latent_masks = self.latent_masks.to(device)

    def latent_scaling_factor(self) -> float:
        """1 / std of one latent sample of every entry, as SD's VAE scaling factor (draws from torch's RNG)."""
        return float(1.0 / self.latent_mean.add(self.latent_std * torch.randn_like(self.latent_std)).std())

    def latent_tensors(self) -> dict[str, torch.Tensor]:
        """What the UNet phase needs of the pool, for a checkpoint (`restore_latents`)."""
        return {"ids": self.ids, "latent_mean": self.latent_mean, "latent_std": self.latent_std,
                "latent_masks": self.latent_masks}

    def restore_latents(self, tensors: dict[str, torch.Tensor], next_seed: int) -> None:
        """Take back `latent_tensors` from a checkpoint; the images are not kept (refreshed entries are
        re-rendered)."""
        self.ids, self.latent_mean, self.latent_std = tensors["ids"], tensors["latent_mean"], tensors["latent_std"]
        self.latent_masks = tensors.get("latent_masks", torch.zeros_like(self.latent_mean[:, :1]))
        self.images.zero_()
        self.next_seed = next_seed


class PoolRefresher:
    """Fresh seeds into the pool before every UNet step: `per_step` rendered here, or with an `executor`
    rendered in the background `chunk_steps` steps' worth at a time, entering the pool one chunk later."""

    def __init__(self, pool: SamplePool, per_step: int, executor=None, workers: int = 0, chunk_steps: int = 1):
        self.pool, self.per_step = pool, per_step
        self.executor, self.workers, self.chunk_steps = executor, workers, chunk_steps
        self.pending: list | None = None  # the chunk rendering in the background

    def before_step(self, step: int, rng: np.random.Generator, vae) -> None:
        if self.executor is None:
            self.pool.refresh(self.per_step, rng, vae)
        elif step % self.chunk_steps == 0:
            if self.pending is not None:
                self.pool.refresh_from(self.pending, rng, vae)
            self.pending = self.pool.render_in_background(self.executor, self.workers,
                                                          self.chunk_steps * self.per_step)


def render_seeds(seeds: list[int], two_object_fraction: float,
                 extras_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render the pool samples of `seeds`: uint8 images (N, H, W, 3), bool object masks (N, H, W), captions.
    A plain function of its arguments, so worker processes can run it."""
    rendered = [sample(seed, num_objects=1 + (two_objects(seed) < two_object_fraction), resolution=TOY_RESOLUTION,
                       extras_fraction=extras_fraction) for seed in seeds]
    return (np.stack([np.asarray(r.image.convert("RGB"), dtype=np.uint8) for r in rendered]),
            np.stack([r.object_mask for r in rendered]), [r.caption for r in rendered])


def two_objects(data_seed: int) -> float:
    """A uniform number in [0, 1) fixed by the data seed: the sample has two objects when it is below
    `two_object_fraction` (so a seed's picture does not depend on the order of rendering)."""
    return float(np.random.default_rng([data_seed, 2]).random())


def _latent_share(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, H, W) bool masks -> (B, 1, size, size) share of object pixels under each latent pixel."""
    return F.adaptive_avg_pool2d(masks.float(), size)


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of the VAE for images in [-1, 1] (unscaled latent space)."""
    dist = vae.encode(images.to(vae.device)).latent_dist
    return dist.mean.cpu(), dist.std.cpu()


__all__ = ["POOL_SEED_BASE", "PoolRefresher", "SamplePool", "encode", "render_seeds", "two_objects"]
