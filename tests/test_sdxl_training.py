"""Training on SDXL (`tiny-random-xl`): the conditioning a step uses is the stock SDXL encoding with each photo's
size and crop, mixed precision and resume, DreamBooth of both text encoders, and the kohya SDXL file under
ComfyUI's and A1111's key logic. (Every method's YAML training and stock round trip: tests/test_training.py,
parametrised over both families; the LoRA layouts: tests/test_lora_io.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image

from lrkit.cli import main
from lrkit.concept import Concept
from lrkit.families import SDXL
from lrkit.lora_io import lora_state_dicts, save_kohya_lora
from lrkit.models import build_tiny_random_xl, load_base
from lrkit.photos import load_images
from lrkit.training import train_concept
from lrkit.training.config import load_config
from lrkit.training.data import PhotoDataset
from lrkit.training.model import ConceptModel
from lrkit.training.module import ConceptDataModule, collate

PROMPT = "a photo of <vase-p> vase on the beach"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Two photos that are not square (96x64 and 64x112 px), so crops and original sizes differ per photo."""
    folder = tmp_path_factory.mktemp("xl-photos")
    rng = np.random.default_rng(0)
    for name, (w, h) in (("wide.png", (96, 64)), ("tall.png", (64, 112))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


def xl_config(photos: Path, out: Path | None = None, **overrides) -> dict:
    config = dict(base="tiny-random-xl", method="lora", output_dir=str(out or "unused"),
                  data=dict(photos=str(photos), class_word="vase", resolution=64, repeats=1, min_size=32),
                  max_steps=4, precision="32", accelerator="cpu", validation=dict(prompts=[]), log_every_n_steps=1,
                  lora=dict(rank=4, alpha=8), optim=dict(optimizer="adamw", lr=1e-3))
    config.update(overrides)
    return config


def latents(pipe, prompt: str) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, height=64, width=64, generator=torch.Generator().manual_seed(0),
                output_type="latent").images


# ------------------------------------------------------------------------------- conditioning and samples


def test_samples_record_the_photos_original_size_and_crop(photos):
    """SDXL conditions on the photo's size before resizing and the crop's top-left in the resized photo (in the
    mirrored photo for a flipped sample)."""
    shots = load_images(photos, min_size=32)
    dataset = PhotoDataset(shots, resolution=64, token="sks", class_word="vase", center_crop=False, random_flip=0.5,
                           seed=3)
    seen = set()
    for i in range(16):
        item = dataset[i]
        w, h = shots[item["photo_index"]].image.size
        assert item["original_size"] == (h, w)
        resized = dataset._pixels[item["photo_index"]]  # (3, H, W) uint8, the photo after resizing
        if item["flipped"]:
            resized = resized.flip(-1)
        top, left = item["crop_top_left"]
        crop = resized[:, top:top + 64, left:left + 64].float() / 127.5 - 1.0
        assert torch.equal(crop, item["pixel_values"])
        seen.add((item["flipped"], top, left))
    assert len(seen) > 2 and any(f for f, _, _ in seen)  # random crops, flipped and not


