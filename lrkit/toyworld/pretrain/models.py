"""The toy model's architecture, noise schedule and pipeline: built from config, exported as fp16 safetensors,
and loaded back in parts (`vae_from`, `init_from`)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

# SD's layout at a small scale. A 4x VAE (64 px -> 16x16x4 latents, no mid-block attention); a UNet with
# cross-attention at the 16x16 and 8x8 levels (down and up) and in the 4x4 mid block, so Layout-and-Retouch's
# decoder swap layers (self-attention at the two highest resolutions with attention) and its cross-attention maps
# exist; a 3-layer CLIP text encoder with the real CLIP vocabulary (49408 tokens, 77 positions) and hidden size 64,
# which keeps the embedding table at 6.3 MB in fp16.
TOY_RESOLUTION = 64
TOY_TEXT_HIDDEN = 64
TOY_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TOY_TEXT_HIDDEN,
    attention_head_dim=2,  # diffusers reads this as the number of heads: 2 heads train 2x faster on a CPU than 8
    norm_num_groups=16,
)
TOY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=TOY_RESOLUTION,
    mid_block_add_attention=False,  # flat-coloured pictures need no global mixing; 2x faster to train
)
TOY_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=TOY_TEXT_HIDDEN,
    intermediate_size=4 * TOY_TEXT_HIDDEN,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=TOY_TEXT_HIDDEN,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


def build_toy_components(seed: int = 0, unet_overrides: dict | None = None):
    """(vae, text_encoder, unet) of the toy architecture, randomly initialised from `seed`; `unet_overrides`
    change fields of `TOY_UNET_CONFIG` (a larger UNet: `block_out_channels`, `layers_per_block`, ...)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**TOY_VAE_CONFIG)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TOY_TEXT_CONFIG))
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(**{**TOY_UNET_CONFIG, **(unet_overrides or {})})
    return vae, text_encoder, unet


def schedule_config(snr_shift: float = 1.0) -> dict:
    """SD's noise schedule (`SD_SCHEDULER_CONFIG`) with its signal-to-noise ratio multiplied by `snr_shift` at
    every timestep (as explicit `trained_betas`; 1.0 gives SD's config itself). A shift > 1 leaves more of the
    signal at each timestep, for latents smaller than the 64x64 that SD's schedule was made for."""
    from diffusers import DDPMScheduler

    from lrkit.models import SD_SCHEDULER_CONFIG

    if snr_shift == 1.0:
        return dict(SD_SCHEDULER_CONFIG)
    abar = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG).alphas_cumprod.double()
    snr = snr_shift * abar / (1 - abar)
    shifted = snr / (1 + snr)
    betas = 1 - shifted / torch.cat([torch.ones(1, dtype=shifted.dtype), shifted[:-1]])
    return {**SD_SCHEDULER_CONFIG, "trained_betas": betas.tolist()}


def assemble_pipeline(vae, text_encoder, unet, prediction_type: str = "epsilon", snr_shift: float = 1.0):
    """A `StableDiffusionPipeline` around the components, with the shipped CLIP tokenizer and DDIM
    (SD's schedule, shifted by `snr_shift` (`schedule_config`), predicting `prediction_type`)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lrkit.models import load_clip_tokenizer

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**{**schedule_config(snr_shift), "prediction_type": prediction_type}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def export_pipeline(vae, text_encoder, unet, out: str | Path, prediction_type: str = "epsilon",
                    snr_shift: float = 1.0) -> Path:
    """Save the pipeline to `out` with fp16 safetensors weights (the models are not changed)."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    half = [copy.deepcopy(m).to("cpu", torch.float16) for m in (vae, text_encoder, unet)]
    assemble_pipeline(*half, prediction_type=prediction_type, snr_shift=snr_shift).save_pretrained(
        str(out), safe_serialization=True)
    return out


# ------------------------------------------------------------------------------------ parts of a pipeline folder


def pipeline_root(source: str) -> Path:
    """The folder of `source`: a diffusers pipeline folder, or "toy" (the shipped model)."""
    from lrkit.models import toy_model_dir

    return toy_model_dir() if source == "toy" else Path(source)


def pipeline_part(option: str, source: str, name: str) -> Path:
    """`source`'s `name` subfolder, which must hold its config.json and safetensors weights; `option` names the
    setting in the error."""
    folder = pipeline_root(source)
    if not (folder / name / "config.json").is_file() or not any((folder / name).glob("*.safetensors")):
        raise FileNotFoundError(
            f"pretrain: {option}={source!r}: no {name}/config.json with {name}/*.safetensors in {folder}; give a "
            "diffusers pipeline folder (such as a previous run's OUT/pipeline) or 'toy'"
        )
    return folder / name


def part_weights(option: str, source: str, name: str) -> dict[str, torch.Tensor]:
    """The float32 weights of `pipeline_part(option, source, name)`."""
    from safetensors.torch import load_file

    files = sorted(pipeline_part(option, source, name).glob("*.safetensors"))
    return {k: v.float() for k, v in load_file(str(files[0])).items()}


def vae_scaling_factor(source: str) -> float:
    """The latent scaling factor of `source`'s VAE (`vae_from`)."""
    return float(json.loads((pipeline_part("vae_from", source, "vae") / "config.json").read_text())["scaling_factor"])


def load_init_weights(source: str, prediction_type: str, unet, text_encoder) -> None:
    """Load `source`'s (`init_from`) UNet and text encoder weights into the freshly built modules; refuse a
    folder whose architecture or prediction type differs from this run's."""
    for name, module in (("unet", unet), ("text_encoder", text_encoder)):
        weights = part_weights("init_from", source, name)
        own = module.state_dict()
        bad = sorted(k for k in weights if k not in own or own[k].shape != weights[k].shape)
        missing = sorted(k for k, v in own.items() if k not in weights and v.is_floating_point())
        if bad or missing:
            raise ValueError(
                f"pretrain: init_from={source!r}: its {name} does not match this run's architecture "
                f"({len(bad)} unexpected or mis-shaped tensors, e.g. {(bad or missing)[0]!r}); set unet_channels, "
                "unet_layers_per_block and unet_heads to that model's"
            )
        module.load_state_dict(weights, strict=False)
    scheduler = json.loads((pipeline_root(source) / "scheduler" / "scheduler_config.json").read_text())
    if scheduler.get("prediction_type", "epsilon") != prediction_type:
        raise ValueError(f"pretrain: init_from={source!r} predicts {scheduler.get('prediction_type')!r}, "
                         f"but prediction_type is {prediction_type!r}")


__all__ = [
    "TOY_RESOLUTION",
    "TOY_TEXT_CONFIG",
    "TOY_UNET_CONFIG",
    "TOY_VAE_CONFIG",
    "assemble_pipeline",
    "build_toy_components",
    "export_pipeline",
    "load_init_weights",
    "part_weights",
    "schedule_config",
    "vae_scaling_factor",
]
