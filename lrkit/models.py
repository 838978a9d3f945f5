"""Loading base models: hub ids, local diffusers folders, single-file checkpoints, built-ins.

`load_base` is the one entry point. It returns a stock diffusers pipeline of the base's model family
(`lrkit.families`: `StableDiffusionPipeline` for SD 1.x/2.x, `StableDiffusionXLPipeline` for SDXL) and
records the base model's fingerprint (UNet config + a dtype-robust probe of its weights), computed
once per UNet, which concept bundles use to refuse being applied to a different base model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import weakref
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BUILTIN_BASES = ("tiny-random", "tiny-random-xl", "toy")
SINGLE_FILE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class BaseModelError(ValueError):
    """A base model could not be loaded; the message says what to do."""


@dataclass(frozen=True)
class BaseFingerprint:
    """Identity of a base model: where it came from, its UNet config hash, and a weight probe.

    The probe is a fixed sample of UNet weights (in float32). It is compared with a tolerance, so the
    same base loaded in fp16/bf16 matches, while a different base model does not.
    """

    id: str
    unet_config_sha256: str
    weight_probe: list[float] = field(default_factory=list)
    family: str = "sd"
    """The model family (`lrkit.families`): `sd` (1.x/2.x) or `sdxl`."""

    def matches(self, other: "BaseFingerprint", rtol: float = 1e-2, atol: float = 1e-3) -> bool:
        if self.family != other.family or self.unet_config_sha256 != other.unet_config_sha256:
            return False
        if len(self.weight_probe) != len(other.weight_probe):
            return False
        a = torch.tensor(self.weight_probe, dtype=torch.float64)
        b = torch.tensor(other.weight_probe, dtype=torch.float64)
        return bool(torch.allclose(a, b, rtol=rtol, atol=atol))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BaseFingerprint":
        return cls(
            id=str(data["id"]),
            unet_config_sha256=str(data["unet_config_sha256"]),
            weight_probe=[float(v) for v in data.get("weight_probe", [])],
            family=str(data.get("family", "sd")),
        )


# One fingerprint per UNet object, computed once (the UNet is the key; adapters do not change it).
_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, BaseFingerprint]" = weakref.WeakKeyDictionary()

_PROBE_TENSORS = 32
_PROBE_VALUES = 4


def _base_state_items(unet: torch.nn.Module):
    """(name, tensor) of the base weights, with peft wrappers' names normalised and adapters skipped."""
    for name, tensor in unet.state_dict().items():
        if "lora_" in name or "lora_magnitude_vector" in name:
            continue
        yield name.replace(".base_layer.", "."), tensor


def _unet_config_sha(unet: torch.nn.Module) -> str:
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    payload = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()


