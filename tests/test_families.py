"""Model families (`lrkit.families`): recognising SD and SDXL bases, the tiny SDXL built-in, and conditioning
that equals the stock pipelines' own."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lrkit.concept import Concept, ConceptError, TokenSpec
from lrkit.families import SD, SDXL, Conditioning, FamilyError, family_of, family_of_checkpoint, family_of_folder
from lrkit.models import BaseModelError, fingerprint, load_base


@pytest.fixture(scope="module")
def xl():
    return load_base("tiny-random-xl")


@pytest.fixture(scope="module")
def xl_folder(xl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl") / "tiny-xl"
    xl.save_pretrained(folder, safe_serialization=True)
    return folder


def test_builtins_have_their_family(xl):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sd = load_base("tiny-random")
    assert isinstance(sd, StableDiffusionPipeline) and family_of(sd) is SD and fingerprint(sd).family == "sd"
    assert isinstance(xl, StableDiffusionXLPipeline) and family_of(xl) is SDXL
    assert fingerprint(xl).family == "sdxl" and fingerprint(xl).id == "tiny-random-xl"
    assert fingerprint(load_base("tiny-random-xl:1")).id == "tiny-random-xl:1"
    assert not fingerprint(xl).matches(fingerprint(sd))


def test_tiny_xl_has_no_attention_at_its_highest_resolution(xl):
    """As SDXL: the decoder's last up block has no attention, so 'the two highest resolutions with attention'
    are the middle and the lowest."""
    assert [type(b).__name__ for b in xl.unet.up_blocks] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]


def test_a_saved_sdxl_folder_loads_as_sdxl_with_the_same_weights(xl, xl_folder):
    assert family_of_folder(xl_folder) is SDXL
    loaded = load_base(xl_folder)
    assert family_of(loaded) is SDXL
    assert fingerprint(loaded).matches(fingerprint(xl))
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(xl, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_an_unknown_pipeline_class_names_the_family_option(xl_folder, tmp_path):
    import shutil

    folder = tmp_path / "other"
    shutil.copytree(xl_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "SomeOtherPipeline"}))
    with pytest.raises(BaseModelError, match="--family"):
        load_base(folder)
    assert family_of(load_base(folder, family="sdxl")) is SDXL  # the override
    with pytest.raises(BaseModelError, match="--family 'xl' is not one of"):
        load_base(folder, family="xl")
    with pytest.raises(BaseModelError, match="is Stable Diffusion XL, not Stable Diffusion 1.x/2.x"):
        load_base("tiny-random-xl", family="sd")


@pytest.mark.parametrize("keys,family", [
    (["conditioner.embedders.1.model.positional_embedding", "model.diffusion_model.out.0.weight"], SDXL),
    (["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
      "model.diffusion_model.out.0.weight"], SD),
])
def test_single_file_family_from_its_keys(tmp_path, keys, family):
    path = tmp_path / "ckpt.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    assert family_of_checkpoint(path) is family


def test_a_single_file_of_unknown_layout_names_the_family_option(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"something.else": torch.zeros(1)}, str(path))
    with pytest.raises(BaseModelError, match="cannot tell the model family.*--family"):
        load_base(path)
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(FamilyError, match="not a readable safetensors checkpoint"):
        family_of_checkpoint(tmp_path / "broken.safetensors")


@pytest.mark.parametrize("base", ["tiny-random", "tiny-random-xl"])
def test_conditioning_drives_the_unet_as_the_stock_pipeline_does(base):
    """A DDIM loop on `family.conditioning(...).unet_kwargs()` gives the stock pipeline's latents exactly."""
    pipe = load_base(base)
    family, prompts, steps, size = family_of(pipe), ["a photo of a cat", "a dog on the beach"], 3, 64
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = pipe(prompts, num_inference_steps=steps, height=size, width=size, latents=latents.clone(),
                    guidance_scale=5.0, output_type="latent").images
    cond, uncond = family.conditioning(pipe, prompts, ["", ""], height=size, width=size)
    both = Conditioning.cat([uncond, cond])
    pipe.scheduler.set_timesteps(steps)
    x = latents * pipe.scheduler.init_noise_sigma
    for t in pipe.scheduler.timesteps:
        noise = pipe.unet(pipe.scheduler.scale_model_input(torch.cat([x, x]), t), t, **both.unet_kwargs()).sample
        u, c = noise.chunk(2)
        x = pipe.scheduler.step(u + 5.0 * (c - u), t, x).prev_sample
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


