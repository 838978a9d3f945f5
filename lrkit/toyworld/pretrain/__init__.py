"""Pretraining the embedded toy base model on the toy world (DESIGN section 7).

`pretrain(out, minutes=60, seed=0)` builds a tiny Stable-Diffusion-architecture model from config (`models`) and
trains it on (rendered image, caption) pairs of `lrkit.toyworld.sample` within a wall-clock budget:

1. Data (`pool`): a pool of rendered samples, refreshed by a few fresh seeds at every UNet step.
2. VAE (`vae_fraction` of the budget): a plain autoencoder (L1 + MSE reconstruction, object pixels weighted
   up by the renderer's masks, a small KL term), then frozen; the latent scaling factor is 1 / std of the
   pool's latents, as in SD.
3. UNet + CLIP text encoder (the rest): the DDPM loss with Min-SNR-γ weighting on SD's noise schedule,
   empty captions for classifier-free guidance, AdamW with warm-up and cosine decay, EMA of both models.

`loop` holds the run, `config` its options (`PretrainConfig`) and command line, `checkpoint` the resumable
checkpoints and the EMA, `fidelity` the scores of a trained model. The export (`OUT/pipeline`) is a diffusers
pipeline folder with fp16 safetensors weights.
"""

from lrkit.toyworld.pretrain.checkpoint import EMA
from lrkit.toyworld.pretrain.config import PretrainConfig, build_parser, parse_command_line
from lrkit.toyworld.pretrain.fidelity import (
    fidelity_prompts,
    measure_class_retention,
    measure_fidelity,
    measure_two_object_fidelity,
    two_object_prompts,
)
from lrkit.toyworld.pretrain.loop import draw_timesteps, pretrain
from lrkit.toyworld.pretrain.models import (
    TOY_RESOLUTION,
    TOY_TEXT_CONFIG,
    TOY_UNET_CONFIG,
    TOY_VAE_CONFIG,
    assemble_pipeline,
    build_toy_components,
    export_pipeline,
    schedule_config,
)
from lrkit.toyworld.pretrain.pool import POOL_SEED_BASE, SamplePool, encode, render_seeds, two_objects

__all__ = [
    "EMA",
    "POOL_SEED_BASE",
    "PretrainConfig",
    "SamplePool",
    "TOY_RESOLUTION",
    "TOY_TEXT_CONFIG",
    "TOY_UNET_CONFIG",
    "TOY_VAE_CONFIG",
    "assemble_pipeline",
    "build_parser",
    "build_toy_components",
    "draw_timesteps",
    "encode",
    "export_pipeline",
    "fidelity_prompts",
    "measure_class_retention",
    "measure_fidelity",
    "measure_two_object_fidelity",
    "parse_command_line",
    "pretrain",
    "render_seeds",
    "schedule_config",
    "two_object_prompts",
    "two_objects",
]
