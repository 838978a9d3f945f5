"""`lora`: peft LoRA on the UNet attention, optionally on the text encoder(s)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lrkit.concept import LORA_WEIGHTS, LoraSpec
from lrkit.lora_io import require_text_encoder_lora_support, save_diffusers_lora, save_kohya_lora
from lrkit.training.methods.base import Method, model_groups, trainable
from lrkit.training.options import check, check_finite

logger = logging.getLogger(__name__)


@dataclass
class LoraOptions:
    """LoRA adapters (peft) on the UNet attention and optionally the text encoder."""

    rank: int = 4
    """LoRA rank r."""
    alpha: Optional[float] = None
    """LoRA alpha (scale = alpha / rank). Default: equal to rank."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    unet_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet module names to adapt (peft suffix match). Default: the attention projections; adding `proj_in`,
    `proj_out`, `ff.net.0.proj`, `ff.net.2`, `conv1`, `conv2` also adapts the transformer blocks' projections and
    feed-forward and the resnets' 3x3 convolutions (both export layouts carry them)."""
    train_text_encoder: bool = False
    """Also put LoRA on the text encoder (SDXL: on both)."""
    text_encoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """Text-encoder module names to adapt (when train_text_encoder)."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""

    def __post_init__(self) -> None:
        check_finite(self, "lora")
        check(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        check(self.alpha is None or self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        check(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        check(bool(self.unet_targets), "lora.unet_targets must name at least one module")

    @property
    def true_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


def add_lora(model, options: LoraOptions, *, text_encoder: bool) -> None:
    """Attach the LoRA adapters described by `options`."""
    from peft import LoraConfig  # here: `lrkit train --help` needs neither peft nor the bitsandbytes it imports

    if text_encoder:
        require_text_encoder_lora_support()  # before any adapter is added: fail whole, not half-configured
    common = dict(r=options.rank, lora_alpha=options.true_alpha, lora_dropout=options.dropout,
                  init_lora_weights="gaussian", use_dora=options.dora)
    model.unet.add_adapter(LoraConfig(target_modules=list(options.unet_targets), **common))
    if text_encoder:
        for encoder in model.text_encoders:
            encoder.add_adapter(LoraConfig(target_modules=list(options.text_encoder_targets), **common))


def write_lora_files(model, root: Path, name: str, *, text_encoder: bool, dora: bool = False) -> dict[str, str]:
    """The diffusers-layout LoRA, plus the kohya-layout copy (not for DoRA: no loader keeps it)."""
    encoders = dict(zip(model.family.text_encoders, model.text_encoders)) if text_encoder else {}
    save_diffusers_lora(root, model.unet, **encoders)
    if dora:
        logger.warning("DoRA concept: no kohya-layout file is written (diffusers' kohya loader drops DoRA weights)")
        return {"lora": LORA_WEIGHTS}
    kohya = f"{name}.kohya.safetensors"
    save_kohya_lora(root / kohya, model.unet, **encoders)
    return {"lora": LORA_WEIGHTS, "kohya": kohya}


def lora_spec_of(options: LoraOptions, *, text_encoder: bool) -> LoraSpec:
    return LoraSpec(rank=options.rank, alpha=options.true_alpha, unet_targets=list(options.unet_targets),
                    text_encoder_targets=list(options.text_encoder_targets) if text_encoder else None,
                    dropout=options.dropout, dora=options.dora)


def lora_groups_beside_tokens(model, embedding_group: dict, lr: float, weight_decay: float, *,
                              text_encoder: bool) -> list[dict]:
    """The token rows' group, then the UNet LoRA and (`text_encoder`) each text encoder's LoRA, for methods that
    learn new tokens and LoRA together (the rows also train inside the text encoders, so they are left out of
    their LoRA groups)."""
    groups = [embedding_group, dict(name="unet_lora", params=trainable(model.unet), lr=lr, weight_decay=weight_decay)]
    if text_encoder:
        rows = {id(p) for p in embedding_group["params"]}
        for name, encoder in zip(model.family.text_encoders, model.text_encoders):
            te_lora = [p for p in trainable(encoder) if id(p) not in rows]
            groups.append(dict(name=f"{name}_lora", params=te_lora, lr=lr, weight_decay=weight_decay))
    return groups


class LoraMethod(Method):
    name = "lora"
    options_class = LoraOptions
    default_lr = 1e-4

    @property
    def _te(self) -> bool:
        return self.options.train_text_encoder

    def configure(self, model) -> None:
        add_lora(model, self.options, text_encoder=self._te)

    def param_groups(self, model) -> list[dict]:
        return model_groups(self, model, text_encoder=self._te, suffix="_lora")

    def text_encoder_frozen(self) -> bool:
        return not self._te

    def lora_spec(self) -> LoraSpec:
        return lora_spec_of(self.options, text_encoder=self._te)

    def write_files(self, model, root: Path) -> dict[str, str]:
        return write_lora_files(model, root, self.config.concept_name, text_encoder=self._te, dora=self.options.dora)
