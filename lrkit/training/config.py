"""Typed training configuration. YAML files under configs/train/ are nothing but saved `TrainConfig`s.

Every field has a docstring (shown by `lrkit train --help`); `__post_init__` validates and names the
offending option. `load_config` is the one way to build a config from YAML, dicts and overrides; the
CLI, the scripts and `lrkit.train_concept` all use it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from lrkit.crf import CRFParams

METHOD_NAMES = ("dreambooth", "lora", "textual_inversion", "pivotal", "concept_em")
PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed")
OPTIMIZERS = ("adamw", "adamw8bit")
LR_SCHEDULERS = ("constant", "cosine", "linear")


class ConfigError(ValueError):
    """An invalid option; the message names it."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


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

    def __post_init__(self) -> None:
        _check(self.resolution >= 8 and self.resolution % 8 == 0,
               f"data.resolution must be a positive multiple of 8, got {self.resolution}")
        _check(0.0 <= self.random_flip <= 1.0, f"data.random_flip must be in [0, 1], got {self.random_flip}")
        _check(self.repeats >= 1, f"data.repeats must be >= 1, got {self.repeats}")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check("{token}" in self.caption_template,
               f"data.caption_template {self.caption_template!r} must contain {{token}} (e.g. 'a photo of {{token}} {{class}}')")


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
    """Also put LoRA on the text encoder."""
    text_encoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """Text-encoder module names to adapt (when train_text_encoder)."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""

    def __post_init__(self) -> None:
        _check(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        _check(self.alpha is None or self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _check(bool(self.unet_targets), "lora.unet_targets must name at least one module")

    @property
    def true_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class TextualInversionOptions:
    """New token embeddings (Textual Inversion)."""

    num_vectors: int = 1
    """Embedding vectors per token."""
    initializer: Optional[str] = None
    """Word whose embedding initialises the new vectors (default: the class word)."""

    def __post_init__(self) -> None:
        _check(self.num_vectors >= 1, f"textual_inversion.num_vectors must be >= 1, got {self.num_vectors}")


@dataclass
class DreamBoothOptions:
    """Full fine-tuning with prior preservation."""

    train_text_encoder: bool = False
    """Also fine-tune the text encoder."""
    prior_preservation: bool = True
    """Add the class-image loss (class images generated by the base model when missing)."""
    prior_loss_weight: float = 1.0
    """Weight of the prior-preservation loss."""
    class_dir: Optional[str] = None
    """Folder of class images (default: OUTPUT_DIR/class_images)."""
    class_prompt: Optional[str] = None
    """Prompt of the class images (default: `a photo of {class}`)."""
    num_class_images: int = 100
    """How many class images to use (missing ones are generated)."""
    class_inference_steps: int = 25
    """Denoising steps when generating class images."""

    def __post_init__(self) -> None:
        _check(self.prior_loss_weight >= 0, f"dreambooth.prior_loss_weight must be >= 0, got {self.prior_loss_weight}")
        _check(self.num_class_images >= 1, f"dreambooth.num_class_images must be >= 1, got {self.num_class_images}")


@dataclass
class PivotalOptions:
    """Pivotal tuning: Textual Inversion first, then tokens and LoRA together."""

    ti_fraction: float = 0.3
    """Fraction of max_steps during which only the tokens train."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.ti_fraction < 1.0, f"pivotal.ti_fraction must be in [0, 1), got {self.ti_fraction}")


@dataclass
class EMConcept:
    """One concept of `concept_em`: a new token learned from the images that show it."""

    token: str = ""
    """The concept's new token in prompts, e.g. `<v1>` (must not be a word the tokenizer knows)."""
    initializer: str = ""
    """Word(s) whose mean embedding starts the token, e.g. `ball` or `red ball`."""
    class_word: str = ""
    """Optional class of the concept (`ball`, `beach`); written to the bundle for Layout-and-Retouch."""
    num_vectors: int = 1
    """Embedding vectors of the token."""