def compute_fingerprint(unet: torch.nn.Module, base_id: str) -> BaseFingerprint:
    """Fingerprint a UNet: config hash plus `_PROBE_VALUES` values from `_PROBE_TENSORS` tensors."""
    items = sorted(_base_state_items(unet), key=lambda kv: kv[0])
    items = [(n, t) for n, t in items if t.is_floating_point() and t.numel() >= _PROBE_VALUES]
    if not items:
        raise BaseModelError("cannot fingerprint a UNet without floating-point weights")
    stride = max(1, len(items) // _PROBE_TENSORS)
    probe: list[float] = []
    for name, tensor in items[::stride][:_PROBE_TENSORS]:
        flat = tensor.detach().reshape(-1)
        # Evenly spaced positions round(k * (n - 1) / last), in exact integer arithmetic: float32
        # positions overflow on tensors with more than 2**24 elements (SD 1.5's up-block convs).
        n = flat.numel()
        last = _PROBE_VALUES - 1
        idx = torch.tensor([(2 * k * (n - 1) + last) // (2 * last) for k in range(_PROBE_VALUES)], device=flat.device)
        probe.extend(float(v) for v in flat[idx].float().cpu())
    from lrkit.families import family_of

    return BaseFingerprint(id=base_id, unet_config_sha256=_unet_config_sha(unet), weight_probe=probe,
                           family=family_of(unet).name)


_BASE_ID_ATTR = "_lrkit_base_id"


def record_base_id(unet, base_id: str) -> None:
    """Name where `unet` came from (a base id, or `<base>+<concept>` for a concept's own UNet): its fingerprint
    records it."""
    setattr(unet, _BASE_ID_ATTR, base_id)


def fingerprint(pipe_or_unet, base_id: str | None = None) -> BaseFingerprint:
    """The base model's fingerprint, computed once per UNet and then cached."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    cached = _FINGERPRINTS.get(unet)
    if cached is None:
        cached = compute_fingerprint(unet, base_id or getattr(unet, _BASE_ID_ATTR, "unknown"))
        _FINGERPRINTS[unet] = cached
    return cached


# --------------------------------------------------------------------------- tiny-random


def clip_tokenizer_dir() -> Path:
    """The CLIP BPE tokenizer files shipped inside the package (real CLIP ids, no download)."""
    return Path(str(resources.files("lrkit") / "assets" / "clip_tokenizer"))


def load_clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()))


# The tiny model mirrors SD's layout at a small scale: cross-attention at the two highest UNet
# resolutions (so the decoder swap layers of Layout-and-Retouch exist), a 4x VAE, a 2-layer CLIP.
TINY_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=16,
)
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=16,
    sample_size=64,
)
TINY_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
TINY_RESOLUTION = 64


def seeded_modules(seed: int, *makers):
    """`maker()` of each maker, the k-th under `torch.manual_seed(seed + k)`; torch's global RNG is left as it was."""
    state = torch.random.get_rng_state()
    try:
        modules = []
        for k, make in enumerate(makers):
            torch.manual_seed(seed + k)
            modules.append(make())
        return modules
    finally:
        torch.random.set_rng_state(state)


def build_tiny_random(seed: int = 0, *, unet_overrides: dict | None = None):
    """A seeded, randomly initialised tiny Stable Diffusion pipeline, built from config offline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet, vae, text_encoder = seeded_modules(
        seed, lambda: UNet2DConditionModel(**{**TINY_UNET_CONFIG, **(unet_overrides or {})}),
        lambda: AutoencoderKL(**TINY_VAE_CONFIG), lambda: CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG)))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


TINY_XL_UNET_CONFIG = dict(
    TINY_UNET_CONFIG,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,  # the two encoders' hidden states, concatenated
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + the second encoder's pooled projection
    use_linear_projection=True,
    transformer_layers_per_block=(1, 1, 2),
)
"""SDXL's layout at a small scale: no attention at the highest resolution, two transformer layers at the lowest."""


def build_tiny_random_xl(seed: int = 0):
    """A seeded, randomly initialised tiny Stable Diffusion XL pipeline (two CLIP text encoders, the second with a
    projection), built from config offline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet, vae, text_encoder, text_encoder_2 = seeded_modules(
        seed, lambda: UNet2DConditionModel(**TINY_XL_UNET_CONFIG), lambda: AutoencoderKL(**TINY_VAE_CONFIG),
        lambda: CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG)),
        lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_CONFIG)))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), add_watermarker=False,
    )


# --------------------------------------------------------------------------- load_base


def builtin_kind(base_id: str) -> str | None:
    """Which built-in base (`toy`, `tiny-random`) a base id names, whatever its seed (`tiny-random:3`) or
    applied concept (`toy+my-dreambooth`, a fingerprint's id); None for any other base."""
    head = str(base_id).split("+")[0].split(":")[0]
    return head if head in BUILTIN_BASES else None


def _parse_builtin(name: str) -> tuple[str, int] | None:
    """`tiny-random` or `tiny-random:SEED` -> ("tiny-random", seed)."""
    head, _, tail = name.partition(":")
    if head not in BUILTIN_BASES:
        return None
    if tail and not tail.isdigit():
        raise BaseModelError(f"base model {name!r}: the seed after ':' must be an integer, e.g. 'tiny-random:1'")
    return head, int(tail or 0)


def _offline_message(name: str, err: Exception) -> str:
    return (
        f"could not load base model {name!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
        f"If this machine is offline, download it elsewhere (`hf download {name} "
        f"--local-dir ./{name.split('/')[-1]}`) and pass the local folder as the base model, "
        f"or pass a single-file .safetensors checkpoint."
    )


def _single_file_config_message(name: str, err: Exception) -> str:
    return (
        f"could not load the single-file checkpoint {name!r}: diffusers needs the pipeline configs "
        f"(UNet/VAE/text-encoder/scheduler/tokenizer) that match it, and fetching the default ones from "
        f"the Hugging Face Hub failed ({type(err).__name__}: {err}). Offline, pass a local diffusers "
        f"folder of the same architecture as config=DIR (e.g. a saved copy of "
        f"stable-diffusion-v1-5/stable-diffusion-v1-5; its weights are not used)."
    )


def _require_pipeline_folder(path: Path, what: str) -> None:
    if not path.is_dir():
        raise BaseModelError(f"{what} {str(path)!r} does not exist or is not a folder")
    if not (path / "model_index.json").is_file():
        raise BaseModelError(
            f"{what} {str(path)!r} has no model_index.json: it is not a diffusers "
            "pipeline folder (save one with pipe.save_pretrained(DIR))"
        )


def _one_loading_bar(load):
    """While `load` runs, diffusers' `Loading pipeline components` bar is the only one: transformers' bar for
    each text encoder's weights (nested in it) is off."""
    @functools.wraps(load)
    def load_with_one_bar(*args, **kwargs):
        from transformers.utils import logging as transformers_logging

        if not transformers_logging.is_progress_bar_enabled():
            return load(*args, **kwargs)
        transformers_logging.disable_progress_bar()
        try:
            return load(*args, **kwargs)
        finally:
            transformers_logging.enable_progress_bar()

    return load_with_one_bar


@_one_loading_bar
def load_base(
    name_or_path: str | os.PathLike = "tiny-random",
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    config: str | os.PathLike | None = None,
    family: str | None = None,
):
    """Load a base model as a stock diffusers pipeline of its model family (`lrkit.families`).

    `name_or_path` is one of: `tiny-random[:seed]` / `tiny-random-xl[:seed]` (built-in SD / SDXL test models),
    `toy` (the embedded toy model), a local diffusers folder, a single-file `.safetensors` checkpoint (A1111 /
    ComfyUI layout), or a hub id. The family is read from the folder's `model_index.json`, the checkpoint's
    tensor names or the hub repository's `model_index.json`; `family` ("sd" or "sdxl") overrides it.
    `config` (single-file checkpoints only): a local diffusers pipeline folder whose component
    configs (and tokenizer/scheduler) describe the checkpoint, passed to diffusers'
    `from_single_file(..., config=...)`; its weights are not used. Without it diffusers fetches
    the default configs from the Hub, which fails offline.
    `dtype` ("fp32", "fp16", "bf16" or a torch dtype) applies to every component; unset, they load as
    float32 whatever the stored weights are.
    The base fingerprint is computed here, once, and cached for the pipeline's UNet.
    """
    from lrkit.families import FamilyError, family_of, get_family

    name = str(name_or_path)
    torch_dtype = _resolve_dtype(dtype)
    builtin = _parse_builtin(name)
    try:
        chosen = None if family is None else get_family(family)
    except FamilyError as err:
        raise BaseModelError(str(err)) from None
    # Unset, every component loads as float32 (diffusers' default). Passed explicitly because transformers 5
    # otherwise keeps the text encoder in its stored dtype ("auto"): an fp16-saved folder would give an fp16
    # text encoder beside a float32 UNet, and generation fails on mismatched dtypes.
    load_dtype = torch_dtype or torch.float32
    is_single_file = builtin is None and Path(name).suffix.lower() in SINGLE_FILE_SUFFIXES
    if config is not None and not is_single_file:
        raise BaseModelError(
            f"config= applies only to single-file .safetensors checkpoints, not to base model {name!r}"
        )
    if builtin is not None:
        kind, seed = builtin
        if kind == "toy":
            pipe = _load_toy()
        elif kind == "tiny-random-xl":
            pipe = build_tiny_random_xl(seed)
        else:
            pipe = build_tiny_random(seed)
        base_id = name if kind not in ("tiny-random", "tiny-random-xl") or seed else kind
        if chosen is not None and chosen is not family_of(pipe):
            raise BaseModelError(f"base model {name!r} is {family_of(pipe).label}, not {chosen.label} (--family {chosen.name})")
    else:
        path = Path(name).expanduser()
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise BaseModelError(
                f"base model {name!r} is a pickle checkpoint; lrkit loads only safetensors. "
                "Convert it (e.g. diffusers' convert_original_stable_diffusion_to_diffusers.py) "
                "or pass a .safetensors file."
            )
        fam = family_of_base(name, chosen)
        cls, extra = fam.pipeline_class(), fam.pipeline_kwargs()
        if is_single_file:
            config_dir = None
            if config is not None:
                config_dir = Path(config).expanduser()
                _require_pipeline_folder(config_dir, "config folder")
            try:
                pipe = cls.from_single_file(
                    str(path), config=str(config_dir) if config_dir is not None else None,
                    **dtype_kwarg(load_dtype), **extra,
                )
            except (OSError, ConnectionError) as err:
                if config_dir is not None:
                    raise
                raise BaseModelError(_single_file_config_message(name, err)) from err
            base_id = path.name
        elif path.is_dir():
            pipe = cls.from_pretrained(str(path), **dtype_kwarg(load_dtype), **extra, use_safetensors=True)
            base_id = str(path.resolve())
        else:
            try:
                pipe = cls.from_pretrained(name, **dtype_kwarg(load_dtype), **extra, use_safetensors=True)
            except (OSError, ValueError, ConnectionError) as err:
                raise BaseModelError(_offline_message(name, err)) from err
            base_id = name
    if torch_dtype is not None and builtin is not None:
        pipe.to(dtype=torch_dtype)
    if device is not None:
        pipe.to(device)
    record_base_id(pipe.unet, base_id)
    fingerprint(pipe, base_id)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def family_of_base(name_or_path: "str | os.PathLike", family=None):
    """The model family (`lrkit.families`) of a base model `load_base` takes, without loading it: a built-in's,
    a single-file checkpoint's (its tensor names), a folder's (`model_index.json`) or a hub repository's (its
    `model_index.json`, one small download). `family` (a name or a `ModelFamily`) is returned as given, after the
    path checks. `BaseModelError` names the base and the fix."""
    from lrkit.families import FamilyError, family_of_checkpoint, family_of_folder, get_family

    name = str(name_or_path)
    try:
        chosen = None if family is None else get_family(family) if isinstance(family, str) else family
        builtin = _parse_builtin(name)
        if builtin is not None:
            return chosen or get_family("sdxl" if builtin[0] == "tiny-random-xl" else "sd")
        path = Path(name).expanduser()
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            if not path.is_file():
                raise BaseModelError(f"base model file {name!r} does not exist")
            return chosen or family_of_checkpoint(path)
        if path.is_dir():
            _require_pipeline_folder(path, "base model folder")
            return chosen or family_of_folder(path)
        if name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise BaseModelError(f"base model path {name!r} does not exist")
        return chosen or _family_of_hub_id(name)
    except FamilyError as err:
        raise BaseModelError(f"base model {name!r}: {err}") from None


def _family_of_hub_id(name: str):
    """The family of a hub repository, from its `model_index.json` (one small download)."""
    from lrkit.families import family_of_folder

    try:
        from huggingface_hub import hf_hub_download

        index = Path(hf_hub_download(name, "model_index.json"))
    except Exception as err:  # offline, unknown repo, gated: the loader's own message says what to do
        raise BaseModelError(_offline_message(name, err)) from err
    return family_of_folder(index.parent)


def toy_model_dir() -> Path:
    """The folder of the embedded toy base model (a diffusers pipeline folder inside the package)."""
    return Path(str(resources.files("lrkit") / "assets" / "toy"))


def _load_toy():
    """The embedded toy base model (DESIGN section 7): fp16 safetensors shipped in lrkit/assets/toy/
    (made by `lrkit toyworld pretrain`, see its MODEL_CARD.md), loaded offline as float32."""
    from diffusers import StableDiffusionPipeline

    path = toy_model_dir()
    if not (path / "model_index.json").is_file():
        raise BaseModelError(
            "the embedded toy base model is not built yet in this version of lrkit; use 'tiny-random' "
            "or a diffusers model (hub id, local folder or .safetensors file)"
        )
    return StableDiffusionPipeline.from_pretrained(
        str(path), **dtype_kwarg(torch.float32), use_safetensors=True, safety_checker=None,
        requires_safety_checker=False, local_files_only=True,
    )


def dtype_kwarg(dtype: torch.dtype, library: str = "diffusers") -> dict[str, torch.dtype]:
    """`{"dtype": dtype}` where `library`'s `from_pretrained` takes it, else `{"torch_dtype": dtype}`.

    diffusers 0.40 and transformers 4.56 renamed the keyword and warn on the old one; the versions lrkit
    still supports below them know only `torch_dtype`.
    """
    from importlib.metadata import version

    from packaging.version import Version

    renamed = {"diffusers": "0.40", "transformers": "4.56"}[library]
    return {"dtype" if Version(version(library)) >= Version(renamed) else "torch_dtype": dtype}


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise BaseModelError(f"dtype {dtype!r} is not one of {sorted(names)}")
    return names[dtype]
