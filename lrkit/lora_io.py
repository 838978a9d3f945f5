"""LoRA weights out of a peft-wrapped UNet / text encoder(s), in two layouts, for SD 1.x/2.x and SDXL.

* diffusers layout (`save_diffusers_lora`): `unet.*` / `text_encoder.*` (SDXL: and `text_encoder_2.*`) keys plus
  the adapters' `LoraConfig`s in the safetensors header, written by the family's pipeline class
  (`StableDiffusionPipeline` / `StableDiffusionXLPipeline.save_lora_weights`); `pipe.load_lora_weights(dir)`
  rebuilds the exact adapters, alpha != rank and DoRA included.
* kohya layout (`to_kohya`, `save_kohya_lora`), read by A1111, ComfyUI and diffusers:
  `lora_unet_<module path, '.' -> '_'>.lora_down.weight` (= lora_A), `.lora_up.weight` (= lora_B),
  `.alpha` (the true alpha; kohya scale = alpha / rank), text encoder modules as
  `lora_te_text_model_encoder_layers_0_self_attn_q_proj` (SDXL: `lora_te1_` for the first encoder, `lora_te2_`
  for the second, kohya's SDXL names). The UNet keeps diffusers' module paths for SDXL too
  (`lora_unet_down_blocks_1_attentions_0_...`), which ComfyUI maps through its diffusers-to-SGM table and
  A1111 through its diffusers-name conversion. DoRA is refused in this layout: diffusers' loader drops kohya
  `dora_scale` keys (with a warning), so such a file would silently load as a plain LoRA.

diffusers' own `convert_state_dict_to_kohya` is not used for the kohya layout: it writes
`.alpha = rank` (an int64 tensor) instead of the true alpha, names text-encoder keys `lora_te1_`
(the SDXL spelling) and never renames DoRA magnitudes for prefixed keys.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from lrkit.families import family_of, get_family
from lrkit.io import atomic_write_bytes

logger = logging.getLogger(__name__)

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_NETWORK_MODULE = "networks.lora"
UNET_KOHYA_PREFIX = "lora_unet_"
CLIP_TEXT_MODEL_PREFIX = "text_model."
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"

# `init_lora_weights` values that change the base weights at init: the trained adapter is relative
# to that changed base, so exporting it as a plain LoRA on the original base would be wrong.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class LoraVersionError(RuntimeError):
    """The installed transformers cannot put a LoRA on the text encoder with the installed peft."""


def require_text_encoder_lora_support() -> None:
    """Raise `LoraVersionError` where transformers' PEFT integration (which both `add_adapter` and diffusers'
    `load_lora_weights` use for the text encoder) asks for a newer peft than the one installed.

    transformers 5.24 and 5.25 ask for peft >= 0.22 before any text-encoder adapter is added or loaded, while
    PyPI's newest peft is 0.21.2 (2026-12-05); lrkit's requirements exclude that pair, and this names it
    where an environment was upgraded by hand, before a training run starts.
    """
    from importlib.metadata import version

    from packaging.version import Version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:  # older transformers: no such requirement
        return
    have, wanted = version("peft"), MIN_PEFT_VERSION
    if Version(have) < Version(wanted):
        transformers = version("transformers")
        raise LoraVersionError(
            f"transformers {transformers} needs peft >= {wanted} for a text-encoder LoRA (add_adapter, "
            f"load_lora_weights), but peft {have} is installed: `pip install -U peft` if peft {wanted} is out, "
            f"else `pip install 'transformers<{transformers}'`"
        )


def _adapter_config(model: torch.nn.Module, adapter_name: str, what: str):
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ValueError(
            f"{what} has no LoRA adapter named {adapter_name!r} (adapters: {sorted(configs) or 'none'}); "
            f"add one with add_adapter(LoraConfig(...)) or pass the right adapter_name"
        )
    config = configs[adapter_name]
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{what} adapter {adapter_name!r} was initialised with init_lora_weights={init!r}, which changes "
            "the base weights; convert it to a plain LoRA first (peft's save_pretrained("
            "path_initial_model_for_weight_conversion=...)) before exporting it"
        )
    return config


def _peft_state_dict(model: torch.nn.Module, adapter_name: str) -> dict[str, Tensor]:
    from peft import get_peft_model_state_dict

    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    return {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in state_dict.items()}


def lora_state_dicts(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None, adapter_name: str = "default"
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """peft state dicts of the adapter (module-relative `lora_A`/`lora_B`[/`lora_magnitude_vector`] keys).

    The tensors are detached float32 CPU copies. `text_encoder=None` exports the UNet only; a text
    encoder without the adapter is an error rather than silently skipped.
    """
    _adapter_config(unet, adapter_name, "unet")
    unet_sd = _peft_state_dict(unet, adapter_name)
    if text_encoder is None:
        return unet_sd, None
    _adapter_config(text_encoder, adapter_name, "text_encoder")
    return unet_sd, _peft_state_dict(text_encoder, adapter_name)


def _clip_module_path(key: str) -> str:
    """Text-encoder keys as `text_model.*`: recent transformers flatten CLIPTextModel (no `text_model`),
    but kohya names, ComfyUI and older diffusers/transformers expect the `text_model.` path; current
    diffusers strips it again when the text encoder lacks it."""
    return key if key.startswith(CLIP_TEXT_MODEL_PREFIX) else CLIP_TEXT_MODEL_PREFIX + key


def _text_encoders(unet: torch.nn.Module, text_encoder, text_encoder_2) -> dict[str, torch.nn.Module]:
    """{pipeline component: module} of the text encoders given, checked against the UNet's family."""
    family = family_of(unet)
    given = {name: m for name, m in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))
             if m is not None}
    extra = [name for name in given if name not in family.text_encoders]
    if extra:
        raise ValueError(f"{extra[0]} was given, but the UNet is {family.label}, whose text encoders are "
                         f"{list(family.text_encoders)}")
    return given