def test_a_training_step_conditions_the_unet_as_the_stock_sdxl_pipeline(photos):
    """The loss's UNet call: both encoders' penultimate states concatenated and the second's pooled embedding,
    exactly as `StableDiffusionXLPipeline.encode_prompt` gives them, and per-sample time ids (original size, crop
    top-left, target size) as `SDXL.time_ids` builds them."""
    config = load_config(xl_config(photos, data=dict(photos=str(photos), class_word="vase", resolution=64,
                                                     min_size=32, center_crop=False, random_flip=0.5)))
    pipe = load_base("tiny-random-xl")
    model = ConceptModel(config, pipe=pipe)  # shares the pipe's modules; LoRA B starts at zero
    items = [dict(ConceptDataModule(config).instance[i], source="instance", counter=i) for i in range(3)]
    batch = collate(items)

    cond = model.conditioning(batch["caption"], batch)
    states, _, pooled, _ = pipe.encode_prompt(batch["caption"], device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    assert torch.equal(cond.states, states) and torch.equal(cond.pooled, pooled)
    for row, item in zip(cond.time_ids, items):
        expected = SDXL.time_ids(pipe, 64, 64, original=item["original_size"], crop=item["crop_top_left"])
        assert torch.equal(row, expected[0])
    assert len({tuple(r.tolist()) for r in cond.time_ids}) > 1  # the photos' sizes and crops differ

    generators = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    loss, _ = model.loss(batch, generators)
    latents_, noise, t = model.sample_noise(model.latent_params(batch), [torch.Generator().manual_seed(10 + i)
                                                                          for i in range(3)])
    noisy = model.noise_scheduler.add_noise(latents_, noise, t)
    time_ids = torch.cat([SDXL.time_ids(pipe, 64, 64, original=it["original_size"], crop=it["crop_top_left"])
                          for it in items])
    pred = pipe.unet(noisy, t, encoder_hidden_states=states,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))  # the loss's own reduction order
    torch.testing.assert_close(loss, per_sample.mean(), atol=1e-7, rtol=1e-6)


