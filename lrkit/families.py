"""Model families: everything that differs between Stable Diffusion 1.x/2.x and Stable Diffusion XL.

A `ModelFamily` owns the diffusers pipeline class, how a base is recognised (a folder's `model_index.json`, a
single-file checkpoint's keys, a UNet's config), how prompts become the UNet's conditioning (`Conditioning`:
SD: one CLIP encoder's last hidden states; SDXL: two encoders' penultimate states concatenated, the second's
pooled embedding and the size/crop time ids), the text encoders a LoRA or a learned token reaches and their
kohya key prefixes, and the tiny random model tests build in-process. Loading (`lrkit.models`), training,
export and inference ask the family; none of them names a pipeline class.

    family_of(pipe)            # the family of a loaded pipeline (or a UNet)
    get_family("sdxl")         # by name: "sd" (1.x and 2.x, epsilon or v-prediction) or "sdxl"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


class FamilyError(ValueError):
    """A model family is unknown, cannot be told, or does not fit; the message names `--family`."""


@dataclass
class Conditioning:
    """What a prompt gives the UNet: `states` (B, tokens, dim) for cross-attention and, for SDXL, the pooled text
    embedding (B, dim) and the time ids (B, 6) of `added_cond_kwargs`. Rows index and concatenate together."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def unet_kwargs(self) -> dict:
        """Keyword arguments of `UNet2DConditionModel.forward` for these rows."""
        kwargs: dict = {"encoder_hidden_states": self.states}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def __len__(self) -> int:
        return self.states.shape[0]

    def __getitem__(self, rows) -> "Conditioning":
        rows = rows if isinstance(rows, slice) else (torch.as_tensor(rows) if not isinstance(rows, int)
                                                     else slice(rows, rows + 1))
        return Conditioning(self.states[rows], None if self.pooled is None else self.pooled[rows],
                            None if self.time_ids is None else self.time_ids[rows])

    def expand(self, batch: int) -> "Conditioning":
        """One row repeated `batch` times."""
        return Conditioning(*(None if t is None else t.expand(batch, *t.shape[1:]) for t in self._parts()))

    def to(self, *args, **kwargs) -> "Conditioning":
        """Every part moved/cast as `Tensor.to` (the time ids keep their values, cast like the rest)."""
        return Conditioning(*(None if t is None else t.to(*args, **kwargs) for t in self._parts()))

    def _parts(self):
        return self.states, self.pooled, self.time_ids

    @staticmethod
    def cat(parts: "list[Conditioning]") -> "Conditioning":
        pooled = [p.pooled for p in parts]
        if any(p is None for p in pooled) and not all(p is None for p in pooled):
            raise FamilyError("cannot concatenate conditioning of two model families")
        return Conditioning(torch.cat([p.states for p in parts]),
                            None if pooled[0] is None else torch.cat(pooled),
                            None if pooled[0] is None else torch.cat([p.time_ids for p in parts]))


