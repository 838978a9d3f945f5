"""LoRA export: diffusers and kohya layouts load back into a fresh pipe and give the same latents.

The adapters get seeded random lora_A AND lora_B (gaussian init leaves lora_B = 0, which would make
every round trip pass trivially), alpha != rank, and different alphas for the UNet (8) and the
text encoder (2), so a loader that ignores or mixes up alphas fails.
SDXL's second text encoder gets alpha 3. The exactness tests run on both built-in families (`tiny-random`,
`tiny-random-xl`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass

import pytest
import safetensors
import safetensors.torch
import torch

from lrkit.families import family_of
from lrkit.lora_io import lora_state_dicts, save_diffusers_lora, save_kohya_lora, to_kohya
from lrkit.models import build_tiny_random, build_tiny_random_xl

RANK, UNET_ALPHA, TE_ALPHA = 4, 8.0, 2.0
TE_ALPHAS = {"text_encoder": TE_ALPHA, "text_encoder_2": 3.0}
BASES = ["tiny-random", "tiny-random-xl"]
BUILD = {"tiny-random": build_tiny_random, "tiny-random-xl": build_tiny_random_xl}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# the attention projections plus the transformer blocks' 1x1 projections, feed-forward and the resnets' 3x3
# convolutions (peft's Conv2d LoRA: lora_A is a (rank, in, 3, 3) convolution)
WIDE_UNET_TARGETS = UNET_TARGETS + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
WIDE_TE_TARGETS = TE_TARGETS + ["fc1", "fc2"]
KOHYA_NAME = "x.kohya.safetensors"
PROMPT = "a photo of sks dog"
TOL = dict(atol=1e-5, rtol=1e-5)


def latents(pipe) -> torch.Tensor:
    out = pipe(PROMPT, num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(0))
    return out.images


def fresh_pipe(base: str = "tiny-random"):
    pipe = BUILD[base](0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_encoders(pipe) -> dict:
    """{component: text encoder} of the pipe's family (SDXL: both)."""
    return {name: getattr(pipe, name) for name in family_of(pipe).text_encoders}


@dataclass
class Trained:
    pipe: object
    base: torch.Tensor  # latents without LoRA
    ref: torch.Tensor  # latents with LoRA


def make_trained(use_dora: bool, unet_targets: list[str] = UNET_TARGETS, te_targets: list[str] = TE_TARGETS,
                 base: str = "tiny-random") -> Trained:
    """A tiny pipe with UNet + text-encoder LoRA (SDXL: on both encoders) whose every adapter weight is seeded and
    non-zero."""
    from peft import LoraConfig

    pipe = fresh_pipe(base)
    base_latents = latents(pipe)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=UNET_ALPHA, target_modules=unet_targets,
                                     init_lora_weights="gaussian", use_dora=use_dora))
    for name, encoder in text_encoders(pipe).items():
        encoder.add_adapter(LoraConfig(r=RANK, lora_alpha=TE_ALPHAS[name], target_modules=te_targets,
                                       init_lora_weights="gaussian", use_dora=use_dora))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in (pipe.unet, *text_encoders(pipe).values()):
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:  # DoRA: move the magnitudes off their init (the weight norms)
                    param.mul_(1 + 0.3 * torch.rand(param.shape, generator=gen))
                elif "lora_" in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    return Trained(pipe, base_latents, latents(pipe))


_MADE: dict[tuple[str, str], Trained] = {}
_KINDS = {"lora": dict(use_dora=False), "dora": dict(use_dora=True),
          "wide_lora": dict(use_dora=False, unet_targets=WIDE_UNET_TARGETS, te_targets=WIDE_TE_TARGETS)}


def made(kind: str, base: str = "tiny-random") -> Trained:
    """`make_trained` of `kind` on `base`, built once per test run."""
    if (kind, base) not in _MADE:
        _MADE[kind, base] = make_trained(base=base, **_KINDS[kind])
    return _MADE[kind, base]


@pytest.fixture(scope="module")
def lora():
    return made("lora")


@pytest.fixture(scope="module")
def dora():
    return made("dora")


