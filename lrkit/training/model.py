"""`ConceptModel`: the frozen base model plus what a method trains, and the diffusion loss.

It works without Lightning (the benchmark and tests drive it directly); `PersonalizationModule` in
`module.py` is a thin owner of the training loop around it.
"""

from __future__ import annotations

import hashlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from lrkit.families import Conditioning, family_of
from lrkit.logs import dropped
from lrkit.models import fingerprint, load_base
from lrkit.training.config import TrainConfig
from lrkit.training.precision import frozen_dtype
from lrkit.training.sharding import clean_name
from lrkit.training.tokens import expand_prompt

logger = logging.getLogger(__name__)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed for (run seed, optimizer step, rank): per-step randomness survives a resume."""
    digest = hashlib.sha256(f"lrkit/{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ConceptModel(nn.Module):
    """VAE, text encoder(s) and UNet of the base model; the method decides which parameters train.

    The base's model family (`lrkit.families`) says which text encoders and tokenizers there are: they are
    attributes under their pipeline names (`text_encoder`, SDXL's `text_encoder_2`; `tokenizer`, `tokenizer_2`)."""

    def __init__(self, config: TrainConfig, pipe=None):
        super().__init__()
        from diffusers import DDPMScheduler

        self.config = config
        pipe = pipe if pipe is not None else load_base(config.base, family=config.family)
        self.family = family_of(pipe)
        self.base_fingerprint = fingerprint(pipe, config.base)
        self.vae = pipe.vae
        self.unet = pipe.unet
        for name in (*self.family.text_encoders, *self.family.tokenizers):
            setattr(self, name, getattr(pipe, name))
        self.scheduler_config = dict(pipe.scheduler.config)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for module in (self.vae, *self.text_encoders, self.unet):
            module.requires_grad_(False)

        self.method = config.method_class(config)
        self.method.configure(self)
        self._cast_frozen(frozen_dtype(config.precision))
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if not self.method.text_encoder_frozen():
                for encoder in self.text_encoders:
                    # transformers 5 renames it (the old name warns); older releases have only the old one
                    enable = (getattr(encoder, "activation_checkpointing_enable", None)
                              or encoder.gradient_checkpointing_enable)
                    enable()
        if config.compile:
            self.unet.compile()  # in place: state_dict keys stay the same
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # caption -> (states, pooled)
        self._latent_cache: dict[tuple, torch.Tensor] = {}
        # from_pretrained hands the modules over in eval mode; set each one's mode from what trains
        self.train()

    def train(self, mode: bool = True) -> "ConceptModel":
        """Train mode for the modules that hold trainable weights (so LoRA dropout is active); the frozen
        ones (always the VAE) stay in eval mode, whatever mode they came in."""
        super().train(mode)
        if mode:
            for name in ("vae", *self.family.text_encoders, "unet"):
                module = getattr(self, name)
                if not any(p.requires_grad for p in module.parameters()):
                    module.eval()
        return self

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The text encoders, in the family's order."""
        return [getattr(self, name) for name in self.family.text_encoders]

    @property
    def tokenizers(self) -> list:
        """The tokenizers, in the family's order (one per text encoder)."""
        return [getattr(self, name) for name in self.family.tokenizers]

    # ------------------------------------------------------------------ setup helpers

    def _cast_frozen(self, dtype: torch.dtype) -> None:
        """Frozen modules in `dtype`; everything that trains stays float32."""
        def cast(module, to):
            if module.dtype != to:
                # diffusers warns on every `.to(dtype)`, even when no module of the model is meant to stay float32
                with dropped("diffusers.models.modeling_utils", r"There are modules in \w+ that should be kept in "
                                                                 r"float32: \[\]\."):
                    module.to(dtype=to)

        cast(self.vae, dtype)
        for name in ("unet", *self.family.text_encoders):
            module = getattr(self, name)
            if self.method.trains_module(name):
                cast(module, torch.float32)
                continue
            cast(module, dtype)
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.float()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_names(self) -> set[str]:
        """The state-dict names of what trains (as without FSDP, whether or not the model is sharded)."""
        return {clean_name(n) for n, p in self.named_parameters() if p.requires_grad}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what trains: the adapter-only checkpoint."""
        names = self.trainable_names()
        return {k: v for k, v in self.state_dict().items() if k in names}

    @property
    def cache_text(self) -> bool:
        return self.config.cache_text_embeddings and self.method.text_encoder_frozen()

    # ------------------------------------------------------------------ encoders

    def tokenize(self, captions: list[str], tokenizer=None) -> torch.Tensor:
        """(batch, 77) token ids of `captions` by `tokenizer` (default: the first), multi-vector tokens expanded."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        captions = [expand_prompt(c, tokenizer) for c in captions]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return ids.to(self.unet.device)

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = [self.tokenize(captions, tokenizer) for tokenizer in self.tokenizers]
        return self.family.encode_ids(self.text_encoders, ids)

    def conditioning(self, captions: list[str], batch: dict | None = None) -> Conditioning:
        """The UNet's conditioning of `captions` (states, and SDXL's pooled embedding), cached per caption when the
        text encoders are frozen; SDXL's time ids from each sample's original size and crop in `batch`."""
        if not self.cache_text:
            states, pooled = self._encode(captions)
        else:
            missing = sorted({c for c in captions if c not in self._text_cache})
            if missing:
                with torch.no_grad():
                    states, pooled = self._encode(missing)
                pooled_rows = list(pooled) if pooled is not None else [None] * len(missing)
                self._text_cache.update(zip(missing, zip(states, pooled_rows)))
            rows = [self._text_cache[c] for c in captions]
            states = torch.stack([r[0] for r in rows])
            pooled = None if rows[0][1] is None else torch.stack([r[1] for r in rows])
        return Conditioning(states, pooled, self.time_ids(batch, len(captions)))

    def time_ids(self, batch: dict | None, size: int) -> torch.Tensor | None:
        """(size, 6) SDXL time ids of the batch's samples: each one's original size and crop, and the size the batch
        trains at (its pixels' height and width: data.resolution square, or its bucket); none given: uncropped
        squares at data.resolution. None for a family without them."""
        if not self.family.time_conditioned:
            return None
        r = self.config.data.resolution
        if batch is None:
            return self.family.training_time_ids(torch.tensor([[r, r]]).expand(size, 2), torch.zeros(size, 2),
                                                 (r, r)).to(self.unet.device)
        pixels = tuple(batch["pixel_values"].shape[-2:])  # one size per batch (`collate`)
        return self.family.training_time_ids(batch["original_size"], batch["crop_top_left"], pixels).to(self.unet.device)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """(batch, 77, dim) text states (both encoders' concatenated for SDXL); cached as `conditioning` is."""
        return self.conditioning(captions).states

    def latent_params(self, batch: dict) -> torch.Tensor:
        """(batch, 2*C, h, w) mean and log-variance of the VAE posterior: cached or encoded now."""
        if self.config.cache_latents:
            size = tuple(batch["pixel_values"].shape[-2:])  # a latent of another size (bucket) never stands in
            keys = [(*k, *size) for k in zip(batch["source"], batch["photo_index"].tolist(), batch["flipped"].tolist())]
            missing = [k for k in keys if k not in self._latent_cache]
            if missing:
                raise RuntimeError(f"cache_latents is on but {missing[0]} was not cached; call cache_latents() first")
            return torch.stack([self._latent_cache[k] for k in keys])
        with torch.no_grad():
            px = batch["pixel_values"].to(self.vae.device, self.vae.dtype)
            return self.vae.encode(px).latent_dist.parameters

    @torch.no_grad()
    def cache_latents(self, items: list[dict], batch_size: int = 8) -> None:
        """Encode deterministic samples once: key (source, photo_index, flipped, height, width) -> latent
        mean/logvar; encoded in chunks of one size."""
        todo = {}
        for item in items:
            key = (item.get("source", "instance"), int(item["photo_index"]), bool(item["flipped"]),
                   *item["pixel_values"].shape[-2:])
            if key not in self._latent_cache:
                todo[key] = item["pixel_values"]
        by_size: dict[tuple, list[tuple]] = {}  # a chunk stacks samples of one size
        for key in todo:
            by_size.setdefault(key[-2:], []).append(key)
        for keys in by_size.values():
            for start in range(0, len(keys), batch_size):
                chunk = keys[start:start + batch_size]
                px = torch.stack([todo[k] for k in chunk]).to(self.vae.device, self.vae.dtype)
                params = self.vae.encode(px).latent_dist.parameters.detach()
                self._latent_cache.update(zip(chunk, params))

    # ------------------------------------------------------------------ loss

    def sample_noise(self, params: torch.Tensor, generators: list[torch.Generator]):
        """Per sample, from its own generator: VAE posterior sample, noise (+offset), timestep."""
        mean, logvar = params.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        shape = mean.shape[1:]
        num_train = self.noise_scheduler.config.num_train_timesteps
        eps, noise, steps = [], [], []
        for g in generators:  # a fixed stream of draws: options never shift the other draws
            eps.append(torch.randn(shape, generator=g))
            n = torch.randn(shape, generator=g)
            offset = torch.randn((shape[0], 1, 1), generator=g)
            noise.append(n + self.config.noise_offset * offset if self.config.noise_offset else n)
            steps.append(torch.randint(0, num_train, (1,), generator=g))
        device = mean.device
        latents = (mean + std * torch.stack(eps).to(device)) * self.vae.config.scaling_factor
        return latents, torch.stack(noise).to(device), torch.cat(steps).to(device)

    def loss(self, batch: dict, generators: "list[torch.Generator] | torch.Generator"):
        """The training loss of `batch`, as the method defines it (default: `diffusion_loss`). Returns (loss, logs)."""
        return self.method.loss(self, batch, generators)

    def diffusion_loss(self, batch: dict, generators: "list[torch.Generator] | torch.Generator",
                       pixel_weights: torch.Tensor | None = None):
        """Noise-prediction loss (DDPM), with min-SNR weighting and prior preservation when set.

        `generators`: one per sample (so a sample's noise does not depend on the batch or rank it
        lands in), or one shared generator. `batch["num_instance"]` photos come first; the rest are
        class images (prior loss). `pixel_weights` (batch, 1, h, w) at latent resolution turns each
        sample's mean squared error into a weighted mean over the latent pixels (the masked loss of
        concept_em). Returns (loss, logs).
        """
        from diffusers.training_utils import compute_snr

        from lrkit.losses import min_snr_weight

        cfg = self.config
        params = self.latent_params(batch)
        bsz = params.shape[0]
        if isinstance(generators, torch.Generator):
            generators = [generators] * bsz
        latents, noise, timesteps = self.sample_noise(params, generators)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)

        cond = self.conditioning(list(batch["caption"]), batch).to(self.unet.dtype)
        pred = self.unet(noisy.to(self.unet.dtype), timesteps, **cond.unet_kwargs()).sample

        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {prediction_type!r} in the base model's scheduler")
        error = F.mse_loss(pred.float(), target.float(), reduction="none")  # (batch, C, h, w)
        if pixel_weights is None:
            per_sample = error.mean(dim=(1, 2, 3))
        else:
            w = pixel_weights.to(error)  # (batch, 1, h, w)
            per_sample = (error * w).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * error.shape[1]).clamp_min(1e-8)
        if cfg.min_snr_gamma is not None:
            snr = compute_snr(self.noise_scheduler, timesteps)
            per_sample = per_sample * min_snr_weight(snr, cfg.min_snr_gamma, prediction_type)

        n = int(batch.get("num_instance", bsz))
        instance_loss = per_sample[:n].mean()
        logs = {"loss/instance": instance_loss.detach()}  # tensors: no device sync per step
        loss = instance_loss
        if n < bsz:
            prior_loss = per_sample[n:].mean()
            loss = loss + self.method.prior_loss_weight * prior_loss
            logs["loss/prior"] = prior_loss.detach()
        return loss, logs

    # ------------------------------------------------------------------ inference view

    def pipeline(self):
        """A stock pipeline of the base's family sharing this model's modules (validation and class images)."""
        from diffusers import DDIMScheduler

        modules = {name: getattr(self, name) for name in (*self.family.text_encoders, *self.family.tokenizers)}
        pipe = self.family.build_pipeline(vae=self.vae, unet=self.unet,
                                          scheduler=DDIMScheduler.from_config(self.scheduler_config), **modules)
        pipe.set_progress_bar_config(disable=True)
        return pipe
