"""The user's photos: a folder of images (with optional same-stem `.txt` captions), a local `datasets`
dataset or a hub id, read into RGB `Photo`s; every unusable file is reported together in one `DataError`.
Training and reference concepts both start here.

Every image is checked against a pixel budget from its header before it is decoded (`pixel_budget`:
40 megapixels unless `max_pixels` or the environment variable LRKIT_MAX_PIXELS says otherwise)."""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_SUFFIX = ".txt"

# Files in a folder that mean "this is a dataset `datasets.load_dataset` can read", not photos.
_DATASET_FILE_SUFFIXES = (".parquet", ".arrow", ".csv", ".tsv", ".json", ".jsonl")
# Markers `Dataset.save_to_disk` / `DatasetDict.save_to_disk` leave behind.
_SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
# What PIL raises for files it cannot decode (truncated data, wrong format, bad headers).
_IMAGE_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
MAX_PIXELS_ENV = "LRKIT_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 40_000_000
"""The pixel budget of one image (width x height) unless LRKIT_MAX_PIXELS or a `max_pixels` argument says
otherwise (120 MB once decoded as RGB). Larger images are refused before decoding; training resizes every
photo to `data.resolution`, so a downscaled copy loses nothing."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
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
    max_pixels: int | None = None,
) -> list[Photo]:
    """Load training photos from a folder, a local `datasets` dataset, or a Hugging Face hub id.

    A folder is read non-recursively: files ending in `IMAGE_SUFFIXES` (any case) sorted by name,
    each with an optional same-stem `.txt` caption; hidden files (`._x.jpg`) are left out. Every
    unreadable, too-small or too-large image, and every entry named like a photo that is no file (a
    folder, a FIFO, a broken symlink or symlink loop), is reported together in one `DataError`.
    `max_pixels`: the pixel budget of one image (default: `pixel_budget()`).
    """
    if min_size < 1:
        raise DataError(f"min_size must be a positive number of pixels, got {min_size}")
    limit = pixel_budget(max_pixels)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True elsewhere; truncated photos will load "
            "with grey areas instead of being reported"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            dataset = _load_saved_dataset(path)
        elif not any(_scan_folder(path)) and _has_dataset_files(path):
            dataset = _load_dataset(str(path), split)
        else:
            return _folder_photos(path, min_size, limit)
        return _dataset_photos(dataset, str(path), split, min_size, image_column, caption_column, limit)
    if path.exists():
        raise DataError(f"{path} is a file; pass the folder that holds the photos (or a `save_to_disk` folder)")
    if isinstance(source, str) and _HUB_ID.match(source) and ".." not in source:
        dataset = _load_dataset(source, split)
        return _dataset_photos(dataset, source, split, min_size, image_column, caption_column, limit)
    raise DataError(f"photo folder {path} does not exist; pass a folder of .jpg/.jpeg/.png/.webp photos")


def image_files(folder: Path) -> list[Path]:
    """The photos directly in `folder`, sorted by name; hidden files (e.g. macOS `._x.jpg`) left out. Entries
    named like a photo that are no file (a folder, a FIFO, a broken symlink) are left out with a warning that
    names each and why."""
    files, skipped = _scan_folder(folder)
    if skipped:
        logger.warning("%d entries in %s are named like images but cannot be read, and are skipped: %s",
                       len(skipped), folder, "; ".join(skipped))
    return files


def _scan_folder(folder: Path) -> tuple[list[Path], list[str]]:
    """(image files directly in `folder` sorted by name, "name: why" of each entry named like an image that
    is not a regular file). Hidden entries are in neither list."""
    files: list[Path] = []
    skipped: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        why = _not_a_file(path)
        if why is None:
            files.append(path)
        else:
            skipped.append(f"{path.name}: {why}")
    return files, skipped


def _not_a_file(path: Path) -> str | None:
    """Why `path` is not a regular file that can be opened for reading, or None when it is one."""
    try:
        mode = path.stat().st_mode  # follows symlinks
    except OSError as err:
        if path.is_symlink():
            return (f"a symlink loop ({err.strerror}); remove it" if err.errno == errno.ELOOP else
                    f"a symlink to {os.readlink(path)!r}, which cannot be read ({err.strerror}); fix or remove it")
        return f"cannot be read ({err.strerror or err}); fix its permissions or remove it"
    if stat.S_ISDIR(mode):
        return "a folder, not an image (subfolders are not searched); rename or move it"
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        return f"{kind}, not an image file; remove it"
    return None


def _has_dataset_files(folder: Path) -> bool:
    candidates = [*folder.glob("*"), *folder.glob("data/*")]
    return any(p.suffix.lower() in _DATASET_FILE_SUFFIXES and p.is_file() for p in candidates)


def _folder_photos(folder: Path, min_size: int, max_pixels: int) -> list[Photo]:
    files, skipped = _scan_folder(folder)
    if not files and not skipped:
        nested = sorted({p.parent.name for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES})
        hint = f" (subfolders are not searched; found images in {', '.join(nested)}/)" if nested else ""
        raise DataError(f"no .jpg/.jpeg/.png/.webp images in {folder}{hint}")
    photos: list[Photo] = []
    problems: list[str] = list(skipped)
    for file in files:
        try:
            image = read_image(file, file.name, min_size, max_pixels)
            caption = _read_caption(file)
        except DataError as err:
            problems.append(str(err))
            continue
        photos.append(Photo(name=file.name, image=image, caption=caption, path=file))
    raise_if_problems(problems, str(folder))
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


def raise_if_problems(problems: list[str], where: str) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise DataError(f"{len(problems)} unusable image(s) in {where}; fix or remove them and try again:\n{lines}")


def pixel_budget(max_pixels: int | None = None) -> int:
    """The pixel budget of one image: `max_pixels` when given, else $LRKIT_MAX_PIXELS, else 40 megapixels."""
    if max_pixels is None:
        text = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_PIXELS
        try:
            max_pixels = int(text)
        except ValueError:
            raise DataError(f"{MAX_PIXELS_ENV}={text!r} is not a whole number of pixels; set it like "
                            f"{MAX_PIXELS_ENV}=60000000, or unset it for the default {DEFAULT_MAX_PIXELS}") from None
        if max_pixels < 1:
            raise DataError(f"{MAX_PIXELS_ENV}={text!r} must be a positive number of pixels, e.g. 60000000")
        return max_pixels
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise DataError(f"max_pixels must be a positive number of pixels, got {max_pixels!r}")
    return max_pixels


def check_pixels(image: Image.Image, name: str, max_pixels: int | None = None) -> None:
    """Raise `DataError` when an opened (not yet decoded) image has more pixels than the budget; PIL reads
    the size from the header, so nothing large is decoded first."""
    limit = pixel_budget(max_pixels)
    width, height = image.size
    if width * height > limit:
        raise DataError(
            f"{name}: {width}x{height} px ({width * height / 1e6:.1f} megapixels) is over the budget of "
            f"{limit / 1e6:g} megapixels per image; downscale it, or raise the budget with {MAX_PIXELS_ENV}=<pixels>"
        )


def open_image(fp: str | os.PathLike | IO[bytes], name: str, max_pixels: int | None = None) -> Image.Image:
    """`PIL.Image.open` (lazy: the header only) with the pixel budget checked; a `DataError` names the file."""
    limit = pixel_budget(max_pixels)
    try:
        with warnings.catch_warnings():  # the budget below is stricter than PIL's decompression-bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
    except Image.DecompressionBombError as err:  # over twice PIL's own limit, refused by PIL from the header
        raise DataError(f"{name}: too many pixels ({err}); downscale it (lrkit's budget is {limit / 1e6:g} "
                        f"megapixels per image, {MAX_PIXELS_ENV})") from err
    except _IMAGE_READ_ERRORS as err:
        raise DataError(f"{name}: not a readable image ({err}); re-export it or remove it") from err
    try:
        check_pixels(image, name, limit)
    except DataError:
        image.close()
        raise
    return image


def read_image(fp: str | os.PathLike | IO[bytes], name: str, min_size: int,
               max_pixels: int | None = None) -> Image.Image:
    """Decode an image fully (truncated files fail), apply EXIF orientation, convert to RGB. The pixel budget
    (`max_pixels`, default `pixel_budget()`) is checked from the header before anything is decoded."""
    raw = open_image(fp, name, max_pixels)
    try:
        with raw:
            raw.load()  # decodes everything now; truncated data raises (LOAD_TRUNCATED_IMAGES is False)
            image = ImageOps.exif_transpose(raw)
            image = to_rgb(image)
    except _IMAGE_READ_ERRORS as err:
        raise DataError(f"{name}: not a readable image ({err}); re-export it or remove it") from err
    if min(image.size) < min_size:
        width, height = image.size
        raise DataError(
            f"{name}: {width}x{height} px is smaller than min_size={min_size} on its short side; "
            f"use a larger photo or lower min_size"
        )
    return image


def to_rgb(image: Image.Image) -> Image.Image:
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
    max_pixels: int,
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
            image = read_image(_image_source(row[image_column], name), name, min_size, max_pixels)
        except DataError as err:
            problems.append(str(err))
            continue
        caption = row[caption_column] if caption_column else None
        if caption is not None:
            caption = str(caption).strip() or None
        photos.append(Photo(name=name, image=image, caption=caption, path=None))
    raise_if_problems(problems, f"dataset {label}")
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
