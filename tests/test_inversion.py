"""DDIM inversion (lrkit.inference.inversion): reconstruction, trajectory alignment, trajectory cache.

Reconstruction is measured on three models, from exact to realistic:
- `TimeOnlyEps`, whose output depends on the timestep only: inversion is then the exact inverse of
  the forward DDIM loop, so any timestep misalignment shows up as a large error.
- `GaussianDenoiser`, the optimal noise predictor for unit-variance Gaussian data: a smooth,
  well-behaved model like a trained one; the error is the genuine DDIM-inversion error (~1/T^2).
- the tiny random pipeline: random weights are not a denoiser and its random VAE gives latents of
  std ~0.04 instead of ~1 (where GroupNorm makes the UNet ~11x input-sensitive), so inversion is
  poor; the tolerances below are measured values plus a margin, with a random-noise control.
"""

import hashlib
import logging
import os

import numpy as np
import PIL.Image
import pytest
import torch

from lrkit.inference.inversion import (
    TrajectoryCache,
    ddim_invert,
    encode_image,
    image_digest,
    sample_from,
)
from lrkit.models import build_tiny_random

PROMPT = "a photo of a vase"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


def synthetic_image(width: int = 64, height: int = 64) -> PIL.Image.Image:
    """Colour ramps and a disc: deterministic, with structure at several scales."""
    y, x = np.mgrid[0:height, 0:width]
    disc = ((x - width // 2) ** 2 + (y - height // 2) ** 2 < 400) * 255
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), disc], -1)
    return PIL.Image.fromarray(rgb.astype(np.uint8))


