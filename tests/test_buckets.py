"""Aspect-ratio buckets: which bucket each photo trains in, how it is cropped, batches of one bucket, the latent cache
per bucket, SDXL's time ids of bucketed samples, the run's record, and (slow) resume after SIGKILL and two processes
against one."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from launching import ROOT, kill_at_first_checkpoint, run
from lrkit.families import SDXL
from lrkit.models import load_base
from lrkit.photos import load_images
from lrkit.training import train_concept
from lrkit.training.buckets import bucket_sizes, buckets_for, nearest_bucket, plan_buckets
from lrkit.training.config import load_config
from lrkit.training.data import PhotoDataset
from lrkit.training.folder import training_inputs
from lrkit.training.model import ConceptModel
from lrkit.training.module import ConceptDataModule, PairedDataset, StepSampler, check_bucket_sizes, collate
from lrkit.training.options import ConfigError, TrainingError

# The shipped vase photos cropped to four shapes (width, height); at 64 px and step 16 their buckets are
# (height, width) 48x96, 80x48, 64x64 and 48x80.
SHAPES = {"a_wide.png": (1080, 540), "b_tall.png": (648, 1080), "c_square.png": (1080, 1080),
          "d_landscape.png": (1080, 810)}
BUCKETS = [(48, 96), (80, 48), (64, 64), (48, 80)]
SHAPES_HW = [(h, w) for w, h in SHAPES.values()]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Four photos of four shapes, cut from the shipped vase photos (so they hold a real subject)."""
    source = sorted((Path(__file__).resolve().parents[1] / "data" / "subjects" / "vase").glob("*.jpg"))
    folder = tmp_path_factory.mktemp("mixed")
    for photo, (name, (w, h)) in zip(source, SHAPES.items()):
        with Image.open(photo) as image:
            image = image.convert("RGB")
            left, top = (image.width - w) // 2, (image.height - h) // 2
            image.crop((left, top, left + w, top + h)).save(folder / name)
    return folder


def config(photos: Path, out: Path | str = "unused", *, data: dict | None = None, **overrides):
    base = dict(base="tiny-random", method="lora", output_dir=str(out), accelerator="cpu", validation=dict(prompts=[]),
                data={"photos": str(photos), "class_word": "vase", "resolution": 64, "bucket_step": 16, "repeats": 1,
                      **(data or {})})
    return load_config(base, **overrides)


# ------------------------------------------------------------------------------------------------ the buckets


def test_bucket_sizes_are_multiples_of_the_step_of_about_the_training_area_within_the_aspect_limit():
    for resolution, step, max_aspect in ((512, 64, 2.0), (1024, 64, 2.0), (768, 64, 1.5), (64, 16, 2.0)):
        sizes = bucket_sizes(resolution, max_aspect=max_aspect, step=step)
        assert (resolution, resolution) in sizes
        assert sizes == sorted({(w, h) for h, w in sizes})  # every shape comes with its transpose
        for h, w in sizes:
            assert h % step == 0 and w % step == 0
            assert max(h, w) <= max_aspect * min(h, w)
            # the short side is the multiple of step nearest area / long side: within half a step's strip of it
            assert abs(h * w - resolution**2) <= step * max(h, w) / 2
    # the buckets README and `bucket_sizes` name at 512 px
    landscape = [(h, w) for h, w in bucket_sizes(512) if w >= h]
    assert landscape == [(384, 640), (384, 704), (448, 576), (512, 512)]


def test_a_photo_goes_to_the_bucket_of_the_nearest_aspect_ratio():
    sizes = bucket_sizes(512)
    assert nearest_bucket(4000, 3000, sizes) == (448, 576)  # 4:3 -> 1.29
    assert nearest_bucket(3000, 4000, sizes) == (576, 448)
    assert nearest_bucket(1920, 1080, sizes) == (384, 704)  # 16:9 = 1.78 -> 1.83 (1.67 is farther)
    assert nearest_bucket(5000, 1000, sizes) == (384, 704)  # beyond max_aspect: the widest
    assert nearest_bucket(1000, 1000, sizes) == (512, 512)