def test_family_option_that_contradicts_the_base_is_one_line_naming_it(photos, tmp_path, capsys):
    code = main(["train", "--base", "tiny-random-xl", "--family", "sd", "--data.photos", str(photos),
                 "--data.class_word", "vase", "--data.resolution", "64", "--output_dir", str(tmp_path / "run"),
                 "--accelerator", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "Stable Diffusion XL" in err and "--family sd" in err


# ------------------------------------------------------------------------------- mixed precision, resume


@pytest.fixture(scope="module")
def pivotal_bf16(photos, tmp_path_factory, capture_trained_model):
    """Pivotal tuning (a token in both encoders, LoRA on the UNet and both encoders) in bf16-mixed with gradient
    checkpointing, 8-bit AdamW and the latent cache, as the SDXL configs train."""
    out = tmp_path_factory.mktemp("xl-pivotal-bf16")
    with capture_trained_model() as captured:
        bundle = train_concept(xl_config(
            photos, out, method="pivotal", precision="bf16-mixed", gradient_checkpointing=True, cache_latents=True,
            data=dict(photos=str(photos), class_word="vase", resolution=64, repeats=1, min_size=32, token="<vase-p>"),
            lora=dict(rank=4, alpha=8, train_text_encoder=True), optim=dict(optimizer="adamw8bit", lr=1e-3)))
    return captured["model"], bundle


def test_bf16_mixed_keeps_trainables_float32_and_the_bundle_loads_in_stock_sdxl(pivotal_bf16):
    model, bundle = pivotal_bf16
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    assert model.unet.conv_in.weight.dtype == torch.bfloat16  # frozen weights in the autocast dtype
    assert model.text_encoder_2.text_model.final_layer_norm.weight.dtype == torch.bfloat16
    assert model.unet.is_gradient_checkpointing

    concept = Concept.load(bundle)
    assert concept.base.family == "sdxl"
    embeds = safetensors.torch.load_file(str(concept.file("embeddings")))
    assert {k: tuple(v.shape) for k, v in embeds.items()} == {"clip_l": (1, 32), "clip_g": (1, 32)}
    with safetensors.safe_open(str(concept.file("kohya")), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}

    ours = latents(concept.apply(load_base("tiny-random-xl")), PROMPT)
    stock = build_tiny_random_xl(0)
    stock.load_textual_inversion(embeds["clip_l"], token="<vase-p>", text_encoder=stock.text_encoder,
                                 tokenizer=stock.tokenizer)
    stock.load_textual_inversion(embeds["clip_g"], token="<vase-p>", text_encoder=stock.text_encoder_2,
                                 tokenizer=stock.tokenizer_2)
    stock.load_lora_weights(str(bundle))
    torch.testing.assert_close(latents(stock, PROMPT), ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, latents(build_tiny_random_xl(0), PROMPT), atol=1e-4)


def test_resume_on_sdxl_is_bit_exact(photos, tmp_path, monkeypatch):
    """Two steps, then a resume to four, give the weights of four steps straight (LoRA dropout draws included)."""
    config = xl_config(photos, lora=dict(rank=4, alpha=8, dropout=0.1, train_text_encoder=True))
    straight = train_concept(dict(config, output_dir=str(tmp_path / "straight")))
    train_concept(dict(config, output_dir=str(tmp_path / "resumed"), max_steps=2))
    steps = []
    loss = ConceptModel.loss
    monkeypatch.setattr(ConceptModel, "loss", lambda self, *a, **k: steps.append(1) or loss(self, *a, **k))
    resumed = train_concept(dict(config, output_dir=str(tmp_path / "resumed"), overwrite=True))
    assert len(steps) == 2  # resumed at step 2, not trained afresh
    a = safetensors.torch.load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = safetensors.torch.load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)


# ------------------------------------------------------------------------------- DreamBooth of both encoders


def test_dreambooth_with_both_text_encoders_round_trips_through_stock_loaders(photos, tmp_path,
                                                                               capture_trained_model):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with capture_trained_model() as captured:
        bundle = train_concept(xl_config(photos, tmp_path / "db", method="dreambooth", max_steps=2,
                                         dreambooth=dict(train_text_encoder=True, prior_preservation=False)))
    model = captured["model"].eval()
    concept = Concept.load(bundle)
    assert {"unet", "text_encoder", "text_encoder_2"} <= set(concept.files)
    prompt = "a photo of sks vase"
    expected = latents(model.pipeline(), prompt)

    ours = latents(concept.apply(load_base("tiny-random-xl")), prompt)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    stock = build_tiny_random_xl(0)
    stock.unet = UNet2DConditionModel.from_pretrained(str(bundle / "unet"), use_safetensors=True)
    stock.text_encoder = CLIPTextModel.from_pretrained(str(bundle / "text_encoder"), use_safetensors=True)
    stock.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(str(bundle / "text_encoder_2"),
                                                                        use_safetensors=True)
    torch.testing.assert_close(latents(stock, prompt), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, latents(build_tiny_random_xl(0), prompt), atol=1e-4)


# ------------------------------------------------------------------------------- kohya SDXL key logic

# SDXL base 1.0's UNet block layout at a small width (layers per block, attention levels, transformer depths).
SDXL_LAYOUT = dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=64,
                   attention_head_dim=(2, 4, 8), norm_num_groups=8, sample_size=16,
                   transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "time_emb_proj", "conv_shortcut"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ALPHAS = {"unet": 8.0, "text_encoder": 2.0, "text_encoder_2": 3.0}

# ComfyUI's LORA_CLIP_MAP (comfy/lora.py): the text-encoder modules it maps, CLIP path -> kohya suffix.
COMFY_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                  "self_attn.out_proj": "self_attn_out_proj"}
# A1111's resnet suffix conversion (extensions-builtin/Lora/networks.py) and SGM's resnet names.
A1111_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                       "conv_shortcut": "skip_connection"}


