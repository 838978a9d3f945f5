"""Layout-and-Retouch on Stable Diffusion XL: what differs from SD beyond the invariants that
tests/test_layout_retouch.py, test_dual_reference.py and test_inversion.py hold on both `tiny-random` and
`tiny-random-xl` (the layers, the conditioning of references, both text encoders, the family option, the VAE)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lrkit.families import SDXL, family_of
from lrkit.inference import GenerationOptions, LayoutRetouchPipeline
from lrkit.inference.personalized import PersonalizedModel
from lrkit.models import load_base
from test_layout_retouch import PROMPT, ROOT, STEPS, Made

PHOTO = ROOT / "data/subjects/vase/00.jpg"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return Made(tmp_path_factory.mktemp("xl-bundles"), tmp_path_factory.mktemp("xl-cache"))


def test_swap_layers_are_the_decoder_self_attention_of_the_two_levels_with_attention(made):
    """SDXL has no attention at its highest resolution: the default swap layers are up_blocks.0 and up_blocks.1's
    self-attention (every decoder self-attention layer), the subject maps come from the second-lowest resolution
    with cross-attention (down_blocks.1 and up_blocks.1)."""
    pipe = made.pipe("tiny-random-xl", "reference")
    unet = pipe.pipe.unet
    swap = {l.name for l in pipe.swap_layers(GenerationOptions())}
    decoder_self = {name for name in unet.attn_processors if name.startswith("up_blocks.") and ".attn1." in name}
    assert swap == decoder_self and {name.split(".attentions")[0] for name in swap} == {"up_blocks.0", "up_blocks.1"}
    capture = pipe.model.store_processors(None, (16, 16))
    assert {name.split(".attentions")[0] for name in capture} == {"down_blocks.1", "up_blocks.1"}
    assert all(".attn2." in name for name in capture)


def test_a_reference_is_inverted_with_sdxl_conditioning_at_its_size(made):
    pipe = made.pipe("tiny-random-xl", "lora")
    options = GenerationOptions.of(num_inference_steps=STEPS, mode="layout-retouch")
    pipe.pipe.scheduler.set_timesteps(STEPS)
    ref = pipe.references.from_concept(options, 64)
    assert ref.embeds.pooled is not None and ref.embeds.pooled.shape[0] == 1
    assert ref.embeds.time_ids.tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]  # original size, crop, target size
    assert ref.trajectory.shape == (STEPS + 1, 1, 4, 16, 16) and ref.mask.shape == (16, 16)
    expected = SDXL.conditioning(pipe.pipe, [f"a photo of {pipe.subject_phrase()}"], None, height=64, width=64,
                                 guidance=False)[0]
    for part in ("states", "pooled", "time_ids"):
        torch.testing.assert_close(getattr(ref.embeds, part), getattr(expected, part), rtol=0, atol=0)


def test_the_vanilla_model_swaps_both_text_encoders_and_the_unet(made):
    """A DreamBooth concept that replaces the UNet and both text encoders: the vanilla view is the base's
    conditioning exactly, the personalized view the concept's; both are restored after."""
    from lrkit.concept import Concept

    base = load_base("tiny-random-xl")
    tuned = load_base("tiny-random-xl")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("unet", "text_encoder", "text_encoder_2"):
            for p in getattr(tuned, name).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    concept = Concept.load(made.bundle("tiny-random-xl", "db"))
    model = PersonalizedModel(tuned, concept, vanilla_modules={n: getattr(base, n) for n in
                                                               ("unet", "text_encoder", "text_encoder_2")})
    plain = model.embed(["a photo of vase"], lambda p: "vase", "", vanilla=True, height=64, width=64)
    star = model.embed(["a photo of vase"], lambda p: "vase", "", vanilla=False, height=64, width=64)
    cond, _ = SDXL.conditioning(base, ["a photo of vase"], [""], height=64, width=64)
    torch.testing.assert_close(plain.cond.states, cond.states, rtol=0, atol=0)
    torch.testing.assert_close(plain.cond.pooled, cond.pooled, rtol=0, atol=0)
    assert (star.cond.states - cond.states).abs().mean() > 1e-3 and (star.cond.pooled - cond.pooled).abs().mean() > 1e-3
    with model.vanilla():
        assert tuned.unet is base.unet and tuned.text_encoder_2 is base.text_encoder_2
    assert tuned.unet is not base.unet and tuned.text_encoder is not base.text_encoder
    assert tuned.text_encoder_2 is not base.text_encoder_2
    with pytest.raises(ValueError, match="text_encoder_3.*is not a UNet or text encoder"):
        PersonalizedModel(tuned, concept, vanilla_modules={"text_encoder_3": base.text_encoder})