class _FakeUNet(torch.nn.Module):
    """Just enough of a UNet2DConditionModel for the inversion loops: device, dtype, call."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.calls = 0

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        self.calls += 1
        return (self.eps(sample, int(timestep)),)


class TimeOnlyEps(_FakeUNet):
    """eps(z, t) = f(t): a different fixed pattern per timestep, independent of z."""

    def __init__(self, shape):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.a = torch.randn(shape[1:], generator=gen)
        self.b = torch.randn(shape[1:], generator=gen)

    def eps(self, sample, t):
        return (np.sin(t / 37.0) * self.a + np.cos(t / 91.0) * self.b).expand_as(sample)


class GaussianDenoiser(_FakeUNet):
    """E[noise | z_t] for data ~ N(0, 1): sqrt(1 - a_t) z_t (unit data variance)."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.alphas_cumprod = alphas_cumprod

    def eps(self, sample, t):
        return (1 - self.alphas_cumprod[t]) ** 0.5 * sample


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from threads; on shared CPUs, extra threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(one_thread):
    """The tiny random pipeline, the prompt embeddings and the latents of a synthetic image."""
    pipe = build_tiny_random(0)
    pipe.set_progress_bar_config(disable=True)
    embeds, _ = pipe.encode_prompt(
        PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    latents = encode_image(pipe, synthetic_image(), 64)
    return pipe, embeds, latents


def conditioned(pipe):
    """(pipe, conditioning of PROMPT, latents of the synthetic image, conditioning of "") in `pipe`'s model family:
    SDXL's conditioning carries its pooled embedding and time ids for 64 px."""
    from lrkit.families import family_of

    family = family_of(pipe)
    cond = family.conditioning(pipe, [PROMPT], None, height=64, width=64, guidance=False)[0]
    empty = family.conditioning(pipe, [""], None, height=64, width=64, guidance=False)[0]
    return pipe, cond, encode_image(pipe, synthetic_image(), 64), empty


@pytest.fixture(scope="module")
def xl_setup(one_thread):
    from lrkit.models import load_base

    return conditioned(load_base("tiny-random-xl"))


@pytest.fixture(scope="module", params=["tiny-random", "tiny-random-xl"])
def family_setup(request, setup):
    """`conditioned` on each model family's tiny base."""
    return conditioned(setup[0]) if request.param == "tiny-random" else request.getfixturevalue("xl_setup")


@pytest.fixture(scope="module")
def inverted(setup):
    """{T: trajectory} of the synthetic image, inverted with the tiny random UNet (computed once)."""
    pipe, embeds, latents = setup
    return {steps: ddim_invert(pipe, latents, embeds, steps) for steps in (10, 25)}


def forward_step(pipe, unet, z, i, steps, embeds):
    """One forward DDIM step (eta = 0) from z = z_i, with diffusers' DDIMScheduler."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    t = scheduler.timesteps[i]
    eps = unet(z, t, encoder_hidden_states=embeds, return_dict=False)[0]
    return scheduler.step(eps, t, z, eta=0.0, return_dict=False)[0]


# --------------------------------------------------------------------------- exact alignment


@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler")  # steps_offset=0 on purpose
@pytest.mark.parametrize(
    "steps, spacing, offset",
    [(10, "leading", 1), (25, "leading", 1), (7, "leading", 1), (7, "trailing", 0), (10, "leading", 0)],
)
def test_inversion_is_exact_inverse_for_time_only_model(setup, steps, spacing, offset):
    """With eps independent of z, each inverse step undoes forward step i exactly: any off-by-one
    in timesteps or noise levels breaks this by orders of magnitude (checked below)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe, embeds, latents = setup
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing, steps_offset=offset)
    pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler})
    unet = TimeOnlyEps(latents.shape)
    trajectory = ddim_invert(pipe, latents, embeds, steps, unet=unet)
    assert unet.calls == steps
    assert trajectory.shape == (steps + 1, *latents.shape)
    assert torch.equal(trajectory[steps], latents)

    replay = sample_from(pipe, trajectory[0], embeds, steps, unet=unet)
    scale = latents.norm()
    for i in range(steps + 1):
        assert (replay[i] - trajectory[i]).norm() / scale < 1e-4, i
    for i in range(steps):
        assert (forward_step(pipe, unet, trajectory[i], i, steps, embeds) - trajectory[i + 1]).norm() / scale < 1e-4

    # Negative control: the model really depends on t, so evaluating it one step off misses by far.
    shifted = TimeOnlyEps(latents.shape)
    shifted.eps = lambda sample, t: TimeOnlyEps.eps(unet, sample, t + 1000 // steps)
    off = sample_from(pipe, trajectory[0], embeds, steps, unet=shifted)
    assert rel_err(off[steps], latents) > 10  # measured 52 to 262


# --------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("steps, tol", [(10, 0.03), (25, 0.005)])
def test_reconstruction_with_smooth_denoiser(setup, steps, tol):
    """Unit-variance latents (as SD's scaling factor gives) and the Gaussian-optimal denoiser:
    measured errors 0.0195 (T=10), 0.0032 (T=25); noise from inversion has unit variance."""
    pipe, embeds, latents = setup
    latents = latents / latents.std()
    unet = GaussianDenoiser(pipe.scheduler.alphas_cumprod)
    trajectory = ddim_invert(pipe, latents, embeds, steps, unet=unet)
    assert 0.9 < trajectory[0].std().item() < 1.2  # measured 1.11 (T=10), 1.05 (T=25)

    error = rel_err(sample_from(pipe, trajectory[0], embeds, steps, unet=unet)[steps], latents)
    assert error < tol
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    baseline = rel_err(sample_from(pipe, noise, embeds, steps, unet=unet)[steps], latents)
    assert baseline > 1.0 > 20 * tol  # measured 1.30 (T=10), 1.34 (T=25)


@pytest.mark.parametrize("steps, tol, measured", [(10, 35.0, 29.06), pytest.param(25, 33.0, 26.89, marks=pytest.mark.slow)])
def test_reconstruction_tiny_random(setup, inverted, steps, tol, measured):
    """The tiny random model: measured relative errors 29.06 (T=10), 26.89 (T=25); sampling from
    pure noise instead lands 207.8 / 288.5 away: inversion is > 5x better than the control."""
    pipe, embeds, latents = setup
    trajectory = inverted[steps]
    error = rel_err(sample_from(pipe, trajectory[0], embeds, steps)[steps], latents)
    assert error < tol
    assert error == pytest.approx(measured, rel=0.05)  # a change here means the algorithm changed

    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    baseline = rel_err(sample_from(pipe, noise, embeds, steps)[steps], latents)
    assert baseline > 5 * error
    assert baseline > 150


def test_reconstruction_tiny_random_xl(xl_setup):
    """The same on the tiny SDXL with its conditioning (pooled embedding, time ids): measured relative error 17.14
    at T=10, against 206.7 from pure noise."""
    pipe, cond, latents, _ = xl_setup
    steps = 10
    error = rel_err(sample_from(pipe, ddim_invert(pipe, latents, cond, steps)[0], cond, steps)[steps], latents)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    baseline = rel_err(sample_from(pipe, noise, cond, steps)[steps], latents)
    assert error < 25.0 and baseline > 5 * error


def test_trajectory_alignment_tiny_random(setup, inverted):
    """z_T is the input exactly; each forward step from z_i lands closer to z_{i+1} than z_i is
    (measured distance / step size at T=25: max 0.87, mean 0.37)."""
    pipe, embeds, latents = setup
    steps = 25
    trajectory = inverted[steps]
    assert trajectory.shape == (steps + 1, 1, 4, 16, 16)
    assert torch.equal(trajectory[steps], latents)
    assert torch.equal(inverted[10][10], latents)

    ratios = []
    for i in range(steps):
        landed = forward_step(pipe, pipe.unet, trajectory[i], i, steps, embeds)
        ratios.append(((landed - trajectory[i + 1]).norm() / (trajectory[i + 1] - trajectory[i]).norm()).item())
    assert max(ratios) < 1.0
    assert sum(ratios) / steps < 0.45


# --------------------------------------------------------------------------- options and errors


def test_guidance_combines_negative_and_prompt(family_setup):
    pipe, embeds, latents, empty = family_setup
    plain = ddim_invert(pipe, latents, embeds, 3)
    # u + g (c - u) with u == c is c: guidance with the prompt as negative changes nothing.
    same = ddim_invert(pipe, latents, embeds, 3, guidance_scale=4.0, negative_prompt_embeds=embeds)
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-5)
    guided = ddim_invert(pipe, latents, embeds, 3, guidance_scale=4.0, negative_prompt_embeds=empty)
    assert rel_err(guided[0], plain[0]) > 1e-2
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        ddim_invert(pipe, latents, embeds, 3, guidance_scale=4.0)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        ddim_invert(pipe, latents, embeds, 3, guidance_scale=4.0, negative_prompt_embeds=empty.states[0])