class ModelFamily:
    """The family interface; `SD` and `SDXL` below are the built-ins."""

    name: str = ""
    label: str = ""
    pipeline_class_name: str = ""
    text_encoders: tuple[str, ...] = ("text_encoder",)
    """The pipeline's text-encoder components, in order (their tokenizers: `tokenizers`)."""
    tokenizers: tuple[str, ...] = ("tokenizer",)
    kohya_text_prefixes: tuple[str, ...] = ("lora_te",)
    """The kohya LoRA key prefix of each text encoder (`text_encoders` order)."""
    embedding_keys: tuple[str, ...] = ()
    """Keys of a learned token's vectors per text encoder in `learned_embeds.safetensors` (empty: `{token: vectors}`)."""
    default_resolution: int = 512
    """The image size (px, square) the family's published bases generate at."""

    text_encoder_classes: tuple[str, ...] = ("CLIPTextModel",)
    """The transformers class of each text encoder (`text_encoders` order), as a bundle's full weights load."""
    constructor_kwargs: dict = {}
    """What the pipeline's constructor needs besides its modules and `pipeline_kwargs` (e.g. SD's feature extractor)."""
    time_conditioned: bool = False
    """Whether the UNet takes size/crop time ids (`training_time_ids`)."""
    shard_blocks: tuple[str, ...] = ("BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer")
    """The classes of the blocks sharded one by one under `strategy: fsdp` (UNet and text-encoder blocks)."""

    def run_training_options(self, cuda: bool) -> dict:
        """Training options `lrkit run` sets on this family's bases (its own options and `--max_steps` win): what
        makes its default training fit a common GPU. `cuda`: whether training runs on a CUDA device."""
        return {}

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments every `from_pretrained` / `from_single_file` / constructor call of this family takes."""
        return {}

    def owns_unet(self, unet) -> bool:
        raise NotImplementedError

    def vae_upcast(self, vae) -> bool:
        """Whether the stock pipeline runs this VAE in float32 although it is loaded in another dtype."""
        return False

    def conditioning(self, pipe, prompts: list[str], negative: list[str] | None, *, height: int, width: int,
                     guidance: bool = True) -> tuple[Conditioning, Conditioning | None]:
        """(conditional, unconditional or None) conditioning of `prompts` as the stock pipeline encodes them."""
        raise NotImplementedError

    def build_pipeline(self, **modules):
        """A stock pipeline of this family around `modules` (vae, unet, scheduler, text encoders, tokenizers)."""
        return self.pipeline_class()(**modules, **self.pipeline_kwargs(), **self.constructor_kwargs)

    def encode_ids(self, text_encoders: list, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(states (B, tokens, dim), pooled (B, dim) or None) of token ids, one tensor per text encoder, as the stock
        pipeline encodes a prompt; gradients flow (training calls it)."""
        raise NotImplementedError

    def training_time_ids(self, original: torch.Tensor, crop: torch.Tensor,
                          size: tuple[int, int]) -> torch.Tensor | None:
        """(B, 6) time ids of training samples from each one's original size (B, 2: height, width) and crop top-left
        (B, 2: top, left), trained at `size` (height, width: the batch's pixels); None where the family has none."""
        return None

    def __repr__(self) -> str:
        return f"<model family {self.name}: {self.label}>"


class StableDiffusion(ModelFamily):
    """Stable Diffusion 1.x and 2.x (epsilon or v-prediction: the scheduler config says which)."""

    name = "sd"
    label = "Stable Diffusion 1.x/2.x"
    pipeline_class_name = "StableDiffusionPipeline"

    def pipeline_kwargs(self) -> dict:
        return {"safety_checker": None, "requires_safety_checker": False}

    def owns_unet(self, unet) -> bool:
        return getattr(unet.config, "addition_embed_type", None) is None

    constructor_kwargs = {"feature_extractor": None}

    def encode_ids(self, text_encoders, ids):
        """The encoder's last hidden states (after the final layer norm), as `StableDiffusionPipeline.encode_prompt`."""
        return text_encoders[0](ids[0])[0], None

    def conditioning(self, pipe, prompts, negative, *, height, width, guidance=True):
        cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, guidance, negative_prompt=negative)
        return Conditioning(cond), (Conditioning(uncond) if guidance else None)


