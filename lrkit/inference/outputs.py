"""Writing generations: deterministic file names, one record per unit, the comparison grid, a contact sheet.

A *unit* is one prompt x seed in a folder: its image `p{prompt:03d}_s{seed}.png`, with intermediates its
`_layout`, `_mask`, `_style`, `_correspondence` and `_grid` PNGs, and its record `p{prompt:03d}_s{seed}.json`::

    {"format": "lrkit.unit/1", "prompt_index": 0, "seed": 1, "prompt": "a photo of <sks> vase",
     "job": "<sha256 of the job inputs that made it>",
     "files": {"p000_s1_layout.png": {"size": 1234, "sha256": "..."}, ..., "p000_s1.png": {...}}}

`save_generation` writes each PNG atomically, the image after its intermediates, and the record last. A unit
is complete only when its record is there and every file it lists has the recorded size and SHA-256
(`unit_problem`), so a kill at any point, or a file truncated later, leaves a unit that is seen as
incomplete and made again.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from PIL import Image, ImageDraw

from lrkit.inference.pipeline import Generation
from lrkit.io import atomic_write_bytes, atomic_write_json, file_sha256, png_bytes, read_json_record

UNIT_FORMAT = "lrkit.unit/1"
INTERMEDIATES = ("layout", "mask", "style", "correspondence", "grid")
NOT_WRITTEN = "not written"
"""`unit_problem`'s answer for a unit none of whose files exist."""
_UNIT_FILE = re.compile(r"p(\d{3,})_s(-?\d+)(?:_(?:" + "|".join(INTERMEDIATES) + r"))?\.(?:png|json)")


def image_path(out_dir: str | Path, prompt_index: int, seed: int, kind: str = "") -> Path:
    """`p{prompt:03d}_s{seed}.png`, or with a suffix: `_layout`, `_mask`, `_style`, `_correspondence`, `_grid`."""
    suffix = f"_{kind}" if kind else ""
    return Path(out_dir) / f"p{prompt_index:03d}_s{seed}{suffix}.png"


def record_path(out_dir: str | Path, prompt_index: int, seed: int) -> Path:
    """`p{prompt:03d}_s{seed}.json`: the unit's record, written after its images."""
    return Path(out_dir) / f"p{prompt_index:03d}_s{seed}.json"


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


def save_generation(gen: Generation, out_dir: str | Path, *, intermediates: bool = False, job: str = "") -> list[Path]:
    """Write one unit: with `intermediates` its layout, mask, style, correspondence and grid, then the image, then
    its record (`job`: the digest of the inputs that made it). Returns the PNG paths, the image first.

    The old record goes first and the unit's PNGs this call does not write are removed, so the folder never
    shows a complete unit that mixes two generations.
    """
    out = Path(out_dir)
    index, seed = gen.prompt_index, gen.seed
    record = record_path(out, index, seed)
    record.unlink(missing_ok=True)
    tiles = {}
    if intermediates:
        tiles = {"layout": gen.layout, "mask": gen.mask, "style": gen.style, "correspondence": gen.correspondence}
        tiles = {kind: tile for kind, tile in tiles.items() if tile is not None}
        tiles["grid"] = comparison_row(gen)
    files: dict[str, dict] = {}
    paths = [image_path(out, index, seed)]
    for kind in INTERMEDIATES:
        path = image_path(out, index, seed, kind)
        if kind in tiles:
            files[path.name] = _write_png(tiles[kind], path)
            paths.append(path)
        else:
            path.unlink(missing_ok=True)
    files[paths[0].name] = _write_png(gen.image, paths[0])
    atomic_write_json(record, {"format": UNIT_FORMAT, "prompt_index": index, "seed": seed, "prompt": gen.prompt,
                               "job": job, "files": files})
    return paths


def _write_png(image: Image.Image, path: Path) -> dict:
    data = png_bytes(image)
    atomic_write_bytes(path, data)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def unit_problem(out_dir: str | Path, prompt_index: int, seed: int, *, prompt: str, job: str,
                 intermediates: bool = False) -> str | None:
    """None when the unit is complete for `prompt` and `job` (its record there, every file it lists intact, the grid
    among them when `intermediates` are wanted); else why not, `NOT_WRITTEN` when none of its files exist."""
    out = Path(out_dir)
    record_file = record_path(out, prompt_index, seed)
    image = image_path(out, prompt_index, seed)
    record = read_json_record(record_file)
    if record is None:
        if record_file.exists():
            return f"its record {record_file.name} is unreadable"
        if any(image_path(out, prompt_index, seed, kind).exists() for kind in ("", *INTERMEDIATES)):
            return f"it has no record {record_file.name} (its writing was interrupted)"
        return NOT_WRITTEN
    if (record.get("format"), record.get("prompt_index"), record.get("seed")) != (UNIT_FORMAT, prompt_index, seed):
        return f"its record {record_file.name} is not a {UNIT_FORMAT} record of this unit"
    if record.get("prompt") != prompt or record.get("job") != job:
        return "it was made from other inputs"
    files = record.get("files")
    wanted = {image.name} | ({image_path(out, prompt_index, seed, "grid").name} if intermediates else set())
    if not isinstance(files, dict) or not wanted <= set(files):
        return f"its record {record_file.name} does not list {sorted(wanted)}"
    for name, meta in files.items():
        match = _UNIT_FILE.fullmatch(str(name))
        if (match is None or (int(match.group(1)), int(match.group(2))) != (prompt_index, seed)
                or not str(name).endswith(".png") or not isinstance(meta, dict)):
            return f"its record {record_file.name} lists {name!r}, which is not one of its files"
        path = out / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta.get("size") or file_sha256(path) != meta.get("sha256"):
            return f"{name} does not match its record (truncated or changed since it was written)"
    return None


def unit_records(out_dir: str | Path) -> dict[tuple[int, int], dict]:
    """Every readable unit record in `out_dir`, by (prompt index, seed)."""
    records = {}
    for key in sorted(unit_keys(out_dir)):
        record = read_json_record(record_path(out_dir, *key))
        if record is not None:
            records[key] = record
    return records


def unit_keys(out_dir: str | Path) -> set[tuple[int, int]]:
    """(prompt index, seed) of every unit that has a file (a PNG or its record) in `out_dir`."""
    folder = Path(out_dir)
    if not folder.is_dir():
        return set()
    return {(int(m.group(1)), int(m.group(2))) for p in folder.iterdir() if (m := _UNIT_FILE.fullmatch(p.name))}


def remove_unit(out_dir: str | Path, prompt_index: int, seed: int) -> None:
    """Delete a unit: its record first, then its PNGs."""
    record_path(out_dir, prompt_index, seed).unlink(missing_ok=True)
    for kind in ("", *INTERMEDIATES):
        image_path(out_dir, prompt_index, seed, kind).unlink(missing_ok=True)


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
