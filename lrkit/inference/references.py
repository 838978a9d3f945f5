"""References: a photo as the loops use it — its DDIM inversion under the personalized model, its subject mask,
and its self-attention keys/values at the swap layers.

Everything computed here is cached outside the bundle (`TrajectoryCache`, keyed by the bundle's weights
digest among the rest): opening a bundle never writes into it. A mask the bundle itself carries (concept_em
computes them at training time) is read, never recomputed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import PIL.ImageOps
import torch

from lrkit.attention import AttentionStore, processors
from lrkit.families import Conditioning
from lrkit.inference.inversion import TrajectoryCache, center_square, ddim_invert, encode_image, image_digest
from lrkit.inference.options import GenerationOptions, InferenceError
from lrkit.inference.personalized import PersonalizedModel
from lrkit.inference.processors import AttentionCache, RecordingProcessor

logger = logging.getLogger(__name__)


@dataclass
class Reference:
    """One reference image as the loops use it."""

    image: PIL.Image.Image  # the photo as given (a concept photo) or its square crop at the generation size
    trajectory: torch.Tensor  # (T+1, 1, C, h, w): its DDIM inversion under ε*
    embeds: Conditioning  # one row: the prompt it was inverted with, at the reference's size
    mask: torch.Tensor  # (h, w) float: its subject at latent resolution
    key: str  # the inversion's cache key: identifies the reference for the key/value memo


def open_image(path: str, option: str) -> PIL.Image.Image:
    """The image at `path`, EXIF-rotated, as RGB; errors name the option."""
    file = Path(path)
    if not file.is_file():
        raise InferenceError(f"{option} {path!r} does not exist; give the path of an image file "
                             f"(CLI: --options.dual_reference.{option} PATH)")
    try:
        with PIL.Image.open(file) as image:
            image.load()
            return PIL.ImageOps.exif_transpose(image).convert("RGB")
    except (PIL.UnidentifiedImageError, OSError) as err:
        raise InferenceError(f"{option} {path!r} is not a readable image ({err})") from err


class References:
    """Builds references for one `PersonalizedModel` and keeps what they cost: inversions and masks on disk
    (`cache`), the prompt embedding, mask and keys/values of the latest references in memory."""

    def __init__(self, model: PersonalizedModel, cache: TrajectoryCache):
        self.model = model
        self.cache = cache
        self._prompts: dict = {}
        self._masks: dict = {}
        self._kv: dict = {}

    def clear(self) -> None:
        """Free the memoized keys/values, mask and prompt embedding (the disk cache stays)."""
        self._prompts, self._masks, self._kv = {}, {}, {}

    def clear_keys_values(self) -> None:
        """Free the memoized keys/values only."""
        self._kv = {}

    @property
    def kv_memo_size(self) -> int:
        """How many references' keys/values are memoized."""
        return len(self._kv)

    # ------------------------------------------------------------------ building

    def concept_photo(self, index: int) -> Path:
        concept = self.model.concept
        refs = concept.ref_paths()
        if not refs:
            raise InferenceError(f"concept {concept.name!r} has no reference photos (refs/ in its bundle)")
        if not 0 <= index < len(refs):
            raise InferenceError(f"reference {index} does not exist; concept {concept.name!r} has {len(refs)}")
        if not refs[index].is_file():
            raise InferenceError(f"reference photo {refs[index]} is missing from the bundle")
        return refs[index]

    def from_concept(self, options: GenerationOptions, size: int) -> Reference:
        """R: the concept's reference photo `retouch.reference`, inverted with `a photo of <token> <class>`; its
        mask from the bundle, else from the cache, else computed (SAM in its attention box, else the attention
        map above its Otsu threshold)."""
        path = self.concept_photo(options.retouch.reference)
        photo = PIL.Image.open(path)
        photo.load()
        photo = photo.convert("RGB")
        prompt = f"a photo of {self.model.subject_phrase()}"
        trajectory, embeds, key = self._invert(photo, prompt, options, size, digest=image_digest(path))
        mask = self._concept_mask(path, photo, trajectory, embeds, prompt, options, key)
        return Reference(photo, trajectory, embeds, mask, key)

    def from_image(self, image: PIL.Image.Image, prompt: str, phrase: str | None, options: GenerationOptions,
                   size: int) -> Reference:
        """A reference from any image: its centre square inverted with `prompt`; the mask of `phrase` (none: an
        empty mask), SAM in its attention box, else the Otsu-thresholded map at the image's size."""
        from lrkit.masks import AttentionSegmenter, resize_map

        square = center_square(image, size)
        trajectory, embeds, key = self._invert(square, prompt, options, size, digest=image_digest(square),
                                               kind="image")
        grid = tuple(trajectory.shape[-2:])
        if phrase is None:
            return Reference(square, trajectory, embeds, torch.zeros(grid, device=self.model.device), key)
        attn = self._attention(trajectory, embeds, prompt, phrase, options.num_inference_steps)
        mask = self._segment(square, attn, fallback=AttentionSegmenter(attn))
        return Reference(square, trajectory, embeds, (resize_map(mask.float(), grid) >= 0.5).float().to(self.model.device),
                         key)

    def _invert(self, image, prompt: str, options: GenerationOptions, size: int, *, digest: str, **kind):
        """(trajectory on the device, embeds, cache key): `image`'s DDIM inversion under ε*, from the cache or run."""
        model = self.model
        pipe, concept = model.pipe, model.concept
        if (prompt, size) not in self._prompts:
            self._prompts = {(prompt, size): model.encode(prompt, size)}
        embeds = self._prompts[(prompt, size)]
        key = self.cache.key(**kind, concept=concept.name, base=concept.base.unet_config_sha256,
                             weights=concept.weights_digest(), reference=digest,
                             scheduler=dict(pipe.scheduler.config), steps=options.num_inference_steps,
                             resolution=size, prompt=prompt, dtype=str(embeds.states.dtype))

        def invert():
            return ddim_invert(pipe, encode_image(pipe, image, size), embeds, options.num_inference_steps)

        trajectory, cached = self.cache.get_or_compute(key, invert)
        logger.debug("reference trajectory %s", "from cache" if cached else "inverted")
        return trajectory.to(model.device, embeds.states.dtype), embeds, key

    # ------------------------------------------------------------------ masks

    def _attention(self, trajectory, embeds, prompt: str, phrase: str, steps: int) -> torch.Tensor:
        """The min-max-normalised cross-attention of `phrase` mid-way through the trajectory, (h, w)."""
        from lrkit.masks import minmax

        model = self.model
        grid = tuple(trajectory.shape[-2:])
        store = AttentionStore(rows=[0], tokens=[model.token_positions(prompt, phrase)], size=grid)
        i = steps // 2
        with processors(model.pipe.unet, model.store_processors(store, grid)):
            model.pipe.unet(trajectory[i], model.pipe.scheduler.timesteps[i], **embeds.unet_kwargs())
        return minmax(store.take()[0])

    def _segment(self, image: PIL.Image.Image, attn: torch.Tensor, fallback) -> torch.Tensor:
        """The segmenter's mask of `image` in the box of `attn`, or `fallback(image)` without a segmenter."""
        from lrkit.masks import box_from_attention

        segmenter = self.model.segmenter
        if segmenter is None:
            return fallback(image)
        return segmenter(image, box_from_attention(attn, image.size))

    def _concept_mask(self, path: Path, photo, trajectory, embeds, prompt: str, options, key: str) -> torch.Tensor:
        from lrkit.masks import load_mask_png, otsu_threshold, resize_map

        model = self.model
        grid = tuple(trajectory.shape[-2:])
        stored = model.concept.masks.get(str(path.relative_to(model.concept.path)))
        if stored is not None:
            return resize_map(load_mask_png(model.concept.path / stored).float(), grid).to(model.device)
        segmenter = model.segmenter
        source = None if segmenter is None else getattr(segmenter, "source", None)
        # A segmenter that cannot say where its weights came from gets no disk cache.
        mask_key = self.cache.key(kind="mask", inversion=key, segmenter=type(segmenter).__name__, source=source) \
            if segmenter is None or source is not None else None
        memo_key = (key, id(segmenter))
        mask = self._masks.get(memo_key)
        if mask is None and mask_key:
            mask = self.cache.get_mask(mask_key)
        if mask is None:
            attn = self._attention(trajectory, embeds, prompt, model.subject_phrase(), options.num_inference_steps)
            square = center_square(photo, grid[0] * model.pipe.vae_scale_factor)  # what the inversion encoded
            mask = self._segment(square, attn, fallback=lambda _: attn > otsu_threshold(attn))
            if mask_key:
                self.cache.put_mask(mask_key, mask)
        self._masks = {memo_key: mask}
        return resize_map(mask.float(), grid).to(model.device)

    # ------------------------------------------------------------------ keys and values

    def keys_values(self, references: list[Reference], layers, steps: range) -> list[AttentionCache]:
        """Each reference's keys/values at `layers` for `steps`: one pass over its trajectory, memoized for the
        references of the latest call."""
        model = self.model
        unet = model.pipe.unet
        names = tuple(l.name for l in layers)
        wanted = {(r.key, names, steps.start, steps.stop) for r in references}
        memo = {k: v for k, v in self._kv.items() if k in wanted}
        for ref in references:
            memo_key = (ref.key, names, steps.start, steps.stop)
            if memo_key in memo:
                continue
            cache = AttentionCache(rows=[0], steps=steps)
            with processors(unet, {name: RecordingProcessor(cache, name, "kv") for name in names}):
                for i in steps:
                    cache.step = i
                    unet(ref.trajectory[i], model.pipe.scheduler.timesteps[i], **ref.embeds.unet_kwargs(),
                         return_dict=False)
            memo[memo_key] = cache
        self._kv = memo
        return [memo[(r.key, names, steps.start, steps.stop)] for r in references]


__all__ = ["Reference", "References", "open_image"]