class StableDiffusionXL(ModelFamily):
    """Stable Diffusion XL (base): two CLIP text encoders, pooled embedding and size/crop time ids."""

    name = "sdxl"
    label = "Stable Diffusion XL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    kohya_text_prefixes = ("lora_te1", "lora_te2")
    embedding_keys = ("clip_l", "clip_g")
    text_encoder_classes = ("CLIPTextModel", "CLIPTextModelWithProjection")
    time_conditioned = True
    default_resolution = 1024

    def pipeline_kwargs(self) -> dict:
        return {"add_watermarker": False}

    def run_training_options(self, cuda: bool) -> dict:
        """As configs/train/sdxl_*.yaml: gradient checkpointing and cached latents, and bf16-mixed on a GPU (SDXL's
        weights alone take 13.9 GB in float32, before a 1024 px step's activations)."""
        return {"gradient_checkpointing": True, "cache_latents": True, **({"precision": "bf16-mixed"} if cuda else {})}

    def owns_unet(self, unet) -> bool:
        return getattr(unet.config, "addition_embed_type", None) == "text_time"

    def vae_upcast(self, vae) -> bool:
        """SDXL's VAE overflows in float16: `StableDiffusionXLPipeline` upcasts it when `force_upcast` says so."""
        return vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))

    def time_ids(self, pipe, height: int, width: int, *, original: tuple[int, int] | None = None,
                 crop: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """(1, 6): original size, crop top-left, target size, as SDXL was trained (original defaults to target)."""
        return torch.tensor([[*(original or (height, width)), *crop, height, width]], dtype=torch.float32)

    def training_time_ids(self, original, crop, size):
        """Per sample: original size, crop top-left, target size (the batch's height and width), as SDXL was
        trained; each row what `time_ids` gives for that sample."""
        target = torch.tensor(size, dtype=torch.float32).expand(original.shape[0], 2)
        return torch.cat([original.float(), crop.float(), target], dim=1)

    def encode_ids(self, text_encoders, ids):
        """Each encoder's penultimate hidden states, concatenated; the pooled (projected) embedding of the last
        encoder, as `StableDiffusionXLPipeline.encode_prompt`."""
        states, pooled = [], None
        for encoder, encoder_ids in zip(text_encoders, ids):
            out = encoder(encoder_ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
                pooled = out[0]
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1), pooled  # (B, tokens, dim_1 + dim_2), (B, projection_dim)

    def conditioning(self, pipe, prompts, negative, *, height, width, guidance=True):
        """As `StableDiffusionXLPipeline.__call__`: no negative prompt (or only empty ones) is the stock default,
        zero unconditional embeddings (`force_zeros_for_empty_prompt`)."""
        if negative is not None and all(n == "" for n in negative):
            negative = None
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompts, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=guidance,
            negative_prompt=negative)
        ids = self.time_ids(pipe, height, width).to(pipe.device, cond.dtype).expand(len(prompts), 6)
        first = Conditioning(cond, pooled, ids)
        return first, (Conditioning(uncond, uncond_pooled, ids) if guidance else None)


SD = StableDiffusion()
SDXL = StableDiffusionXL()
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD, SDXL)}
_PIPELINE_CLASSES = {"StableDiffusionPipeline": SD, "StableDiffusionXLPipeline": SDXL}


def get_family(name: str | ModelFamily) -> ModelFamily:
    if isinstance(name, ModelFamily):
        return name
    if name not in FAMILIES:
        raise FamilyError(f"--family {name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(pipe_or_unet) -> ModelFamily:
    """The family of a pipeline or a UNet, told by the UNet's config (SDXL's adds text-time embeddings)."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    for family in FAMILIES.values():
        if family.owns_unet(unet):
            return family
    raise FamilyError(f"the UNet's addition_embed_type {unet.config.addition_embed_type!r} is not one of a family "
                      f"lrkit knows ({', '.join(f.label for f in FAMILIES.values())})")


def family_of_folder(path: str | Path) -> ModelFamily:
    """The family of a diffusers pipeline folder, from its `model_index.json` `_class_name`."""
    index = Path(path) / "model_index.json"
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise FamilyError(f"{index}: cannot read the pipeline class ({err}); pass --family "
                          f"({' or '.join(FAMILIES)})") from err
    if name not in _PIPELINE_CLASSES:
        raise FamilyError(f"{index}: pipeline class {name!r} is not one lrkit loads "
                          f"({', '.join(_PIPELINE_CLASSES)}); pass --family ({' or '.join(FAMILIES)}) to load it as one")
    return _PIPELINE_CLASSES[name]


SDXL_CHECKPOINT_KEY = "conditioner.embedders.1.model."  # SDXL's OpenCLIP-G encoder (A1111/ComfyUI checkpoints)
SD_CHECKPOINT_KEYS = ("cond_stage_model.", "model.diffusion_model.")


def family_of_checkpoint(path: str | Path) -> ModelFamily:
    """The family of a single-file `.safetensors` checkpoint, from its tensor names (the header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise FamilyError(f"{path}: not a readable safetensors checkpoint ({err})") from err
    if any(k.startswith(SDXL_CHECKPOINT_KEY) for k in keys):
        return SDXL
    if any(k.startswith(SD_CHECKPOINT_KEYS) for k in keys):
        return SD
    raise FamilyError(f"{path}: cannot tell the model family from its keys (neither an SD 1.x/2.x nor an SDXL "
                      f"checkpoint layout); pass --family ({' or '.join(FAMILIES)})")


__all__ = ["Conditioning", "FAMILIES", "FamilyError", "ModelFamily", "SD", "SDXL", "family_of", "family_of_checkpoint",
           "family_of_folder", "get_family"]
