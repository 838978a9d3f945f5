"""The embedded toy base model: offline loading, architecture, size, fidelity; its pretraining code."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from lrkit.attention import attention_layers, cross_layers_at, decoder_self_layers
from lrkit.models import load_base

TOY_DIR = Path(__file__).resolve().parents[1] / "lrkit" / "assets" / "toy"
MAX_ASSET_BYTES = 20 * 1024 * 1024
# Measured on the shipped weights (MODEL_CARD.md), 25 DDIM steps, guidance 6, over the 8 prompts below:
# scenes 8/8, 7/8, 8/8 and colours 8/8, 7/8, 8/8 with seeds 0-7, 100-107, 200-207. A random model
# scores about 1/8 on each. The thresholds leave a margin of one miss below the worst measurement.
FIDELITY_PROMPTS = [
    ("a photo of a red ball on the beach", "beach"),
    ("a photo of a blue cube in the snow", "snow"),
    ("a photo of a yellow star under the night sky", "night"),
    ("a photo of a red vase on the grass", "grass"),
    ("a photo of a blue mug in the desert", "desert"),
    ("a photo of a yellow teapot in front of a brick wall", "brick"),
    ("a photo of a yellow cone on the beach", "beach"),
    ("a photo of a red mushroom in the snow", "snow"),
]
MIN_SCENE_HITS = 6
MIN_COLOUR_HITS = 6


@pytest.fixture(scope="module")
def toy_pipe():
    return load_base("toy")


def test_toy_loads_offline_as_float32(toy_pipe):
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert toy_pipe.unet.dtype == torch.float32 and toy_pipe.vae.dtype == torch.float32
    config = toy_pipe.text_encoder.config
    assert (config.vocab_size, config.max_position_embeddings) == (49408, 77)
    assert len(toy_pipe.tokenizer) == 49408
    assert toy_pipe.vae.config.scaling_factor != pytest.approx(0.18215)  # measured, not SD's


def test_toy_has_cross_attention_at_two_resolutions_and_swap_layers(toy_pipe):
    unet = toy_pipe.unet
    cross_levels = {layer.level for layer in attention_layers(unet) if layer.is_cross and layer.place != "mid"}
    assert len(cross_levels) >= 2
    assert {layer.place for layer in attention_layers(unet) if layer.is_cross} >= {"down", "up"}
    assert len({layer.level for layer in decoder_self_layers(unet)}) == 2
    assert cross_layers_at(unet)  # the maps Layout-and-Retouch reads


def test_toy_assets_fit_the_budget():
    files = [p for p in TOY_DIR.rglob("*") if p.is_file()]
    assert (TOY_DIR / "model_index.json").is_file() and (TOY_DIR / "MODEL_CARD.md").is_file()
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 3  # vae, text encoder, unet
    assert sum(p.stat().st_size for p in files) <= MAX_ASSET_BYTES


def test_toy_generations_show_the_prompted_scene_and_colour(toy_pipe):
    from lrkit.toyworld import classify_scene, object_color, segment_object

    prompts = [p for p, _ in FIDELITY_PROMPTS]
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = toy_pipe(prompts, num_inference_steps=25, guidance_scale=6.0, height=64, width=64,
                      generator=generators).images
    hits = sum(classify_scene(image)[0] == scene for image, (_, scene) in zip(images, FIDELITY_PROMPTS))
    assert hits >= MIN_SCENE_HITS, f"{hits}/{len(prompts)} generations show the prompted scene"
    colours = [object_color(image, mask) if (mask := segment_object(image)).any() else None for image in images]
    colour_hits = sum(c == prompt.split()[4] for c, prompt in zip(colours, prompts))
    assert colour_hits >= MIN_COLOUR_HITS, f"{colour_hits}/{len(prompts)} objects have the prompted colour: {colours}"


@pytest.mark.slow
def test_pretrain_smoke_writes_a_loadable_pipeline_and_resumes(tmp_path):
    from diffusers import StableDiffusionPipeline

    from lrkit.toyworld.pretrain import pretrain

    small = dict(pool_size=16, batch_size=4, vae_batch_size=4, refresh_per_step=1, warmup_steps=2, num_threads=1)
    out = pretrain(tmp_path, minutes=5, seed=3, max_steps=2, vae_steps=2, **small)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())["state"]
    assert (state["phase"], state["vae_step"], state["step"]) == ("unet", 2, 2)
    pipe = StableDiffusionPipeline.from_pretrained(str(out), dtype=torch.float32, use_safetensors=True,
                                                   safety_checker=None, requires_safety_checker=False)
    assert pipe.vae.config.scaling_factor == pytest.approx(state["scaling_factor"])
    assert next(pipe.unet.parameters()).dtype == torch.float32
    with pytest.raises(FileExistsError):
        pretrain(tmp_path, minutes=5, seed=3, max_steps=2, vae_steps=2, **small)

    pretrain(tmp_path, minutes=5, seed=3, resume=True, max_steps=3, vae_steps=2, **small)
    resumed = json.loads((tmp_path / "checkpoint" / "state.json").read_text())["state"]
    assert (resumed["vae_step"], resumed["step"]) == (2, 3)  # the VAE phase is not redone
    assert resumed["elapsed"] > state["elapsed"]
    again = StableDiffusionPipeline.from_pretrained(str(out), dtype=torch.float32, use_safetensors=True,
                                                    safety_checker=None, requires_safety_checker=False)
    for key, value in pipe.vae.state_dict().items():  # the frozen VAE carried over
        torch.testing.assert_close(again.vae.state_dict()[key], value)


@pytest.mark.slow
def test_pretrain_reuses_a_vae_and_exports_v_prediction(tmp_path):
    from diffusers import StableDiffusionPipeline

    from lrkit.toyworld.pretrain import pretrain

    small = dict(pool_size=16, batch_size=4, vae_batch_size=4, refresh_per_step=1, warmup_steps=2, num_threads=1)
    first = pretrain(tmp_path / "a", minutes=5, seed=3, max_steps=1, vae_steps=2, **small)
    out = pretrain(tmp_path / "b", minutes=5, seed=4, max_steps=2, vae_from=str(first),
                   prediction_type="v_prediction", object_loss_weight=3.0, bf16=True, **small)
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["state"]
    assert (state["vae_step"], state["step"]) == (0, 2)  # no VAE phase
    assert math.isfinite(state["final_loss"])
    load = dict(dtype=torch.float32, use_safetensors=True, safety_checker=None, requires_safety_checker=False)
    source, pipe = (StableDiffusionPipeline.from_pretrained(str(path), **load) for path in (first, out))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert source.scheduler.config.prediction_type == "epsilon"
    assert pipe.vae.config.scaling_factor == source.vae.config.scaling_factor
    for key, value in source.vae.state_dict().items():
        torch.testing.assert_close(pipe.vae.state_dict()[key], value, rtol=0, atol=0)
    assert not torch.equal(pipe.unet.conv_in.weight, source.unet.conv_in.weight)
    assert pipe.unet.config.block_out_channels == source.unet.config.block_out_channels == [32, 64, 64]

    bigger = pretrain(tmp_path / "c", minutes=5, seed=4, max_steps=1, vae_from=str(first), unet_channels="48,96,96",
                      unet_layers_per_block=2, unet_heads=4, snr_shift=4.0, **small)
    shifted = StableDiffusionPipeline.from_pretrained(str(bigger), **load)
    unet = shifted.unet
    assert (list(unet.config.block_out_channels), unet.config.layers_per_block, unet.config.attention_head_dim) == \
        ([48, 96, 96], 2, 4)
    # the exported scheduler carries the shifted schedule: SNR(t) is 4x SD's at every timestep
    snr = [sched.alphas_cumprod.double() / (1 - sched.alphas_cumprod.double())
           for sched in (source.scheduler, shifted.scheduler)]
    torch.testing.assert_close(snr[1] / snr[0], torch.full_like(snr[0], 4.0), rtol=1e-3, atol=0)
    assert "trained_betas" not in source.scheduler.config or source.scheduler.config.trained_betas is None


@pytest.mark.slow
def test_pretrain_continues_a_pipeline_from_init_from(tmp_path):
    from diffusers import StableDiffusionPipeline

    from lrkit.toyworld.pretrain import pretrain

    small = dict(pool_size=16, batch_size=4, vae_batch_size=4, refresh_per_step=1, warmup_steps=2, num_threads=1)
    first = pretrain(tmp_path / "a", minutes=5, seed=3, max_steps=2, vae_steps=2, **small)
    load = dict(dtype=torch.float32, use_safetensors=True, safety_checker=None, requires_safety_checker=False)
    source = StableDiffusionPipeline.from_pretrained(str(first), **load)
    # no step: the export is the starting point itself (the EMA starts from the loaded weights), VAE included
    same = StableDiffusionPipeline.from_pretrained(
        str(pretrain(tmp_path / "b", minutes=5, seed=9, max_steps=0, init_from=str(first), **small)), **load)
    for name in ("unet", "text_encoder", "vae"):
        theirs, ours = getattr(source, name).state_dict(), getattr(same, name).state_dict()
        assert theirs.keys() == ours.keys()
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), f"{name}.{key}"
    assert same.vae.config.scaling_factor == source.vae.config.scaling_factor
    # steps with a timestep focus move the weights away from the start
    moved = StableDiffusionPipeline.from_pretrained(str(pretrain(
        tmp_path / "c", minutes=5, seed=9, max_steps=2, init_from=str(first), timestep_focus="400,900",
        timestep_focus_fraction=0.5, **small)), **load)
    assert not torch.equal(moved.unet.conv_in.weight, source.unet.conv_in.weight)
    # token_lr_scale: one step from the same start, seed and batch; the UNet's update is the same, the token
    # table's is `scale` times as large (Adam's first step is lr * sign(gradient), plus the decay)
    steps = {scale: StableDiffusionPipeline.from_pretrained(str(pretrain(
        tmp_path / f"lr{scale}", minutes=5, seed=9, max_steps=1, init_from=str(first), lr=1e-2, token_lr_scale=scale,
        **small)), **load) for scale in (1.0, 50.0)}
    for key, value in steps[1.0].unet.state_dict().items():
        assert torch.equal(steps[50.0].unet.state_dict()[key], value), key
    start = source.text_encoder.get_input_embeddings().weight
    plain, scaled = (steps[k].text_encoder.get_input_embeddings().weight - start for k in (1.0, 50.0))
    assert plain.abs().max() > 1e-3
    torch.testing.assert_close(scaled, 50.0 * plain, rtol=2e-2, atol=2e-3)
    with pytest.raises(ValueError, match="does not match this run's architecture"):
        pretrain(tmp_path / "d", minutes=5, max_steps=0, init_from=str(first), unet_channels="48,96,96", **small)
    with pytest.raises(ValueError, match="predicts 'epsilon'"):
        pretrain(tmp_path / "e", minutes=5, max_steps=0, init_from=str(first), prediction_type="v_prediction",
                 **small)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="unet/\\*.safetensors"):
        pretrain(tmp_path / "f", minutes=5, max_steps=0, init_from=str(tmp_path / "empty"), vae_from=str(first),
                 **small)


def test_pretrain_timestep_focus_draws_its_share_from_the_range():
    from lrkit.toyworld.pretrain import PretrainConfig, draw_timesteps

    torch.manual_seed(0)
    cfg = PretrainConfig(batch_size=40, timestep_focus="400,900", timestep_focus_fraction=0.75)
    draws = torch.stack([draw_timesteps(cfg) for _ in range(200)])
    focused, free = draws[:, :30], draws[:, 30:]
    assert focused.min() >= 400 and focused.max() < 900
    assert free.min() < 50 and free.max() > 950  # the rest spans the whole schedule
    torch.manual_seed(0)
    plain = PretrainConfig(batch_size=40)
    first = draw_timesteps(plain)
    torch.manual_seed(0)
    assert torch.equal(first, torch.randint(0, 1000, (40,)))  # without a focus: the plain uniform draw
    for bad in (dict(timestep_focus="900,400"), dict(timestep_focus="0,1001"), dict(timestep_focus="a,b"),
                dict(timestep_focus_fraction=0.5), dict(timestep_focus="400,900", timestep_focus_fraction=1.5)):
        with pytest.raises(ValueError, match="timestep_focus"):
            PretrainConfig(**bad)
    with pytest.raises(ValueError, match="token_lr_scale"):
        PretrainConfig(token_lr_scale=0.0)


def test_pretrain_command_line_sets_every_config_field(tmp_path):
    """`lrkit toyworld pretrain` takes each `PretrainConfig` field as an option, spelled as in `lrkit train`, or
    from a YAML file; a bad value is refused naming the option and nothing is written."""
    from lrkit.argparsing import CommandLineError
    from lrkit.toyworld.pretrain import PretrainConfig, parse_command_line

    config = tmp_path / "pretrain.yaml"
    config.write_text("pool_size: 4096\ntimestep_focus: 400,900\n")
    out, resume, fields = parse_command_line(["--out", str(tmp_path / "run"), "--config", str(config), "--bf16", "true",
                                              "--render_workers", "14", "--max_steps", "3", "--resume", "true"])
    assert (out, resume) == (str(tmp_path / "run"), True)
    assert PretrainConfig(**fields) == PretrainConfig(pool_size=4096, timestep_focus="400,900", bf16=True,
                                                      render_workers=14, max_steps=3)
    for argv, words in ((["--pool_size", "big"], "--pool_size: expected int, got 'big'"),
                        (["--pool-size", "2"], "unrecognized option --pool-size; did you mean --pool_size?")):
        with pytest.raises(CommandLineError, match=re.escape(words)):
            parse_command_line(["--out", str(tmp_path / "run"), *argv])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_pretrain_pool_mixes_two_object_pictures(fraction):
    from lrkit.models import load_clip_tokenizer
    from lrkit.toyworld.pretrain import SamplePool, two_objects
    from lrkit.toyworld.render import sample

    pool = SamplePool(load_clip_tokenizer(), 12, seed=0, two_object_fraction=fraction)
    pool.fill(progress=False)
    captions = pool.tokenizer.batch_decode(pool.ids, skip_special_tokens=True)
    twos = [" and " in c for c in captions]
    expected = [two_objects(pool.base + i) < fraction for i in range(12)]
    assert twos == expected
    assert (not any(twos)) if fraction == 0 else all(twos) if fraction == 1 else 0 < sum(twos) < 12
    for i, two in enumerate(twos):  # each entry is the renderer's picture for its seed, object count included
        s = sample(pool.base + i, num_objects=2 if two else 1, resolution=64)
        assert len(s.masks) == (2 if two else 1)
        assert torch.equal(pool.masks[i, 0], torch.from_numpy(s.object_mask))


def test_pretrain_pool_renders_extras_when_asked():
    from lrkit.models import load_clip_tokenizer
    from lrkit.toyworld.pretrain import SamplePool
    from lrkit.toyworld.render import sample

    pool = SamplePool(load_clip_tokenizer(), 6, seed=0, extras_fraction=1.0)
    pool.fill(progress=False)
    for i in range(6):
        s = sample(pool.base + i, resolution=64, extras_fraction=1.0)
        assert s.objects[0].extras and torch.equal(pool.masks[i, 0], torch.from_numpy(s.object_mask))


@pytest.mark.slow
def test_pretrain_render_workers_fill_the_same_pool_and_refresh_in_the_background(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from lrkit.models import load_clip_tokenizer
    from lrkit.toyworld.pretrain import SamplePool, pretrain, render_seeds

    tokenizer = load_clip_tokenizer()
    here, there = SamplePool(tokenizer, 9, seed=1, two_object_fraction=0.5), SamplePool(tokenizer, 9, seed=1,
                                                                                         two_object_fraction=0.5)
    here.fill(progress=False)
    with ThreadPoolExecutor(2) as executor:  # the same code path as worker processes, without their start-up
        there.fill(progress=False, executor=executor)
    assert torch.equal(here.images, there.images) and torch.equal(here.masks, there.masks)
    assert torch.equal(here.ids, there.ids) and here.next_seed == there.next_seed == 9
    images, masks, captions = render_seeds([here.base + 4], 0.5)
    assert torch.equal(torch.from_numpy(images[0]).permute(2, 0, 1).float() / 127.5 - 1.0, here.images[4])

    # a real run with 2 worker processes, each chunk split between them: 2 chunks of fresh seeds enter the
    # pool (steps 2 and 4), a third is asked for
    small = dict(pool_size=16, batch_size=4, vae_batch_size=4, refresh_per_step=1, warmup_steps=2, num_threads=1,
                 render_workers=2, refresh_chunk_steps=2)
    pretrain(tmp_path, minutes=5, seed=3, max_steps=5, vae_steps=1, **small)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())["state"]
    assert state["step"] == 5
    assert state["pool_next_seed"] == 16 + 3 * 2


def test_pretrain_rejects_bad_options(tmp_path):
    from lrkit.toyworld.pretrain import pretrain

    with pytest.raises(ValueError, match="minutes"):
        pretrain(tmp_path, minutes=0)
    with pytest.raises(FileNotFoundError, match="resume"):
        pretrain(tmp_path, minutes=1, resume=True)
    with pytest.raises(ValueError, match="prediction_type"):
        pretrain(tmp_path, minutes=1, prediction_type="sample")
    with pytest.raises(ValueError, match="two_object_fraction"):
        pretrain(tmp_path, minutes=1, two_object_fraction=1.5)
    with pytest.raises(ValueError, match="extras_fraction"):
        pretrain(tmp_path, minutes=1, extras_fraction=-0.1)
    with pytest.raises(ValueError, match="object_loss_weight"):
        pretrain(tmp_path, minutes=1, object_loss_weight=-1.0)
    with pytest.raises(FileNotFoundError, match="vae/config.json"):
        pretrain(tmp_path / "run", minutes=1, vae_from=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="render_workers"):
        pretrain(tmp_path, minutes=1, render_workers=-1)
    for bad in (dict(unet_channels="32,64"), dict(unet_channels="32,64,x"), dict(unet_channels="30,60,60"),
                dict(unet_heads=3), dict(unet_layers_per_block=0)):
        with pytest.raises(ValueError, match="unet_channels"):
            pretrain(tmp_path, minutes=1, **bad)
    with pytest.raises(ValueError, match="snr_shift"):
        pretrain(tmp_path, minutes=1, snr_shift=0.0)
