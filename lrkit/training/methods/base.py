"""The shape every training method shares: what trains, how it is optimised, what is exported."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from lrkit.concept import LoraSpec, TokenSpec

if TYPE_CHECKING:
    from lrkit.training.config import TrainConfig
    from lrkit.training.model import ConceptModel


class Method:
    """A personalization method. Subclasses set `name` and override the hooks they need."""

    name: ClassVar[str]
    default_lr: ClassVar[float] = 1e-4

    def __init__(self, config: "TrainConfig"):
        self.config = config

    # what trains ------------------------------------------------------------------
    def configure(self, model: "ConceptModel") -> None:
        """Add adapters/tokens to the (frozen) model and mark the trainable parameters."""
        raise NotImplementedError

    def param_groups(self, model: "ConceptModel") -> list[dict]:
        """Optimizer parameter groups (each with `params`, `lr`, `weight_decay`, `name`)."""
        raise NotImplementedError

    def text_encoder_frozen(self) -> bool:
        """True when no gradient flows through the text encoder (its outputs may be cached)."""
        return True

    def trains_module(self, module_name: str) -> bool:
        """Whether the whole `unet` / `text_encoder` trains (its weights then stay float32)."""
        return False

    def before_optimizer_step(self, model: "ConceptModel", step: int) -> None:
        """Hook after backward, before the optimizer step (e.g. pivotal tuning's phases)."""

    # the loss -----------------------------------------------------------------------
    def loss(self, model: "ConceptModel", batch: dict, generators) -> tuple:
        """(loss, logs) of one batch: the plain diffusion loss unless a method adds terms (concept_em)."""
        return model.diffusion_loss(batch, generators)

    def callbacks(self) -> list:
        """Lightning callbacks the method's training loop needs (e.g. concept_em's mask estimation)."""
        return []

    # what is exported ----------------------------------------------------------------
    def concept_tokens(self) -> list[TokenSpec]:
        return [TokenSpec(token=self.config.token, learned=False)]

    def lora_spec(self) -> LoraSpec | None:
        return None

    def write_files(self, model: "ConceptModel", root: Path) -> dict[str, str]:
        """Write this method's weights into the bundle folder `root`; return the manifest `files`."""
        raise NotImplementedError

    def finish_bundle(self, model: "ConceptModel", root: Path, concept) -> None:
        """After weights and refs/ are written: add method-specific files (e.g. per-token masks) to `concept`."""


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
