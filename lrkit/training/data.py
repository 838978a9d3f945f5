"""The data side of concept training: turn the user's photos (`lrkit.photos`) into training samples, and
generate the class images for prior preservation.

- `PhotoDataset` turns photos into `{"pixel_values", "caption", ...}` samples (with the photo's original size
  and the crop's top-left, which SDXL conditions on); sample `i` depends
  only on `(seed, i)`, so a resumed run sees exactly the samples it would have seen.
- `ensure_class_images` tops up a folder of class images, reproducibly and resumably.
"""

from __future__ import annotations

import logging
import operator
import os
import re
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


# --------------------------------------------------------------------------- PhotoDataset


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample `index` of a run seeded with `seed`."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


class PhotoDataset(torch.utils.data.Dataset):
    """Training samples from photos: resize the short side, crop a square, maybe flip.

    Sample `i` (any non-negative integer, e.g. a global step counter) shows photo
    `i % len(photos)`; its crop and flip come from a generator seeded with `(seed, i)` only, so the
    same `i` always gives the same sample.
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
        # Resizing is deterministic, so it is done once; items only crop and flip.
        self._pixels = [self._resize(p) for p in self.photos]  # each (3, H, W) uint8, min(H, W) == resolution

    @property
    def cacheable(self) -> bool:
        """True when every item equals one of `deterministic_variants(photo_index)` (center crop)."""
        return self.center_crop

    def __len__(self) -> int:
        return len(self.photos) * self.repeats

    def __getitem__(self, i: int) -> dict:
        i = operator.index(i)
        if i < 0:
            raise IndexError(f"PhotoDataset index must be >= 0, got {i}")
        photo_index = i % len(self.photos)
        _, height, width = self._pixels[photo_index].shape
        generator = torch.Generator().manual_seed(sample_seed(self.seed, i))
        u_top, u_left, u_flip = torch.rand(3, generator=generator).tolist()  # always drawn: fixed stream
        if self.center_crop:
            top, left = self._center_offsets(photo_index)
        else:
            top = min(int(u_top * (height - self.resolution + 1)), height - self.resolution)
            left = min(int(u_left * (width - self.resolution + 1)), width - self.resolution)
        return self._item(photo_index, top, left, flipped=u_flip < self.random_flip)

    def deterministic_variants(self, photo_index: int) -> list[dict]:
        """The center-cropped item of a photo, and its mirror image if `random_flip > 0` (for latent caching)."""
        if not 0 <= photo_index < len(self.photos):
            raise IndexError(f"photo_index must be in [0, {len(self.photos)}), got {photo_index}")
        top, left = self._center_offsets(photo_index)
        flips = (False, True) if self.random_flip > 0 else (False,)
        return [self._item(photo_index, top, left, flipped=f) for f in flips]

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

    def _resize(self, photo: Photo) -> torch.Tensor:
        width, height = photo.image.size
        scale = self.resolution / min(width, height)
        if scale > 1:
            logger.warning(
                "%s is %dx%d px; upscaling it to %d px on its short side (a larger photo trains better)",
                photo.name,
                width,
                height,
                self.resolution,
            )
        size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        resized = to_rgb(photo.image).resize(size, Image.Resampling.LANCZOS)  # antialiased
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)

    def _center_offsets(self, photo_index: int) -> tuple[int, int]:
        _, height, width = self._pixels[photo_index].shape
        return (height - self.resolution) // 2, (width - self.resolution) // 2

    def _item(self, photo_index: int, top: int, left: int, *, flipped: bool) -> dict:
        r = self.resolution
        pixels = self._pixels[photo_index]
        crop = pixels[:, top : top + r, left : left + r]  # (3, R, R)
        if flipped:
            crop = crop.flip(-1)
            left = pixels.shape[-1] - left - r  # the crop's left edge in the mirrored photo
        width, height = self.photos[photo_index].image.size
        return {
            "pixel_values": crop.float() / 127.5 - 1.0,
            "caption": self._captions[photo_index],
            "photo_index": photo_index,
            "flipped": flipped,
            "original_size": (height, width),  # the photo before resizing (SDXL's size conditioning)
            "crop_top_left": (top, left),  # in the resized photo (SDXL's crop conditioning)
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