def test_a_dreambooth_concept_keeps_the_base_unet_and_both_text_encoders(made):
    pipe = made.pipe("tiny-random-xl", "db")
    assert set(pipe.vanilla_modules) == {"unet", "text_encoder", "text_encoder_2"}
    assert all(module is not getattr(pipe.pipe, name) for name, module in pipe.vanilla_modules.items())
    assert made.pipe("tiny-random-xl", "lora").vanilla_modules == {}  # adapters switched off instead


def test_from_concept_passes_the_family_to_load_base(made, tmp_path):
    """A folder whose pipeline class lrkit does not know loads as SDXL with `family="sdxl"`; an SDXL concept on an
    SD base is refused naming both families."""
    from lrkit.concept import ConceptError
    from lrkit.models import BaseModelError

    folder = tmp_path / "xl"
    load_base("tiny-random-xl").save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "SomeOtherPipeline"}))
    bundle = made.bundle("tiny-random-xl", "reference")
    with pytest.raises(BaseModelError, match="--family"):
        LayoutRetouchPipeline.from_concept(folder, bundle, cache_dir=tmp_path / "c")
    pipe = LayoutRetouchPipeline.from_concept(folder, bundle, family="sdxl", cache_dir=tmp_path / "c")
    assert family_of(pipe.pipe) is SDXL and pipe.model.family is SDXL
    assert pipe(PROMPT["reference"], options=GenerationOptions.of(num_inference_steps=2, mode="personalized"))
    with pytest.raises(ConceptError, match="Stable Diffusion XL concept .* is Stable Diffusion 1.x/2.x"):
        LayoutRetouchPipeline.from_concept("tiny-random", bundle, cache_dir=tmp_path / "c")


def test_lrkit_reference_writes_an_sdxl_reference_concept(tmp_path, capsys):
    from lrkit.concept import Concept
    from lrkit.reference import cli, reference_concept

    assert cli(["--photos", str(PHOTO), "--class-word", "vase", "--out", str(tmp_path / "cli"),
                "--base", "tiny-random-xl"]) == 0
    concept = Concept.load(tmp_path / "cli")
    assert concept.base.family == "sdxl" and concept.resolution == 64 and concept.method == "reference"
    folder = tmp_path / "xl-folder"
    shutil.rmtree(folder, ignore_errors=True)
    load_base("tiny-random-xl").save_pretrained(folder, safe_serialization=True)
    # a non-built-in SDXL base suggests SDXL's own size
    assert reference_concept(PHOTO, "vase", tmp_path / "folder", base=folder).resolution == SDXL.default_resolution == 1024


def test_an_fp16_sdxl_vae_runs_in_float32_and_is_cast_back():
    from lrkit.inference.inversion import vae_precision

    pipe = load_base("tiny-random-xl")
    pipe.vae.to(torch.float16)
    pipe.vae.register_to_config(force_upcast=True)
    with vae_precision(pipe) as dtype:
        assert dtype == torch.float32 and pipe.vae.dtype == torch.float32
    assert pipe.vae.dtype == torch.float16
    sd = load_base("tiny-random")
    sd.vae.to(torch.float16)
    with vae_precision(sd) as dtype:  # the SD pipeline decodes in the VAE's own dtype
        assert dtype == torch.float16
