"""The shape every training method shares: its options, its data, what trains, the loss, what is exported.

A method is built from the whole training config (`Method(config)`); `config.<name>` holds its options
(an `options_class`). Questions about a config alone (validation, the token) are classmethods.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torch import nn

from lrkit.concept import LoraSpec, TokenSpec
from lrkit.photos import Photo
from lrkit.training.data import PhotoDataset


class Method:
    """A personalization method. Subclasses set `name` and `options_class` and override the hooks they need."""

    name: ClassVar[str]
    options_class: ClassVar[type | None] = None
    """The dataclass of `TrainConfig.<name>` (None: the method has no options of its own)."""
    default_lr: ClassVar[float] = 1e-4
    default_token: ClassVar[str] = "sks"
    """The concept's token when data.token is not set."""

    def __init__(self, config):
        self.config = config

    @property
    def options(self):
        """This method's options: `config.<name>`."""
        return getattr(self.config, self.name)

    # the config ---------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config) -> None:
        """Checks of the whole config that only this method needs; raise `ConfigError` naming the option."""

    @classmethod
    def option_groups(cls, config) -> list[str]:
        """The options groups of `config` this method reads (`TrainConfig.<group>`); a resume compares them."""
        return [cls.name] if cls.options_class is not None else []

    @classmethod
    def token_of(cls, config) -> str:
        """The concept's token in prompts (`TrainConfig.token`)."""
        return config.data.token or cls.default_token

    def prompt_tokens(self) -> list[str]:
        """Every token a prompt of this concept may use."""
        return [self.config.token]

    # the data -----------------------------------------------------------------------
    def select_photos(self, photos: list[Photo]) -> list[Photo]:
        """The photos of data.photos that train (and become the bundle's refs/), in order."""
        return photos

    def instance_dataset(self, photos: list[Photo]) -> PhotoDataset:
        """The training samples of the subject photos."""
        return photo_dataset(self.config, photos, self.config.token)

    def prepare_data(self, model) -> None:
        """Write what `prior_dataset` reads (DreamBooth: missing class images); run once, on local rank 0."""

    def prior_dataset(self) -> PhotoDataset | None:
        """Class images paired with the photos for prior preservation; None: the method has none."""
        return None

    @property
    def prior_loss_weight(self) -> float:
        """Weight of the class images' loss (used only when `prior_dataset` gives class images)."""
        return 1.0

    # what trains ------------------------------------------------------------------
    def configure(self, model) -> None:
        """Add adapters/tokens to the (frozen) `ConceptModel` and mark the trainable parameters."""
        raise NotImplementedError

    def param_groups(self, model) -> list[dict]:
        """Optimizer parameter groups (each with `params`, `lr`, `weight_decay`, `name`)."""
        raise NotImplementedError

    def text_encoder_frozen(self) -> bool:
        """True when no gradient flows through the text encoder (its outputs may be cached)."""
        return True

    def trains_module(self, module_name: str) -> bool:
        """Whether the whole `unet` / a text encoder (`text_encoder`, SDXL's `text_encoder_2`) trains (its weights
        then stay float32)."""
        return False

    def before_optimizer_step(self, model, step: int) -> None:
        """Hook after backward, before the optimizer step (e.g. pivotal tuning's phases)."""

    # the loss -----------------------------------------------------------------------
    def loss(self, model, batch: dict, generators) -> tuple:
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

    def write_files(self, model, root: Path) -> dict[str, str]:
        """Write this method's weights into the bundle folder `root`; return the manifest `files`."""
        raise NotImplementedError

    def finish_bundle(self, model, root: Path, concept) -> None:
        """After weights and refs/ are written: add method-specific files (e.g. per-token masks) to `concept`."""


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def model_groups(method: Method, model, *, text_encoder: bool, suffix: str = "") -> list[dict]:
    """Optimizer groups of the UNet's trainable parameters and, with `text_encoder`, each text encoder's, at the
    method's learning rate (`optim.lr`, else its default); named `unet<suffix>` / `text_encoder<suffix>` (SDXL:
    and `text_encoder_2<suffix>`)."""
    lr = method.config.optim.lr or method.default_lr
    wd = method.config.optim.weight_decay
    groups = [dict(name=f"unet{suffix}", params=trainable(model.unet), lr=lr, weight_decay=wd)]
    if text_encoder:
        for name, encoder in zip(model.family.text_encoders, model.text_encoders):
            groups.append(dict(name=f"{name}{suffix}", params=trainable(encoder), lr=lr, weight_decay=wd))
    return groups


def photo_dataset(config, photos: list[Photo], token: str) -> PhotoDataset:
    """Samples of `photos` as data.* of `config` describes them, captioned with `token`."""
    d = config.data
    return PhotoDataset(photos, resolution=d.resolution, token=token, class_word=d.class_word,
                        caption_template=d.caption_template, center_crop=d.center_crop, random_flip=d.random_flip,
                        repeats=d.repeats, seed=config.seed)
