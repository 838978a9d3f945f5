"""Writing generations: deterministic file names, the comparison grid, a contact sheet."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from lrkit.inference.pipeline import Generation
from lrkit.io import atomic_save_png


def image_path(out_dir: str | Path, prompt_index: int, seed: int, kind: str = "") -> Path:
    """`p{prompt:03d}_s{seed}.png`, or with a suffix: `_layout`, `_mask`, `_style`, `_correspondence`, `_grid`."""
    suffix = f"_{kind}" if kind else ""
    return Path(out_dir) / f"p{prompt_index:03d}_s{seed}{suffix}.png"


def comparison_row(gen: Generation) -> Image.Image:
    """reference | layout (dual-reference: the style image) | mask | result, each at the result's size."""
    size = gen.image.size
    middle = gen.style if gen.style is not None else gen.layout
    tiles = [gen.reference, middle, gen.mask.convert("RGB") if gen.mask is not None else None, gen.image]
    row = Image.new("RGB", (size[0] * len(tiles), size[1]), "white")
    for i, tile in enumerate(tiles):
        if tile is not None:
            row.paste(tile.convert("RGB").resize(size), (i * size[0], 0))
    return row


def save_generation(gen: Generation, out_dir: str | Path, *, intermediates: bool = False) -> list[Path]:
    """Write the image, and with `intermediates` its layout, mask and comparison grid."""
    paths = [atomic_save_png(gen.image, image_path(out_dir, gen.prompt_index, gen.seed))]
    if intermediates:
        if gen.layout is not None:
            paths.append(atomic_save_png(gen.layout, image_path(out_dir, gen.prompt_index, gen.seed, "layout")))
        if gen.mask is not None:
            paths.append(atomic_save_png(gen.mask, image_path(out_dir, gen.prompt_index, gen.seed, "mask")))
        if gen.style is not None:
            paths.append(atomic_save_png(gen.style, image_path(out_dir, gen.prompt_index, gen.seed, "style")))
        if gen.correspondence is not None:
            paths.append(atomic_save_png(gen.correspondence,
                                         image_path(out_dir, gen.prompt_index, gen.seed, "correspondence")))
        paths.append(atomic_save_png(comparison_row(gen), image_path(out_dir, gen.prompt_index, gen.seed, "grid")))
    return paths


def contact_sheet(paths_by_prompt: list[tuple[str, list[Path]]], tile: int = 128) -> Image.Image:
    """One row per prompt (its text above), one column per seed."""
    columns = max((len(paths) for _, paths in paths_by_prompt), default=1)
    label = 14
    sheet = Image.new("RGB", (columns * tile, len(paths_by_prompt) * (tile + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (prompt, paths) in enumerate(paths_by_prompt):
        y = r * (tile + label)
        draw.text((2, y), prompt[: tile * columns // 6], fill="black")
        for c, path in enumerate(paths):
            with Image.open(path) as image:
                sheet.paste(image.convert("RGB").resize((tile, tile)), (c * tile, y + label))
    return sheet