def sgm_prefixes() -> list[tuple[str, str]]:
    """(diffusers prefix, SGM prefix) of SDXL's UNet blocks: the layout kohya's and A1111's SDXL conversion maps
    describe (three levels; two layers down, three up; a downsampler/upsampler closing each level but the last)."""
    pairs = []
    for i in range(3):
        for j in range(2):
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1.")]
        for j in range(3):
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1.")]
        if i < 2:
            pairs += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."),
                      (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.")]
    pairs += [("mid_block.attentions.0.", "middle_block.1.")] + [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.")
                                                                 for j in range(2)]
    return pairs


def sgm_module(diffusers_path: str) -> str:
    """The SGM (A1111/ComfyUI checkpoint) name of a diffusers UNet module, '.' -> '_'."""
    for hf, sd in sgm_prefixes():
        if diffusers_path.startswith(hf):
            rest = diffusers_path[len(hf):]
            if ".resnets." in hf:
                rest = A1111_RESNET_SUFFIX.get(rest, rest)
            return "diffusion_model_" + (sd + rest).replace(".", "_")
    raise AssertionError(f"{diffusers_path} is outside SDXL's block layout")


def a1111_compvis_name(key: str) -> str:
    """A1111's `convert_diffusers_name_to_compvis` for the kohya module names it rewrites (SD 1.x arithmetic, which
    SDXL's two-layer levels share), and its SDXL text-encoder prefixes; any other name comes back unchanged."""
    m = re.fullmatch(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        kind, block, part, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        rest = A1111_RESNET_SUFFIX.get(rest, rest) if part == "resnets" else rest
        index = 1 + block * 3 + layer if kind == "down" else block * 3 + layer
        blocks = "input_blocks" if kind == "down" else "output_blocks"
        return f"diffusion_model_{blocks}_{index}_{1 if part == 'attentions' else 0}_{rest}"
    m = re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        rest = A1111_RESNET_SUFFIX.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{rest}"
    if key.startswith("lora_te1_text_model"):
        return key.replace("lora_te1_text_model", "0_transformer_text_model")
    m = re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{m[1]}_{rest}"
    return key


@pytest.fixture(scope="module")
def sdxl_kohya(tmp_path_factory):
    """A kohya file of a LoRA on every kind of UNet module of SDXL's block layout and on both text encoders,
    with seeded non-zero weights; returns (unet, text encoders, tensors)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_LAYOUT)
    pipe = build_tiny_random_xl(0)
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    unet.add_adapter(LoraConfig(r=4, lora_alpha=ALPHAS["unet"], target_modules=UNET_TARGETS))
    for name, encoder in encoders.items():
        encoder.add_adapter(LoraConfig(r=4, lora_alpha=ALPHAS[name], target_modules=TE_TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in (unet, *encoders.values()):
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    path = save_kohya_lora(tmp_path_factory.mktemp("kohya") / "x.kohya.safetensors", unet, **encoders)
    return unet, encoders, safetensors.torch.load_file(str(path))


def kohya_modules(tensors: dict) -> set[str]:
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}


def test_kohya_sdxl_file_maps_every_key_under_comfyui_logic(sdxl_kohya):
    """ComfyUI (comfy/lora.py `model_lora_keys_unet` / `model_lora_keys_clip`): a UNet module maps as `lora_unet_`
    + its diffusers path ('.' -> '_'), which `unet_to_diffusers` lists for every weight of the model; SDXL text
    encoders as `lora_te1_` / `lora_te2_` + `text_model_encoder_layers_<i>_` + LORA_CLIP_MAP's suffix. Every
    module of the file is mapped, each has lora_down, lora_up and alpha, and ComfyUI's scale (alpha / the
    lora_down rows) gives the adapter's own delta weight."""
    unet, encoders, tensors = sdxl_kohya
    key_map = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): ("unet", k.removesuffix(".weight"))
               for k in unet.state_dict() if k.endswith(".weight") and "lora_" not in k and ".base_layer" not in k}
    key_map.update({"lora_unet_" + k.removesuffix(".base_layer.weight").replace(".", "_"):
                    ("unet", k.removesuffix(".base_layer.weight"))
                    for k in unet.state_dict() if k.endswith(".base_layer.weight")})
    for (name, encoder), prefix in zip(encoders.items(), SDXL.kohya_text_prefixes):
        for layer in range(encoder.config.num_hidden_layers):
            for clip, suffix in COMFY_CLIP_MAP.items():
                key_map[f"{prefix}_text_model_encoder_layers_{layer}_{suffix}"] = (
                    name, f"text_model.encoder.layers.{layer}.{clip}")

    modules = kohya_modules(tensors)
    unmapped = sorted(m for m in modules if m not in key_map)
    assert unmapped == [] and len(modules) > 100
    assert {m.split("_")[1] for m in modules} == {"unet", "te1", "te2"}
    for module in modules:
        down, up, alpha = (tensors[f"{module}.{part}"] for part in ("lora_down.weight", "lora_up.weight", "alpha"))
        owner, path = key_map[module]
        model = unet if owner == "unet" else encoders[owner]
        try:
            layer = model.get_submodule(path)
        except AttributeError:  # transformers>=5 flattens CLIPTextModel (no `text_model`)
            layer = model.get_submodule(path.removeprefix("text_model."))
        assert alpha.item() == ALPHAS[owner]
        assert alpha.item() / down.shape[0] == layer.scaling["default"]  # ComfyUI's scale: alpha / rank
        if down.ndim == 2:
            torch.testing.assert_close(up @ down * (alpha / down.shape[0]), layer.get_delta_weight("default"))


