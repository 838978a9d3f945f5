"""DDIM inversion of reference images, and an on-disk cache of the inverted trajectories.

Path R of the retouch stage (DESIGN.md §5.2) replays the DDIM-inverted trajectory of a reference
photo. Notation (DESIGN.md §5): the sampler runs T steps over the timesteps t_0 > ... > t_{T-1}
of `scheduler.set_timesteps(T)`; `z_i` is the latent fed INTO step i (z_0 is pure noise) and
`z_T` the clean latent. A *trajectory* is the tensor (T+1, B, C, h, w) holding z_0 .. z_T.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import PIL.Image
import PIL.ImageOps
import torch
from tqdm.auto import tqdm

from lrkit.families import Conditioning, family_of
from lrkit.io import atomic_write_bytes

logger = logging.getLogger(__name__)

# Bump when the inversion algorithm changes, so old cache entries stop matching.
INVERSION_FORMAT = "lrkit-ddim-inversion-v1"
_TRAJECTORY_KEY = "trajectory"
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- encoding


def center_square(image: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """Resize so that the short side is `resolution`, then crop the centre square."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), PIL.Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


@contextlib.contextmanager
def vae_precision(pipe) -> Iterator[torch.dtype]:
    """The dtype `pipe.vae` runs in for the block: its own, or float32 where the family's stock pipeline upcasts it
    (SDXL in float16); an upcast VAE is cast back on exit."""
    vae = pipe.vae
    if not family_of(pipe).vae_upcast(vae):
        yield vae.dtype
        return
    dtype = vae.dtype
    vae.to(torch.float32)
    try:
        yield torch.float32
    finally:
        vae.to(dtype)


@torch.no_grad()
def encode_image(pipe, image: PIL.Image.Image, resolution: int, generator=None) -> torch.Tensor:
    """Encode a PIL image to (1, C, resolution / f, resolution / f) latents, scaled for the UNet.

    The image is EXIF-rotated, converted to RGB, resized (short side) and centre-cropped to
    `resolution`; a note is logged when that changes its size. The latent is the mean of the VAE
    posterior (deterministic), or a sample drawn with `generator` when one is given.
    """
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    factor = pipe.vae_scale_factor
    if not isinstance(resolution, int) or resolution <= 0 or resolution % factor:
        raise ValueError(
            f"resolution must be a positive multiple of the VAE scale factor {factor}, got {resolution!r}"
        )
    image = PIL.ImageOps.exif_transpose(image).convert("RGB")
    if image.size != (resolution, resolution):
        logger.info(
            "reference image is %dx%d; resized (short side) and centre-cropped to %dx%d",
            *image.size, resolution, resolution,
        )
        image = center_square(image, resolution)
    return vae_encode(pipe, image, generator)


def vae_encode(pipe, image: PIL.Image.Image, generator=None) -> torch.Tensor:
    """An RGB image whose sides are multiples of the VAE scale factor, as (1, C, H / f, W / f) latents scaled (and
    shifted) for the UNet: the VAE posterior's mean, or a sample drawn with `generator`."""
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image)  # (1, 3, H, W) in [-1, 1]
    with vae_precision(pipe) as dtype:
        posterior = vae.encode(pixels.to(device=vae.device, dtype=dtype)).latent_dist
        latents = posterior.mean if generator is None else posterior.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae.config.scaling_factor


# --------------------------------------------------------------------------- DDIM loops


def _ddim_config(pipe) -> dict:
    """pipe.scheduler's config, checked to describe a DDIM sampler that inversion can mirror."""
    from diffusers import DDIMScheduler

    scheduler = pipe.scheduler
    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(
            f"DDIM inversion needs pipe.scheduler to be a DDIMScheduler, got {type(scheduler).__name__}; "
            "set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
        )
    config = dict(scheduler.config)
    if config.get("timestep_spacing", "leading") not in ("leading", "trailing"):
        raise ValueError(
            f"scheduler timestep_spacing {config['timestep_spacing']!r} cannot be inverted; "
            "use 'leading' or 'trailing'"
        )
    if config.get("thresholding", False):
        raise ValueError("scheduler thresholding=True (dynamic thresholding) cannot be inverted; set it to False")
    return config


