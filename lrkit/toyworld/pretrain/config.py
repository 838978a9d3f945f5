"""`PretrainConfig`, the options of a pretraining run, and the command line that fills it."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class PretrainConfig:
    """Options of `pretrain`; every field is saved in `state.json`."""

    minutes: float = 60.0
    """Wall-clock budget for the whole run (all phases, export included)."""
    seed: int = 0
    """Seeds model initialisation, data seeds, noise and caption dropout."""
    max_steps: int | None = None
    """Stop the UNet phase after this many steps (smoke tests), whatever the time."""
    vae_steps: int | None = None
    """Stop the VAE phase after this many steps (smoke tests), whatever the time."""
    pool_size: int = 3072
    """Rendered samples kept in memory."""
    refresh_per_step: int = 3
    """Pool entries replaced by freshly rendered seeds at every UNet step."""
    render_workers: int = 0
    """Processes that render the pool (0: this process). With workers, fresh seeds are rendered in the background,
    `refresh_chunk_steps` steps' worth at a time, and enter the pool one chunk later (same seeds, same slots)."""
    refresh_chunk_steps: int = 25
    """With `render_workers`: steps between two background refreshes of `refresh_chunk_steps * refresh_per_step` seeds."""
    two_object_fraction: float = 0.0
    """Share of rendered samples with two objects ("a red ball and a blue cube on the beach"); the rest have one."""
    extras_fraction: float = 0.0
    """Share of generic objects drawn with one of their class's subject-only features (`SUBJECT_EXTRAS`), which the
    caption does not name."""
    vae_fraction: float = 0.2
    """Share of the budget for the VAE phase."""
    vae_batch_size: int = 8
    """Batch size of the VAE phase."""
    vae_lr: float = 2e-3
    """Learning rate of the VAE (AdamW, 30-step warm-up)."""
    vae_kl_weight: float = 1e-6
    """Weight of the VAE's KL term."""
    vae_object_weight: float = 8.0
    """Extra reconstruction weight of object pixels (from the renderer's ground-truth masks)."""
    batch_size: int = 32
    """Batch size of the UNet phase."""
    lr: float = 8e-4
    """Peak learning rate of the UNet + text encoder (AdamW)."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up of the UNet phase, in steps."""
    weight_decay: float = 1e-2
    """AdamW weight decay of the UNet phase."""
    caption_dropout: float = 0.1
    """Share of empty captions (for classifier-free guidance)."""
    min_snr_gamma: float = 5.0
    """γ of the Min-SNR-γ loss weighting (`lrkit.losses.min_snr_weight`)."""
    prediction_type: str = "epsilon"
    """What the UNet predicts: "epsilon" (SD 1.x) or "v_prediction" (SD 2.x)."""
    object_loss_weight: float = 0.0
    """Extra diffusion-loss weight of object latents (the renderer's masks at latent resolution):
    the per-pixel weight is 1 + object_loss_weight * object share, normalised to mean 1 per sample."""
    vae_from: str | None = None
    """Reuse the VAE (and its scaling factor) of this pipeline folder, or "toy" for the shipped one,
    and skip the VAE phase; the whole budget then goes to the UNet."""
    init_from: str | None = None
    """Start the UNet and text encoder from this pipeline folder ("toy": the shipped model) instead of random
    weights; the VAE then comes from there too (`vae_from`). The UNet options must describe that folder's UNet."""
    timestep_focus: str = ""
    """"LO,HI": draw `timestep_focus_fraction` of each batch's timesteps uniformly from [LO, HI) instead of the
    whole schedule (the range where an object's outline is laid out)."""
    timestep_focus_fraction: float = 0.0
    """Share of each batch's timesteps drawn from `timestep_focus`."""
    token_lr_scale: float = 1.0
    """The text encoder's token table learns at `lr` times this (the rest of both models at `lr`)."""
    snr_shift: float = 1.0
    """Multiply the noise schedule's SNR by this at every timestep (1.0: SD's schedule). The exported scheduler
    carries the schedule, and lrkit's training and inference read it from there."""
    unet_channels: str = "32,64,64"
    """The UNet's `block_out_channels`, comma-separated (three levels; the shipped model's by default)."""
    unet_layers_per_block: int = 1
    """The UNet's `layers_per_block`."""
    unet_heads: int = 2
    """Attention heads of the UNet (diffusers' `attention_head_dim`, which it reads as the number of heads)."""
    ema_decay: float = 0.995
    """Decay of the exported EMA weights of the UNet and text encoder."""
    checkpoint_minutes: float = 5.0
    """Minutes between two checkpoints."""
    export_reserve_minutes: float = 0.5
    """Time kept at the end for the final checkpoint and the export."""
    num_threads: int = 2
    """CPU threads of torch during the run."""
    device: str = "cpu"
    """Where the models train ("cuda" on a GPU); rendering and the sample pool stay on the CPU."""
    bf16: bool = False
    """Run the UNet and text encoder forward passes under bfloat16 autocast (weights stay fp32)."""

    def unet_block_out_channels(self) -> tuple[int, ...]:
        return tuple(int(c) for c in str(self.unet_channels).split(","))

    def timestep_focus_range(self) -> tuple[int, int] | None:
        """`timestep_focus` as (LO, HI); None when unset."""
        if not self.timestep_focus:
            return None
        try:
            lo, hi = (int(v) for v in str(self.timestep_focus).split(","))
        except ValueError:
            raise ValueError(self._focus_error()) from None
        return lo, hi

    def _focus_error(self) -> str:
        return (f"pretrain: timestep_focus must be 'LO,HI' with 0 <= LO < HI <= 1000 and timestep_focus_fraction in "
                f"[0, 1] (> 0 only with a range); got {self.timestep_focus!r}, {self.timestep_focus_fraction}")

    def unet_overrides(self) -> dict:
        return dict(block_out_channels=self.unet_block_out_channels(), layers_per_block=self.unet_layers_per_block,
                    attention_head_dim=self.unet_heads)

    def __post_init__(self):
        if self.minutes <= 0:
            raise ValueError(f"pretrain: minutes must be > 0, got {self.minutes}")
        if not 0.0 < self.vae_fraction < 1.0:
            raise ValueError(f"pretrain: vae_fraction must be in (0, 1), got {self.vae_fraction}")
        if self.pool_size < self.batch_size or self.pool_size < self.vae_batch_size:
            raise ValueError(f"pretrain: pool_size ({self.pool_size}) must be >= the batch sizes")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"pretrain: caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"pretrain: prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}"
            )
        for name in ("two_object_fraction", "extras_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"pretrain: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.object_loss_weight < 0:
            raise ValueError(f"pretrain: object_loss_weight must be >= 0, got {self.object_loss_weight}")
        try:
            channels = self.unet_block_out_channels()
        except ValueError:
            channels = ()
        if len(channels) != 3 or any(c < 1 or c % 16 for c in channels) or self.unet_layers_per_block < 1 \
                or self.unet_heads < 1 or any(c % self.unet_heads for c in channels):
            raise ValueError(
                f"pretrain: unet_channels must be three multiples of 16 (the UNet's group norm) divisible by "
                f"unet_heads, and unet_layers_per_block >= 1; got {self.unet_channels!r}, {self.unet_heads} heads, "
                f"{self.unet_layers_per_block} layers per block"
            )
        lo, hi = self.timestep_focus_range() or (0, 1)
        if not (0 <= lo < hi <= 1000 and 0.0 <= self.timestep_focus_fraction <= 1.0) \
                or (self.timestep_focus_fraction > 0 and not self.timestep_focus):
            raise ValueError(self._focus_error())
        if not self.token_lr_scale > 0:
            raise ValueError(f"pretrain: token_lr_scale must be > 0, got {self.token_lr_scale}")
        if self.init_from is not None and self.vae_from is None:
            self.vae_from = self.init_from
        if not self.snr_shift > 0:
            raise ValueError(f"pretrain: snr_shift must be > 0, got {self.snr_shift}")
        if self.render_workers < 0 or self.refresh_chunk_steps < 1:
            raise ValueError(
                f"pretrain: render_workers must be >= 0 and refresh_chunk_steps >= 1, got {self.render_workers} "
                f"and {self.refresh_chunk_steps}"
            )


# ------------------------------------------------------------------------------------ command line



def build_parser(prog: str = "lrkit toyworld pretrain"):
    """The jsonargparse parser of `lrkit toyworld pretrain`: `--out`, `--resume`, `--config FILE` and every
    `PretrainConfig` field as an option, spelled as in `lrkit train` (`--pool_size 49152`, `--bf16 true`).
    A refused command line raises `lrkit.argparsing.CommandLineError`."""
    from jsonargparse import ActionConfigFile

    from lrkit.argparsing import argument_parser

    parser = argument_parser(prog, "Pretrain the toy base model on the toy world (time-budgeted).", default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of PretrainConfig fields")
    parser.add_argument("--out", required=True, help="run folder: checkpoint/, log.jsonl, pipeline/ (the export)")
    parser.add_argument("--resume", type=bool, default=False, help="continue the run in --out from its checkpoint")
    parser.add_class_arguments(PretrainConfig, None, as_group=False)
    return parser


def parse_command_line(argv: list[str], prog: str = "lrkit toyworld pretrain") -> tuple[str, bool, dict]:
    """(out, resume, PretrainConfig fields) of an `lrkit toyworld pretrain` command line."""
    args = build_parser(prog).parse_args(argv)
    return args.out, args.resume, {f.name: getattr(args, f.name) for f in fields(PretrainConfig)}


__all__ = ["PretrainConfig", "build_parser", "parse_command_line"]