def test_batched_inversion_matches_single(family_setup):
    pipe, embeds, latents, _ = family_setup
    batch = torch.cat([latents, latents.flip(-1)])
    both = ddim_invert(pipe, batch, embeds, 3)  # one prompt for the whole batch
    assert both.shape == (4, 2, 4, 16, 16)
    torch.testing.assert_close(both[:, :1], ddim_invert(pipe, latents, embeds, 3), rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_refused(setup):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe, embeds, latents = setup
    with pytest.raises(ValueError, match="latents"):
        ddim_invert(pipe, latents[0], embeds, 3)
    with pytest.raises(ValueError, match="prompt_embeds"):
        ddim_invert(pipe, latents, embeds.expand(3, -1, -1), 3)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim_invert(pipe, latents, embeds, 0)
    other = StableDiffusionPipeline(**{**pipe.components, "scheduler": PNDMScheduler.from_config(pipe.scheduler.config)})
    with pytest.raises(ValueError, match="DDIMScheduler"):
        ddim_invert(other, latents, embeds, 3)
    # Neither loop touches pipe.scheduler's state.
    assert pipe.scheduler.num_inference_steps is None


# --------------------------------------------------------------------------- encode_image


def test_encode_image_non_square_logs_and_crops_centre(setup, caplog):
    pipe, _, _ = setup
    image = synthetic_image(80, 50)
    with caplog.at_level(logging.INFO, logger="lrkit.inference.inversion"):
        latents = encode_image(pipe, image, 64)
    assert latents.shape == (1, 4, 16, 16)
    assert "80x50" in caplog.text and "64x64" in caplog.text

    # Short side 50 -> 64 makes it 102x64 and the centre crop drops 19 columns (~15 original) per side:
    # images differing only in their outer 10 columns encode identically; in the middle, they do not.
    pixels = np.array(image)
    edges, middle = pixels.copy(), pixels.copy()
    edges[:, :10] = 0
    edges[:, 70:] = 255
    middle[:, 35:45] = 0
    torch.testing.assert_close(encode_image(pipe, PIL.Image.fromarray(edges), 64), latents, rtol=0, atol=0)
    assert not torch.equal(encode_image(pipe, PIL.Image.fromarray(middle), 64), latents)


def test_encode_image_square_is_deterministic_and_quiet(setup, caplog):
    pipe, _, latents = setup
    with caplog.at_level(logging.INFO, logger="lrkit.inference.inversion"):
        again = encode_image(pipe, synthetic_image().convert("RGBA"), 64)
    assert caplog.text == ""
    assert torch.equal(again, latents)
    sampled = encode_image(pipe, synthetic_image(), 64, generator=torch.Generator().manual_seed(1))
    resampled = encode_image(pipe, synthetic_image(), 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, resampled) and not torch.equal(sampled, latents)
    with pytest.raises(ValueError, match="resolution"):
        encode_image(pipe, synthetic_image(), 62)


# --------------------------------------------------------------------------- cache


def test_image_digest(tmp_path):
    image = synthetic_image()
    path = tmp_path / "ref.png"
    image.save(path)
    assert image_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert image_digest(str(path)) == image_digest(path.read_bytes())
    assert image_digest(image) == image_digest(image.copy())
    changed = np.array(image)
    changed[0, 0, 0] ^= 1
    assert image_digest(PIL.Image.fromarray(changed)) != image_digest(image)
    flat = np.zeros((2, 8, 3), np.uint8)
    assert image_digest(PIL.Image.fromarray(flat)) != image_digest(PIL.Image.fromarray(flat.reshape(4, 4, 3)))
    with pytest.raises(TypeError):
        image_digest(42)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cache_round_trip_is_bitwise(tmp_path, dtype):
    cache = TrajectoryCache(tmp_path)
    trajectory = torch.randn(11, 2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    key = TrajectoryCache.key(concept="vase", steps=10)
    assert cache.get(key) is None
    path = cache.put(key, trajectory)
    assert path == tmp_path / "inversions" / f"{key}.safetensors"
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    loaded = cache.get(key)
    assert loaded.dtype == dtype and loaded.shape == trajectory.shape
    assert torch.equal(loaded.view(torch.uint8), trajectory.view(torch.uint8))


def test_cache_key_changes_with_every_part():
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    from lrkit.models import SD_SCHEDULER_CONFIG

    base = dict(
        concept="sks-vase", image=image_digest(synthetic_image()), scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        steps=50, resolution=512, prompt="a photo of sks vase", dtype=torch.float32,
    )
    key = TrajectoryCache.key(**base)
    assert len(key) == 64 and int(key, 16) >= 0
    # Same content -> same key: part order and scheduler object identity do not matter.
    assert TrajectoryCache.key(**dict(reversed(list(base.items())))) == key
    assert TrajectoryCache.key(**{**base, "scheduler": DDIMScheduler(**SD_SCHEDULER_CONFIG)}) == key
    changed = dict(
        concept="sks-cat", image=image_digest(synthetic_image(64, 63)), steps=25, resolution=768,
        prompt="a photo of sks jar", dtype=torch.float16,
        scheduler=DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "timestep_spacing": "trailing"}),
    )
    keys = {name: TrajectoryCache.key(**{**base, name: value}) for name, value in changed.items()}
    keys["scheduler class"] = TrajectoryCache.key(**{**base, "scheduler": DDIMInverseScheduler(**SD_SCHEDULER_CONFIG)})
    keys["extra part"] = TrajectoryCache.key(**base, guidance=1.0)
    assert key not in keys.values()
    assert len(set(keys.values())) == len(keys)
    with pytest.raises(TypeError, match="weird"):
        TrajectoryCache.key(weird=object())


