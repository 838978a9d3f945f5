"""`LayoutRetouchPipeline`: vanilla, personalized, layout and layout-retouch generation (DESIGN §5).

Two explicit loops: stage 1 (`_layout`) draws a diverse layout with the vanilla model for the first
λ·T steps and the personalized model after; stage 2 (`_retouch`) runs the reference (R), context (C)
and target (X) paths in one batched UNet call per step, with the multi-source attention swap in the
decoder self-attention layers and adaptive mask blending. Mode `dual-reference` (DESIGN §6.1) runs its
own loop in `lrkit.inference.dual_reference`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from lrkit.attention import (AttentionCache, AttentionStore, AttentionStoreProcessor, MultiSourceSwapProcessor,
                             RecordingProcessor, SwapState, attention_layers, cross_layers_at, decoder_self_layers,
                             processors)
from lrkit.concept import Concept
from lrkit.models import load_base

logger = logging.getLogger(__name__)

MODES = ("vanilla", "personalized", "layout", "layout-retouch", "dual-reference")
SCHEDULERS = {  # name -> diffusers class name
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


class InferenceError(ValueError):
    """Bad inference input; the message names the option or file."""


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
    lam: float = 0.3
    """λ: fraction of the steps drawn by the vanilla model in stage 1."""
    vanilla_phrase: str | None = None
    """What replaces the concept token for the vanilla model (default: the class word), e.g. 'red vase'."""
    retouch_start: float | None = None
    """s0 as a fraction of T: where X leaves the layout trajectory (default: λ; must be >= λ)."""
    swap_start: float | None = None
    """First step (fraction of T) with the attention swap on (default: retouch_start)."""
    swap_levels: int = 2
    """Decoder self-attention at this many highest resolutions swaps in the reference."""
    swap_layers: list[str] | None = None
    """Explicit swap layers (self-attention processor names, e.g. 'up_blocks.3.attentions.0.transformer_blocks.0.attn1.processor'); overrides swap_levels."""
    alpha: float = 0.5
    """Weight of the SAM mask against the cross-attention map in the target mask."""
    tau: float = 0.5
    """Threshold of the blended target mask."""
    reference: int = 0
    """Which of the concept's reference photos R uses."""
    swap: bool = True
    """Turn the attention swap off (stage 2 then returns the layout: a debugging switch)."""
    eta: float = 0.0
    """DDIM eta."""
    cache_attention: bool = True
    """Reuse what earlier passes computed: C's swap-layer outputs recorded in stage 1, R's keys/values
    recorded once per reference. Stage 2 then runs only the target rows (faster, costs memory)."""
    style_reference: str | None = None
    """Style image (mode dual-reference, required there): its background's palette and texture go onto the subject."""
    style_subject: str | None = None
    """Word for the style image's foreground content, e.g. 'ball' (dual-reference): its cross-attention (and SAM) masks
    that content out of the style; unset, the whole style image counts as style."""
    custom_reference: str | None = None
    """Customization reference photo (dual-reference); default: the concept's reference photo `reference`."""
    switch: float | None = None
    """Dual-reference: fraction of T where customization hands over to style (default: from the references'
    grey-level entropies, H_C / (H_C + H_S), clamped to [switch_min, switch_max])."""
    switch_min: float = 0.2
    """Lower clamp of the entropy-derived switch (fraction of T)."""
    switch_max: float = 0.8
    """Upper clamp of the entropy-derived switch (fraction of T)."""
    customize: bool = True
    """Dual-reference: the early (customization) phase on."""
    stylize: bool = True
    """Dual-reference: the late (style) phase on."""
    custom_weight: float = 1.0
    """Dual-reference: multiplies the attention weight of the customization reference's tokens (1: plain concatenation)."""
    style_weight: float = 1.0
    """Dual-reference: multiplies the attention weight of the style reference's tokens (1: plain concatenation; large:
    the subject's queries are rebuilt from the style image's background alone)."""
    style_shift: float = 0.0
    """Dual-reference, lrkit's addition to DRP-Diff (0: off, the paper's method): in the style phase, after each
    step, move the per-channel mean of the target's subject latents this fraction of the way to the mean of
    the style image's background latents at the same noise level (1: equal means). Self-attention alone
    may not recolour a subject whose colour the text and adapters fix; this carries the style's palette."""
    style_shift_start: float = 0.9
    """Dual-reference: the first step of `style_shift`, a fraction of T (never before the switch step; the last
    step always shifts). Late steps recolour the subject without moving its outline or the background: shifted
    from the switch step on, the model redraws a halo of the new colour around the subject and repaints the
    background to match (bench/RESULTS.md, "Dual reference")."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InferenceError(f"mode {self.mode!r} is not one of {list(MODES)}")
        if self.scheduler not in SCHEDULERS:
            raise InferenceError(f"scheduler {self.scheduler!r} is not one of {list(SCHEDULERS)}")
        if self.mode == "layout-retouch" and self.scheduler != "ddim":
            raise InferenceError(f"mode 'layout-retouch' needs scheduler 'ddim' (got {self.scheduler!r})")
        if not 0.0 <= self.lam <= 1.0:
            raise InferenceError(f"lam must be in [0, 1], got {self.lam}")
        if self.num_inference_steps < 1:
            raise InferenceError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        for name in ("retouch_start", "swap_start"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise InferenceError(f"{name} must be in [0, 1], got {value}")
        if self.retouch_start is not None and self.retouch_start < self.lam:
            raise InferenceError(
                f"retouch_start ({self.retouch_start}) must be >= lam ({self.lam}): the target leaves the layout "
                "trajectory where the personalized model has taken over"
            )
        if not 0.0 <= self.alpha <= 1.0 or not 0.0 <= self.tau <= 1.0:
            raise InferenceError(f"alpha and tau must be in [0, 1], got alpha={self.alpha}, tau={self.tau}")
        self._check_dual_reference()

    def _check_dual_reference(self) -> None:
        if self.mode == "dual-reference" and self.scheduler != "ddim":
            raise InferenceError(f"mode 'dual-reference' needs scheduler 'ddim' (got {self.scheduler!r}): "
                                 "its references are DDIM-inverted")
        if self.mode != "dual-reference":
            given = [name for name in ("style_reference", "style_subject", "custom_reference", "switch")
                     if getattr(self, name) is not None]
            given += ["style_shift"] if self.style_shift else []
            start_default = type(self).__dataclass_fields__["style_shift_start"].default
            given += ["style_shift_start"] if self.style_shift_start != start_default else []
            if given:
                raise InferenceError(f"{given[0]} is an option of mode 'dual-reference' (mode is {self.mode!r}); "
                                     "set mode: dual-reference or leave it unset")
        if self.switch is not None and not 0.0 <= self.switch <= 1.0:
            raise InferenceError(f"switch must be in [0, 1] (a fraction of the steps), got {self.switch}")
        if not 0.0 <= self.style_shift <= 1.0:
            raise InferenceError(f"style_shift must be in [0, 1] (0: off, 1: the style's latent means), got "
                                 f"{self.style_shift}")
        if not 0.0 <= self.style_shift_start <= 1.0:
            raise InferenceError(f"style_shift_start must be in [0, 1] (a fraction of the steps), got "
                                 f"{self.style_shift_start}")
        if not (self.custom_weight > 0 and self.style_weight > 0):
            raise InferenceError(f"custom_weight and style_weight must be > 0, got custom_weight={self.custom_weight}, "
                                 f"style_weight={self.style_weight}")
        if not 0.0 <= self.switch_min <= self.switch_max <= 1.0:
            raise InferenceError(f"need 0 <= switch_min <= switch_max <= 1, got switch_min={self.switch_min}, "
                                 f"switch_max={self.switch_max}")

    def step_index(self, fraction: float) -> int:
        """Index of the first step i with i >= fraction * T."""
        return min(self.num_inference_steps, math.ceil(fraction * self.num_inference_steps - 1e-9))


@dataclass
class Generation:
    """One generated image and what led to it."""

    prompt_index: int
    prompt: str
    seed: int
    image: Image.Image
    layout: Image.Image | None = None
    mask: Image.Image | None = None
    reference: Image.Image | None = None
    style: Image.Image | None = None  # dual-reference: the style reference as used (square, generation size)

    @property
    def stem(self) -> str:
        return f"p{self.prompt_index:03d}_s{self.seed}"


@dataclass
class LayoutResult:
    latents: torch.Tensor  # (B, C, h, w) final
    trajectory: torch.Tensor  # (T+1, B, C, h, w): z_0 .. z_T
    maps: torch.Tensor | None  # (T, B, h, w) subject cross-attention per step (conditional rows), if recorded
    embeds: "_Embeds | None" = None  # y* embeddings of stage 1's personalized phase, reused by stage 2


@dataclass
class _Embeds:
    """Text embeddings of one prompt batch: unconditional and conditional, per model."""

    uncond: torch.Tensor
    cond: torch.Tensor
    tokens: list[list[int]] = field(default_factory=list)  # subject token positions per row


class LayoutRetouchPipeline:
    """Personalized generation with Layout-and-Retouch on a stock diffusers `StableDiffusionPipeline`.

    For LoRA and TI concepts the vanilla and personalized models share one UNet (adapters toggled,
    or a prompt without the new token); only a full DreamBooth concept keeps a second UNet.
    """

    def __init__(self, pipe, concept: Concept, *, vanilla_unet=None, vanilla_text_encoder=None, segmenter=None,
                 cache=None):
        self.pipe = pipe
        self.concept = concept
        self.vanilla_unet = vanilla_unet
        self.vanilla_text_encoder = vanilla_text_encoder
        self.segmenter = segmenter
        self.cache = cache
        self._schedulers: dict = {}
        self.use_scheduler("ddim")
        self.has_lora = "lora" in concept.files
        self._kv_memo: dict = {}
        self._prompt_memo: dict = {}
        self._dual_memo: dict = {}  # dual-reference: recorded reference keys/values, the latest references only
        pipe.set_progress_bar_config(disable=True)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_concept(cls, base, concept, *, dtype=None, device=None, sam_checkpoint: str | None = None,
                     force: bool = False, cache_dir: str | os.PathLike | None = None) -> "LayoutRetouchPipeline":
        """Load `base` (id, folder, file, or a pipeline), apply `concept` (folder or `Concept`)."""
        from lrkit.inference.inversion import TrajectoryCache
        from lrkit.masks import load_segmenter

        concept = concept if isinstance(concept, Concept) else Concept.load(concept)
        pipe = base if not isinstance(base, (str, os.PathLike)) else load_base(base, dtype=dtype, device=device)
        concept.check_base(pipe, force=force)
        vanilla_unet = pipe.unet if "unet" in concept.files else None
        vanilla_te = pipe.text_encoder if "text_encoder" in concept.files else None
        concept.apply(pipe, force=force)
        return cls(pipe, concept, vanilla_unet=vanilla_unet, vanilla_text_encoder=vanilla_te,
                   segmenter=load_segmenter(sam_checkpoint, device=pipe.device), cache=TrajectoryCache(cache_dir))

    def clear_caches(self) -> None:
        """Free the memoized reference keys/values and prompt embeddings (the disk cache stays)."""
        self._kv_memo, self._prompt_memo, self._dual_memo = {}, {}, {}

    def use_scheduler(self, name: str) -> None:
        """Switch the pipeline's scheduler (built once per name from the base model's config)."""
        import diffusers

        if name not in self._schedulers:
            cls = getattr(diffusers, SCHEDULERS[name])
            self._schedulers[name] = cls.from_config(self.pipe.scheduler.config)
        self.pipe.scheduler = self._schedulers[name]

    # ------------------------------------------------------------------ prompts

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def subject_phrase(self) -> str:
        return self.concept.subject_phrase()

    def vanilla_prompt(self, prompt: str, phrase: str | None) -> str:
        """y from y*: the concept phrase (`<tok> <class>`, or the bare token) -> the vanilla phrase."""
        phrase = phrase or self.concept.class_word
        token = self.concept.token
        if self.subject_phrase() in prompt:
            return prompt.replace(self.subject_phrase(), phrase)
        return prompt.replace(token, phrase)

    def _require_token(self, prompts: list[str], mode: str) -> None:
        missing = [p for p in prompts if self.concept.token not in p]
        if missing:
            raise InferenceError(
                f"mode {mode!r} needs the concept token {self.concept.token!r} in every prompt; "
                f"missing in {missing[0]!r} (e.g. 'a photo of {self.subject_phrase()} on the beach')"
            )

    @contextlib.contextmanager
    def vanilla(self):
        """The vanilla model: LoRA adapters off, or the base UNet / text encoder of a DreamBooth concept."""
        pipe = self.pipe
        if self.vanilla_unet is not None or self.vanilla_text_encoder is not None:
            unet, te = pipe.unet, pipe.text_encoder
            pipe.unet = self.vanilla_unet or unet
            pipe.text_encoder = self.vanilla_text_encoder or te
            try:
                yield
            finally:
                pipe.unet, pipe.text_encoder = unet, te
        elif self.has_lora:
            pipe.disable_lora()
            try:
                yield
            finally:
                pipe.enable_lora()
        else:
            yield

    def token_positions(self, prompt: str, phrase: str) -> list[int]:
        """Positions of `phrase`'s tokens in the encoded `prompt` (TI tokens expanded as diffusers does)."""
        tok = self.pipe.tokenizer
        prompt = self.pipe.maybe_convert_prompt(prompt, tok)
        phrase = self.pipe.maybe_convert_prompt(phrase, tok)
        ids = tok(prompt, truncation=True, max_length=tok.model_max_length).input_ids
        sub = tok(phrase, add_special_tokens=False).input_ids
        for start in range(len(ids) - len(sub) + 1):
            if ids[start:start + len(sub)] == sub:
                return list(range(start, start + len(sub)))
        raise InferenceError(f"phrase {phrase!r} not found in prompt {prompt!r} after tokenization")

    def _phrase_in(self, prompt: str) -> str:
        """The words standing for the subject in `prompt`: `<token> <class>` if present, else the token."""
        return self.subject_phrase() if self.subject_phrase() in prompt else self.concept.token

    def _embed(self, prompts: list[str], phrase_of, negative: str, *, vanilla: bool) -> _Embeds:
        ctx = self.vanilla() if vanilla else contextlib.nullcontext()
        with ctx:
            cond, uncond = self.pipe.encode_prompt(prompts, self.device, 1, True, negative_prompt=[negative] * len(prompts))
        tokens = [self.token_positions(p, phrase_of(p)) for p in prompts]
        return _Embeds(uncond=uncond, cond=cond, tokens=tokens)

    # ------------------------------------------------------------------ the call

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], seeds: int | list[int] = 0, options: GenerationOptions | None = None,
                 layout_image: "Image.Image | str | os.PathLike | None" = None, **overrides) -> list[Generation]:
        """Generate every prompt x seed. `overrides` are `GenerationOptions` fields.

        `layout_image`: retouch the subject into this image instead of a generated layout (its
        trajectory comes from DDIM inversion; layout-retouch mode only).
        """
        options = options or GenerationOptions()
        if overrides:
            options = GenerationOptions(**{**options.__dict__, **overrides})
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        if not prompts or not seeds:
            raise InferenceError("give at least one prompt and one seed")
        if options.mode != "vanilla":
            self._require_token(prompts, options.mode)
        results = []
        for index, prompt in enumerate(prompts):
            results += self.generate(prompt, seeds, options, prompt_index=index, layout_image=layout_image)
        return results

    @torch.no_grad()
    def generate(self, prompt: str, seeds: list[int], options: GenerationOptions, prompt_index: int = 0,
                 layout_image=None) -> list[Generation]:
        """One prompt, several seeds in one batch."""
        height = options.height or self.concept.resolution
        width = options.width or self.concept.resolution
        self.use_scheduler(options.scheduler)
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        if options.mode == "dual-reference":
            if layout_image is not None:
                raise InferenceError("layout_image needs mode 'layout-retouch', not 'dual-reference'")
            return self._dual_reference(prompt, seeds, generators, options, prompt_index, height, width)
        plain = self.vanilla_prompt(prompt, options.vanilla_phrase)
        vanilla_phrase = options.vanilla_phrase or self.concept.class_word
        if options.mode == "vanilla":
            lam = 1.0
        elif options.mode == "personalized":
            lam = 0.0
        else:
            lam = options.lam
        retouch = options.mode == "layout-retouch"
        context = None
        if layout_image is not None:
            if not retouch:
                raise InferenceError(f"layout_image needs mode 'layout-retouch', not {options.mode!r}")
            layout = self._given_layout(layout_image, prompt, len(seeds), options, height, width)
        else:
            if retouch and options.cache_attention and options.swap:
                context = AttentionCache(rows=list(range(2 * len(seeds))),
                                         steps=range(self._swap_from(options), options.num_inference_steps))
            layout = self._layout([prompt] * len(seeds), [plain] * len(seeds), generators, options, lam, height,
                                  width, vanilla_phrase, context, record_maps=retouch)
        images = layout.latents
        masks = reference = None
        if retouch:
            images, masks, reference = self._retouch(prompt, layout, options, height, width, context)
        decoded = self._decode(images, generators)
        layouts = self._decode(layout.latents, generators) if options.mode == "layout-retouch" else [None] * len(seeds)
        out = []
        for b, seed in enumerate(seeds):
            mask = None
            if masks is not None:
                mask = Image.fromarray((masks[b].float().cpu().numpy() * 255).astype("uint8"))
                mask = mask.resize((width, height), Image.Resampling.NEAREST)  # a binary mask stays binary
            out.append(Generation(prompt_index, prompt, seed, decoded[b], layouts[b], mask, reference))
        return out

    def _dual_reference(self, prompt: str, seeds: list[int], generators, options: GenerationOptions,
                        prompt_index: int, height: int, width: int) -> list[Generation]:
        """Mode dual-reference (DESIGN §6.1): the loop lives in `lrkit.inference.dual_reference`."""
        from lrkit.inference.dual_reference import denoise_dual_reference

        result = denoise_dual_reference(self, prompt, generators, options, height, width)
        decoded = self._decode(result.latents, generators)
        out = []
        for b, seed in enumerate(seeds):
            mask = Image.fromarray((result.masks[b].float().cpu().numpy() * 255).astype("uint8"))
            mask = mask.resize((width, height), Image.Resampling.NEAREST)
            out.append(Generation(prompt_index, prompt, seed, decoded[b], None, mask, result.custom.image,
                                  result.style.image))
        return out

    def _decode(self, latents: torch.Tensor, generators) -> list[Image.Image]:
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False, generator=generators)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])

    # ------------------------------------------------------------------ stage 1

    def _layout(self, prompts, plain_prompts, generators, options: GenerationOptions, lam: float, height, width,
                vanilla_phrase: str, context: AttentionCache | None = None, record_maps: bool = False) -> LayoutResult:
        """Step-blended denoising: ε(z, y) for i < λ·T, then ε*(z, y*); guidance in both phases."""
        pipe, steps = self.pipe, options.num_inference_steps
        batch = len(prompts)
        switch = options.step_index(lam)
        star = self._embed(prompts, self._phrase_in, options.negative_prompt, vanilla=False) if switch < steps else None
        vanilla = self._embed(plain_prompts, lambda p: vanilla_phrase, options.negative_prompt, vanilla=True) \
            if switch > 0 else None
        dtype = (star or vanilla).cond.dtype
        pipe.scheduler.set_timesteps(steps, device=self.device)
        latents = pipe.prepare_latents(batch, pipe.unet.config.in_channels, height, width, dtype, self.device,
                                       generators)
        extra = pipe.prepare_extra_step_kwargs(generators, options.eta)
        grid = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        store = AttentionStore(rows=list(range(batch, 2 * batch)), tokens=[], size=grid)
        trajectory, maps = [latents], []
        timesteps = pipe.scheduler.timesteps

        def denoise(i: int, embeds: _Embeds) -> None:
            nonlocal latents
            t = timesteps[i]
            store.tokens = embeds.tokens
            if context is not None:
                context.step = i
            latent_in = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise = pipe.unet(latent_in, t, encoder_hidden_states=torch.cat([embeds.uncond, embeds.cond]),
                              return_dict=False)[0]
            uncond, cond = noise.chunk(2)
            latents = pipe.scheduler.step(uncond + options.guidance_scale * (cond - uncond), t, latents, **extra,
                                          return_dict=False)[0]
            trajectory.append(latents)
            if record_maps:
                maps.append(store.take())

        with contextlib.ExitStack() as hooks:
            for unet in {id(u): u for u in (pipe.unet, self.vanilla_unet) if u is not None}.values():
                chosen = self._store_processors(store, grid) if record_maps else {}
                if context is not None and unet is pipe.unet:  # record C for stage 2 (personalized steps only)
                    chosen.update({l.name: RecordingProcessor(context, l.name, "out") for l in self._swap_layers(options)})
                if chosen:
                    hooks.enter_context(processors(unet, chosen))
            if switch > 0:
                with self.vanilla():  # phase 1: the vanilla model on y (adapters switched once)
                    for i in range(switch):
                        denoise(i, vanilla)
            for i in range(switch, steps):  # phase 2: the personalized model on y*
                denoise(i, star)
        return LayoutResult(latents=latents, trajectory=torch.stack(trajectory),
                            maps=torch.stack(maps) if record_maps else None, embeds=star)

    def _swap_layers(self, options: GenerationOptions):
        if not options.swap_layers:
            return decoder_self_layers(self.pipe.unet, options.swap_levels)
        layers = {l.name: l for l in attention_layers(self.pipe.unet)}
        unknown = [n for n in options.swap_layers if n not in layers]
        if unknown:
            raise InferenceError(f"swap_layers: {unknown[0]!r} is not an attention layer of this UNet")
        cross = [n for n in options.swap_layers if not layers[n].is_self]
        if cross:
            raise InferenceError(f"swap_layers: {cross[0]!r} is a cross-attention layer; the swap needs self-attention (attn1)")
        return [layers[n] for n in options.swap_layers]

    @staticmethod
    def _start(options: GenerationOptions) -> int:
        return options.step_index(options.retouch_start if options.retouch_start is not None else options.lam)

    def _swap_from(self, options: GenerationOptions) -> int:
        if options.swap_start is not None:
            return max(self._start(options), options.step_index(options.swap_start))
        return self._start(options)

    def _given_layout(self, image, prompt: str, batch: int, options: GenerationOptions, height: int,
                      width: int) -> LayoutResult:
        """C from a user's layout image: DDIM-inverted with ε* and y*; the subject map from one pass at s0."""
        from lrkit.inference.inversion import ddim_invert, encode_image

        if height != width:
            raise InferenceError("layout-retouch needs a square image size (height == width)")
        if not isinstance(image, Image.Image):
            path = Path(image)
            if not path.is_file():
                raise InferenceError(f"layout image {str(path)!r} does not exist")
            image = Image.open(path)
        latents = encode_image(self.pipe, image.convert("RGB"), height).to(self.device)
        cond, _ = self.pipe.encode_prompt(prompt, self.device, 1, False)
        steps = options.num_inference_steps
        self.pipe.scheduler.set_timesteps(steps, device=self.device)
        trajectory = ddim_invert(self.pipe, latents, cond, steps).to(cond.dtype)  # (T+1, 1, C, h, w)
        grid = tuple(latents.shape[-2:])
        store = AttentionStore(rows=[0], tokens=[self.token_positions(prompt, self._phrase_in(prompt))], size=grid)
        start = min(self._start(options), steps - 1)
        with processors(self.pipe.unet, self._store_processors(store, grid)):
            self.pipe.unet(trajectory[start], self.pipe.scheduler.timesteps[start], encoder_hidden_states=cond)
        maps = store.take().expand(steps, batch, *grid)
        trajectory = trajectory.expand(-1, batch, -1, -1, -1)
        return LayoutResult(latents=trajectory[-1], trajectory=trajectory, maps=maps)

    def _store_processors(self, store: AttentionStore, grid) -> dict:
        aspect = grid[0] / grid[1]
        return {l.name: AttentionStoreProcessor(store, aspect) for l in cross_layers_at(self.pipe.unet)}

    # ------------------------------------------------------------------ stage 2

    def reference_photo(self, index: int) -> Path:
        refs = self.concept.ref_paths()
        if not refs:
            raise InferenceError(f"concept {self.concept.name!r} has no reference photos (refs/ in its bundle)")
        if not 0 <= index < len(refs):
            raise InferenceError(f"reference {index} does not exist; concept {self.concept.name!r} has {len(refs)}")
        if not refs[index].is_file():
            raise InferenceError(f"reference photo {refs[index]} is missing from the bundle")
        return refs[index]

    def _reference(self, options: GenerationOptions, height: int, width: int):
        """R: the reference photo's DDIM-inverted trajectory under ε* (cached) and its subject mask."""
        from lrkit.inference.inversion import ddim_invert, encode_image, image_digest

        path = self.reference_photo(options.reference)
        photo = Image.open(path)
        photo.load()
        photo = photo.convert("RGB")
        prompt = f"a photo of {self.subject_phrase()}"
        if prompt not in self._prompt_memo:
            self._prompt_memo = {prompt: self.pipe.encode_prompt(prompt, self.device, 1, False)[0]}
        embeds = self._prompt_memo[prompt]
        if height != width:
            raise InferenceError("layout-retouch needs a square image size (height == width)")
        key = self.cache.key(concept=self.concept.name, base=self.concept.base.unet_config_sha256,
                             weights=self.concept.weights_digest(), reference=image_digest(path),
                             scheduler=dict(self.pipe.scheduler.config), steps=options.num_inference_steps,
                             resolution=height, prompt=prompt, dtype=str(embeds.dtype))

        def invert():
            latents = encode_image(self.pipe, photo, height)
            return ddim_invert(self.pipe, latents, embeds, options.num_inference_steps)

        trajectory, cached = self.cache.get_or_compute(key, invert)
        trajectory = trajectory.to(self.device, embeds.dtype)
        logger.debug("reference trajectory %s", "from cache" if cached else "inverted")
        mask = self._reference_mask(path, photo, trajectory, embeds, prompt, options)
        return photo, trajectory, embeds, mask, key

    def _reference_mask(self, path: Path, photo: Image.Image, trajectory, embeds, prompt, options) -> torch.Tensor:
        """M_R at latent resolution: from the bundle's masks/ or computed once (SAM, else attention) and stored."""
        from lrkit.inference.inversion import center_square
        from lrkit.masks import box_from_attention, load_mask_png, minmax, otsu_threshold, resize_map

        grid = tuple(trajectory.shape[-2:])
        rel = str(path.relative_to(self.concept.path))
        stored = self.concept.masks.get(rel)
        if stored is not None:
            mask = load_mask_png(self.concept.path / stored)
            return resize_map(mask.float(), grid).to(self.device)
        # Cross-attention of the subject on the reference, mid-way through its trajectory.
        store = AttentionStore(rows=[0], tokens=[self.token_positions(prompt, self.subject_phrase())], size=grid)
        i = options.num_inference_steps // 2
        t = self.pipe.scheduler.timesteps[i]
        with processors(self.pipe.unet, self._store_processors(store, grid)):
            self.pipe.unet(trajectory[i], t, encoder_hidden_states=embeds)
        attn = minmax(store.take()[0])
        if self.segmenter is not None:
            square = center_square(photo, grid[0] * self.pipe.vae_scale_factor)  # what the inversion encoded
            mask = self.segmenter(square, box_from_attention(attn, square.size))
        else:
            mask = attn > otsu_threshold(attn)
        self._store_reference_mask(rel, mask)
        return resize_map(mask.float(), grid).to(self.device)

    def _store_reference_mask(self, rel: str, mask: torch.Tensor) -> None:
        from lrkit.concept import MANIFEST
        from lrkit.io import atomic_write_json
        from lrkit.masks import save_mask_png

        target = f"masks/{Path(rel).stem}.png"
        try:
            save_mask_png(mask, self.concept.path / target)
            self.concept.masks[rel] = target
            # The bundle's own manifest plus this mask, not `self.concept`: that may be a view
            # (`Concept.for_token` reorders the tokens) that must never be written back.
            on_disk = Concept.load(self.concept.path)
            on_disk.masks[rel] = target
            atomic_write_json(self.concept.path / MANIFEST, on_disk.to_manifest())
        except OSError as err:  # a read-only bundle still generates; the mask is recomputed next time
            logger.warning("could not store the reference mask in %s (%s)", self.concept.path, err)

    def _target_sam_masks(self, layout_latents, layout_maps, height, width) -> list[torch.Tensor | None]:
        """M_SAM of each layout image, prompted with the box of its subject's cross-attention."""
        if self.segmenter is None:
            return [None] * layout_latents.shape[0]
        return self.segment_latents(layout_latents, layout_maps.mean(0), height, width)  # maps averaged over steps

    def segment_latents(self, latents: torch.Tensor, attn: torch.Tensor, height: int, width: int) -> list[torch.Tensor]:
        """The segmenter's subject mask of each row of `latents` (B, C, h, w), decoded, prompted with the box of
        that row's subject cross-attention `attn` (B, h, w)."""
        from lrkit.masks import box_from_attention, minmax

        images = self._decode(latents, None)
        attn = minmax(attn)
        return [self.segmenter(img, box_from_attention(attn[b], (width, height))) for b, img in enumerate(images)]

    def _reference_kv(self, key: str, trajectory, embeds, options: GenerationOptions) -> AttentionCache:
        """R's keys/values at the swap layers for the swap steps: one pass over its trajectory, memoized."""
        layers = self._swap_layers(options)
        steps = range(self._swap_from(options), options.num_inference_steps)
        memo_key = (key, tuple(l.name for l in layers), steps.start)
        if memo_key not in self._kv_memo:
            cache = AttentionCache(rows=[0], steps=steps)
            with processors(self.pipe.unet, {l.name: RecordingProcessor(cache, l.name, "kv") for l in layers}):
                for i in steps:
                    cache.step = i
                    t = self.pipe.scheduler.timesteps[i]
                    self.pipe.unet(trajectory[i], t, encoder_hidden_states=embeds, return_dict=False)
            self._kv_memo = {memo_key: cache}  # keep the latest reference only
        return self._kv_memo[memo_key]

    def _retouch(self, prompt: str, layout: LayoutResult, options: GenerationOptions, height, width,
                 context: AttentionCache | None = None):
        """Stage 2: X leaves the layout at s0 and is denoised with the swap and adaptive masks.

        Uncached, each step is one UNet call on [R, C_u, C_c, X_u, X_c]; with `context` (C recorded
        in stage 1) and R's memoized keys/values, it is a call on [X_u, X_c] alone.
        """
        from lrkit.masks import blend_target_mask

        pipe, steps = self.pipe, options.num_inference_steps
        batch = layout.latents.shape[0]
        start, swap_from = self._start(options), self._swap_from(options)
        pipe.scheduler.set_timesteps(steps, device=self.device)
        photo, ref_traj, ref_embeds, ref_mask, ref_key = self._reference(options, height, width)
        star = layout.embeds or self._embed([prompt] * batch, self._phrase_in, options.negative_prompt, vanilla=False)
        sam = self._target_sam_masks(layout.latents, layout.maps, height, width)
        grid = tuple(layout.latents.shape[-2:])
        cached = context is not None
        if cached:  # rows: X_u (B), X_c (B)
            x_u, x_c = 0, batch
            pairs = [(x_u + b, None) for b in range(batch)] + [(x_c + b, None) for b in range(batch)]
            embeds = torch.cat([star.uncond, star.cond])
            state = SwapState(ref=None, pairs=pairs, ref_mask=ref_mask, target_mask=torch.zeros(2 * batch, 1, 1),
                              ref_cache=self._reference_kv(ref_key, ref_traj, ref_embeds, options), context_cache=context)
        else:  # rows: R, C_u (B), C_c (B), X_u (B), X_c (B)
            c_u, c_c, x_u, x_c = (1 + k * batch for k in range(4))
            pairs = [(x_u + b, c_u + b) for b in range(batch)] + [(x_c + b, c_c + b) for b in range(batch)]
            embeds = torch.cat([ref_embeds, star.uncond, star.cond, star.uncond, star.cond])
            state = SwapState(ref=0, pairs=pairs, ref_mask=ref_mask, target_mask=torch.zeros(2 * batch, 1, 1))
        store = AttentionStore(rows=list(range(x_c, x_c + batch)), tokens=star.tokens, size=grid)
        chosen = self._store_processors(store, grid)
        if options.swap:
            chosen.update({l.name: MultiSourceSwapProcessor(state, grid[0] / grid[1], l.name)
                           for l in self._swap_layers(options)})
        extra = pipe.prepare_extra_step_kwargs(None, options.eta)
        x = layout.trajectory[start]
        attn = layout.maps[start] if start < steps else None
        masks = torch.zeros(batch, *grid, device=self.device)
        with processors(pipe.unet, chosen):
            for i in range(start, steps):
                t = pipe.scheduler.timesteps[i]
                masks = torch.stack([blend_target_mask(attn[b], sam[b], options.alpha, options.tau)
                                     for b in range(batch)]).to(self.device)
                state.set_target(torch.cat([masks, masks]))
                state.active = options.swap and i >= swap_from
                state.step = i
                if cached:
                    latent_in = torch.cat([x, x])
                else:
                    context_latents = layout.trajectory[i]
                    latent_in = torch.cat([ref_traj[i], context_latents, context_latents, x, x])
                latent_in = pipe.scheduler.scale_model_input(latent_in, t)
                noise = pipe.unet(latent_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
                uncond, cond = noise[x_u:x_c], noise[x_c:]
                x = pipe.scheduler.step(uncond + options.guidance_scale * (cond - uncond), t, x, **extra,
                                        return_dict=False)[0]
                attn = store.take()
        return x, masks, photo