@contextlib.contextmanager
def captured_warnings():
    """Collect logging warnings of diffusers / transformers / peft (which do not propagate) and `warnings`."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def load_clean(directory, base: str = "tiny-random", **kwargs):
    """A fresh pipe with the LoRA loaded, asserting the loaders warned about nothing (no unexpected keys)."""
    pipe = fresh_pipe(base)
    with captured_warnings() as messages:
        pipe.load_lora_weights(str(directory), **kwargs)
    assert messages == []
    return pipe


def assert_same_adapter(loaded, trained, adapter_name="default_0"):
    """Every adapter tensor (UNet and each text encoder) arrived under its own name with its own value."""
    pairs = [(lora_state_dicts(loaded.unet, None, adapter_name)[0], lora_state_dicts(trained.unet)[0])]
    for name in text_encoders(trained):
        pairs.append((lora_state_dicts(loaded.unet, getattr(loaded, name), adapter_name)[1],
                      lora_state_dicts(trained.unet, getattr(trained, name))[1]))
    for got, want in pairs:
        assert sorted(got) == sorted(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)


def test_lora_changes_output_and_state_dicts_are_float32_copies(lora):
    assert not torch.allclose(lora.ref, lora.base, atol=1e-2)
    unet_sd, te_sd = lora_state_dicts(lora.pipe.unet, lora.pipe.text_encoder)
    suffixes = tuple(f".{t}" for t in UNET_TARGETS)
    n_unet_modules = sum(1 for name, _ in lora.pipe.unet.named_modules() if name.endswith(suffixes))
    assert len(unet_sd) == 2 * n_unet_modules and len(te_sd) == 2 * 4 * 2  # A+B, 4 projections, 2 layers
    for sd in (unet_sd, te_sd):
        for key, value in sd.items():
            assert key.endswith((".lora_A.weight", ".lora_B.weight"))
            assert value.dtype == torch.float32 and value.device.type == "cpu" and value.is_contiguous()
            assert not value.requires_grad and value.abs().sum() > 0


def test_state_dicts_refuse_a_missing_adapter(lora):
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        lora_state_dicts(lora.pipe.unet, adapter_name="other")
    with pytest.raises(ValueError, match="text_encoder has no LoRA adapter"):
        lora_state_dicts(lora.pipe.unet, fresh_pipe().text_encoder)


@pytest.mark.parametrize("base", BASES)
def test_diffusers_layout_round_trip_is_exact(base, tmp_path):
    lora = made("lora", base)
    encoders = text_encoders(lora.pipe)
    path = save_diffusers_lora(tmp_path, lora.pipe.unet, **encoders)
    assert path == tmp_path / "pytorch_lora_weights.safetensors"
    with safetensors.safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert (header["unet.r"], header["unet.lora_alpha"]) == (RANK, UNET_ALPHA)
    for name in encoders:
        assert (header[f"{name}.r"], header[f"{name}.lora_alpha"]) == (RANK, TE_ALPHAS[name])
    assert all(k.startswith(("unet.", *(f"{name}.text_model." for name in encoders))) for k in keys)
    assert {k.split(".")[0] for k in keys} == {"unet", *encoders}

    loaded = load_clean(tmp_path, base)
    assert loaded.unet.peft_config["default_0"].lora_alpha == UNET_ALPHA
    for name in encoders:
        assert getattr(loaded, name).peft_config["default_0"].lora_alpha == TE_ALPHAS[name]
    assert_same_adapter(loaded, lora.pipe)
    torch.testing.assert_close(latents(loaded), lora.ref, **TOL)


def test_kohya_file_names_and_true_alphas(lora, tmp_path):
    path = save_kohya_lora(tmp_path / KOHYA_NAME, lora.pipe.unet, lora.pipe.text_encoder)
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        header = f.metadata()
    assert header["ss_network_module"] == "networks.lora"
    assert (header["ss_network_dim"], float(header["ss_network_alpha"])) == (str(RANK), UNET_ALPHA)

    unet_sd, te_sd = lora_state_dicts(lora.pipe.unet, lora.pipe.text_encoder)
    q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    # "encoder.layers.0..." on transformers>=5 (flattened CLIPTextModel), "text_model.encoder..." before
    te_q = next(k for k in te_sd if k.endswith("encoder.layers.0.self_attn.q_proj.lora_A.weight")).removesuffix(
        ".lora_A.weight")
    torch.testing.assert_close(tensors[f"{q}.lora_up.weight"], te_sd[f"{te_q}.lora_B.weight"])
    torch.testing.assert_close(tensors[f"{q}.lora_down.weight"], te_sd[f"{te_q}.lora_A.weight"])
    out0 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    torch.testing.assert_close(tensors[f"{out0}.lora_down.weight"],
                               unet_sd["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight"])
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == (len(unet_sd) + len(te_sd)) // 2  # one per module
    for key, value in alphas.items():
        assert value.ndim == 0 and value.dtype == torch.float32
        assert value.item() == (UNET_ALPHA if key.startswith("lora_unet_") else TE_ALPHA), key
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)


def test_kohya_unet_names_agree_with_diffusers_converter(lora):
    """Our UNet lora_down/lora_up names are the ones diffusers' own PEFT->kohya converter produces
    (its `.alpha` = rank and `lora_te1_` prefix are why we do not use it)."""
    from diffusers.utils import convert_state_dict_to_kohya

    unet_sd, _ = lora_state_dicts(lora.pipe.unet)
    theirs = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in unet_sd.items()})
    ours = to_kohya(unet_sd, alpha=UNET_ALPHA)
    assert {k for k in ours if not k.endswith(".alpha")} == {k for k in theirs if not k.endswith(".alpha")}


@pytest.mark.parametrize("base", BASES)
def test_kohya_round_trip_matches_diffusers_layout(base, tmp_path):
    lora = made("lora", base)
    encoders = text_encoders(lora.pipe)
    save_diffusers_lora(tmp_path, lora.pipe.unet, **encoders)
    save_kohya_lora(tmp_path / KOHYA_NAME, lora.pipe.unet, **encoders)
    via_diffusers = latents(load_clean(tmp_path, base))
    loaded = load_clean(tmp_path, base, weight_name=KOHYA_NAME)
    assert loaded.unet.peft_config["default_0"].lora_alpha == UNET_ALPHA
    for name in encoders:
        assert getattr(loaded, name).peft_config["default_0"].lora_alpha == TE_ALPHAS[name]
    assert_same_adapter(loaded, lora.pipe)
    via_kohya = latents(loaded)
    torch.testing.assert_close(via_kohya, via_diffusers, **TOL)
    torch.testing.assert_close(via_kohya, lora.ref, **TOL)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_lora_on_convolutions_round_trips(base, tmp_path, layout):
    """`lora.unet_targets` may name the resnets' 3x3 convolutions (conv1, conv2) and the feed-forward (and
    `text_encoder_targets` the MLP): both layouts load them back into a stock pipe, every tensor under its own name.
    (diffusers' `convert_state_dict_to_diffusers` renames only the attention projections, and its loader then drops
    them from such a mixed file without an error: the diffusers layout keeps peft's key names.)"""
    wide_lora = made("wide_lora", base)
    encoders = text_encoders(wide_lora.pipe)
    unet_sd, _ = lora_state_dicts(wide_lora.pipe.unet)
    assert any(v.ndim == 4 and v.shape[-1] == 3 for v in unet_sd.values())  # a 3x3 conv LoRA is in the file
    if layout == "diffusers":
        save_diffusers_lora(tmp_path, wide_lora.pipe.unet, **encoders)
        loaded = load_clean(tmp_path, base)
    else:
        save_kohya_lora(tmp_path / KOHYA_NAME, wide_lora.pipe.unet, **encoders)
        loaded = load_clean(tmp_path, base, weight_name=KOHYA_NAME)
    assert_same_adapter(loaded, wide_lora.pipe)
    assert not torch.allclose(wide_lora.ref, wide_lora.base, atol=1e-3)
    torch.testing.assert_close(latents(loaded), wide_lora.ref, **TOL)


@pytest.mark.parametrize("base, prefix", [("tiny-random", "lora_unet_"), ("tiny-random", "lora_te_"),
                                          ("tiny-random-xl", "lora_unet_"), ("tiny-random-xl", "lora_te1_"),
                                          ("tiny-random-xl", "lora_te2_")])
def test_kohya_wrong_alpha_changes_output(base, prefix, tmp_path):
    """Negative control: the same file with one model's `.alpha` set to the rank gives other latents."""
    lora = made("lora", base)
    save_kohya_lora(tmp_path / KOHYA_NAME, lora.pipe.unet, **text_encoders(lora.pipe))
    tensors = safetensors.torch.load_file(str(tmp_path / KOHYA_NAME))
    assert any(k.startswith(prefix) for k in tensors)
    for key in tensors:
        if key.startswith(prefix) and key.endswith(".alpha"):
            tensors[key] = torch.tensor(float(RANK))
    safetensors.torch.save_file(tensors, str(tmp_path / KOHYA_NAME))
    wrong = latents(load_clean(tmp_path, base, weight_name=KOHYA_NAME))
    assert not torch.allclose(wrong, lora.ref, atol=1e-3)


@pytest.mark.parametrize("base", BASES)
def test_dora_diffusers_layout_round_trip_is_exact(base, tmp_path):
    dora = made("dora", base)
    encoders = text_encoders(dora.pipe)
    assert not torch.allclose(dora.ref, dora.base, atol=1e-2)
    unet_sd, te_sd = lora_state_dicts(dora.pipe.unet, dora.pipe.text_encoder)
    assert any(k.endswith(".lora_magnitude_vector") for k in unet_sd)
    assert any(k.endswith(".lora_magnitude_vector") for k in te_sd)

    save_diffusers_lora(tmp_path, dora.pipe.unet, **encoders)
    loaded = load_clean(tmp_path, base)
    assert loaded.unet.peft_config["default_0"].use_dora
    assert all(getattr(loaded, name).peft_config["default_0"].use_dora for name in encoders)
    assert_same_adapter(loaded, dora.pipe)
    torch.testing.assert_close(latents(loaded), dora.ref, **TOL)


def test_dora_kohya_export_is_refused(dora, tmp_path):
    target = tmp_path / KOHYA_NAME
    with pytest.raises(NotImplementedError, match="DoRA"):
        save_kohya_lora(target, dora.pipe.unet, dora.pipe.text_encoder)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(NotImplementedError, match="DoRA"):
        to_kohya(*lora_state_dicts(dora.pipe.unet), alpha=UNET_ALPHA)


def test_diffusers_still_drops_kohya_dora_scale():
    """Why kohya DoRA export is refused: diffusers' loader filters `dora_scale` out of kohya files.
    If this starts failing, diffusers reads them and the export can be implemented."""
    from diffusers import StableDiffusionPipeline

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    kohya = {f"{name}.lora_down.weight": torch.ones(4, 32), f"{name}.lora_up.weight": torch.ones(32, 4),
             f"{name}.alpha": torch.tensor(8.0), f"{name}.dora_scale": torch.ones(32)}
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(kohya)
    assert not any("magnitude" in k or "dora" in k for k in state_dict)


def test_kohya_metadata_and_config_checks(lora, tmp_path):
    path = save_kohya_lora(tmp_path / KOHYA_NAME, lora.pipe.unet, metadata={"ss_output_name": "sks"})
    with safetensors.safe_open(str(path), "pt") as f:
        header, keys = f.metadata(), list(f.keys())
    assert header["ss_output_name"] == "sks" and not any(k.startswith("lora_te_") for k in keys)
    with pytest.raises(ValueError, match="str -> str"):
        save_kohya_lora(tmp_path / "y.safetensors", lora.pipe.unet, metadata={"ss_network_dim": 4})
    with pytest.raises(ValueError, match=".safetensors"):
        save_kohya_lora(tmp_path / "y.pt", lora.pipe.unet)
    with pytest.raises(ValueError, match="not a LoRA weight"):
        to_kohya({"x.lora_B.bias": torch.ones(2)}, alpha=1.0)


def test_kohya_refuses_rslora():
    from peft import LoraConfig

    pipe = fresh_pipe()
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=UNET_ALPHA, target_modules=UNET_TARGETS, use_rslora=True))
    with pytest.raises(ValueError, match="use_rslora"):
        save_kohya_lora("never-written.safetensors", pipe.unet)
