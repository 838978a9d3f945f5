"""`pivotal`: Textual Inversion first, then the tokens and LoRA together (pivotal tuning)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lrkit.concept import LoraSpec
from lrkit.training.methods.base import trainable
from lrkit.training.methods.lora import add_lora, lora_groups_beside_tokens, lora_spec_of, write_lora_files
from lrkit.training.methods.textual_inversion import TextualInversionMethod
from lrkit.training.options import check, check_finite
from lrkit.training.tokens import token_rows


@dataclass
class PivotalOptions:
    """Pivotal tuning: Textual Inversion first, then tokens and LoRA together."""

    ti_fraction: float = 0.3
    """Fraction of max_steps during which only the tokens train."""

    def __post_init__(self) -> None:
        check_finite(self, "pivotal")
        check(0.0 <= self.ti_fraction < 1.0, f"pivotal.ti_fraction must be in [0, 1), got {self.ti_fraction}")


class PivotalMethod(TextualInversionMethod):
    """Tokens as in `textual_inversion` (options there), LoRA as in `lora` (options there)."""

    name = "pivotal"
    options_class = PivotalOptions
    default_lr = 1e-4

    @classmethod
    def option_groups(cls, config) -> list[str]:
        return ["pivotal", "textual_inversion", "lora"]

    @property
    def _te(self) -> bool:
        return self.config.lora.train_text_encoder

    @property
    def ti_steps(self) -> int:
        return math.ceil(self.options.ti_fraction * self.config.max_steps)

    def configure(self, model) -> None:
        # LoRA first: peft's add_adapter freezes every non-LoRA parameter, new token rows included.
        add_lora(model, self.config.lora, text_encoder=self._te)
        super().configure(model)

    def param_groups(self, model) -> list[dict]:
        return lora_groups_beside_tokens(model, self.embedding_group(model), self.config.optim.lr or self.default_lr,
                                         self.config.optim.weight_decay, text_encoder=self._te)

    def before_optimizer_step(self, model, step: int) -> None:
        # Phase 1 (tokens only): drop the LoRA gradients, so the optimizer neither moves the LoRA
        # weights nor accumulates moments for them. LoRA B starts at zero, so the adapters are
        # exactly inactive until phase 2.
        if step >= self.ti_steps:
            return
        rows = {id(p) for p in token_rows(model)}
        for p in trainable(model.unet) + [p for encoder in model.text_encoders for p in trainable(encoder)]:
            if id(p) not in rows:
                p.grad = None

    def lora_spec(self) -> LoraSpec:
        return lora_spec_of(self.config.lora, text_encoder=self._te)

    def write_files(self, model, root: Path) -> dict[str, str]:
        files = self.write_embeddings(model, root)
        files.update(write_lora_files(model, root, self.config.concept_name, text_encoder=self._te,
                                      dora=self.config.lora.dora))
        return files