def _check_inputs(latents: torch.Tensor, num_inference_steps: int) -> None:
    if latents.ndim != 4:
        raise ValueError(f"latents must be (B, C, h, w), got shape {tuple(latents.shape)}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")


def _batched_embeds(name: str, embeds: torch.Tensor | Conditioning, batch: int) -> Conditioning:
    """Text embeddings (1 or batch, tokens, dim), or a family's `Conditioning` of 1 or batch rows, expanded to the
    latents' batch size."""
    states = embeds.states if isinstance(embeds, Conditioning) else embeds
    if states.ndim != 3 or states.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must be (1 or {batch}, tokens, dim) for {batch} latents, got shape {tuple(states.shape)}"
        )
    return (embeds if isinstance(embeds, Conditioning) else Conditioning(embeds)).expand(batch)


def _predict_noise(unet, latents, t, prompt_embeds: Conditioning, guidance_scale=1.0,
                   negative_prompt_embeds: Conditioning | None = None) -> torch.Tensor:
    """The UNet's output at (latents, t), with classifier-free guidance when guidance_scale > 1."""
    model_in = latents.to(device=unet.device, dtype=unet.dtype)
    cond = prompt_embeds.to(device=unet.device, dtype=unet.dtype)
    if guidance_scale <= 1.0:
        out = unet(model_in, t, **cond.unet_kwargs(), return_dict=False)[0]
    else:
        uncond = negative_prompt_embeds.to(device=unet.device, dtype=unet.dtype)
        both = unet(
            torch.cat([model_in, model_in]), t, **Conditioning.cat([uncond, cond]).unet_kwargs(), return_dict=False
        )[0]
        out_uncond, out_cond = both.chunk(2)
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
    return out.to(device=latents.device, dtype=latents.dtype)


