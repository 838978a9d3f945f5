"""The data side of concept training: load the user's photos, turn them into training samples,
and generate the class images for prior preservation.

- `load_images` reads a folder of photos (or a `datasets` dataset) into RGB `Photo`s and reports
  every unusable file in one `DataError`.
- `PhotoDataset` turns photos into `{"pixel_values", "caption", ...}` samples; sample `i` depends
  only on `(seed, i)`, so a resumed run sees exactly the samples it would have seen.
- `ensure_class_images` tops up a folder of class images, reproducibly and resumably.
"""

from __future__ import annotations

import io
import logging
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from tqdm.auto import tqdm

from lrkit.io import atomic_write_bytes

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_SUFFIX = ".txt"
DEFAULT_CAPTION_TEMPLATE = "a photo of {token} {class}"
CAPTION_PLACEHOLDERS = ("token", "class")

# Files in a folder that mean "this is a dataset `datasets.load_dataset` can read", not photos.
_DATASET_FILE_SUFFIXES = (".parquet", ".arrow", ".csv", ".tsv", ".json", ".jsonl")
# Markers `Dataset.save_to_disk` / `DatasetDict.save_to_disk` leave behind.
_SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
# What PIL raises for files it cannot decode (truncated data, wrong format, bad headers).
_IMAGE_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_WHITE = (255, 255, 255)


class DataError(ValueError):
    """Unusable training data; the message names the file or option and what to do."""


@dataclass
class Photo:
    """One training photo."""

    name: str
    """File name, or `dataset[i]` for a row of a `datasets` dataset."""
    image: Image.Image
    """RGB, EXIF orientation applied."""
    caption: str | None = None
    """From a same-stem `.txt` file (or the dataset's caption column); None if absent."""
    path: Path | None = None
    """The original file (to copy into a bundle's refs/); None for dataset rows."""


# --------------------------------------------------------------------------- load_images


