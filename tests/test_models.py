"""Base-model loading (DESIGN.md §2): built-ins, local folders, single files, fingerprints, errors."""

import json

import numpy as np
import pytest
import torch

from lrkit import models
from lrkit.models import BaseFingerprint, BaseModelError, compute_fingerprint, fingerprint, load_base

PROMPT = "a photo of a cat"


def images(pipe, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.from_numpy(pipe(PROMPT, num_inference_steps=2, output_type="np", generator=gen).images)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def differs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return any(not torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny pipeline, its `save_pretrained` folder and an LDM-layout single-file copy."""
    from ldm_layout import save_ldm_checkpoint

    root = tmp_path_factory.mktemp("base")
    pipe = load_base("tiny-random")
    pipe.save_pretrained(root / "folder", safe_serialization=True)
    save_ldm_checkpoint(pipe, root / "tiny-ldm.safetensors")
    return pipe, root / "folder", root / "tiny-ldm.safetensors"


# ------------------------------------------------------------------------------------ tiny-random


def test_tiny_random_is_deterministic_per_seed():
    a, b, c = load_base("tiny-random"), load_base("tiny-random:0"), load_base("tiny-random:1")
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(a, name), getattr(b, name))
        assert differs(getattr(a, name), getattr(c, name)), name
    assert fingerprint(b).id == "tiny-random"
    assert fingerprint(c).id == "tiny-random:1"


def test_tiny_random_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_base("tiny-random:2")
    assert torch.equal(torch.rand(3), expected)


def test_tiny_random_tokenizer_gives_real_clip_ids():
    pipe = load_base("tiny-random")
    assert pipe.tokenizer(PROMPT).input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert pipe.tokenizer.model_max_length == 77


# ------------------------------------------------------------------------------------ fingerprint


@pytest.mark.parametrize("dtype", ["fp16", "bf16", torch.float16])
def test_fingerprint_ignores_load_dtype(dtype):
    ref = fingerprint(load_base("tiny-random"))
    low = load_base("tiny-random", dtype=dtype)
    assert low.unet.dtype in (torch.float16, torch.bfloat16)
    fp = fingerprint(low)
    assert fp.weight_probe != ref.weight_probe  # really rounded, yet...
    assert fp.matches(ref) and ref.matches(fp)


def test_fingerprint_tells_bases_apart():
    ref = fingerprint(load_base("tiny-random"))
    other = fingerprint(load_base("tiny-random:1"))
    assert ref.unet_config_sha256 == other.unet_config_sha256  # same architecture: only the weights differ
    assert not ref.matches(other)
    assert len(ref.weight_probe) == models._PROBE_TENSORS * models._PROBE_VALUES


def test_fingerprint_tells_architectures_apart():
    a = load_base("tiny-random").unet
    b = models.build_tiny_random(0, unet_overrides={"attention_head_dim": 8}).unet
    fa, fb = compute_fingerprint(a, "a"), compute_fingerprint(b, "b")
    assert fa.unet_config_sha256 != fb.unet_config_sha256
    assert not fa.matches(fb)


def test_fingerprint_survives_json():
    ref = fingerprint(load_base("tiny-random"))
    back = BaseFingerprint.from_dict(json.loads(json.dumps(ref.to_dict())))
    assert back == ref


def test_fingerprint_is_computed_once_per_unet(monkeypatch):
    calls = []
    real = models.compute_fingerprint

    def counting(unet, base_id):
        calls.append(base_id)
        return real(unet, base_id)

    monkeypatch.setattr(models, "compute_fingerprint", counting)
    pipe = load_base("tiny-random:3")
    assert calls == ["tiny-random:3"]
    first = fingerprint(pipe)
    assert fingerprint(pipe) is first and fingerprint(pipe.unet) is first
    assert calls == ["tiny-random:3"]
    load_base("tiny-random:3")  # a new pipeline, a new UNet: computed for it
    assert calls == ["tiny-random:3", "tiny-random:3"]


def test_fingerprint_ignores_a_peft_lora_adapter():
    from peft import LoraConfig

    unet = load_base("tiny-random").unet
    before = compute_fingerprint(unet, "tiny-random")
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q"]))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)
    names = list(unet.state_dict())
    assert any(".base_layer." in n for n in names) and any("lora_B" in n for n in names)
    assert compute_fingerprint(unet, "tiny-random") == before


# ---------------------------------------------------------------------------------- local folder


def test_local_diffusers_folder_gives_the_same_pipeline(saved):
    pipe, folder, _ = saved
    loaded = load_base(folder)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(pipe, name), getattr(loaded, name))
    torch.testing.assert_close(images(loaded), images(pipe), rtol=0, atol=1e-6)
    assert fingerprint(loaded).matches(fingerprint(pipe))
    assert fingerprint(loaded).id == str(folder.resolve())


def test_fp16_folder_loads_as_float32_unless_a_dtype_is_given(tmp_path):
    pipe = load_base("tiny-random")
    folder = tmp_path / "fp16"
    pipe.to(dtype=torch.float16).save_pretrained(str(folder), safe_serialization=True)
    loaded = load_base(folder)  # every component float32, the text encoder too (transformers 5 keeps "auto")
    assert {getattr(loaded, n).dtype for n in ("unet", "vae", "text_encoder")} == {torch.float32}
    out = loaded("a photo", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(out).all()
    half = load_base(folder, dtype="fp16")
    assert {getattr(half, n).dtype for n in ("unet", "vae", "text_encoder")} == {torch.float16}


# ----------------------------------------------------------------------------------- single file


def test_ldm_helper_writes_the_original_layout(saved):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import load_file

    pipe, _, single = saved
    state = load_file(str(single))
    prefixes = {"model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."}
    assert all(any(k.startswith(p) for p in prefixes) for k in state)
    n_params = sum(len(getattr(pipe, n).state_dict()) for n in ("unet", "vae", "text_encoder"))
    assert len(state) == n_params
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in state
    assert "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight" in state
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert infer_diffusers_model_type(state) == "v1"


def test_single_file_with_local_config_gives_the_same_pipeline(saved):
    pipe, folder, single = saved
    loaded = load_base(single, config=folder)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(pipe, name), getattr(loaded, name))
    torch.testing.assert_close(images(loaded), images(pipe), rtol=0, atol=1e-6)
    assert fingerprint(loaded).matches(fingerprint(pipe))
    assert fingerprint(loaded).id == "tiny-ldm.safetensors"


def test_single_file_passes_config_to_from_single_file(saved, monkeypatch):
    from diffusers import StableDiffusionPipeline

    pipe, folder, single = saved
    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs, path=path)
        return load_base("tiny-random")

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", staticmethod(fake))
    load_base(single, config=folder, dtype="bf16")
    assert seen["path"] == str(single)
    assert seen["config"] == str(folder)
    assert seen["dtype"] is torch.bfloat16  # diffusers >= 0.40's keyword (the test env has 0.42)
    assert seen["safety_checker"] is None


def test_single_file_offline_without_config_says_to_pass_it(saved, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _, _, single = saved
    with pytest.raises(BaseModelError) as err:
        load_base(single)
    msg = str(err.value)
    assert "'" + str(single) + "'" in msg and "config=" in msg


def test_single_file_config_must_be_a_pipeline_folder(saved, tmp_path):
    _, _, single = saved
    with pytest.raises(BaseModelError, match="config folder .* does not exist"):
        load_base(single, config=tmp_path / "nope")
    with pytest.raises(BaseModelError, match="config folder .* has no model_index.json"):
        load_base(single, config=tmp_path)


# ---------------------------------------------------------------------------------------- errors


def test_hub_id_offline_names_the_id_and_a_local_folder(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BaseModelError) as err:
        load_base("some-org/some-model")
    msg = str(err.value)
    assert "'some-org/some-model'" in msg
    assert "local folder" in msg and "hf download some-org/some-model" in msg


@pytest.mark.parametrize("rel", ["missing", "missing/deeper/model", "missing.safetensors"])
def test_missing_path(tmp_path, rel):
    path = str(tmp_path / rel)
    with pytest.raises(BaseModelError, match="does not exist") as err:
        load_base(path)
    assert repr(path) in str(err.value)


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(BaseModelError, match="has no model_index.json: it is not a diffusers pipeline folder"):
        load_base(tmp_path)


@pytest.mark.parametrize("name", ["model.ckpt", "model.bin", "model.pt", "MODEL.PTH"])
def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path, monkeypatch, name):
    path = tmp_path / name
    path.write_bytes(b"not really a pickle")

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(BaseModelError, match="is a pickle checkpoint; lrkit loads only safetensors"):
        load_base(path)


@pytest.mark.parametrize("dtype", ["fp8", "half", "float64"])
def test_bad_dtype_string(dtype):
    with pytest.raises(BaseModelError, match=f"dtype '{dtype}' is not one of"):
        load_base("tiny-random", dtype=dtype)


def test_bad_builtin_seed():
    with pytest.raises(BaseModelError, match="the seed after ':' must be an integer"):
        load_base("tiny-random:abc")


def test_config_only_for_single_files(saved):
    _, folder, _ = saved
    with pytest.raises(BaseModelError, match="config= applies only to single-file"):
        load_base("tiny-random", config=folder)
    with pytest.raises(BaseModelError, match="config= applies only to single-file"):
        load_base(folder, config=folder)


def test_fingerprint_of_tensors_larger_than_float32_can_index():
    """SD 1.5's up-block convolutions hold ~29.5M weights (> 2**24): probe positions must stay in range."""
    import torch.nn as nn

    from lrkit.models import compute_fingerprint

    class Big(nn.Module):
        config = {"kind": "big"}

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.arange(2**24 + 3, dtype=torch.float32), requires_grad=False)

    probe = compute_fingerprint(Big(), "big").weight_probe
    assert probe[0] == 0.0 and probe[-1] == float(2**24 + 2)  # first and last element, exactly


@pytest.mark.parametrize("library, installed, key", [
    ("diffusers", "0.39.0", "torch_dtype"), ("diffusers", "0.40.0", "dtype"), ("diffusers", "0.42.1", "dtype"),
    ("transformers", "4.55.4", "torch_dtype"), ("transformers", "4.56.0", "dtype"), ("transformers", "5.23.0", "dtype"),
])
def test_dtype_kwarg_follows_the_installed_library(monkeypatch, library, installed, key):
    import importlib.metadata

    from lrkit.models import dtype_kwarg

    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed if name == library else "0")
    assert dtype_kwarg(torch.float16, library) == {key: torch.float16}