def save_diffusers_lora(
    out_dir: str | os.PathLike,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    adapter_name: str = "default",
    weight_name: str = DIFFUSERS_WEIGHT_NAME,
    *,
    text_encoder_2: torch.nn.Module | None = None,
) -> Path:
    """Write the adapter in diffusers layout, LoraConfigs in the header; returns the file's path.

    `text_encoder_2`: SDXL's second text encoder. `pipe.load_lora_weights(out_dir, weight_name=weight_name)`
    rebuilds the adapters exactly.
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    if not weight_name.endswith(".safetensors"):
        raise ValueError(f"weight_name {weight_name!r} must end with '.safetensors'")
    encoders = _text_encoders(unet, text_encoder, text_encoder_2)
    unet_sd, _ = lora_state_dicts(unet, None, adapter_name)
    # The UNet keeps peft's key names, which diffusers' loader takes as they are. Its
    # `convert_state_dict_to_diffusers` renames only the attention projections (`to_q.lora_A` ->
    # `to_q.lora.down`); with other targets too (conv1, proj_in, ff) the file mixes both namings and the
    # loader silently drops the renamed ones.
    unet_layers = unet_sd
    # The LoraConfig dicts go in the header; the loader rebuilds the adapters with LoraConfig(**metadata).
    layers = {"unet_lora_layers": unet_layers,
              "unet_lora_adapter_metadata": unet.peft_config[adapter_name].to_dict()}
    for name, encoder in encoders.items():
        _adapter_config(encoder, adapter_name, name)
        te_layers = {}
        for key, value in convert_state_dict_to_diffusers(_peft_state_dict(encoder, adapter_name)).items():
            if key.endswith(MAGNITUDE_SUFFIX):
                # transformers>=5 `load_adapter` renames `lora_*` to `lora_*.<adapter>` and so cannot find
                # the DoRA parameter `lora_magnitude_vector.<adapter>.weight` from peft's suffix-less
                # key; peft's own loader accepts both spellings.
                key += ".weight"
            te_layers[_clip_module_path(key)] = value
        layers[f"{name}_lora_layers"] = te_layers
        layers[f"{name}_lora_adapter_metadata"] = encoder.peft_config[adapter_name].to_dict()

    out_dir = Path(out_dir)
    path = out_dir / weight_name
    with tempfile.TemporaryDirectory(prefix="lrkit-lora-") as tmp:
        family_of(unet).pipeline_class().save_lora_weights(tmp, weight_name=weight_name, **layers)
        atomic_write_bytes(path, (Path(tmp) / weight_name).read_bytes())
    logger.info("wrote diffusers-layout LoRA %s", path)
    return path


def _kohya_module_tensors(
    state_dict: dict[str, Tensor], prefix: str, alpha: float, module_path: Callable[[str], str]
) -> dict[str, Tensor]:
    """One model's peft state dict in kohya names, with a float32 `.alpha` per module."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(MAGNITUDE_SUFFIX) or key.endswith(MAGNITUDE_SUFFIX + ".weight"):
            raise NotImplementedError(
                f"DoRA ({key!r}) cannot be exported in kohya layout: diffusers' loader drops kohya "
                "`dora_scale` keys, so the file would load as a plain LoRA; use save_diffusers_lora"
            )
        if key.endswith(".lora_A.weight"):
            module, kohya_name = key.removesuffix(".lora_A.weight"), "lora_down.weight"
        elif key.endswith(".lora_B.weight"):
            module, kohya_name = key.removesuffix(".lora_B.weight"), "lora_up.weight"
        else:
            raise ValueError(
                f"state dict key {key!r} is not a LoRA weight (`.lora_A.weight` / `.lora_B.weight`); "
                "kohya layout has no place for it (e.g. lora_bias=True)"
            )
        name = prefix + module_path(module).replace(".", "_")
        out[f"{name}.{kohya_name}"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def to_kohya(
    unet_sd: dict[str, Tensor],
    text_encoder_sd: dict[str, Tensor] | None = None,
    *,
    alpha: float,
    te_alpha: float | None = None,
    text_encoder_2_sd: dict[str, Tensor] | None = None,
    te2_alpha: float | None = None,
    family: str = "sd",
) -> dict[str, Tensor]:
    """peft state dicts -> kohya / A1111 / ComfyUI keys (kohya scale = alpha / rank) for the model `family`
    ("sd": text encoder `lora_te_`; "sdxl": `lora_te1_` and, for `text_encoder_2_sd`, `lora_te2_`).

    `alpha` is the UNet's true lora_alpha, `te_alpha` / `te2_alpha` the text encoders' (default `alpha`).
    Raises NotImplementedError for DoRA weights (see the module docstring).
    """
    if alpha is None or alpha <= 0:
        raise ValueError(f"alpha must be a positive number (the adapter's lora_alpha), got {alpha!r}")
    prefixes = [f"{p}_" for p in get_family(family).kohya_text_prefixes]
    if text_encoder_2_sd and len(prefixes) < 2:
        raise ValueError(f"text_encoder_2_sd was given, but family {family!r} has one text encoder")
    tensors = _kohya_module_tensors(unet_sd, UNET_KOHYA_PREFIX, alpha, lambda m: m)
    for option, state, prefix, te_alpha_given in (("te_alpha", text_encoder_sd, prefixes[0], te_alpha),
                                                  ("te2_alpha", text_encoder_2_sd, prefixes[-1], te2_alpha)):
        if not state:
            continue
        a = alpha if te_alpha_given is None else te_alpha_given
        if a <= 0:
            raise ValueError(f"{option} must be a positive number, got {a!r}")
        tensors.update(_kohya_module_tensors(state, prefix, a, _clip_module_path))
    return tensors


def _kohya_alpha(model: torch.nn.Module, adapter_name: str, what: str) -> tuple[int, float]:
    """(rank, alpha) of an adapter, refusing configs whose scale is not alpha / rank per module."""
    config = _adapter_config(model, adapter_name, what)
    if config.use_rslora:
        raise ValueError(f"{what} adapter {adapter_name!r} uses use_rslora=True (scale alpha/sqrt(r)); "
                         "kohya layout stores scale = alpha / rank")
    if config.alpha_pattern:
        raise ValueError(f"{what} adapter {adapter_name!r} has a per-module alpha_pattern; kohya export "
                         "supports one alpha per model")
    return int(config.r), float(config.lora_alpha)


def save_kohya_lora(
    path: str | os.PathLike,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    *,
    adapter_name: str = "default",
    metadata: dict[str, str] | None = None,
    text_encoder_2: torch.nn.Module | None = None,
) -> Path:
    """Write the adapter in kohya layout with kohya's `ss_*` metadata; returns `path`.

    `text_encoder_2`: SDXL's second text encoder. Rank and alpha come from the modules' peft_config.
    `metadata` entries (strings) are added to, and override, the defaults. Load with
    `pipe.load_lora_weights(dir, weight_name=path.name)`.
    """
    import safetensors.torch

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path {str(path)!r} must end with '.safetensors'")
    family = family_of(unet)
    encoders = _text_encoders(unet, text_encoder, text_encoder_2)
    rank, alpha = _kohya_alpha(unet, adapter_name, "unet")
    ranks_alphas = {name: _kohya_alpha(encoder, adapter_name, name) for name, encoder in encoders.items()}
    unet_sd, _ = lora_state_dicts(unet, None, adapter_name)
    states = {name: _peft_state_dict(encoder, adapter_name) for name, encoder in encoders.items()}
    tensors = to_kohya(unet_sd, states.get("text_encoder"), alpha=alpha,
                       te_alpha=ranks_alphas.get("text_encoder", (None, None))[1],
                       text_encoder_2_sd=states.get("text_encoder_2"),
                       te2_alpha=ranks_alphas.get("text_encoder_2", (None, None))[1], family=family.name)

    header = {
        "ss_network_module": KOHYA_NETWORK_MODULE,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
    }
    if family.name == "sdxl":
        header["ss_base_model_version"] = "sdxl_base_v1-0"  # kohya's value; A1111 lists the file for SDXL bases
    for name, (te_rank, te_alpha) in ranks_alphas.items():
        # kohya has one dim/alpha for all models; each text encoder's own values go in lrkit's keys.
        header[f"lrkit_{name}_network_dim"] = str(te_rank)
        header[f"lrkit_{name}_network_alpha"] = str(te_alpha)
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata entries must be str -> str (safetensors header), got {key!r}: {value!r}")
        header[key] = value
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=header))
    logger.info("wrote kohya-layout LoRA %s", path)
    return path
