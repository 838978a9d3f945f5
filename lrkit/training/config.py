"""Typed training configuration. YAML files under configs/train/ are nothing but saved `TrainConfig`s.

Every field has a docstring (shown by `lrkit train --help`); `__post_init__` validates and names the
offending option. Each method's options dataclass lives in its module under `lrkit.training.methods`.
`load_config` is the one way to build a config from YAML, dicts and overrides; the CLI, the scripts and
`lrkit.train_concept` all use it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, Union

from lrkit.concept import ConceptError, check_name, concept_slug
from lrkit.families import FAMILIES
from lrkit.training.buckets import BUCKETLESS_METHODS
from lrkit.training.methods import METHOD_NAMES, Method, get_method
from lrkit.training.methods.concept_em import ConceptEMOptions
from lrkit.training.methods.dreambooth import DreamBoothOptions
from lrkit.training.methods.lora import LoraOptions
from lrkit.training.methods.pivotal import PivotalOptions
from lrkit.training.methods.textual_inversion import TextualInversionOptions
from lrkit.training.options import ConfigError, check, check_finite

PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed")
OPTIMIZERS = ("adamw", "adamw8bit")
LR_SCHEDULERS = ("constant", "cosine", "linear")


@dataclass
class DataConfig:
    """Where the subject photos come from and how they become training samples."""

    photos: str = ""
    """Folder of subject photos (jpg/png/webp), a `datasets` save_to_disk folder, or a dataset id."""
    class_word: str = ""
    """The subject's class, e.g. `vase`, `dog` (used in captions and by the vanilla model at inference)."""
    token: Optional[str] = None
    """The concept's token in prompts. Default: `sks` (LoRA, DreamBooth), `<sks>` (Textual Inversion, pivotal)."""
    caption_template: str = "a photo of {token} {class}"
    """Caption for photos without a same-name .txt file; must contain `{token}`."""
    resolution: int = 512
    """Training resolution in pixels (square)."""
    center_crop: bool = True
    """Center crop after resizing (False: random crop). Required for `cache_latents`."""
    random_flip: float = 0.5
    """Probability of a horizontal flip."""
    repeats: int = 10
    """How many times each photo is seen per epoch (an epoch ends with a checkpoint)."""
    batch_size: int = 1
    """Photos per step and process."""
    num_workers: int = 0
    """DataLoader worker processes."""
    min_size: Optional[int] = None
    """Reject photos whose short side is smaller than this (default: resolution / 2)."""
    image_column: Optional[str] = None
    """For `datasets` sources: the image column (default: the first Image column)."""
    caption_column: Optional[str] = None
    """For `datasets` sources: an optional caption column."""
    buckets: Union[bool, Literal["auto"]] = "auto"
    """Aspect-ratio buckets: each photo trains at about resolution² pixels in the bucket shape nearest its own,
    every batch from one bucket. `auto`: on when the photos' nearest buckets differ (mixed shapes); false: square
    crops."""
    max_aspect: float = 2.0
    """The widest bucket's width over its height (and the tallest's height over its width)."""
    bucket_step: int = 64
    """Bucket sides are multiples of this many pixels (the base model's latents must halve evenly: 64 for SD 1.x)."""
    max_upscale: float = 2.0
    """With buckets, no photo is upscaled more than this: a smaller one trains in a smaller bucket of its shape."""
    caption_dropout: float = 0.0
    """Probability that a photo's sample trains with the empty caption (class images keep theirs)."""
    shuffle_caption: bool = False
    """Shuffle the comma-separated parts of each photo's caption, per sample; the first `keep_tokens` parts, and every
    part up to the one holding the token, stay in place."""
    keep_tokens: int = 0
    """With shuffle_caption: how many leading comma-separated parts stay in place."""

    def __post_init__(self) -> None:
        check_finite(self, "data")
        check(self.resolution >= 8 and self.resolution % 8 == 0,
               f"data.resolution must be a positive multiple of 8, got {self.resolution}")
        check(0.0 <= self.random_flip <= 1.0, f"data.random_flip must be in [0, 1], got {self.random_flip}")
        check(self.repeats >= 1, f"data.repeats must be >= 1, got {self.repeats}")
        check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        check(self.min_size is None or self.min_size >= 1, f"data.min_size must be >= 1, got {self.min_size}")
        check("{token}" in self.caption_template,
               f"data.caption_template {self.caption_template!r} must contain {{token}} (e.g. 'a photo of {{token}} {{class}}')")
        check(self.token is None or (bool(self.token) and not any(c.isspace() for c in self.token)),
              f"data.token {self.token!r} must be one word without whitespace, e.g. '<my-vase>'")
        check(self.buckets in (True, False, "auto"), f"data.buckets must be true, false or auto, got {self.buckets!r}")
        check(self.max_aspect >= 1.0, f"data.max_aspect must be >= 1, got {self.max_aspect}")
        check(self.bucket_step >= 8 and self.bucket_step % 8 == 0,
              f"data.bucket_step must be a positive multiple of 8, got {self.bucket_step}")
        check(self.buckets is not True or self.bucket_step <= self.resolution,
              f"data.buckets true needs data.bucket_step ({self.bucket_step}) at most data.resolution "
              f"({self.resolution})")
        check(self.max_upscale >= 1.0, f"data.max_upscale must be >= 1, got {self.max_upscale}")
        check(0.0 <= self.caption_dropout < 1.0, f"data.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        check(self.keep_tokens >= 0, f"data.keep_tokens must be >= 0, got {self.keep_tokens}")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    lr: Optional[float] = None
    """Learning rate of UNet/text-encoder weights or adapters (default per method: lora 1e-4, dreambooth 5e-6)."""
    embedding_lr: float = 5e-3
    """Learning rate of new token embeddings (textual_inversion, pivotal)."""
    optimizer: str = "adamw"
    """`adamw` (torch; fused on CUDA) or `adamw8bit` (bitsandbytes)."""
    weight_decay: float = 1e-2
    """AdamW weight decay (never applied to token embeddings)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    lr_scheduler: str = "constant"
    """`constant`, `cosine` or `linear` (decay to 0 at max_steps)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    max_grad_norm: Optional[float] = 1.0
    """Gradient clipping norm (None: off)."""

    def __post_init__(self) -> None:
        check_finite(self, "optim")
        check(self.optimizer in OPTIMIZERS, f"optim.optimizer {self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        check(self.lr_scheduler in LR_SCHEDULERS,
               f"optim.lr_scheduler {self.lr_scheduler!r} is not one of {list(LR_SCHEDULERS)}")
        check(self.lr is None or self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        check(self.embedding_lr > 0, f"optim.embedding_lr must be > 0, got {self.embedding_lr}")
        check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
              f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        check(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.max_grad_norm is None or self.max_grad_norm > 0,
              f"optim.max_grad_norm must be > 0 (or null: no clipping), got {self.max_grad_norm}")


@dataclass
class ValidationConfig:
    """Validation images during training."""

    prompts: list[str] = field(default_factory=list)
    """Prompts ({token} and {class} are filled in). Empty: no validation images."""
    every_n_steps: int = 0
    """Generate every N optimizer steps (0: only at the end)."""
    num_inference_steps: int = 25
    """Denoising steps of validation images."""
    guidance_scale: float = 7.5
    """Classifier-free guidance of validation images."""
    seed: int = 0
    """Seed of validation images (same images each time, to compare steps)."""

    def __post_init__(self) -> None:
        check_finite(self, "validation")
        check(self.every_n_steps >= 0, f"validation.every_n_steps must be >= 0, got {self.every_n_steps}")
        check(self.num_inference_steps >= 1,
              f"validation.num_inference_steps must be >= 1, got {self.num_inference_steps}")


@dataclass
class TrainConfig:
    """Train a personalization concept and export it as a concept bundle."""

    base: str = "tiny-random"
    """Base model: `tiny-random`, `tiny-random-xl`, `toy`, a hub id, a local diffusers folder, or a .safetensors
    file."""
    family: Optional[str] = None
    """The base model's family, `sd` (SD 1.x/2.x) or `sdxl`; None: told from the base (its model_index.json, a
    single file's keys)."""
    method: str = "lora"
    """One of dreambooth, lora, textual_inversion, pivotal, concept_em."""
    name: Optional[str] = None
    """Concept name (default: the output folder's name)."""
    output_dir: str = "outputs/concept"
    """Where checkpoints, logs, validation images and the bundle (OUTPUT_DIR/concept) go."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data options."""
    # the methods' options, each named after its method (`Method.options_class`, in lrkit.training.methods)
    lora: LoraOptions = field(default_factory=LoraOptions)
    """LoRA options (lora, pivotal, concept_em with train_lora)."""
    textual_inversion: TextualInversionOptions = field(default_factory=TextualInversionOptions)
    """Textual-Inversion options (textual_inversion, pivotal)."""
    dreambooth: DreamBoothOptions = field(default_factory=DreamBoothOptions)
    """DreamBooth options."""
    pivotal: PivotalOptions = field(default_factory=PivotalOptions)
    """Pivotal-tuning options."""
    concept_em: ConceptEMOptions = field(default_factory=ConceptEMOptions)
    """Multi-concept EM options (concept_em)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer options."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Validation images."""
    max_steps: int = 400
    """Optimizer steps."""
    seed: int = 0
    """Seed of everything (initialisation, noise, timesteps, data order, augmentation)."""
    precision: str = "32"
    """32, 16-mixed or bf16-mixed (trainable parameters always stay float32)."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu, ..."""
    devices: str = "auto"
    """Lightning devices: auto, a count, or a list. Under torchrun/accelerate launch: from the environment."""
    num_nodes: int = 1
    """Number of nodes."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp, ..."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the UNet (and the text encoder when it trains)."""
    compile: bool = False
    """torch.compile the UNet (in place: checkpoint and export names are unchanged). Costs a compile at start."""
    cache_latents: bool = False
    """Encode each photo (and its flip) once with the VAE instead of every step."""
    cache_text_embeddings: bool = False
    """Encode each caption once (only when the text encoder and embeddings are frozen)."""
    min_snr_gamma: Optional[float] = None
    """Min-SNR loss weighting gamma (e.g. 5.0); None: plain MSE."""
    noise_offset: float = 0.0
    """Noise offset (e.g. 0.05) for darker/brighter images."""
    checkpoint_every_n_epochs: int = 1
    """Write OUTPUT_DIR/checkpoints/last.ckpt (adapter-only) every N epochs."""
    resume: Optional[str] = "auto"
    """`auto`: resume from OUTPUT_DIR/checkpoints/last.ckpt if present; a path; or None to start fresh. A checkpoint
    trained from other inputs (photos, class word, token, method options, optimizer, seed, base) is refused."""
    overwrite: bool = False
    """Replace an existing bundle at OUTPUT_DIR/concept."""
    log_every_n_steps: int = 10
    """Logging interval."""

    def __post_init__(self) -> None:
        check_finite(self)
        check(self.method in METHOD_NAMES, f"method {self.method!r} is not one of {list(METHOD_NAMES)}")
        check(self.family is None or self.family in FAMILIES,
              f"family {self.family!r} is not one of {sorted(FAMILIES)} (or unset: told from the base)")
        check(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        check(self.precision in PRECISIONS, f"precision {self.precision!r} is not one of {list(PRECISIONS)}")
        check(self.checkpoint_every_n_epochs >= 1,
               f"checkpoint_every_n_epochs must be >= 1, got {self.checkpoint_every_n_epochs}")
        check(self.noise_offset >= 0, f"noise_offset must be >= 0, got {self.noise_offset}")
        check(self.min_snr_gamma is None or self.min_snr_gamma > 0, f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        check(self.num_nodes >= 1, f"num_nodes must be >= 1, got {self.num_nodes}")
        check(self.log_every_n_steps >= 1, f"log_every_n_steps must be >= 1, got {self.log_every_n_steps}")
        if self.name is not None:
            try:
                check_name(self.name, "name")
            except ConceptError as err:
                raise ConfigError(str(err)) from None
        if self.cache_latents:
            check(self.data.center_crop, "cache_latents needs data.center_crop=true (random crops cannot be cached)")
        check(not (self.cache_text_embeddings and self.data.shuffle_caption),
              "data.shuffle_caption and cache_text_embeddings cannot be combined (every order of a caption's parts "
              "would be encoded and kept); set cache_text_embeddings=false")
        if self.method in BUCKETLESS_METHODS:
            check(self.data.buckets is not True, f"method {self.method} trains on square crops: set data.buckets to "
                                                 "false or auto")
            check(self.data.caption_dropout == 0 and not self.data.shuffle_caption,
                  f"method {self.method} reads each concept's token in its captions: data.caption_dropout must be 0 "
                  "and data.shuffle_caption false")
        self.method_class.validate_config(self)

    # -------------------------------------------------------------- derived values

    @property
    def method_class(self) -> type[Method]:
        """The registered class of `method`."""
        return get_method(self.method)

    @property
    def token(self) -> str:
        """The concept's token in prompts, as the method says (`Method.token_of`)."""
        return self.method_class.token_of(self)

    @property
    def concept_name(self) -> str:
        """`name`, else the output folder's name made a valid concept name (`lrkit.concept.concept_slug`)."""
        return self.name or concept_slug(Path(self.output_dir).resolve().name)

    @property
    def bundle_dir(self) -> Path:
        return Path(self.output_dir) / "concept"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["optim"]["betas"] = list(data["optim"]["betas"])
        return data


# ------------------------------------------------------------------ parsing (one way)


def build_parser(prog: str = "lrkit train"):
    """The jsonargparse parser for `TrainConfig`: `--config FILE`, dotted overrides, `--print_config`.

    Options must be spelled in full; a refused command line or key raises `lrkit.argparsing.CommandLineError`
    (one line, with the closest real option)."""
    from jsonargparse import ActionConfigFile

    from lrkit.argparsing import argument_parser

    parser = argument_parser(prog, TrainConfig.__doc__, default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (configs/train/<method>.yaml)")
    parser.add_class_arguments(TrainConfig, None, as_group=False)
    return parser


def merge_nested(base: dict, over: dict) -> dict:
    """`base` updated with `over`, nested dicts merged key by key (neither input is changed)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_nested(out[key], value)
        else:
            out[key] = value
    return out


def _dotted_to_nested(overrides: dict) -> dict:
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = key.replace("__", ".").split(".")
        cur = nested
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = value
    return nested


def load_config(source: "TrainConfig | dict | str | os.PathLike | None" = None, **overrides) -> TrainConfig:
    """Build a validated `TrainConfig` from a config, a dict or a YAML file, plus overrides.

    Overrides are keyword arguments; nested options as dicts (`data={"photos": "x"}`) or with
    `__` for dots (`data__photos="x"`).
    """
    import yaml

    if source is None:
        data: dict = {}
    elif isinstance(source, TrainConfig):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of options")
    data = merge_nested(data, _dotted_to_nested(overrides))
    return config_from_dict(data)


def config_from_namespace(namespace) -> TrainConfig:
    """The `TrainConfig` of a parsed (and instantiated) jsonargparse namespace."""
    return TrainConfig(**{f.name: getattr(namespace, f.name) for f in fields(TrainConfig)})


def config_from_dict(data: dict) -> TrainConfig:
    parser = build_parser()
    try:
        return config_from_namespace(parser.instantiate(parser.parse_object(data)))
    except ConfigError:
        raise
    except Exception as err:  # jsonargparse wraps type errors and __post_init__ errors
        cause = err
        while cause.__cause__ is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from err
        raise ConfigError(f"invalid training config: {err}") from err