def load_images(
    source: str | os.PathLike,
    *,
    min_size: int = 64,
    image_column: str | None = None,
    caption_column: str | None = None,
    split: str = "train",
) -> list[Photo]:
    """Load training photos from a folder, a local `datasets` dataset, or a Hugging Face hub id.

    A folder is read non-recursively: files ending in `IMAGE_SUFFIXES` (any case) sorted by name,
    each with an optional same-stem `.txt` caption. Every unreadable or too-small image is
    reported together in one `DataError`.
    """
    if min_size < 1:
        raise DataError(f"min_size must be a positive number of pixels, got {min_size}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True elsewhere; truncated photos will load "
            "with grey areas instead of being reported"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            dataset = _load_saved_dataset(path)
        elif not _image_files(path) and _has_dataset_files(path):
            dataset = _load_dataset(str(path), split)
        else:
            return _folder_photos(path, min_size)
        return _dataset_photos(dataset, str(path), split, min_size, image_column, caption_column)
    if path.exists():
        raise DataError(f"{path} is a file; pass the folder that holds the photos (or a `save_to_disk` folder)")
    if isinstance(source, str) and _HUB_ID.match(source) and ".." not in source:
        dataset = _load_dataset(source, split)
        return _dataset_photos(dataset, source, split, min_size, image_column, caption_column)
    raise DataError(f"photo folder {path} does not exist; pass a folder of .jpg/.jpeg/.png/.webp photos")


def _image_files(folder: Path) -> list[Path]:
    """The photos directly in `folder`, sorted by name; hidden files (e.g. macOS `._x.jpg`) skipped."""
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def _has_dataset_files(folder: Path) -> bool:
    candidates = [*folder.glob("*"), *folder.glob("data/*")]
    return any(p.suffix.lower() in _DATASET_FILE_SUFFIXES and p.is_file() for p in candidates)


def _folder_photos(folder: Path, min_size: int) -> list[Photo]:
    files = _image_files(folder)
    if not files:
        nested = sorted({p.parent.name for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES})
        hint = f" (subfolders are not searched; found images in {', '.join(nested)}/)" if nested else ""
        raise DataError(f"no .jpg/.jpeg/.png/.webp images in {folder}{hint}")
    photos: list[Photo] = []
    problems: list[str] = []
    for file in files:
        try:
            image = _read_image(file, file.name, min_size)
            caption = _read_caption(file)
        except DataError as err:
            problems.append(str(err))
            continue
        photos.append(Photo(name=file.name, image=image, caption=caption, path=file))
    _raise_if_problems(problems, str(folder))
    stems = {f.stem for f in files}
    for orphan in sorted(p.name for p in folder.glob(f"*{CAPTION_SUFFIX}") if p.stem not in stems):
        logger.warning("caption file %s in %s has no photo with the same name; it is ignored", orphan, folder)
    logger.info("loaded %d photos from %s", len(photos), folder)
    return photos


def _read_caption(image_file: Path) -> str | None:
    caption_file = image_file.with_suffix(CAPTION_SUFFIX)
    if not caption_file.is_file():
        return None
    try:
        text = caption_file.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{caption_file.name}: cannot read the caption ({err}); save it as UTF-8 text") from err
    return text or None


def _raise_if_problems(problems: list[str], where: str) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise DataError(f"{len(problems)} unusable image(s) in {where}; fix or remove them and try again:\n{lines}")


def _read_image(fp: str | os.PathLike | IO[bytes], name: str, min_size: int) -> Image.Image:
    """Decode an image fully (truncated files fail), apply EXIF orientation, convert to RGB."""
    try:
        with Image.open(fp) as raw:
            raw.load()  # decodes everything now; truncated data raises (LOAD_TRUNCATED_IMAGES is False)
            image = ImageOps.exif_transpose(raw)
            image = _to_rgb(image)
    except _IMAGE_READ_ERRORS as err:
        raise DataError(f"{name}: not a readable image ({err}); re-export it or remove it") from err
    if min(image.size) < min_size:
        width, height = image.size
        raise DataError(
            f"{name}: {width}x{height} px is smaller than min_size={min_size} on its short side; "
            f"use a larger photo or lower min_size"
        )
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: transparency composited over white, 16-bit scaled to 8-bit."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (mode "I" is how PIL often holds it too): 0..65535 -> 0..255, not clipped.
        values = np.asarray(image).astype(np.float64).clip(0, 65535)
        image = Image.fromarray((values / 257.0).round().astype(np.uint8))  # 2-D uint8 -> "L"
    has_alpha = image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


# ------------------------------------------------------------------ datasets (`datasets` library)


def _load_saved_dataset(path: Path) -> Any:
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(f"{path} looks like a `save_to_disk` dataset but cannot be loaded ({err})") from err


def _load_dataset(source: str, split: str) -> Any:
    """`datasets.load_dataset(source, split=split)`, with "not found / offline" as a DataError."""
    import datasets

    try:
        return datasets.load_dataset(source, split=split)
    except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError, HFValidationError
        if Path(source).exists():
            raise DataError(f"cannot load the dataset in {source} (split={split!r}): {err}") from err
        raise DataError(
            f"{source!r} is not a local folder, and loading it as a Hugging Face dataset id failed "
            f"({type(err).__name__}: {err}); pass a local folder of photos or a `save_to_disk` path"
        ) from err


def _dataset_photos(
    dataset: Any,
    label: str,
    split: str,
    min_size: int,
    image_column: str | None,
    caption_column: str | None,
) -> list[Photo]:
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in dataset:
            raise DataError(f"split={split!r} is not in dataset {label} (splits: {', '.join(dataset)})")
        dataset = dataset[split]
    columns = list(dataset.column_names)
    if image_column is None:
        image_column = next(
            (name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)), None
        )
        if image_column is None:
            raise DataError(
                f"dataset {label} has no image column (columns: {', '.join(columns)}); "
                f"pass image_column= naming the column that holds the images"
            )
    elif image_column not in columns:
        raise DataError(f"image_column={image_column!r} is not in dataset {label} (columns: {', '.join(columns)})")
    if caption_column is not None and caption_column not in columns:
        raise DataError(f"caption_column={caption_column!r} is not in dataset {label} (columns: {', '.join(columns)})")
    keep = [image_column] + ([caption_column] if caption_column else [])
    try:
        # Undecoded rows ({"bytes", "path"}) let us decode, check and name each image ourselves.
        rows = dataset.select_columns(keep).cast_column(image_column, datasets.Image(decode=False))
    except (TypeError, ValueError, NotImplementedError) as err:
        raise DataError(f"image_column={image_column!r} of dataset {label} does not hold images ({err})") from err

    photos: list[Photo] = []
    problems: list[str] = []
    for i, row in enumerate(rows):
        name = f"dataset[{i}]"
        try:
            image = _read_image(_image_source(row[image_column], name), name, min_size)
        except DataError as err:
            problems.append(str(err))
            continue
        caption = row[caption_column] if caption_column else None
        if caption is not None:
            caption = str(caption).strip() or None
        photos.append(Photo(name=name, image=image, caption=caption, path=None))
    _raise_if_problems(problems, f"dataset {label}")
    if not photos:
        raise DataError(f"dataset {label} has no rows")
    logger.info("loaded %d photos from dataset %s (column %r)", len(photos), label, image_column)
    return photos


def _image_source(value: Any, name: str) -> IO[bytes] | str:
    if isinstance(value, dict) and value.get("bytes"):
        return io.BytesIO(value["bytes"])
    if isinstance(value, dict) and value.get("path"):
        return value["path"]
    raise DataError(f"{name}: the image is empty; remove the row or fill it")


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
        resized = _to_rgb(photo.image).resize(size, Image.Resampling.LANCZOS)  # antialiased
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)

    def _center_offsets(self, photo_index: int) -> tuple[int, int]:
        _, height, width = self._pixels[photo_index].shape
        return (height - self.resolution) // 2, (width - self.resolution) // 2

    def _item(self, photo_index: int, top: int, left: int, *, flipped: bool) -> dict:
        r = self.resolution
        crop = self._pixels[photo_index][:, top : top + r, left : left + r]  # (3, R, R)
        if flipped:
            crop = crop.flip(-1)
        return {
            "pixel_values": crop.float() / 127.5 - 1.0,
            "caption": self._captions[photo_index],
            "photo_index": photo_index,
            "flipped": flipped,
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
    existing = _image_files(class_dir)
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
    return _image_files(class_dir)[:num_images]


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
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                atomic_write_bytes(class_dir / f"class_{k:05d}.png", buffer.getvalue())
            progress.update(len(batch))
