"""Benchmark outputs: the per-image CSV, the per-prompt CSV, a markdown table, and plots (PIL only).

Rows are plain dicts. The table averages per method (and per concept x method): per-image metrics
over images, per-prompt metrics (sigma^2 of the centres, DINO diversity) over prompts; missing
values (NaN, None) are left out of a mean, and a column with no value at all prints as `-`.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from lrkit.io import atomic_write_bytes, atomic_write_text

IMAGE_COLUMNS = ["concept", "method", "prompt_index", "seed", "prompt", "clip_i", "clip_t", "dino", "center_x",
                 "center_y", "scale", "scene", "scene_ok", "identity", "is_subject", "image"]
PROMPT_COLUMNS = ["concept", "method", "prompt_index", "prompt", "layout_var", "dino_diversity", "centers"]

# (column in the table, source, how it is averaged): "image" columns average image rows,
# "prompt" columns average per-prompt rows.
TABLE: list[tuple[str, str, str]] = [
    ("CLIP-I", "clip_i", "image"),
    ("CLIP-T", "clip_t", "image"),
    ("DINO", "dino", "image"),
    ("sigma2_avg", "layout_var", "prompt"),
    ("DINO-div", "dino_diversity", "prompt"),
    ("identity", "identity", "image"),
    ("subject rate", "is_subject", "image"),
    ("scene rate", "scene_ok", "image"),
]


def _number(value) -> float:
    if value is None or value == "":
        return math.nan
    if isinstance(value, bool):
        return float(value)
    return float(value)


def mean_of(rows: Sequence[dict], key: str) -> float:
    """Mean of `key` over rows, missing values left out; NaN when none has one."""
    values = [v for v in (_number(r.get(key)) for r in rows) if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def summarize(image_rows: list[dict], prompt_rows: list[dict], by: tuple[str, ...]) -> list[dict]:
    """One summary per distinct value of the `by` columns (in first-seen order), with the TABLE columns."""
    keys: list[tuple] = []
    for row in image_rows + prompt_rows:
        key = tuple(row[k] for k in by)
        if key not in keys:
            keys.append(key)
    out = []
    for key in keys:
        images = [r for r in image_rows if tuple(r[k] for k in by) == key]
        prompts = [r for r in prompt_rows if tuple(r[k] for k in by) == key]
        summary = dict(zip(by, key))
        summary["images"] = len(images)
        for column, source, level in TABLE:
            summary[column] = mean_of(images if level == "image" else prompts, source)
        out.append(summary)
    return out


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    return atomic_write_text(path, _csv_text(rows, columns))


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(summaries: list[dict], by: tuple[str, ...]) -> str:
    """A markdown table of `summarize` output; columns without any value are dropped."""
    columns = [c for c, _, _ in TABLE if any(not math.isnan(s[c]) for s in summaries)]
    header = [*by, "images", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for s in summaries:
        lines.append("| " + " | ".join(_cell(s[h]) for h in header) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ plots

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _png(image: Image.Image, path: Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def bar_chart(title: str, labels: list[str], values: list[float], path: Path, size: tuple[int, int] = (480, 320)) -> Path:
    """One bar per label (NaN: no bar, the label says n/a), value printed above each bar."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black")
    top, bottom, left = 44, height - 40, 40
    finite = [v for v in values if not math.isnan(v)]
    lo, hi = min([0.0, *finite]), max([0.0, *finite])
    span = (hi - lo) or 1.0
    zero = bottom - (0.0 - lo) / span * (bottom - top)
    draw.line([(left, zero), (width - 8, zero)], fill="gray")
    slot = (width - left - 8) / max(len(labels), 1)
    for i, (label, value) in enumerate(zip(labels, values)):
        x0 = left + i * slot + slot * 0.15
        x1 = left + (i + 1) * slot - slot * 0.15
        if not math.isnan(value):
            y = bottom - (value - lo) / span * (bottom - top)
            draw.rectangle([x0, min(y, zero), x1, max(y, zero)], fill=_PALETTE[i % len(_PALETTE)])
            draw.text((x0, min(y, zero) - 12), f"{value:.3f}", fill="black")
        draw.text((x0, bottom + 6), label[:16] if not math.isnan(value) else f"{label[:12]} n/a", fill="black")
    return _png(image, path)


def center_heatmap(title: str, centers: list[tuple[float, float]], path: Path, bins: int = 16,
                   cell: int = 16) -> Path:
    """A bins x bins histogram of normalised centre points (darker = more), the image frame as the axes."""
    counts = np.zeros((bins, bins), dtype=np.int64)  # (rows = y, cols = x)
    for cx, cy in centers:
        counts[min(int(cy * bins), bins - 1), min(int(cx * bins), bins - 1)] += 1
    scale = counts.max() or 1
    label = 16
    image = Image.new("RGB", (bins * cell, bins * cell + label), "white")
    draw = ImageDraw.Draw(image)
    draw.text((2, 2), f"{title} (n={len(centers)})", fill="black")
    for r in range(bins):
        for c in range(bins):
            level = int(255 - 255 * counts[r, c] / scale)
            draw.rectangle([c * cell, label + r * cell, (c + 1) * cell - 1, label + (r + 1) * cell - 1],
                           fill=(level, level, 255) if counts[r, c] else (250, 250, 250))
    draw.rectangle([0, label, bins * cell - 1, label + bins * cell - 1], outline="gray")
    return _png(image, path)


__all__ = ["IMAGE_COLUMNS", "PROMPT_COLUMNS", "TABLE", "bar_chart", "center_heatmap", "markdown_table", "mean_of",
           "summarize", "write_csv"]