def test_conditioning_rows_index_and_concatenate():
    c = Conditioning(torch.arange(6.).view(3, 2, 1), torch.arange(3.).view(3, 1), torch.ones(3, 6))
    assert torch.equal(c[1].states, c.states[1:2]) and torch.equal(c[[0, 2]].pooled, torch.tensor([[0.], [2.]]))
    assert len(Conditioning.cat([c, c[0:1]])) == 4 and len(c[0].expand(5)) == 5
    with pytest.raises(FamilyError):
        Conditioning.cat([c, Conditioning(torch.zeros(1, 2, 1))])


def test_a_concept_of_one_family_is_refused_on_the_other_naming_both(xl):
    sd_base = fingerprint(load_base("tiny-random"))
    concept = Concept(name="c", method="lora", tokens=[TokenSpec("sks")], class_word="dog", base=sd_base,
                      resolution=64)
    for force in (False, True):
        with pytest.raises(ConceptError, match="Stable Diffusion 1.x/2.x concept .* is Stable Diffusion XL"):
            concept.check_base(xl, force=force)


@pytest.fixture(scope="module")
def v_prediction_folder(tmp_path_factory):
    """A tiny SD 2.x-style base: the tiny random model with a v-prediction DDIM scheduler, saved as a folder."""
    from diffusers import DDIMScheduler

    pipe = load_base("tiny-random")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    folder = tmp_path_factory.mktemp("v") / "tiny-v"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def test_a_v_prediction_base_is_the_sd_family_and_inverts(v_prediction_folder):
    """SD 2.x (v-prediction) is part of the SD family: it loads as one, and DDIM inversion (diffusers' inverse
    scheduler reads the prediction type) reconstructs its latents far better than sampling from noise."""
    from lrkit.inference.inversion import ddim_invert, encode_image, sample_from
    from PIL import Image

    pipe = load_base(v_prediction_folder)
    assert family_of(pipe) is SD and pipe.scheduler.config.prediction_type == "v_prediction"
    cond, _ = SD.conditioning(pipe, ["a photo of a vase"], None, height=64, width=64, guidance=False)
    image = Image.fromarray((torch.arange(64 * 64 * 3) % 251).view(64, 64, 3).to(torch.uint8).numpy())
    latents = encode_image(pipe, image, 64)
    steps = 10
    rebuilt = sample_from(pipe, ddim_invert(pipe, latents, cond, steps)[0], cond, steps)[steps]
    from_noise = sample_from(pipe, torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)), cond, steps)[steps]
    error, baseline = ((rebuilt - latents).norm() / latents.norm()).item(), ((from_noise - latents).norm() / latents.norm()).item()
    assert baseline > 5 * error, (error, baseline)


def test_a_v_prediction_base_trains_against_the_velocity(v_prediction_folder, tmp_path, monkeypatch):
    """Training on a v-prediction base regresses the scheduler's velocity, not the noise."""
    from diffusers import DDPMScheduler

    from lrkit.training import train_concept

    targets = []
    original = DDPMScheduler.get_velocity

    def spy(self, *args, **kwargs):
        targets.append(True)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DDPMScheduler, "get_velocity", spy)  # the training noise scheduler
    bundle = train_concept({"base": str(v_prediction_folder), "method": "lora", "output_dir": str(tmp_path / "run"),
                            "max_steps": 2, "data": {"photos": "data/subjects/vase", "class_word": "vase",
                                                      "resolution": 64}, "validation": {"prompts": []}})
    assert targets and Concept.load(bundle).base.family == "sd"


def test_a_job_takes_the_default_resolution_of_the_family_the_base_is(tmp_path, monkeypatch):
    """`lrkit run` without --resolution: a folder, checkpoint or hub repository's family decides it (SDXL 1024 px),
    without --family; where the family cannot be told, 512 (loading the base then says why)."""
    import lrkit.models as models
    from lrkit.jobs import default_resolution

    xl, sd = tmp_path / "xl", tmp_path / "sd"
    load_base("tiny-random-xl").save_pretrained(xl)
    load_base("tiny-random").save_pretrained(sd)
    assert default_resolution(str(xl)) == 1024 and default_resolution(str(sd)) == 512
    assert default_resolution(str(sd), "sdxl") == 1024 and default_resolution("tiny-random-xl") == 64
    monkeypatch.setattr(models, "_family_of_hub_id", lambda name: {"org/xl": SDXL, "org/sd": SD}[name])
    assert default_resolution("org/xl") == 1024 and default_resolution("org/sd") == 512

    def offline(name):
        raise models.BaseModelError("offline")

    monkeypatch.setattr(models, "_family_of_hub_id", offline)
    assert default_resolution("org/xl") == 512
