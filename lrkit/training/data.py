"""The data side of concept training: turn the user's photos (`lrkit.photos`) into training samples, and
generate the class images for prior preservation.

- `PhotoDataset` turns photos into `{"pixel_values", "caption", ...}` samples (with the photo's original size,
  the crop's top-left and the size trained at, which SDXL conditions on), square or in a given bucket shape
  (`lrkit.training.buckets`); sample `i` depends only on `(seed, i)`, so a resumed run sees exactly the samples it
  would have seen.
- `CaptionVariation` varies a sample's caption (dropout, shuffled parts) from `(seed, i)` only.
- `ensure_class_images` tops up a folder of class images, reproducibly and resumably.
"""

from __future__ import annotations

import logging
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from lrkit.io import atomic_save_png
from lrkit.photos import DataError, Photo, image_files, to_rgb

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_TEMPLATE = "a photo of {token} {class}"
CAPTION_PLACEHOLDERS = ("token", "class")

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


# --------------------------------------------------------------------------- captions


def unknown_placeholders(template: str) -> list[str]:
    """The `{...}` names in `template` that are not CAPTION_PLACEHOLDERS, sorted."""
    return sorted({p for p in _PLACEHOLDER.findall(template) if p not in CAPTION_PLACEHOLDERS})


def validate_caption_template(template: str) -> None:
    """Raise DataError unless `template` has `{token}` and no placeholders besides {token}/{class}."""
    unknown = unknown_placeholders(template)
    if unknown:
        raise DataError(
            f"caption_template {template!r} has unknown placeholder(s) "
            f"{', '.join('{' + p + '}' for p in unknown)}; only {{token}} and {{class}} are allowed"
        )
    if "{token}" not in template:
        raise DataError(
            f"caption_template {template!r} must contain {{token}} (where the concept's token goes), "
            f"e.g. {DEFAULT_CAPTION_TEMPLATE!r}"
        )


def format_caption(template: str, *, token: str, class_word: str) -> str:
    """Fill `{token}` and `{class}`; other braces are left alone and whitespace is collapsed."""
    text = template.replace("{token}", token).replace("{class}", class_word)
    return " ".join(text.split())


CAPTION_STREAM = 0xCA7  # mixed into a sample's seed: caption draws never share the crop's stream


@dataclass(frozen=True)
class CaptionVariation:
    """How a photo's caption varies from sample to sample, each sample's draw seeded by `(seed, counter)` only.

    Two draws per sample, always in this order: u ~ U(0, 1), then, with `shuffle`, a permutation of the movable
    parts. With u < `dropout` the sample trains with the empty caption. With `shuffle` the caption is split at
    commas into parts (whitespace stripped, empty parts dropped); the first `keep_tokens` parts, and every part up to
    and including the first that holds `token` as a word, stay in place; the rest are shuffled and all are joined
    with ", ". The token therefore never moves, so it is never pushed towards the end, where the text encoder's
    77-token limit would cut it.
    """

    token: str
    seed: int = 0
    dropout: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise DataError(f"caption dropout is a probability in [0, 1), got {self.dropout}")
        if self.keep_tokens < 0:
            raise DataError(f"keep_tokens must be >= 0, got {self.keep_tokens}")

    @property
    def active(self) -> bool:
        """Whether any caption changes."""
        return self.dropout > 0 or self.shuffle

    def kept_parts(self, parts: list[str]) -> int:
        """How many leading parts stay in place: `keep_tokens`, extended to the first part holding the token."""
        word = re.compile(rf"(?<![\w<>-]){re.escape(self.token)}(?![\w<>-])")
        holding = next((k + 1 for k, part in enumerate(parts) if word.search(part)), 0)
        return min(len(parts), max(self.keep_tokens, holding))

    def apply(self, caption: str, counter: int) -> str:
        """The caption of sample `counter`."""
        generator = torch.Generator().manual_seed(sample_seed(self.seed, counter) ^ CAPTION_STREAM)
        u = torch.rand(1, generator=generator).item()
        if self.shuffle:
            parts = [p.strip() for p in caption.split(",") if p.strip()]
            kept = self.kept_parts(parts)
            order = torch.randperm(len(parts) - kept, generator=generator).tolist()
            caption = ", ".join(parts[:kept] + [parts[kept + j] for j in order])
        return "" if u < self.dropout else caption


# --------------------------------------------------------------------------- PhotoDataset


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample `index` of a run seeded with `seed`."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


