"""`lora`: peft LoRA on the UNet attention, optionally on the text encoder."""

from __future__ import annotations

import logging
from pathlib import Path

from lrkit.concept import LORA_WEIGHTS, LoraSpec
from lrkit.lora_io import require_text_encoder_lora_support, save_diffusers_lora, save_kohya_lora
from lrkit.training.methods.base import Method, trainable

logger = logging.getLogger(__name__)


def add_lora(model, options, *, text_encoder: bool) -> None:
    """Attach the LoRA adapters described by `options` (a `LoraOptions`)."""
    from peft import LoraConfig  # here: `lrkit train --help` needs neither peft nor the bitsandbytes it imports

    if text_encoder:
        require_text_encoder_lora_support()  # before any adapter is added: fail whole, not half-configured
    common = dict(r=options.rank, lora_alpha=options.true_alpha, lora_dropout=options.dropout,
                  init_lora_weights="gaussian", use_dora=options.dora)
    model.unet.add_adapter(LoraConfig(target_modules=list(options.unet_targets), **common))
    if text_encoder:
        model.text_encoder.add_adapter(LoraConfig(target_modules=list(options.text_encoder_targets), **common))


def write_lora_files(model, root: Path, name: str, *, text_encoder: bool, dora: bool = False) -> dict[str, str]:
    """The diffusers-layout LoRA, plus the kohya-layout copy (not for DoRA: no loader keeps it)."""
    te = model.text_encoder if text_encoder else None
    save_diffusers_lora(root, model.unet, te)
    if dora:
        logger.warning("DoRA concept: no kohya-layout file is written (diffusers' kohya loader drops DoRA weights)")
        return {"lora": LORA_WEIGHTS}
    kohya = f"{name}.kohya.safetensors"
    save_kohya_lora(root / kohya, model.unet, te)
    return {"lora": LORA_WEIGHTS, "kohya": kohya}


def lora_spec_of(options, *, text_encoder: bool) -> LoraSpec:
    return LoraSpec(rank=options.rank, alpha=options.true_alpha, unet_targets=list(options.unet_targets),
                    text_encoder_targets=list(options.text_encoder_targets) if text_encoder else None,
                    dropout=options.dropout, dora=options.dora)


def lora_groups_beside_tokens(model, embedding_group: dict, lr: float, weight_decay: float, *,
                              text_encoder: bool) -> list[dict]:
    """The token rows' group, then the UNet LoRA and (`text_encoder`) the text-encoder LoRA, for methods that
    learn new tokens and LoRA together (the rows also train inside the text encoder, so they are left out of
    its LoRA group)."""
    groups = [embedding_group, dict(name="unet_lora", params=trainable(model.unet), lr=lr, weight_decay=weight_decay)]
    if text_encoder:
        rows = {id(p) for p in embedding_group["params"]}
        te_lora = [p for p in trainable(model.text_encoder) if id(p) not in rows]
        groups.append(dict(name="text_encoder_lora", params=te_lora, lr=lr, weight_decay=weight_decay))
    return groups


class LoraMethod(Method):
    name = "lora"
    default_lr = 1e-4

    @property
    def _te(self) -> bool:
        return self.config.lora.train_text_encoder

    def configure(self, model) -> None:
        add_lora(model, self.config.lora, text_encoder=self._te)

    def param_groups(self, model) -> list[dict]:
        lr = self.config.optim.lr or self.default_lr
        wd = self.config.optim.weight_decay
        groups = [dict(name="unet_lora", params=trainable(model.unet), lr=lr, weight_decay=wd)]
        if self._te:
            groups.append(dict(name="text_encoder_lora", params=trainable(model.text_encoder), lr=lr, weight_decay=wd))
        return groups

    def text_encoder_frozen(self) -> bool:
        return not self._te

    def lora_spec(self) -> LoraSpec:
        return lora_spec_of(self.config.lora, text_encoder=self._te)

    def write_files(self, model, root: Path) -> dict[str, str]:
        return write_lora_files(model, root, self.config.concept_name, text_encoder=self._te,
                                dora=self.config.lora.dora)