@dataclass
class EMImage:
    """One training image of `concept_em` and the concepts it shows."""

    file: str = ""
    """File name inside data.photos."""
    concepts: list[str] = field(default_factory=list)
    """Tokens of the concepts this image shows (each must be one of concept_em.concepts)."""


@dataclass
class ConceptEMOptions:
    """Multi-concept tokens + latent masks learned by EM (DESIGN §6.3)."""

    concepts: list[EMConcept] = field(default_factory=list)
    """The concepts: token, initializer word(s), optional class word."""
    images: list[EMImage] = field(default_factory=list)
    """Which concepts each image of data.photos shows; images not listed are not used."""
    steps_per_round: int = 50
    """Optimizer steps of one M-step; the masks are re-estimated (E-step) before each round."""
    convergence_iou: float = 0.95
    """The masks have converged when every mask's IoU with the previous round's is at least this (1.0: only
    once no mask changes)."""
    after_convergence: str = "stop"
    """Once the masks converge: `stop` training there (DESIGN §6.3), or `freeze` the masks and train the
    tokens on to max_steps (the masks of a few rounds can settle long before the tokens have learned)."""
    update_masks: bool = True
    """False: estimate the masks once, before training, and keep them (the non-EM baseline)."""
    attention_timesteps: int = 50
    """Random timesteps of noised latents whose cross-attention maps are averaged per E-step."""
    max_timestep_fraction: float = 1.0
    """E-step timesteps are drawn from [0, fraction * num_train_timesteps)."""
    attention_levels: Optional[list[int]] = None
    """Resolution levels of the cross-attention layers to read (0 = latent resolution). Default:
    the second-lowest level that has cross-attention (as Layout-and-Retouch)."""
    estep_captions: str = "separate"
    """E-step captions: `separate` (one caption per token: in a causal CLIP text encoder a later token
    also carries the earlier ones, so a joint caption biases its map) or `joint` (all the image's tokens)."""
    relative_maps: bool = False
    """For images with several concepts, binarise each token's share of the attention (its map divided by
    the sum over the image's tokens) instead of its raw map."""
    threshold: Optional[float] = None
    """Binarisation threshold of the min-max-normalised maps; None: Otsu per map."""
    crf: bool = True
    """Refine each binarised map with a dense CRF on the image colours (see `crf_resolution`)."""
    crf_resolution: int = 64
    """Side of the grid the CRF runs on: at least the latent grid, at most the picture, in whole latent-pixel
    steps. The binarised map is upsampled to it (bilinear), the picture area-resized to it, and the refined mask
    area-averaged back to the latent grid (share >= 0.5). The spatial ranges stay in latent pixels and the
    kernel weights are divided by the grid pixels per latent pixel, so it is the same CRF, sampled finer. For
    SD 1.5 at 512 px this is the latent grid (64); on the toy model (64 px pictures, 16x16 latents) it is the
    picture, whose pixels carry the objects' own colours, where a latent cell on an outline mixes two."""
    crf_confidence: float = 0.7
    """CRF unary: P(foreground) inside the binarised map (1 - this outside)."""
    crf_iterations: int = CRFParams.iterations
    """Mean-field iterations."""
    crf_appearance_weight: float = CRFParams.appearance_weight
    """Weight of the CRF's appearance (colour + position) kernel."""
    crf_smoothness_weight: float = CRFParams.smoothness_weight
    """Weight of the CRF's smoothness (position) kernel."""
    crf_theta_alpha: float = CRFParams.theta_alpha
    """Spatial range of the appearance kernel, in latent pixels."""
    crf_theta_beta: float = CRFParams.theta_beta
    """Colour range of the appearance kernel (colours in [0, 1])."""
    crf_theta_gamma: float = CRFParams.theta_gamma
    """Spatial range of the smoothness kernel, in latent pixels."""
    attention_loss_weight: float = 0.1
    """Weight of the cross-attention loss (MSE between each token's normalised map and its mask)."""
    masked_loss: bool = True
    """Diffusion loss only inside the union of the masks of the concepts in the caption."""
    loss_on_unclaimed: bool = True
    """With masked_loss, also count the pixels that no concept of the image claims (the background, which the
    caption's other words describe: `on the beach`), so only the pixels of the concepts left out of the caption
    are excluded. Without them a LoRA learns nothing about where a concept ends and paints it over the whole
    frame (docs/concept-em.md); with a background concept the masks cover the picture and this changes nothing."""
    train_lora: bool = False
    """Also train LoRA (options under `lora`) together with the tokens: on the UNet, and on the text encoder
    too when lora.train_text_encoder."""

    def __post_init__(self) -> None:
        _check(self.steps_per_round >= 1, f"concept_em.steps_per_round must be >= 1, got {self.steps_per_round}")
        _check(0.0 <= self.convergence_iou <= 1.0,
               f"concept_em.convergence_iou must be in [0, 1], got {self.convergence_iou}")
        _check(self.attention_timesteps >= 1,
               f"concept_em.attention_timesteps must be >= 1, got {self.attention_timesteps}")
        _check(0.0 < self.max_timestep_fraction <= 1.0,
               f"concept_em.max_timestep_fraction must be in (0, 1], got {self.max_timestep_fraction}")
        _check(self.after_convergence in ("stop", "freeze"),
               f"concept_em.after_convergence must be 'stop' or 'freeze', got {self.after_convergence!r}")
        _check(self.estep_captions in ("separate", "joint"),
               f"concept_em.estep_captions must be 'separate' or 'joint', got {self.estep_captions!r}")
        _check(self.threshold is None or 0.0 < self.threshold < 1.0,
               f"concept_em.threshold must be in (0, 1) or null (Otsu), got {self.threshold}")
        _check(0.5 < self.crf_confidence < 1.0, f"concept_em.crf_confidence must be in (0.5, 1), got {self.crf_confidence}")
        _check(self.crf_resolution >= 1, f"concept_em.crf_resolution must be >= 1, got {self.crf_resolution}")
        _check(self.crf_iterations >= 0, f"concept_em.crf_iterations must be >= 0, got {self.crf_iterations}")
        for name in ("crf_theta_alpha", "crf_theta_beta", "crf_theta_gamma"):
            _check(getattr(self, name) > 0, f"concept_em.{name} must be > 0, got {getattr(self, name)}")
        for name in ("crf_appearance_weight", "crf_smoothness_weight", "attention_loss_weight"):
            _check(getattr(self, name) >= 0, f"concept_em.{name} must be >= 0, got {getattr(self, name)}")

    def validate(self) -> None:
        """Checks that need the whole concept list (run when method is concept_em)."""
        _check(bool(self.concepts), "concept_em.concepts is empty; list the concepts, e.g. "
                                    "[{token: '<v1>', initializer: ball}, {token: '<v2>', initializer: vase}]")
        _check(bool(self.images), "concept_em.images is empty; list each image with the concepts it shows, "
                                  "e.g. [{file: scene.png, concepts: ['<v1>', '<v2>']}]")
        tokens = [c.token for c in self.concepts]
        for i, c in enumerate(self.concepts):
            _check(bool(c.token) and c.token == c.token.strip() and " " not in c.token,
                   f"concept_em.concepts[{i}].token must be one word without spaces, got {c.token!r}")
            _check(bool(c.initializer.strip()),
                   f"concept_em.concepts[{i}] ({c.token}): initializer is empty; give a word such as 'ball'")
            _check(c.num_vectors >= 1, f"concept_em.concepts[{i}].num_vectors must be >= 1, got {c.num_vectors}")
        for i, a in enumerate(tokens):
            for b in tokens[i + 1:]:
                _check(a != b, f"concept_em.concepts: token {a!r} is listed twice; tokens must be unique")
                _check(a not in b and b not in a,
                       f"concept_em.concepts: tokens {a!r} and {b!r} overlap (one contains the other), so "
                       f"prompts cannot tell them apart; rename one, e.g. '<v1>' and '<v2>'")
        used: set[str] = set()
        for i, image in enumerate(self.images):
            name = image.file or f"images[{i}]"
            _check(bool(image.file), f"concept_em.images[{i}].file is empty; give a file name inside data.photos")
            _check(bool(image.concepts), f"concept_em.images[{i}] ({name}) lists no concept; every image must "
                                         f"show at least one of {tokens} (or leave the image out)")
            unknown = [t for t in image.concepts if t not in tokens]
            _check(not unknown, f"concept_em.images[{i}] ({name}) lists {unknown}, which are not in "
                                f"concept_em.concepts {tokens}")
            _check(len(set(image.concepts)) == len(image.concepts),
                   f"concept_em.images[{i}] ({name}) lists a concept twice: {image.concepts}")
            used.update(image.concepts)
        files = [image.file for image in self.images]
        dupes = sorted({f for f in files if files.count(f) > 1})
        _check(not dupes, f"concept_em.images lists {dupes} more than once; list each image once with all its concepts")
        unused = [t for t in tokens if t not in used]
        _check(not unused, f"concept_em.concepts {unused} are shown by no image; add them to an image's "
                           f"concepts in concept_em.images or remove them")


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
        _check(self.optimizer in OPTIMIZERS, f"optim.optimizer {self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        _check(self.lr_scheduler in LR_SCHEDULERS,
               f"optim.lr_scheduler {self.lr_scheduler!r} is not one of {list(LR_SCHEDULERS)}")
        _check(self.lr is None or self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


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


@dataclass
class TrainConfig:
    """Train a personalization concept and export it as a concept bundle."""

    base: str = "tiny-random"
    """Base model: `tiny-random`, `toy`, a hub id, a local diffusers folder, or a .safetensors file."""
    method: str = "lora"
    """One of dreambooth, lora, textual_inversion, pivotal, concept_em."""
    name: Optional[str] = None
    """Concept name (default: the output folder's name)."""
    output_dir: str = "outputs/concept"
    """Where checkpoints, logs, validation images and the bundle (OUTPUT_DIR/concept) go."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data options."""
    lora: LoraOptions = field(default_factory=LoraOptions)
    """LoRA options (lora, pivotal)."""
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
    """`auto`: resume from OUTPUT_DIR/checkpoints/last.ckpt if present; a path; or None to start fresh."""
    overwrite: bool = False
    """Replace an existing bundle at OUTPUT_DIR/concept."""
    log_every_n_steps: int = 10
    """Logging interval."""

    def __post_init__(self) -> None:
        _check(self.method in METHOD_NAMES, f"method {self.method!r} is not one of {list(METHOD_NAMES)}")
        _check(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        _check(self.precision in PRECISIONS, f"precision {self.precision!r} is not one of {list(PRECISIONS)}")
        _check(self.checkpoint_every_n_epochs >= 1,
               f"checkpoint_every_n_epochs must be >= 1, got {self.checkpoint_every_n_epochs}")
        _check(self.noise_offset >= 0, f"noise_offset must be >= 0, got {self.noise_offset}")
        _check(self.min_snr_gamma is None or self.min_snr_gamma > 0, f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        if self.cache_latents:
            _check(self.data.center_crop, "cache_latents needs data.center_crop=true (random crops cannot be cached)")
        if self.method == "concept_em":
            self.concept_em.validate()
            _check(self.data.center_crop, "method concept_em needs data.center_crop=true (the masks are estimated "
                                          "on the center crop of each image)")

    # -------------------------------------------------------------- derived values

    @property
    def token(self) -> str:
        if self.method == "concept_em" and self.concept_em.concepts:
            return self.concept_em.concepts[0].token
        if self.data.token:
            return self.data.token
        return "<sks>" if self.method in ("textual_inversion", "pivotal") else "sks"

    @property
    def concept_name(self) -> str:
        return self.name or Path(self.output_dir).name

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