class PhotoDataset(torch.utils.data.Dataset):
    """Training samples from photos: resize to cover the crop, crop (a square, or a bucket's shape), maybe flip.

    Sample `i` (any non-negative integer, e.g. a global step counter) shows photo
    `i % len(photos)`; its crop and flip come from a generator seeded with `(seed, i)` only, so the
    same `i` always gives the same sample. `dataset[i]` is the square crop at `resolution`; `sample(i, size)` the
    crop of shape `size` (a bucket, `lrkit.training.buckets`).
    """

    def __init__(
        self,
        photos: list[Photo],
        *,
        resolution: int,
        token: str,
        class_word: str,
        caption_template: str = DEFAULT_CAPTION_TEMPLATE,
        center_crop: bool = True,
        random_flip: float = 0.0,
        repeats: int = 1,
        seed: int = 0,
    ) -> None:
        if not photos:
            raise DataError("PhotoDataset needs at least one photo; load_images returned none")
        if resolution < 1:
            raise DataError(f"resolution must be a positive number of pixels, got {resolution}")
        if not token or not token.strip():
            raise DataError("token must be a non-empty string, e.g. 'sks'")
        if not 0.0 <= random_flip <= 1.0:
            raise DataError(f"random_flip is a probability in [0, 1], got {random_flip}")
        if repeats < 1:
            raise DataError(f"repeats must be >= 1, got {repeats}")
        if seed < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        validate_caption_template(caption_template)
        self.photos = list(photos)
        self.resolution = resolution
        self.token = token
        self.class_word = class_word
        self.caption_template = caption_template
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.repeats = repeats
        self.seed = seed
        self._captions = [self._caption(p) for p in self.photos]
        # Resizing is deterministic, so it is done once (per crop shape); items only crop and flip.
        self._pixels = [self._resize(p) for p in self.photos]  # each (3, H, W) uint8, min(H, W) == resolution
        self._bucket_pixels: dict[tuple[int, tuple[int, int]], torch.Tensor] = {}  # (photo, size) -> (3, H, W)

    @property
    def cacheable(self) -> bool:
        """True when every item equals one of `deterministic_variants(photo_index)` (center crop)."""
        return self.center_crop

    def __len__(self) -> int:
        return len(self.photos) * self.repeats

    def __getitem__(self, i: int) -> dict:
        return self.sample(i)

    def sample(self, i: int, size: tuple[int, int] | None = None) -> dict:
        """Sample `i` cropped to `size` (height, width); None: the `resolution` square."""
        i = operator.index(i)
        if i < 0:
            raise IndexError(f"PhotoDataset index must be >= 0, got {i}")
        photo_index = i % len(self.photos)
        size = self._size(size)
        pixels = self._resized(photo_index, size)
        _, height, width = pixels.shape
        generator = torch.Generator().manual_seed(sample_seed(self.seed, i))
        u_top, u_left, u_flip = torch.rand(3, generator=generator).tolist()  # always drawn: fixed stream
        if self.center_crop:
            top, left = (height - size[0]) // 2, (width - size[1]) // 2
        else:
            top = min(int(u_top * (height - size[0] + 1)), height - size[0])
            left = min(int(u_left * (width - size[1] + 1)), width - size[1])
        return self._item(photo_index, pixels, top, left, size, flipped=u_flip < self.random_flip)

    def deterministic_variants(self, photo_index: int, size: tuple[int, int] | None = None) -> list[dict]:
        """The center-cropped item of a photo at `size` (None: the square), and its mirror image if
        `random_flip > 0` (for latent caching)."""
        if not 0 <= photo_index < len(self.photos):
            raise IndexError(f"photo_index must be in [0, {len(self.photos)}), got {photo_index}")
        size = self._size(size)
        pixels = self._resized(photo_index, size)
        top, left = (pixels.shape[1] - size[0]) // 2, (pixels.shape[2] - size[1]) // 2
        flips = (False, True) if self.random_flip > 0 else (False,)
        return [self._item(photo_index, pixels, top, left, size, flipped=f) for f in flips]

    def _size(self, size: tuple[int, int] | None) -> tuple[int, int]:
        if size is None:
            return (self.resolution, self.resolution)
        height, width = (operator.index(side) for side in size)
        if height < 1 or width < 1:
            raise ValueError(f"a crop size is (height, width) in pixels, got {size}")
        return height, width

    def _resized(self, photo_index: int, size: tuple[int, int]) -> torch.Tensor:
        """(3, H, W) uint8: the photo resized to cover `size` (the smallest scale at which both sides reach it)."""
        if size == (self.resolution, self.resolution):
            return self._pixels[photo_index]
        key = (photo_index, size)
        if key not in self._bucket_pixels:
            self._bucket_pixels[key] = self._resize(self.photos[photo_index], size)
        return self._bucket_pixels[key]

    def _caption(self, photo: Photo) -> str:
        template = photo.caption if photo.caption is not None else self.caption_template
        unknown = unknown_placeholders(template)
        if photo.caption is not None and unknown:  # the template itself was validated in __init__
            logger.warning("caption of %s has %s, which is not filled in (only {token} and {class} are); "
                           "it stays as written: %r", photo.name, ", ".join("{" + p + "}" for p in unknown), template)
        caption = format_caption(template, token=self.token, class_word=self.class_word)
        if self.token not in caption:
            logger.warning("caption of %s does not mention the token %r: %r", photo.name, self.token, caption)
        return caption

    def _resize(self, photo: Photo, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(3, H, W) uint8: `photo` resized to cover `size` (height, width; None: the resolution square)."""
        crop_height, crop_width = size or (self.resolution, self.resolution)
        width, height = photo.image.size
        scale = max(crop_height / height, crop_width / width)
        size = (max(crop_width, round(width * scale)), max(crop_height, round(height * scale)))
        resized = to_rgb(photo.image).resize(size, Image.Resampling.LANCZOS)  # antialiased
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)

    def _item(self, photo_index: int, pixels: torch.Tensor, top: int, left: int, size: tuple[int, int], *,
              flipped: bool) -> dict:
        crop_height, crop_width = size
        crop = pixels[:, top : top + crop_height, left : left + crop_width]  # (3, h, w)
        if flipped:
            crop = crop.flip(-1)
            left = pixels.shape[-1] - left - crop_width  # the crop's left edge in the mirrored photo
        width, height = self.photos[photo_index].image.size
        return {
            "pixel_values": crop.float() / 127.5 - 1.0,
            "caption": self._captions[photo_index],
            "photo_index": photo_index,
            "flipped": flipped,
            "original_size": (height, width),  # the photo before resizing (SDXL's size conditioning)
            "crop_top_left": (top, left),  # in the resized photo (SDXL's crop conditioning)
            "target_size": (crop_height, crop_width),  # the size trained at (SDXL's target size)
        }


# --------------------------------------------------------------------------- class images


def ensure_class_images(
    pipe,
    class_dir: str | os.PathLike,
    *,
    prompt: str,
    num_images: int,
    resolution: int,
    seed: int = 0,
    batch_size: int = 4,
    num_inference_steps: int = 25,
) -> list[Path]:
    """Top `class_dir` up to `num_images` prior-preservation images generated with `pipe`.

    Image `k` is saved as `class_{k:05d}.png` and generated from seed `seed + k`, so a stopped run
    resumes where it was and yields the same images. Returns the first `num_images` images in
    `class_dir`, sorted by name.
    """
    if num_images < 0:
        raise DataError(f"num_images must be >= 0, got {num_images}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = image_files(class_dir)
    missing = num_images - len(existing)
    if missing <= 0:
        logger.info("%d class images already in %s; none generated", len(existing), class_dir)
        return existing[:num_images]

    taken = {p.name for p in existing}
    todo: list[int] = []
    k = 0
    while len(todo) < missing:
        if f"class_{k:05d}.png" not in taken:
            todo.append(k)
        k += 1

    # One bar for the whole job; the pipeline's per-call step bar is silenced meanwhile.
    previous_bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(**{**previous_bar_config, "disable": True})
    try:
        _generate_class_images(pipe, class_dir, todo, prompt, resolution, seed, batch_size, num_inference_steps)
    finally:
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(**previous_bar_config)
    logger.info("generated %d class images in %s (%d were there)", missing, class_dir, len(existing))
    return image_files(class_dir)[:num_images]


def _generate_class_images(
    pipe,
    class_dir: Path,
    indices: list[int],
    prompt: str,
    resolution: int,
    seed: int,
    batch_size: int,
    num_inference_steps: int,
) -> None:
    """Generate and atomically save `class_{k:05d}.png` for each k in `indices`, batch by batch."""
    with tqdm(total=len(indices), desc="class images", unit="img") as progress:
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            generators = [torch.Generator(device="cpu").manual_seed(seed + k) for k in batch]
            images = pipe(
                [prompt] * len(batch),
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                generator=generators,
            ).images
            for k, image in zip(batch, images, strict=True):
                atomic_save_png(image, class_dir / f"class_{k:05d}.png")
            progress.update(len(batch))
