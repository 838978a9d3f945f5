"""`LayoutRetouchPipeline`: vanilla, personalized, layout, layout-retouch and dual-reference generation.

It loads a base model, applies a concept and hands each call to its mode's loop: stage 1
(`lrkit.inference.layout`), stage 2 (`lrkit.inference.retouch`, DESIGN §5) or the dual-reference loop
(`lrkit.inference.dual_reference`, DESIGN §6.1). References and their caches live in
`lrkit.inference.references`; the concept bundle is only read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from PIL import Image

from lrkit.concept import Concept
from lrkit.inference.dual_reference import denoise_dual_reference
from lrkit.inference.inversion import TrajectoryCache
from lrkit.inference.layout import draw_layout, given_layout
from lrkit.inference.options import SCHEDULERS, GenerationOptions, InferenceError
from lrkit.inference.personalized import PersonalizedModel
from lrkit.inference.processors import AttentionCache
from lrkit.inference.references import References
from lrkit.inference.retouch import correspondence_view, retouch
from lrkit.models import load_base

logger = logging.getLogger(__name__)


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
    correspondence: Image.Image | None = None  # layout-retouch with `correspondence`: where the subject reads R

    @property
    def stem(self) -> str:
        return f"p{self.prompt_index:03d}_s{self.seed}"


def _mask_image(mask: torch.Tensor, width: int, height: int) -> Image.Image:
    image = Image.fromarray((mask.float().cpu().numpy() * 255).astype("uint8"))
    return image.resize((width, height), Image.Resampling.NEAREST)  # a binary mask stays binary


class LayoutRetouchPipeline:
    """Personalized generation with Layout-and-Retouch on a stock diffusers pipeline of a model family
    (`StableDiffusionPipeline` for SD 1.x/2.x, `StableDiffusionXLPipeline` for SDXL).

    For LoRA and TI concepts the vanilla and personalized models share one UNet (adapters toggled,
    or a prompt without the new token); only a full DreamBooth concept keeps a second UNet (and the base's text
    encoders it replaces: `vanilla_modules`).
    """

    def __init__(self, pipe, concept: Concept, *, vanilla_unet=None, vanilla_text_encoder=None,
                 vanilla_modules: dict | None = None, segmenter=None, cache: TrajectoryCache | None = None):
        self.model = PersonalizedModel(pipe, concept, vanilla_unet=vanilla_unet,
                                       vanilla_text_encoder=vanilla_text_encoder, vanilla_modules=vanilla_modules,
                                       segmenter=segmenter)
        self.cache = cache if cache is not None else TrajectoryCache()
        self.references = References(self.model, self.cache)
        self._schedulers: dict = {}
        self.use_scheduler("ddim")
        pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_concept(cls, base, concept, *, dtype=None, device=None, sam_checkpoint: str | None = None,
                     force: bool = False, cache_dir: str | os.PathLike | None = None,
                     family: str | None = None) -> "LayoutRetouchPipeline":
        """Load `base` (id, folder, file, or a pipeline; `family` "sd" or "sdxl" overrides the detected model
        family), apply `concept` (folder or `Concept`)."""
        from lrkit.families import family_of
        from lrkit.masks import load_segmenter

        concept = concept if isinstance(concept, Concept) else Concept.load(concept)
        pipe = base if not isinstance(base, (str, os.PathLike)) else load_base(base, dtype=dtype, device=device,
                                                                                family=family)
        concept.check_base(pipe, force=force)
        # A DreamBooth concept replaces these components: the base's stay beside them for the vanilla model.
        vanilla = {name: getattr(pipe, name) for name in ("unet", *family_of(pipe).text_encoders)
                   if name in concept.files}
        concept.apply(pipe, force=force)
        return cls(pipe, concept, vanilla_modules=vanilla, segmenter=load_segmenter(sam_checkpoint, device=pipe.device),
                   cache=TrajectoryCache(cache_dir))

    # ------------------------------------------------------------------ what it holds

    @property
    def pipe(self):
        return self.model.pipe

    @property
    def concept(self) -> Concept:
        return self.model.concept

    @property
    def segmenter(self):
        return self.model.segmenter

    @segmenter.setter
    def segmenter(self, segmenter) -> None:
        self.model.segmenter = segmenter

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def vanilla_unet(self):
        """The base UNet beside a DreamBooth concept's (None: the vanilla model is the adapters switched off)."""
        return self.model.vanilla_unet

    @property
    def vanilla_text_encoder(self):
        return self.model.vanilla_text_encoder

    @property
    def vanilla_modules(self) -> dict:
        """The base's components beside a DreamBooth concept's, by pipeline component name."""
        return self.model.vanilla_modules

    def vanilla(self):
        """Context manager: the vanilla model (adapters off, or the base UNet / text encoders)."""
        return self.model.vanilla()

    def subject_phrase(self) -> str:
        return self.model.subject_phrase()

    def vanilla_prompt(self, prompt: str, phrase: str | None) -> str:
        """y from y*: the concept phrase (`<tok> <class>`, or the bare token) -> the vanilla phrase."""
        return self.model.vanilla_prompt(prompt, phrase)

    def token_positions(self, prompt: str, phrase: str) -> list[int]:
        return self.model.token_positions(prompt, phrase)

    def reference_photo(self, index: int):
        """The path of the concept's reference photo `index`."""
        return self.references.concept_photo(index)

    def swap_layers(self, options: GenerationOptions):
        return self.model.swap_layers(options)

    def clear_caches(self) -> None:
        """Free the memoized reference keys/values and prompt embeddings (the disk cache stays)."""
        self.references.clear()

    def use_scheduler(self, name: str) -> None:
        """Switch the pipeline's scheduler (built once per name from the base model's config)."""
        import diffusers

        if name not in self._schedulers:
            cls = getattr(diffusers, SCHEDULERS[name])
            self._schedulers[name] = cls.from_config(self.pipe.scheduler.config)
        self.pipe.scheduler = self._schedulers[name]

    def _require_token(self, prompts: list[str], mode: str) -> None:
        missing = [p for p in prompts if self.concept.token not in p]
        if missing:
            raise InferenceError(
                f"mode {mode!r} needs the concept token {self.concept.token!r} in every prompt; "
                f"missing in {missing[0]!r} (e.g. 'a photo of {self.subject_phrase()} on the beach')"
            )

    # ------------------------------------------------------------------ the call

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], seeds: int | list[int] = 0, options: GenerationOptions | None = None,
                 layout_image: "Image.Image | str | os.PathLike | None" = None, **overrides) -> list[Generation]:
        """Generate every prompt x seed. `overrides` are `GenerationOptions` fields of any group by their bare
        names (`lam=0.5`, `swap=False`, `style_reference='style.png'`).

        `layout_image`: retouch the subject into this image instead of a generated layout (its
        trajectory comes from DDIM inversion; layout-retouch mode only).
        """
        options = options or GenerationOptions()
        if overrides:
            options = options.replace(**overrides)
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
        model = self.model
        height = options.height or self.concept.resolution
        width = options.width or self.concept.resolution
        self.use_scheduler(options.scheduler)
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        if options.mode == "dual-reference":
            if layout_image is not None:
                raise InferenceError("layout_image needs mode 'layout-retouch', not 'dual-reference'")
            result = denoise_dual_reference(model, self.references, prompt, generators, options, height, width)
            decoded = model.decode(result.latents, generators)
            return [Generation(prompt_index, prompt, seed, decoded[b], None, _mask_image(result.masks[b], width, height),
                               result.custom.image, result.style.image) for b, seed in enumerate(seeds)]
        lam = {"vanilla": 1.0, "personalized": 0.0}.get(options.mode, options.layout.lam)
        retouching = options.mode == "layout-retouch"
        context = None
        if layout_image is not None:
            if not retouching:
                raise InferenceError(f"layout_image needs mode 'layout-retouch', not {options.mode!r}")
            layout = given_layout(model, layout_image, prompt, len(seeds), options, height, width)
        else:
            if retouching and options.retouch.cache_attention and options.retouch.swap:
                context = AttentionCache(rows=list(range(2 * len(seeds))),
                                         steps=range(options.swap_step(), options.num_inference_steps))
            plain = model.vanilla_prompt(prompt, options.layout.vanilla_phrase)
            vanilla_phrase = options.layout.vanilla_phrase or self.concept.class_word
            layout = draw_layout(model, [prompt] * len(seeds), [plain] * len(seeds), generators, options, lam, height,
                                 width, vanilla_phrase, context, record_maps=retouching)
        if not retouching:
            return [Generation(prompt_index, prompt, seed, image)
                    for seed, image in zip(seeds, model.decode(layout.latents, generators))]
        done = retouch(model, self.references, prompt, layout, options, height, width, context)
        decoded = model.decode(done.latents, generators)
        layouts = model.decode(layout.latents, generators)
        out = [Generation(prompt_index, prompt, seed, decoded[b], layouts[b], _mask_image(done.masks[b], width, height),
                          done.reference.image) for b, seed in enumerate(seeds)]
        corr = done.correspondence
        if corr is not None and corr.weights is not None:
            reads = corr.reads_from()
            for b, gen in enumerate(out):
                gen.correspondence = correspondence_view(reads[b], corr.grid, done.reference.image,
                                                         done.reference.mask, gen.image, done.masks[b])
        return out


__all__ = ["Generation", "GenerationOptions", "InferenceError", "LayoutRetouchPipeline"]