def test_kohya_sdxl_file_maps_every_key_under_a1111_logic(sdxl_kohya):
    """A1111 (extensions-builtin/Lora/networks.py): `convert_diffusers_name_to_compvis` rewrites each UNet name
    to the SGM module of SDXL's checkpoint layout, `lora_te1_text_model` becomes `0_transformer_text_model`
    (CLIP-L) and `lora_te2_` names become OpenCLIP-G's `1_model_transformer_resblocks_<i>_...` (q/k/v as slices
    of `attn_in_proj`). Every UNet module lands on its own SGM name; every text module on a module A1111 knows."""
    unet, encoders, tensors = sdxl_kohya
    openclip_suffixes = re.compile(r"attn_(q|k|v)_proj|attn_out_proj|mlp_c_fc|mlp_c_proj")
    for module in kohya_modules(tensors):
        compvis = a1111_compvis_name(module)
        assert compvis != module, f"A1111 does not rewrite {module}"
        if module.startswith("lora_unet_"):
            diffusers_path = next(n for n, _ in unet.named_modules() if "lora_unet_" + n.replace(".", "_") == module)
            assert compvis == sgm_module(diffusers_path), module
        elif module.startswith("lora_te1_"):
            clip_l = r"0_transformer_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
            assert re.fullmatch(clip_l, compvis), module
        else:
            layer, suffix = re.fullmatch(r"1_model_transformer_resblocks_(\d+)_(.+)", compvis).groups()
            assert openclip_suffixes.fullmatch(suffix), module
            assert int(layer) < encoders["text_encoder_2"].config.num_hidden_layers


def test_kohya_sdxl_state_dicts_are_the_adapters(sdxl_kohya):
    """The file holds the peft tensors themselves: lora_down = lora_A, lora_up = lora_B, for every adapted module."""
    unet, encoders, tensors = sdxl_kohya
    unet_sd, _ = lora_state_dicts(unet)
    assert 3 * len(unet_sd) // 2 == sum(1 for k in tensors if k.startswith("lora_unet_"))
    for key, value in unet_sd.items():
        module, part = key.removesuffix(".weight").rsplit(".", 1)
        kohya = ".lora_down.weight" if part == "lora_A" else ".lora_up.weight"
        assert torch.equal(tensors["lora_unet_" + module.replace(".", "_") + kohya], value)


def test_generate_and_run_pass_the_family_option_to_the_base(pivotal_bf16, photos, tmp_path, capsys):
    _, bundle = pivotal_bf16
    code = main(["generate", "--concept", str(bundle), "--family", "sd", "--prompt", "{}", "--out",
                 str(tmp_path / "images")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--family sd" in err, err
    code = main(["run", "--photos", str(photos), "--class_word", "vase", "--base", "tiny-random", "--family", "sdxl",
                 "--prompt", "{}", "--out", str(tmp_path / "run"), "--resolution", "64"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--family sdxl" in err, err
