"""Generation options: the common ones, and one group per stage or mode, each validated in one place.

`GenerationOptions` is what `LayoutRetouchPipeline` takes and what configs/infer/*.yaml hold::

    options:
      mode: layout-retouch
      num_inference_steps: 50
      layout: {lam: 0.3}
      retouch: {swap_levels: 2, sam_weight: 0.5, mask_threshold: 0.5}

Field names are unique across the groups, so `GenerationOptions.of(lam=0.5, swap=False)` and
`options.replace(...)` take any field by its bare name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

MODES = ("vanilla", "personalized", "layout", "layout-retouch", "dual-reference")
SCHEDULERS = {  # name -> diffusers class name
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}
FOREGROUND_MODES = ("concatenate", "replace")
RENAMED = {"alpha": "sam_weight", "tau": "mask_threshold"}  # old option name -> new one


class InferenceError(ValueError):
    """Bad inference input; the message names the option or file."""


def _check_finite(options) -> None:
    """Raise `InferenceError` naming the first float field of `options` that is NaN or infinite."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise InferenceError(f"{f.name} must be a finite number, got {value}")


def _fraction(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise InferenceError(f"{name} must be in [0, 1] (a fraction of the steps), got {value}")


@dataclass
class LayoutOptions:
    """Stage 1 (modes layout and layout-retouch): which steps the vanilla model draws."""

    lam: float = 0.3
    """λ: fraction of the steps drawn by the vanilla model."""
    vanilla_phrase: str | None = None
    """What replaces the concept token for the vanilla model (default: the class word), e.g. 'red vase'."""

    def __post_init__(self) -> None:
        _check_finite(self)
        if not 0.0 <= self.lam <= 1.0:
            raise InferenceError(f"lam must be in [0, 1], got {self.lam}")


@dataclass
class RetouchOptions:
    """Stage 2 (mode layout-retouch): the reference photo, the swap layers and steps, the target mask.
    Mode dual-reference reads `reference`, the layers and the mask options too."""

    reference: int = 0
    """Which of the concept's reference photos R is."""
    retouch_start: float | None = None
    """s0 as a fraction of T: where X leaves the layout trajectory (default: λ; must be >= λ)."""
    swap_start: float | None = None
    """First step (fraction of T) with the attention swap on (default: retouch_start)."""
    swap_levels: int = 2
    """Decoder self-attention at this many highest resolutions that have attention swaps in the reference (SD 1.5:
    up_blocks.3, then up_blocks.2; SDXL: up_blocks.1, then up_blocks.0)."""
    swap_layers: list[str] | None = None
    """Explicit swap layers (self-attention processor names, e.g.
    'up_blocks.3.attentions.0.transformer_blocks.0.attn1.processor'); overrides swap_levels."""
    sam_weight: float = 0.5
    """Weight of the SAM mask against the cross-attention map in the target mask."""
    mask_threshold: float = 0.5
    """Threshold of the blended target mask."""
    foreground: str = "concatenate"
    """How the target's subject queries read the reference in the swap layers: concatenate (its own keys and R's
    subject keys, [K_R ⊙ M_R ; K_X]) or replace (R's subject keys alone, as MasaCtrl)."""
    reference_weight: float = 1.0
    """Multiplies the softmax weight of R's subject tokens in the swap (1: plain concatenation)."""
    swap: bool = True
    """The attention swap on (off, stage 2 returns the layout: a debugging switch)."""
    correspondence: bool = False
    """Also return where each part of the target's subject reads from in the reference (`Generation.correspondence`,
    saved as `_correspondence.png` with the intermediates): the view to open when a retouch fails."""
    cache_attention: bool = True
    """Reuse what earlier passes computed: C's swap-layer outputs recorded in stage 1, R's keys/values
    recorded once per reference. Stage 2 then runs only the target rows (faster, costs memory)."""

    def __post_init__(self) -> None:
        _check_finite(self)
        _fraction("retouch_start", self.retouch_start)
        _fraction("swap_start", self.swap_start)
        if self.foreground not in FOREGROUND_MODES:
            raise InferenceError(f"foreground {self.foreground!r} is not one of {list(FOREGROUND_MODES)}")
        if not (math.isfinite(self.reference_weight) and self.reference_weight > 0):
            raise InferenceError(f"reference_weight must be a finite number > 0, got {self.reference_weight}")
        if not 0.0 <= self.sam_weight <= 1.0 or not 0.0 <= self.mask_threshold <= 1.0:
            raise InferenceError(f"sam_weight and mask_threshold must be in [0, 1], got sam_weight={self.sam_weight}, "
                                 f"mask_threshold={self.mask_threshold}")


@dataclass
class DualReferenceOptions:
    """Mode dual-reference (DESIGN §6.1): the style image and how the two references share the steps."""

    style_reference: str | None = None
    """Style image (required): its background's palette and texture go onto the subject."""
    style_subject: str | None = None
    """Word for the style image's foreground content, e.g. 'ball': its cross-attention (and SAM) masks that content
    out of the style; unset, the whole style image counts as style."""
    custom_reference: str | None = None
    """Customization reference photo; default: the concept's reference photo `retouch.reference`."""
    switch: float | None = None
    """Fraction of T where customization hands over to style (default: from the references' grey-level entropies,
    H_C / (H_C + H_S), clamped to [switch_min, switch_max])."""
    switch_min: float = 0.2
    """Lower clamp of the entropy-derived switch (fraction of T)."""
    switch_max: float = 0.8
    """Upper clamp of the entropy-derived switch (fraction of T)."""
    customize: bool = True
    """The early (customization) phase on."""
    stylize: bool = True
    """The late (style) phase on."""
    custom_weight: float = 1.0
    """Multiplies the attention weight of the customization reference's tokens (1: plain concatenation)."""
    style_weight: float = 1.0
    """Multiplies the attention weight of the style reference's tokens (1: plain concatenation; large: the
    subject's queries are rebuilt from the style image's background alone)."""
    style_shift: float = 0.0
    """lrkit's addition to DRP-Diff (0: off, the paper's method): in the style phase, after each step, move the
    per-channel mean of the target's subject latents this fraction of the way to the mean of the style image's
    background latents at the same noise level (1: equal means). Self-attention alone may not recolour a subject
    whose colour the text and adapters fix; this carries the style's palette."""
    style_shift_start: float = 0.9
    """The first step of `style_shift`, a fraction of T (never before the switch step; the last step always
    shifts). Late steps recolour the subject without moving its outline or the background (bench/RESULTS.md,
    "Dual reference")."""

    def __post_init__(self) -> None:
        _check_finite(self)
        _fraction("switch", self.switch)
        _fraction("style_shift_start", self.style_shift_start)
        if not 0.0 <= self.style_shift <= 1.0:
            raise InferenceError(f"style_shift must be in [0, 1] (0: off, 1: the style's latent means), got "
                                 f"{self.style_shift}")
        if not (self.custom_weight > 0 and self.style_weight > 0):
            raise InferenceError(f"custom_weight and style_weight must be > 0, got custom_weight={self.custom_weight}, "
                                 f"style_weight={self.style_weight}")
        if not 0.0 <= self.switch_min <= self.switch_max <= 1.0:
            raise InferenceError(f"need 0 <= switch_min <= switch_max <= 1, got switch_min={self.switch_min}, "
                                 f"switch_max={self.switch_max}")


GROUPS = {"layout": LayoutOptions, "retouch": RetouchOptions, "dual_reference": DualReferenceOptions}


@dataclass
class GenerationOptions:
    """Options of one `LayoutRetouchPipeline` call (also the YAML under configs/infer/)."""

    mode: str = "layout-retouch"
    """vanilla | personalized | layout | layout-retouch | dual-reference."""
    scheduler: str = "ddim"
    """ddim | euler | euler_a | dpm++ | pndm (layout-retouch and dual-reference need ddim: their references are
    DDIM-inverted)."""
    num_inference_steps: int = 50
    """Denoising steps T (DDIM)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale (both stages)."""
    negative_prompt: str = ""
    """Negative prompt."""
    height: int | None = None
    """Image height (default: the concept's training resolution)."""
    width: int | None = None
    """Image width (default: the concept's training resolution)."""
    eta: float = 0.0
    """DDIM eta."""
    layout: LayoutOptions = field(default_factory=LayoutOptions)
    """Stage 1: modes layout and layout-retouch."""
    retouch: RetouchOptions = field(default_factory=RetouchOptions)
    """Stage 2: mode layout-retouch (dual-reference reads its reference, layers and mask options)."""
    dual_reference: DualReferenceOptions = field(default_factory=DualReferenceOptions)
    """Mode dual-reference."""

    def __post_init__(self) -> None:
        for name, group in GROUPS.items():  # YAML and plain dicts arrive as dicts
            if isinstance(getattr(self, name), dict):
                setattr(self, name, group(**getattr(self, name)))
        _check_finite(self)
        if self.eta < 0:
            raise InferenceError(f"eta must be >= 0 (0: deterministic DDIM), got {self.eta}")
        if self.mode not in MODES:
            raise InferenceError(f"mode {self.mode!r} is not one of {list(MODES)}")
        if self.scheduler not in SCHEDULERS:
            raise InferenceError(f"scheduler {self.scheduler!r} is not one of {list(SCHEDULERS)}")
        if self.mode in ("layout-retouch", "dual-reference") and self.scheduler != "ddim":
            raise InferenceError(f"mode {self.mode!r} needs scheduler 'ddim' (got {self.scheduler!r}): its references "
                                 "are DDIM-inverted")
        if self.num_inference_steps < 1:
            raise InferenceError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        start = self.retouch.retouch_start
        if start is not None and start < self.layout.lam:
            raise InferenceError(
                f"retouch_start ({start}) must be >= lam ({self.layout.lam}): the target leaves the layout "
                "trajectory where the personalized model has taken over"
            )
        if self.mode != "dual-reference":
            given = [f.name for f in dataclasses.fields(DualReferenceOptions)
                     if getattr(self.dual_reference, f.name) != f.default]
            if given:
                raise InferenceError(f"{given[0]} is an option of mode 'dual-reference' (mode is {self.mode!r}); "
                                     "set mode: dual-reference or leave it unset")

    # ------------------------------------------------------------------ fields by bare name

    @classmethod
    def of(cls, **fields) -> "GenerationOptions":
        """Options from fields of any group by their bare names, e.g. `of(mode='layout', lam=0.5)`."""
        return cls().replace(**fields)

    def replace(self, **fields) -> "GenerationOptions":
        """A copy with fields of any group replaced by their bare names (validated again)."""
        top, groups = {}, {name: {} for name in GROUPS}
        for name, value in fields.items():
            group = field_group(name)
            if group is None:
                top[name] = value
            else:
                groups[group][name] = value
        changed = {name: dataclasses.replace(getattr(self, name), **values) for name, values in groups.items() if values}
        return dataclasses.replace(self, **top, **changed)

    def step_index(self, fraction: float) -> int:
        """Index of the first step i with i >= fraction * T."""
        return min(self.num_inference_steps, math.ceil(fraction * self.num_inference_steps - 1e-9))

    def retouch_step(self) -> int:
        """s0 as a step index: `retouch.retouch_start`, else λ."""
        start = self.retouch.retouch_start
        return self.step_index(start if start is not None else self.layout.lam)

    def swap_step(self) -> int:
        """The first step with the attention swap on: `retouch.swap_start` (not before s0), else s0."""
        if self.retouch.swap_start is not None:
            return max(self.retouch_step(), self.step_index(self.retouch.swap_start))
        return self.retouch_step()


def field_group(name: str) -> str | None:
    """The group holding field `name` (None: a common field); unknown and renamed names raise `InferenceError`."""
    if name in RENAMED:
        raise InferenceError(f"option {name!r} is now {RENAMED[name]!r} ({field_path(RENAMED[name])})")
    for group, cls in GROUPS.items():
        if name in {f.name for f in dataclasses.fields(cls)}:
            return group
    if name in {f.name for f in dataclasses.fields(GenerationOptions)} and name not in GROUPS:
        return None
    raise InferenceError(f"{name!r} is not a generation option")


def field_path(name: str) -> str:
    """`options.<group>.<name>`, the field's place in the YAML and the CLI (`--options.<group>.<name>`)."""
    group = field_group(name)
    return f"options.{group}.{name}" if group else f"options.{name}"


def moved_keys() -> dict[str, str]:
    """Config keys that moved or were renamed -> their place now (for the CLI's error messages)."""
    moved = {f"options.{old}": field_path(new) for old, new in RENAMED.items()}
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            moved[f"options.{f.name}"] = f"options.{group}.{f.name}"
            for other in GROUPS:
                if other != group:
                    moved[f"options.{other}.{f.name}"] = f"options.{group}.{f.name}"
        for old, new in RENAMED.items():
            moved[f"options.{group}.{old}"] = field_path(new)
    return moved


__all__ = ["DualReferenceOptions", "GenerationOptions", "InferenceError", "LayoutOptions", "MODES", "RENAMED",
           "RetouchOptions", "SCHEDULERS", "field_group", "field_path", "moved_keys"]