def test_get_or_compute_computes_once(tmp_path):
    cache = TrajectoryCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(24, dtype=torch.float32).view(3, 1, 2, 2, 2)

    key = TrajectoryCache.key(concept="x")
    first, hit1 = cache.get_or_compute(key, compute)
    second, hit2 = cache.get_or_compute(key, compute)
    assert (hit1, hit2) == (False, True)
    assert len(calls) == 1
    assert torch.equal(first, second)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong tensor"])
def test_corrupt_cache_file_is_recomputed_with_warning(tmp_path, caplog, damage):
    from safetensors.torch import save

    cache = TrajectoryCache(tmp_path)
    key = TrajectoryCache.key(concept="x")
    good = torch.randn(3, 1, 4, 2, 2)
    path = cache.put(key, good)
    if damage == "garbage":
        path.write_bytes(b"\x00garbage, not safetensors" * 7)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-17])
    else:
        path.write_bytes(save({"something_else": good}))
    calls = []
    with caplog.at_level(logging.WARNING, logger="lrkit.inference.inversion"):
        result, hit = cache.get_or_compute(key, lambda: calls.append(1) or good)
    assert not hit and len(calls) == 1 and torch.equal(result, good)
    assert "recomputing" in caplog.text and str(path) in caplog.text
    assert torch.equal(cache.get(key), good)  # overwritten with a valid file