@torch.no_grad()
def ddim_invert(
    pipe,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor | Conditioning,
    num_inference_steps: int,
    *,
    unet=None,
    guidance_scale: float = 1.0,
    negative_prompt_embeds: torch.Tensor | Conditioning | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM inversion (Song et al. 2021, §4.3: the eta = 0 step, eq. 12, run backwards) of clean z_T to z_0.

    Returns the trajectory (T+1, B, C, h, w) holding z_0 .. z_T, with trajectory[T] == latents.
    Uses `unet or pipe.unet` and `prompt_embeds` (text embeddings, or a `Conditioning` of the pipeline's family:
    SDXL needs its pooled embedding and time ids); no guidance unless guidance_scale > 1, which then
    needs `negative_prompt_embeds`. Sampling forward with pipe.scheduler (same T, eta = 0, same
    prompt, no guidance) from trajectory[0] retraces the trajectory approximately.
    """
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    config = _ddim_config(pipe)
    _check_inputs(latents, num_inference_steps)
    prompt_embeds = _batched_embeds("prompt_embeds", prompt_embeds, latents.shape[0])
    if guidance_scale > 1.0:
        if negative_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds is required when guidance_scale > 1")
        negative_prompt_embeds = _batched_embeds("negative_prompt_embeds", negative_prompt_embeds, latents.shape[0])
    unet = unet if unet is not None else pipe.unet

    # diffusers' DDIMInverseScheduler does the job: built from the same config, step(eps, t_i, z_{i+1})
    # maps the noise level of forward step i's output (alphas_cumprod[t_i - 1000 // T], or the final
    # alpha) back to alphas_cumprod[t_i], i.e. it undoes DDIMScheduler.step(eps, t_i, z_i) for the same
    # eps. Its timesteps are the forward ones reversed; that is checked below, not assumed.
    inverse = DDIMInverseScheduler.from_config(config)
    inverse.set_timesteps(num_inference_steps, device=latents.device)
    forward = DDIMScheduler.from_config(config)
    forward.set_timesteps(num_inference_steps, device=latents.device)
    if not torch.equal(inverse.timesteps.flip(0), forward.timesteps):
        raise ValueError(
            f"inverse timesteps {inverse.timesteps.tolist()} do not mirror the forward timesteps "
            f"{forward.timesteps.tolist()} for scheduler config {config}"
        )

    steps = num_inference_steps
    trajectory = latents.new_empty((steps + 1, *latents.shape))  # (T+1, B, C, h, w)
    trajectory[steps] = latents
    z = latents
    for i in tqdm(range(steps - 1, -1, -1), desc="DDIM inversion", disable=not progress):
        t = forward.timesteps[i]
        # The exact inverse would need eps(z_i, t_i), which depends on the unknown z_i; as usual, it is
        # approximated by eps(z_{i+1}, t_i): the source of the reconstruction error (besides rounding).
        noise = _predict_noise(unet, z, t, prompt_embeds, guidance_scale, negative_prompt_embeds)
        z = inverse.step(noise, int(t), z, return_dict=False)[0]
        trajectory[i] = z
    return trajectory


@torch.no_grad()
def sample_from(
    pipe, z0: torch.Tensor, prompt_embeds: torch.Tensor | Conditioning, num_inference_steps: int, *, unet=None
) -> torch.Tensor:
    """The plain forward DDIM loop (eta = 0, no guidance) from z_0; returns the trajectory (T+1, B, C, h, w).

    Runs on a copy of pipe.scheduler, so pipe.scheduler's state is left untouched.
    """
    from diffusers import DDIMScheduler

    config = _ddim_config(pipe)
    _check_inputs(z0, num_inference_steps)
    prompt_embeds = _batched_embeds("prompt_embeds", prompt_embeds, z0.shape[0])
    unet = unet if unet is not None else pipe.unet
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_inference_steps, device=z0.device)

    trajectory = z0.new_empty((num_inference_steps + 1, *z0.shape))  # (T+1, B, C, h, w)
    trajectory[0] = z0
    z = z0
    for i, t in enumerate(scheduler.timesteps):
        noise = _predict_noise(unet, scheduler.scale_model_input(z, t), t, prompt_embeds)
        z = scheduler.step(noise, t, z, eta=0.0, return_dict=False)[0]
        trajectory[i + 1] = z
    return trajectory


# --------------------------------------------------------------------------- cache


def image_digest(image_or_path) -> str:
    """sha256 of a file's bytes (path), of raw bytes, or of a PIL image's RGB pixels and size."""
    digest = hashlib.sha256()
    if isinstance(image_or_path, (str, os.PathLike)):
        with open(image_or_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    elif isinstance(image_or_path, (bytes, bytearray, memoryview)):
        digest.update(image_or_path)
    elif isinstance(image_or_path, PIL.Image.Image):
        rgb = image_or_path.convert("RGB")
        digest.update(f"RGB {rgb.width}x{rgb.height}\n".encode())
        digest.update(rgb.tobytes())
    else:
        raise TypeError(
            f"image_or_path must be a path, bytes or a PIL image, got {type(image_or_path).__name__}"
        )
    return digest.hexdigest()


def _canonical(value, name: str):
    """A JSON-ready, order-independent form of one key part."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, dict):
        return {str(k): _canonical(v, f"{name}.{k}") for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{name}[{i}]") for i, v in enumerate(value)]
    config = getattr(value, "config", None)
    if config is not None and hasattr(value, "from_config"):  # a diffusers scheduler (ConfigMixin)
        # Private entries (_class_name, _diffusers_version, ...) do not change the numbers.
        public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
        return {"class": type(value).__name__, "config": _canonical(public, name)}
    if hasattr(value, "tolist"):  # numpy arrays and scalars, e.g. trained_betas
        return _canonical(value.tolist(), name)
    raise TypeError(f"cache key part {name!r} has unsupported type {type(value).__name__}")


def _default_cache_root() -> Path:
    return Path(os.environ.get("LRKIT_CACHE") or Path.home() / ".cache" / "lrkit")


class TrajectoryCache:
    """On-disk cache of inverted reference trajectories (safetensors, atomic writes).

    Files live in `<root>/inversions/<key>.safetensors` (reference masks: `<root>/masks/<key>.png`), root
    defaulting to $LRKIT_CACHE or
    ~/.cache/lrkit. Trajectories read back are on the CPU; move them with `.to(device)`.
    An unreadable file is treated as a miss (with a warning) and overwritten on the next put.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root if root is not None else _default_cache_root()).expanduser()
        self.dir = self.root / "inversions"

    @staticmethod
    def key(**parts) -> str:
        """sha256 over a canonical JSON of the parts, e.g. concept id, image digest, scheduler, steps,
        resolution, prompt, dtype. A scheduler object counts as its class name plus public config."""
        if not parts:
            raise ValueError("TrajectoryCache.key needs at least one part")
        payload = {"format": INVERSION_FORMAT, "parts": _canonical(parts, "parts")}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(
                f"cache key must be a 64-character sha256 hex string from TrajectoryCache.key, got {key!r}"
            )
        return self.dir / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        """The cached trajectory (on the CPU), or None when absent or unreadable."""
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path), device="cpu")
            trajectory = tensors[_TRAJECTORY_KEY]
        except Exception as err:  # any corruption (truncated file, bad header, missing tensor) is a miss
            logger.warning(
                "ignoring unreadable inversion cache file %s (%s: %s); recomputing", path, type(err).__name__, err
            )
            return None
        if not trajectory.is_floating_point() or trajectory.ndim < 2:
            logger.warning("ignoring inversion cache file %s holding a %s tensor of shape %s; recomputing",
                           path, trajectory.dtype, tuple(trajectory.shape))
            return None
        return trajectory

    def put(self, key: str, trajectory: torch.Tensor) -> Path:
        """Write `trajectory` under `key` atomically (readers see the old file or the whole new one)."""
        from safetensors.torch import save

        path = self.path(key)
        tensors = {_TRAJECTORY_KEY: trajectory.detach().to("cpu").contiguous()}
        data = save(tensors, metadata={"format": INVERSION_FORMAT})
        return atomic_write_bytes(path, data)

    def mask_path(self, key: str) -> Path:
        return self.root / "masks" / self.path(key).with_suffix(".png").name

    def get_mask(self, key: str) -> torch.Tensor | None:
        """The cached (H, W) bool mask, or None when absent or unreadable."""
        from lrkit.masks import load_mask_png

        path = self.mask_path(key)
        if not path.is_file():
            return None
        try:
            return load_mask_png(path)
        except Exception as err:  # a corrupt file is a miss
            logger.warning("ignoring unreadable mask cache file %s (%s); recomputing", path, err)
            return None

    def put_mask(self, key: str, mask: torch.Tensor) -> Path | None:
        """Store a mask as a PNG under `key`; a failed write is logged (the mask is recomputed next time)."""
        from lrkit.masks import save_mask_png

        try:
            return save_mask_png(mask, self.mask_path(key))
        except OSError as err:
            logger.warning("could not write mask cache file %s (%s); continuing without caching", self.mask_path(key), err)
            return None

    def get_or_compute(self, key: str, compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """(trajectory, was_cached): the cached trajectory, or `compute()` stored and returned.

        A failed write (e.g. read-only cache folder) is logged and does not fail the caller.
        """
        cached = self.get(key)
        if cached is not None:
            return cached, True
        trajectory = compute()
        try:
            self.put(key, trajectory)
        except OSError as err:
            logger.warning(
                "could not write inversion cache file %s (%s); continuing without caching", self.path(key), err
            )
        return trajectory, False
