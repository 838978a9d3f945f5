"""Training options: caches are exact, min-SNR weighting, mixed precision keeps trainables fp32, etc."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lrkit.training import train_concept
from lrkit.training.config import load_config
from lrkit.training.model import ConceptModel
from lrkit.training.module import ConceptDataModule, StepSampler, collate



@pytest.fixture(scope="module")
def photos(vase_photos) -> Path:
    return vase_photos(2)


def small_config(photos: Path, **overrides):
    base = dict(base="tiny-random", method="lora", data={"photos": str(photos), "class_word": "vase", "resolution": 64,
                                                         "repeats": 1, "random_flip": 0.5})
    return load_config(base, **overrides)


def a_batch(config) -> tuple[dict, ConceptDataModule]:
    dm = ConceptDataModule(config)
    items = [dict(dm.instance[i], source="instance", counter=i) for i in range(4)]
    return collate(items), dm


def generators(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in range(n)]


def test_cached_latents_and_text_give_the_same_loss(photos):
    config = small_config(photos)
    batch, dm = a_batch(config)
    plain = ConceptModel(config)
    expected, _ = plain.loss(batch, generators(4))

    cached_config = small_config(photos, cache_latents=True, cache_text_embeddings=True)
    cached = ConceptModel(cached_config, pipe=None)
    cached.load_state_dict(plain.state_dict())
    cached.cache_latents(dm.cacheable_items())
    assert len(cached._latent_cache) == 4  # 2 photos x (plain, flipped)
    got, _ = cached.loss(batch, generators(4))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert cached._text_cache  # the caption was encoded once and reused
    got_again, _ = cached.loss(batch, generators(4))
    torch.testing.assert_close(got_again, expected, atol=1e-6, rtol=1e-6)


def test_latent_cache_is_filled_in_chunks_of_the_training_batch(photos, tmp_path, monkeypatch):
    """The cache is encoded at fit start in batches no larger than a training step's, so filling it never
    raises the run's peak memory above an uncached run's (the VAE's activations at 512 px are GBs)."""
    from diffusers import AutoencoderKL

    sizes = []
    encode = AutoencoderKL.encode

    def recording_encode(self, x, *args, **kwargs):
        sizes.append(x.shape[0])
        return encode(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", recording_encode)
    config = small_config(photos, data={"photos": str(photos), "class_word": "vase", "resolution": 64, "repeats": 1,
                                        "random_flip": 0.5, "batch_size": 3}, cache_latents=True)
    train_concept(config, output_dir=str(tmp_path / "run"), max_steps=1, accelerator="cpu")
    assert sum(sizes) == 4 and sizes == [3, 1]  # 2 photos x (plain, flipped), encoded once, 3 at a time


def test_text_cache_is_off_when_text_encoder_trains(photos):
    config = small_config(photos, cache_text_embeddings=True, lora={"train_text_encoder": True})
    assert not ConceptModel(config).cache_text


def test_min_snr_weighting_matches_the_formula(photos):
    from diffusers.training_utils import compute_snr

    config = small_config(photos)
    batch, _ = a_batch(config)
    model = ConceptModel(config)
    plain, _ = model.loss(batch, generators(4))
    model.config = small_config(photos, min_snr_gamma=5.0)
    weighted, _ = model.loss(batch, generators(4))

    # Recompute by hand with the same draws.
    params = model.latent_params(batch)
    latents, noise, t = model.sample_noise(params, generators(4))
    noisy = model.noise_scheduler.add_noise(latents, noise, t)
    pred = model.unet(noisy, t, model.encode_text(batch["caption"])).sample
    per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    snr = compute_snr(model.noise_scheduler, t)
    expected = (per * torch.clamp(snr, max=5.0) / snr).mean()
    torch.testing.assert_close(weighted, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(plain, per.mean(), atol=1e-6, rtol=1e-5)


def test_noise_offset_changes_only_the_noise(photos):
    config = small_config(photos)
    model = ConceptModel(config)
    params = torch.zeros(2, 8, 16, 16)
    _, noise0, t0 = model.sample_noise(params, generators(2))
    model.config = small_config(photos, noise_offset=0.1)
    _, noise1, t1 = model.sample_noise(params, generators(2))
    diff = noise1 - noise0
    assert torch.equal(t0, t1)
    assert diff.abs().max() > 0
    # The offset is constant over each channel's pixels.
    torch.testing.assert_close(diff, diff[..., :1, :1].expand_as(diff))


def test_step_sampler_is_a_function_of_the_step():
    sampler = StepSampler(10, batch_size=2, seed=3, rank=0, world_size=1, current_step=lambda: 0)
    full = list(sampler)
    assert len(full) == len(sampler) == 10
    assert sorted(c % 10 for c in full) == list(range(10))  # one pass covers every sample once
    resumed = StepSampler(10, batch_size=2, seed=3, current_step=lambda: 3)
    assert list(resumed) == full[6:]
    ranks = [list(StepSampler(10, batch_size=1, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert [c for pair in zip(*ranks) for c in pair] == full


@pytest.mark.slow
def test_mixed_precision_options_and_validation_images(photos, tmp_path, capture_trained_model):
    out = tmp_path / "run"
    with capture_trained_model() as captured:
        bundle = train_concept(
            small_config(photos), output_dir=str(out), max_steps=4, precision="bf16-mixed", accelerator="cpu",
            gradient_checkpointing=True, min_snr_gamma=5.0, noise_offset=0.05, cache_latents=True,
            optim={"optimizer": "adamw8bit", "lr": 1e-3}, log_every_n_steps=1,
            validation={"prompts": ["a photo of {token} {class}"], "every_n_steps": 2, "num_inference_steps": 2},
        )
    model = captured["model"]
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    assert model.unet.conv_in.weight.dtype == torch.bfloat16  # frozen weights in the autocast dtype
    assert model.unet.is_gradient_checkpointing
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == [
        "step000002_00.png", "step000004_00.png"]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in model.trainable_state_dict()}  # adapter-only
    states = ckpt["optimizer_states"][0]["state"].values()
    assert states and all("__bnb_optimizer_quant_state__" in st and "exp_avg" not in st for st in states)  # 8-bit AdamW
    assert (bundle / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("method, trained", [("lora", {"unet"}), ("textual_inversion", {"text_encoder"}),
                                             ("dreambooth", {"unet"})])
def test_modules_that_train_are_in_train_mode_and_frozen_ones_in_eval(photos, method, trained):
    """from_pretrained hands modules over in eval mode, which would switch LoRA dropout off in training."""
    from lrkit.models import build_tiny_random

    pipe = build_tiny_random(0)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.eval()  # as diffusers' and transformers' from_pretrained return them
    config = small_config(photos, method=method, lora={"dropout": 0.1, "train_text_encoder": False})
    model = ConceptModel(config, pipe=pipe)

    def modes() -> dict[str, bool]:
        return {name: getattr(model, name).training for name in ("vae", "text_encoder", "unet")}

    expected = {name: name in trained for name in ("vae", "text_encoder", "unet")}
    assert modes() == expected
    if method == "lora":
        dropouts = [m for n, m in model.unet.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
        assert dropouts and all(m.training for m in dropouts)
    model.eval()
    assert not any(modes().values())
    model.train()
    assert modes() == expected


def test_training_raises_no_warning_about_the_batch_hook_eval_modules_or_short_epochs(photos, tmp_path, recwarn):
    """The batch hook lives on the datamodule (Lightning warns when the LightningModule overrides it); the
    frozen modules' eval mode is intended, and epochs shorter than the logging interval still log every n
    steps, so train_concept silences Lightning's warnings about those two."""
    import csv

    out = tmp_path / "run"
    # 2 photos x batch 1 = epochs of 2 steps, logging every 3 steps
    train_concept(small_config(photos, data={"batch_size": 1}), output_dir=str(out), max_steps=7, accelerator="cpu",
                  log_every_n_steps=3, validation={"prompts": []})
    messages = [str(w.message) for w in recwarn]
    noise = ("transfer_batch_to_device", "in eval mode", "smaller than the logging interval")
    assert not [m for m in messages if any(n in m for n in noise)], messages
    rows = [r for r in csv.DictReader(open(out / "logs" / "metrics.csv")) if r.get("loss")]
    assert [int(r["step"]) for r in rows] == [2, 5]  # Lightning's 0-based steps 2 and 5: every 3 steps


def test_progress_bar_counts_steps_across_epochs(photos, tmp_path, capsys):
    """One bar over max_steps, not one per epoch (2 photos at batch 1 make epochs of 2 steps)."""
    train_concept(small_config(photos, data={"batch_size": 1}), output_dir=str(tmp_path / "run"), max_steps=5,
                  accelerator="cpu", validation={"prompts": []})
    captured = capsys.readouterr()
    shown = captured.out + captured.err  # Lightning's bars write to stdout
    assert "training: 100%" in shown and "5/5" in shown, shown[-2000:]
    assert "Epoch" not in shown