def test_loading_warns_about_no_deprecated_dtype_keyword(tmp_path, recwarn, caplog):
    """diffusers >= 0.40 and transformers >= 4.56 warn on `torch_dtype=`; lrkit's loaders pass `dtype=`."""
    pipe = load_base("toy")
    pipe.save_pretrained(tmp_path / "folder", safe_serialization=True)
    load_base(tmp_path / "folder", dtype="fp32")
    messages = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "torch_dtype" in m], messages


def test_an_sdxl_single_file_checkpoint_loads_as_the_same_sdxl_pipeline(tmp_path):
    """An A1111/ComfyUI-layout SDXL checkpoint (SGM UNet, both CLIP encoders, the second in OpenCLIP's layout):
    recognised as SDXL from its tensor names, loaded through `StableDiffusionXLPipeline.from_single_file` with a
    local config, every weight and the generated latents equal to the folder's, and the same fingerprint (the
    check `Concept.apply` makes: a concept trained on the folder applies to the checkpoint)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from ldm_layout import save_ldm_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lrkit.families import SDXL, family_of, family_of_checkpoint
    from lrkit.jobs import default_resolution
    from lrkit.models import (SD_SCHEDULER_CONFIG, TINY_TEXT_CONFIG, TINY_VAE_CONFIG, TINY_XL_UNET_CONFIG,
                              load_clip_tokenizer, seeded_modules)

    # tiny-random-xl with a wider second encoder, as SDXL's (1280 vs 768): diffusers tells the two encoders of a
    # checkpoint apart by their widths
    wide = dict(TINY_TEXT_CONFIG, hidden_size=48, intermediate_size=96)
    unet, vae, te1, te2 = seeded_modules(
        0, lambda: UNet2DConditionModel(**dict(TINY_XL_UNET_CONFIG, cross_attention_dim=32 + 48)),
        lambda: AutoencoderKL(**TINY_VAE_CONFIG), lambda: CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG)),
        lambda: CLIPTextModelWithProjection(CLIPTextConfig(**wide)))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=load_clip_tokenizer(),
                                     tokenizer_2=load_clip_tokenizer(), unet=unet,
                                     scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "folder", safe_serialization=True)
    single = tmp_path / "tiny-xl-sgm.safetensors"
    save_ldm_checkpoint(pipe, single)
    state = load_file(str(single))
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in state
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    assert family_of_checkpoint(single) is SDXL and default_resolution(str(single)) == 1024

    loaded = load_base(single, config=tmp_path / "folder")
    assert isinstance(loaded, StableDiffusionXLPipeline) and family_of(loaded) is SDXL
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_state(getattr(pipe, name), getattr(loaded, name))

    def latents(p):
        return p("a photo of a vase", num_inference_steps=2, height=64, width=64, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images

    torch.testing.assert_close(latents(loaded), latents(pipe), rtol=0, atol=0)
    assert fingerprint(loaded).matches(fingerprint(pipe))
