"""References: a photo as the loops use it — its DDIM inversion under the personalized model, its subject mask,
and its self-attention keys/values at the swap layers.

Layout-and-Retouch inverts a concept's reference photo at its own aspect ratio (`reference_size`: about the
generation's area, each side a multiple of the VAE's scale times the UNet's downsampling), so a portrait photo
stays portrait beside a square or landscape generation; the swap reads R's tokens as a set of keys and values
(`lrkit.inference.processors`). Dual-reference and other images keep the generation's square.

Everything computed here is cached outside the bundle (`TrajectoryCache`, keyed by the bundle's weights
digest among the rest): opening a bundle never writes into it. A mask the bundle itself carries (concept_em
computes them at training time) is read, never recomputed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import PIL.ImageOps
import torch

from lrkit.attention import AttentionStore, processors
from lrkit.families import Conditioning
from lrkit.inference.inversion import (TrajectoryCache, center_square, ddim_invert, encode_image, image_digest,
                                       vae_encode)
from lrkit.inference.options import GenerationOptions, InferenceError
from lrkit.inference.personalized import PersonalizedModel
from lrkit.inference.processors import AttentionCache, RecordingProcessor

logger = logging.getLogger(__name__)


@dataclass
class Reference:
    """One reference image as the loops use it."""

    image: PIL.Image.Image  # a concept photo as given (EXIF-rotated), or another image's square crop as inverted
    trajectory: torch.Tensor  # (T+1, 1, C, h, w): its DDIM inversion under ε*, at the size it was inverted at
    embeds: Conditioning  # one row: the prompt it was inverted with, at the reference's size
    mask: torch.Tensor  # (h, w) float: its subject at latent resolution (the trajectory's grid)
    key: str  # the inversion's cache key: identifies the reference for the key/value memo


def size_multiple(pipe) -> int:
    """The side (px) every reference size is a multiple of: the VAE's scale times the UNet's total downsampling,
    so that the reference has a whole token grid at every UNet level."""
    unet = pipe.unet
    ups = getattr(unet, "num_upsamplers", len(unet.config.block_out_channels) - 1)
    return pipe.vae_scale_factor * 2 ** ups


def reference_size(photo_size: tuple[int, int], target: tuple[int, int], multiple: int) -> tuple[int, int]:
    """(height, width) at which a reference photo of `photo_size` (width, height) is inverted for a generation of
    `target` (height, width): of the candidates, the one nearest the photo's aspect ratio (|log(h/w) - log(H/W)|),
    the larger area on a tie. Candidates: the target's own size, and for each width w that is a multiple of
    `multiple` the largest height h, a multiple too, with h * w <= the target's area, and the same sizes
    transposed, and the largest such square. A photo of the target's aspect ratio therefore takes the target's
    size."""
    height, width = target
    area = height * width
    want = math.log(photo_size[1] / photo_size[0])
    side = math.isqrt(area) // multiple * multiple
    candidates = {(height, width)} | ({(side, side)} if side else set())
    for w in range(multiple, area // multiple + 1, multiple):
        h = area // w // multiple * multiple
        if h >= multiple:
            candidates |= {(h, w), (w, h)}
    return min(candidates, key=lambda hw: (abs(math.log(hw[0] / hw[1]) - want), -hw[0] * hw[1], hw))


def crop_to(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """`image` resized to cover `width` x `height` and centre-cropped to it (a square: `center_square`)."""
    if width == height:
        return center_square(image, width)
    w, h = image.size
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), PIL.Image.Resampling.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


@torch.no_grad()
def encode_reference(pipe, image: PIL.Image.Image, height: int, width: int) -> torch.Tensor:
    """`image` as (1, C, height / f, width / f) latents scaled for the UNet: `encode_image` for a square, else
    resized and centre-cropped to `width` x `height` (`crop_to`) and encoded the same way (posterior mean)."""
    if height == width:
        return encode_image(pipe, image, height)
    image = PIL.ImageOps.exif_transpose(image).convert("RGB")
    if image.size != (width, height):
        logger.info("reference image is %dx%d; inverted at %dx%d (its own aspect ratio, about the generation's area)",
                    *image.size, width, height)
        image = crop_to(image, width, height)
    return vae_encode(pipe, image)


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

    def from_concept(self, options: GenerationOptions, size: "int | tuple[int, int]", *,
                     own_aspect: bool = False) -> Reference:
        """R: the concept's reference photo `retouch.reference` (EXIF-rotated), inverted with `a photo of <token>
        <class>`; its mask from the bundle, else from the cache, else computed (SAM in its attention box, else the
        attention map above its Otsu threshold).

        `size`: the generation's side, or its (height, width). Without `own_aspect` the photo is resized and
        centre-cropped to that size; with it (Layout-and-Retouch) it is inverted at its own aspect ratio, about the
        generation's area (`reference_size`), or at the aspect ratio of the mask the bundle stores for it (that
        mask describes the crop it was made on)."""
        path = self.concept_photo(options.retouch.reference)
        with PIL.Image.open(path) as opened:
            opened.load()
            photo = PIL.ImageOps.exif_transpose(opened).convert("RGB")
        target = (size, size) if isinstance(size, int) else tuple(size)
        shape = target
        if own_aspect:
            stored = self._stored_mask(path)
            aspect_of = photo.size
            if stored is not None:
                with PIL.Image.open(stored) as mask_image:
                    aspect_of = mask_image.size
            shape = reference_size(aspect_of, target, size_multiple(self.model.pipe))
        prompt = f"a photo of {self.model.subject_phrase()}"
        trajectory, embeds, key = self._invert(photo, prompt, options, shape, digest=image_digest(path))
        mask = self._concept_mask(path, photo, trajectory, embeds, prompt, options, key)
        return Reference(photo, trajectory, embeds, mask, key)

    def from_image(self, image: PIL.Image.Image, prompt: str, phrase: str | None, options: GenerationOptions,
                   size: int) -> Reference:
        """A reference from any image: its centre square inverted with `prompt`; the mask of `phrase` (none: an
        empty mask), SAM in its attention box, else the Otsu-thresholded map at the image's size."""
        from lrkit.masks import AttentionSegmenter, resize_map

        square = center_square(image, size)
        trajectory, embeds, key = self._invert(square, prompt, options, (size, size), digest=image_digest(square),
                                               kind="image")
        grid = tuple(trajectory.shape[-2:])
        if phrase is None:
            return Reference(square, trajectory, embeds, torch.zeros(grid, device=self.model.device), key)
        attn = self._attention(trajectory, embeds, prompt, phrase, options.num_inference_steps)
        mask = self._segment(square, attn, fallback=AttentionSegmenter(attn))
        return Reference(square, trajectory, embeds, (resize_map(mask.float(), grid) >= 0.5).float().to(self.model.device),
                         key)

    def _invert(self, image, prompt: str, options: GenerationOptions, shape: tuple[int, int], *, digest: str,
                **kind):
        """(trajectory on the device, embeds, cache key): `image`'s DDIM inversion under ε* at `shape` (height,
        width), from the cache or run."""
        model = self.model
        pipe, concept = model.pipe, model.concept
        height, width = shape
        if (prompt, height, width) not in self._prompts:
            embeds = model.encode(prompt, height) if height == width else model.family.conditioning(
                pipe, [prompt], None, height=height, width=width, guidance=False)[0]
            self._prompts = {(prompt, height, width): embeds}
        embeds = self._prompts[(prompt, height, width)]
        key = self.cache.key(**kind, concept=concept.name, base=concept.base.unet_config_sha256,
                             weights=concept.weights_digest(), reference=digest,
                             scheduler=dict(pipe.scheduler.config), steps=options.num_inference_steps,
                             resolution=height if height == width else [height, width], prompt=prompt,
                             dtype=str(embeds.states.dtype))

        def invert():
            return ddim_invert(pipe, encode_reference(pipe, image, height, width), embeds, options.num_inference_steps)

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

    def _stored_mask(self, path: Path) -> Path | None:
        """The mask file the bundle stores for the reference photo at `path`, if any."""
        concept = self.model.concept
        stored = concept.masks.get(str(path.relative_to(concept.path)))
        return None if stored is None else concept.path / stored

    def _concept_mask(self, path: Path, photo, trajectory, embeds, prompt: str, options, key: str) -> torch.Tensor:
        from lrkit.masks import load_mask_png, otsu_threshold, resize_map

        model = self.model
        grid = tuple(trajectory.shape[-2:])
        stored = self._stored_mask(path)
        if stored is not None:
            return resize_map(load_mask_png(stored).float(), grid).to(model.device)
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
            factor = model.pipe.vae_scale_factor
            inverted = crop_to(photo, grid[1] * factor, grid[0] * factor)  # what the inversion encoded
            mask = self._segment(inverted, attn, fallback=lambda _: attn > otsu_threshold(attn))
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


__all__ = ["Reference", "References", "crop_to", "encode_reference", "open_image", "reference_size", "size_multiple"]