def test_a_mixed_shape_folder_gets_the_documented_buckets(mixed, vase_photos):
    dm = ConceptDataModule(config(mixed))
    assert [p.name for p in dm.photos] == list(SHAPES)
    assert list(dm.buckets.photo_sizes) == BUCKETS and dm.buckets.sizes == sorted(BUCKETS)
    assert buckets_for(config(mixed, data=dict(buckets=False)), dm.photos) is None
    # auto: square crops when every photo is nearest the same bucket (one shape)
    square = vase_photos(3)
    assert ConceptDataModule(config(square)).buckets is None
    assert ConceptDataModule(config(square, data=dict(buckets=True))).buckets.sizes == [(64, 64)]
    # at the default step of 64, a 64 px area has the square bucket only: mixed shapes train as squares
    assert ConceptDataModule(config(mixed, data=dict(bucket_step=64))).buckets is None


def test_photos_too_small_for_their_bucket_train_in_a_smaller_one_named_in_one_warning(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for name, (w, h) in {"big.png": (200, 100), "small_wide.png": (40, 20), "small_tall.png": (24, 40)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    with caplog.at_level(logging.WARNING, logger="lrkit.training.module"):
        dm = ConceptDataModule(config(tmp_path, data=dict(min_size=16, max_upscale=1.5)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "data.max_upscale=1.5" in warnings[0], warnings
    assert "small_wide.png (40x20 px): 48x96 -> 16x48" in warnings[0]
    assert "small_tall.png (24x40 px): 80x48 -> 48x32" in warnings[0] and "big.png" not in warnings[0]
    for i, photo in enumerate(dm.photos):
        item = dm.instance.sample(i, dm.buckets.size_of(i))
        h, w = item["target_size"]
        assert max(h / photo.image.height, w / photo.image.width) <= 1.5  # never upscaled beyond max_upscale


def test_a_bucketed_sample_is_the_minimal_crop_of_the_photo_resized_to_cover_its_bucket(mixed):
    shots = load_images(mixed)
    plan = plan_buckets([(p.name, *p.image.size) for p in shots], resolution=64, step=16)
    for center in (True, False):
        dataset = PhotoDataset(shots, resolution=64, token="sks", class_word="vase", center_crop=center,
                               random_flip=0.5, seed=3)
        for i in range(16):
            size = plan.size_of(i)
            item = dataset.sample(i, size)
            photo = shots[item["photo_index"]]
            assert item["target_size"] == size and item["pixel_values"].shape == (3, *size)
            assert item["original_size"] == (photo.image.height, photo.image.width)
            resized = dataset._resized(item["photo_index"], size)  # (3, H, W) uint8
            _, H, W = resized.shape
            assert (H == size[0] and W >= size[1]) or (W == size[1] and H >= size[0])  # one side fits exactly
            if item["flipped"]:
                resized = resized.flip(-1)
            top, left = item["crop_top_left"]
            crop = resized[:, top:top + size[0], left:left + size[1]].float() / 127.5 - 1.0
            assert torch.equal(crop, item["pixel_values"])
            if center:
                assert (top, left) == ((H - size[0]) // 2, (W - size[1]) // 2)


def test_buckets_on_a_square_folder_give_exactly_the_square_samples(vase_photos):
    photos = vase_photos(3)
    square = ConceptDataModule(config(photos, data=dict(buckets=False, center_crop=False, random_flip=0.5)))
    bucketed = ConceptDataModule(config(photos, data=dict(buckets=True, center_crop=False, random_flip=0.5)))
    plain = PairedDataset(square.instance, None)
    paired = PairedDataset(bucketed.instance, None, buckets=bucketed.buckets)
    for i in range(9):
        a, b = plain[i], paired[i]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["crop_top_left"] == b["crop_top_left"]


# ------------------------------------------------------------------------------------------------ batches


@pytest.mark.parametrize("batch_size, world_size", [(1, 1), (2, 1), (1, 2), (3, 2)])
def test_every_batch_comes_from_one_bucket_on_every_rank(mixed, batch_size, world_size):
    dm = ConceptDataModule(config(mixed, data=dict(repeats=3)))
    dataset = PairedDataset(dm.instance, None, buckets=dm.buckets)
    groups = dm.buckets.groups(len(dataset))
    samplers = [StepSampler(len(dataset), batch_size=batch_size, seed=5, rank=r, world_size=world_size,
                            groups=groups) for r in range(world_size)]
    steps = 3 * samplers[0].steps_per_epoch
    seen = set()
    for step in range(steps):
        counters = [s.counter(step, b) for s in samplers for b in range(batch_size)]
        assert len({dm.buckets.size_of(c) for c in counters}) == 1, (step, counters)
        assert len(set(counters)) == len(counters)  # no sample twice in one step
        batch = collate([dataset[c] for c in counters])
        assert batch["pixel_values"].shape[-2:] == tuple(batch["target_size"][0].tolist())
        seen.update(counters)
    assert {c % len(dataset) for c in seen} == set(range(len(dataset)))  # every sample trained
    assert len(seen) == steps * batch_size * world_size  # counters never repeat: augmentation differs


def test_the_bucketed_sampler_is_a_function_of_the_step_and_shards_like_one_process(mixed):
    dm = ConceptDataModule(config(mixed, data=dict(repeats=2)))
    groups = dm.buckets.groups(8)
    one = StepSampler(8, batch_size=2, seed=3, groups=groups, current_step=lambda: 0)
    epoch = list(one)
    assert len(epoch) == len(one) == 2 * one.steps_per_epoch == 8
    assert sorted(c % 8 for c in epoch) == list(range(8))  # each bucket's two samples: one step each
    resumed = StepSampler(8, batch_size=2, seed=3, groups=groups, current_step=lambda: 2)
    assert list(resumed) == epoch[4:]
    far = [StepSampler(8, batch_size=2, seed=3, groups=groups).counter(s, b) for s in range(40, 44) for b in (0, 1)]
    assert far == [one.counter(s, b) for s in range(40, 44) for b in (0, 1)]  # whatever the sampler saw before
    ranks = [[StepSampler(8, batch_size=1, seed=3, rank=r, world_size=2, groups=groups).counter(s, 0)
              for s in range(12)] for r in (0, 1)]
    assert [c for pair in zip(*ranks) for c in pair] == [one.counter(s, b) for s in range(12) for b in (0, 1)]
    other_seed = StepSampler(8, batch_size=2, seed=4, groups=groups)
    assert [other_seed.counter(s, 0) for s in range(40)] != [one.counter(s, 0) for s in range(40)]


def test_one_group_is_the_unbucketed_stream():
    plain = StepSampler(10, batch_size=2, seed=3, rank=1, world_size=2)
    grouped = StepSampler(10, batch_size=2, seed=3, rank=1, world_size=2, groups=[list(range(10))])
    assert [plain.counter(s, b) for s in range(20) for b in (0, 1)] == \
        [grouped.counter(s, b) for s in range(20) for b in (0, 1)]
    with pytest.raises(ValueError, match="groups must be non-empty and split"):
        StepSampler(4, batch_size=1, seed=0, groups=[[0, 1], [1, 2, 3]])


def test_a_batch_that_mixes_bucket_sizes_is_refused(mixed):
    dm = ConceptDataModule(config(mixed))
    dataset = PairedDataset(dm.instance, None, buckets=dm.buckets)
    with pytest.raises(ValueError, match=r"one size \(one bucket\), got \[\(48, 96\), \(80, 48\)\]"):
        collate([dataset[0], dataset[1]])


# ------------------------------------------------------------------------------------------------ class images


@pytest.fixture(scope="module")
def class_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("class")
    rng = np.random.default_rng(1)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"class_{k:05d}.png")
    return folder


def dreambooth(mixed: Path, class_images: Path, **overrides):
    return config(mixed, method="dreambooth", dreambooth=dict(class_dir=str(class_images), num_class_images=3),
                  **overrides)


def test_class_images_are_cropped_to_the_bucket_of_the_photo_they_pair_with(mixed, class_images):
    dm = ConceptDataModule(dreambooth(mixed, class_images))
    dm.setup()
    dataset = PairedDataset(dm.instance, dm.prior, buckets=dm.buckets)
    for i in range(12):
        item = dataset[i]
        instance, prior = item["instance"], item["prior"]
        assert prior["pixel_values"].shape == instance["pixel_values"].shape == (3, *BUCKETS[i % 4])
        assert prior["photo_index"] == i % 3 and prior["caption"] == "a photo of vase"
        assert torch.equal(prior["pixel_values"], dm.prior.sample(i, BUCKETS[i % 4])["pixel_values"])


def test_the_latent_cache_holds_each_sample_at_its_bucket_and_never_another_size(mixed, class_images):
    plain_config = dreambooth(mixed, class_images, data=dict(random_flip=0.5))
    dm = ConceptDataModule(plain_config)
    dm.setup()
    dataset = PairedDataset(dm.instance, dm.prior, buckets=dm.buckets)
    plain = ConceptModel(plain_config)
    cached = ConceptModel(dreambooth(mixed, class_images, data=dict(random_flip=0.5), cache_latents=True))
    cached.load_state_dict(plain.state_dict())
    cached.cache_latents(dm.cacheable_items(), batch_size=3)
    # 4 photos x 2 flips; class image k pairs with photo k, k+4, k+8 ... (mod 3): each class image in every bucket
    instance_keys = {k for k in cached._latent_cache if k[0] == "instance"}
    assert instance_keys == {("instance", p, f, *BUCKETS[p]) for p in range(4) for f in (False, True)}
    assert {k for k in cached._latent_cache if k[0] == "class"} == \
        {("class", c, f, *BUCKETS[p]) for c in range(3) for p in range(4) for f in (False, True)}
    for k, latent in cached._latent_cache.items():
        assert latent.shape[-2:] == (k[-2] // 4, k[-1] // 4)  # the tiny VAE's 4x
    for i in (0, 1, 2, 5):
        batch = collate([dataset[i]])
        gens = lambda: [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]  # noqa: E731
        torch.testing.assert_close(cached.loss(batch, gens())[0], plain.loss(batch, gens())[0], atol=1e-6, rtol=1e-6)
    # a sample of another size than any cached one is refused, not served another bucket's latent
    square = collate([{**dataset[0]["instance"], "pixel_values": torch.zeros(3, 64, 64)}])
    with pytest.raises(RuntimeError, match=r"\('instance', 0, False, 64, 64\) was not cached"):
        cached.latent_params(square)


def test_a_bucket_step_the_unet_cannot_halve_is_refused(mixed):
    cfg = config(mixed, data=dict(bucket_step=8, max_aspect=1.5))
    dm = ConceptDataModule(cfg)
    assert any(h % 16 or w % 16 for h, w in dm.buckets.sizes)
    with pytest.raises(ConfigError, match=r"multiples of 16 px; set data.bucket_step to a multiple of 16 \(now 8\)"):
        check_bucket_sizes(dm.buckets, ConceptModel(cfg), cfg)
    check_bucket_sizes(ConceptDataModule(config(mixed)).buckets, ConceptModel(cfg), cfg)  # step 16 fits


# ------------------------------------------------------------------------------------------------ SDXL


def test_sdxl_bucketed_samples_carry_original_size_crop_and_bucket_in_their_time_ids(mixed):
    """Each sample's time ids are (original height, width, crop top, left, bucket height, width), as `SDXL.time_ids`
    builds them for a generation of that size, and the step's UNet call gets them."""
    cfg = config(mixed, base="tiny-random-xl", data=dict(center_crop=False, random_flip=0.5, repeats=3))
    pipe = load_base("tiny-random-xl")
    model = ConceptModel(cfg, pipe=pipe)
    dm = ConceptDataModule(cfg)
    dataset = PairedDataset(dm.instance, None, buckets=dm.buckets)
    for photo in range(4):
        counters = [photo, photo + 4, photo + 8]  # one bucket: one photo, three random crops
        items = [dataset[c] for c in counters]
        batch = collate(items)
        cond = model.conditioning(batch["caption"], batch)
        for row, item in zip(cond.time_ids, items):
            h, w = BUCKETS[photo]
            expected = SDXL.time_ids(pipe, h, w, original=item["original_size"], crop=item["crop_top_left"])
            assert torch.equal(row, expected[0])
            assert row.tolist()[:2] == list(SHAPES_HW[photo]) and row.tolist()[4:] == [h, w]
    # the UNet call of a non-square bucket's step, against the stock UNet with those time ids
    items = [dataset[c] for c in (0, 4)]
    batch = collate(items)
    generators = lambda: [torch.Generator().manual_seed(10 + i) for i in range(2)]  # noqa: E731
    loss, _ = model.loss(batch, generators())
    states, _, pooled, _ = pipe.encode_prompt(batch["caption"], device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    latents, noise, t = model.sample_noise(model.latent_params(batch), generators())
    time_ids = torch.cat([SDXL.time_ids(pipe, 48, 96, original=it["original_size"], crop=it["crop_top_left"])
                          for it in items])
    pred = pipe.unet(model.noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=states,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    torch.testing.assert_close(loss, ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mean(), atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ the record


def test_each_photos_bucket_is_a_training_input(mixed):
    photos = ConceptDataModule(config(mixed)).photos
    inputs = training_inputs(config(mixed), photos)
    assert inputs["data"]["buckets"] == [list(b) for b in BUCKETS]
    assert training_inputs(config(mixed, data=dict(buckets=False)), photos)["data"]["buckets"] is None
    # an option that moves no photo leaves the record as it is; one that moves a photo changes it
    assert training_inputs(config(mixed, data=dict(max_aspect=2.2)), photos) == inputs
    assert training_inputs(config(mixed, data=dict(max_aspect=1.5)), photos)["data"]["buckets"] != \
        inputs["data"]["buckets"]


def test_resuming_with_other_buckets_is_refused(mixed, tmp_path):
    out = tmp_path / "run"
    train_concept(config(mixed, out, max_steps=4, data=dict(repeats=1)))  # an epoch: 4 steps, one per bucket
    with pytest.raises(TrainingError, match=r"other inputs \(data.buckets: \[\[48, 96\], .* -> \(unset\)\)"):
        train_concept(config(mixed, out, max_steps=8, overwrite=True, data=dict(buckets=False)))
    # at max_aspect 1.8 the widest bucket is 48x80: the 2:1 photo moves there
    with pytest.raises(TrainingError, match=r"data.buckets: \[\[48, 96\], \[80, 48\].* -> \[\[48, 80\], \[80, 48\]"):
        train_concept(config(mixed, out, max_steps=8, overwrite=True, data=dict(max_aspect=1.8)))


# ------------------------------------------------------------------------------------------------ launched runs


def launch_args(out: Path, photos: Path, *extra: str) -> list[str]:
    return [str(ROOT / "train/train.py"), "--config", str(ROOT / "configs/demo.yaml"), "--data.photos", str(photos),
            "--data.bucket_step", "16", "--data.repeats", "2", "--validation.prompts", "[]", "--output_dir", str(out),
            *extra]


def lora_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "concept" / "pytorch_lora_weights.safetensors")


@pytest.mark.slow
def test_bucketed_resume_after_sigkill_ends_bit_identical(tmp_path, mixed):
    # random crops and flips (per-sample counters), LoRA dropout (the global RNG), batches of 2 from one bucket:
    # an epoch is 4 steps (one per bucket), a checkpoint every epoch
    steps = ["--max_steps", "12", "--lora.dropout", "0.1", "--data.batch_size", "2", "--data.center_crop", "false"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    log = run([sys.executable, *launch_args(straight, mixed, *steps)])
    assert "48x80: 1, 48x96: 1, 64x64: 1, 80x48: 1" in log.stdout + log.stderr

    kill_at_first_checkpoint([sys.executable, *launch_args(killed, mixed, *steps)], killed, 12)

    resumed = run([sys.executable, *launch_args(killed, mixed, *steps)])
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    a, b = lora_weights(straight), lora_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)


@pytest.mark.slow
def test_two_processes_with_buckets_equal_one_process_with_twice_the_batch(tmp_path, mixed):
    steps = ["--max_steps", "8", "--lora.dropout", "0.0", "--data.center_crop", "false"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run([sys.executable, *launch_args(single, mixed, *steps, "--data.batch_size", "2")])
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                *launch_args(ddp, mixed, *steps, "--data.batch_size", "1")])
    assert "rank 1/2 finished training at step 8" in proc.stdout + proc.stderr
    a, b = lora_weights(single), lora_weights(ddp)
    assert a.keys() == b.keys()
    # Each rank took one of the two samples of the step's bucket, gradients averaged: the single process's
    # weights up to reduction order (AdamW normalises each gradient, so a near-zero one may flip sign: compare
    # the whole update, LoRA's B matrices, which start at zero).
    update_a = torch.cat([a[k].flatten() for k in sorted(a) if "lora_B" in k])
    update_b = torch.cat([b[k].flatten() for k in sorted(a) if "lora_B" in k])
    assert update_b.norm() > 0.5 * update_a.norm() > 0
    assert (update_a - update_b).norm() < 1e-3 * update_a.norm(), ((update_a - update_b).norm() / update_a.norm())
