"""Test helper: write a diffusers SD or SDXL pipeline as an original (LDM / SGM) single-file checkpoint, the
layout A1111 and ComfyUI checkpoints have.

The inverse of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`
and `convert_open_clip_checkpoint` (diffusers/loaders/single_file_utils.py), for SD 1.x- and SDXL-shaped models
(SDXL: `conditioner.embedders.0.transformer.*` CLIP-L, `conditioner.embedders.1.model.*` OpenCLIP-G).
"""

from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's size/crop + pooled-text embedding
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _split(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def unet_to_ldm(state: dict, config) -> dict:
    """Diffusers UNet2DConditionModel keys -> `model.diffusion_model.*` keys."""
    per_block = config["layers_per_block"] + 1  # resnets + one down/up-sampler slot per block
    has_attn = {i: "CrossAttn" in t for i, t in enumerate(config["up_block_types"])}
    out = {}
    for key, value in state.items():
        module, param = _split(key)
        if module in _UNET_TOP:
            new = _UNET_TOP[module]
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = 1 + b * per_block + j
            new = f"input_blocks.{idx}.0.{_UNET_RESNET[rest]}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            new = f"input_blocks.{1 + int(m[1]) * per_block + per_block - 1}.0.op"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", module):
            new = f"middle_block.{2 * int(m[1])}.{_UNET_RESNET[m[2]]}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = b * per_block + j
            new = f"output_blocks.{idx}.0.{_UNET_RESNET[rest]}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            b = int(m[1])
            new = f"output_blocks.{b * per_block + per_block - 1}.{2 if has_attn[b] else 1}.conv"
        else:
            raise KeyError(f"no LDM name for UNet key {key!r}")
        out[f"{UNET_PREFIX}{new}.{param}"] = value
    return out


def vae_to_ldm(state: dict, config) -> dict:
    """Diffusers AutoencoderKL keys -> `first_stage_model.*` keys (attention as 1x1 convs)."""
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        module, param = _split(key)
        new = module
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out", module):
            new = f"{m[1]}.norm_out"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            new = f"encoder.down.{m[1]}.downsample.conv"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", module):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}"
            if m[2] != "group_norm" and param == "weight":
                value = value[:, :, None, None]  # linear -> 1x1 conv, as in the original VAE
        new = new.replace("conv_shortcut", "nin_shortcut")
        out[f"{VAE_PREFIX}{new}.{param}"] = value
    return out


def text_encoder_to_ldm(state: dict, prefix: str = CLIP_PREFIX) -> dict:
    """transformers CLIPTextModel keys -> `<prefix>text_model.*` keys."""
    out = {}
    for key, value in state.items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        out[f"{prefix}{key}"] = value
    return out


def open_clip_to_ldm(state: dict, prefix: str = SDXL_CLIP_PREFIXES[1]) -> dict:
    """transformers CLIPTextModelWithProjection keys -> OpenCLIP's (`<prefix>transformer.resblocks.*`: q, k, v
    stacked into `attn.in_proj_*`; the projection transposed)."""
    out, qkv = {}, {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out[f"{prefix}text_projection"] = value.T
            continue
        key = key.removeprefix("text_model.")
        if key == "embeddings.token_embedding.weight":
            out[f"{prefix}token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[f"{prefix}positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[f"{prefix}ln_final.{key.rpartition('.')[2]}"] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            rest = (m[2].replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2").replace("self_attn.", "attn.")
                    .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            out[f"{prefix}transformer.resblocks.{m[1]}.{rest}"] = value
        elif key != "embeddings.position_ids":
            raise KeyError(f"no OpenCLIP name for text-encoder key {key!r}")
    for (layer, param), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def save_ldm_checkpoint(pipe, path) -> None:
    """Write `pipe` (UNet, VAE, its CLIP text encoder; SDXL's two) as one LDM/SGM-layout .safetensors file."""
    from safetensors.torch import save_file

    state = {}
    state.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    if getattr(pipe, "text_encoder_2", None) is not None:
        state.update(text_encoder_to_ldm(pipe.text_encoder.state_dict(), SDXL_CLIP_PREFIXES[0]))
        state.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict()))
    else:
        state.update(text_encoder_to_ldm(pipe.text_encoder.state_dict()))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