def test_cache_writes_are_atomic(tmp_path, monkeypatch):
    cache = TrajectoryCache(tmp_path)
    key = TrajectoryCache.key(concept="x")
    old = torch.zeros(2, 1, 4, 2, 2)
    cache.put(key, old)
    cache.put(key, old + 1)  # overwrite
    cache.put(TrajectoryCache.key(concept="y"), old)
    assert sorted(p.suffix for p in cache.dir.iterdir()) == [".safetensors", ".safetensors"]

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)  # the write dies just before the rename
    with pytest.raises(OSError, match="disk full"):
        cache.put(key, old + 2)
    monkeypatch.undo()
    assert torch.equal(cache.get(key), old + 1)  # readers still see the whole previous file
    assert len(list(cache.dir.iterdir())) == 2  # and no temporary file is left behind


def test_cache_write_failure_does_not_fail_generation(tmp_path, monkeypatch, caplog):
    cache = TrajectoryCache(tmp_path)

    def refuse(key, trajectory):
        raise PermissionError("read-only cache")

    monkeypatch.setattr(cache, "put", refuse)
    with caplog.at_level(logging.WARNING, logger="lrkit.inference.inversion"):
        result, hit = cache.get_or_compute(TrajectoryCache.key(concept="x"), lambda: torch.ones(2, 1, 1, 1, 1))
    assert not hit and torch.equal(result, torch.ones(2, 1, 1, 1, 1))
    assert "read-only cache" in caplog.text


def test_cache_location_and_key_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("LRKIT_CACHE", str(tmp_path / "env"))
    assert TrajectoryCache().dir == tmp_path / "env" / "inversions"
    monkeypatch.delenv("LRKIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert TrajectoryCache().dir == tmp_path / "home" / ".cache" / "lrkit" / "inversions"
    with pytest.raises(ValueError, match="sha256"):
        TrajectoryCache(tmp_path).get("../../etc/passwd")
