"""Does an input belong to the toy world? The toy base only knows it; real photos and words get a warning.

The embedded `toy` base model is a tiny Stable Diffusion trained on the procedural toy world: it can learn
and draw toy subjects in toy scenes, nothing else. A real photo or a prompt outside the world's vocabulary
trains and generates without error, but the pictures mean nothing; `warn_outside_toy_world` says so, once
per process.

A photo is read as the toy world draws it: flat colours, one scene background and up to two object colours.
`toy_world_reading` reports the share of its pixels that the detected scene's background model and the two
best-fitting object colours explain, and how many colours (16 levels a channel) cover 90 % of it. The
thresholds separate every rendered toy picture (studio photos, scenes, two-object pictures, the demo's
backdrops) from every shipped real photo in data/subjects; tests/test_toy_inputs.py holds both sets.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import PIL.Image

logger = logging.getLogger(__name__)

READ_SIZE = 64
"""Photos are read at the toy world's own size."""
COLOR_TOLERANCE = 25.0
"""RGB distance within which a pixel counts as explained by a background or object colour model."""
MIN_EXPLAINED = 0.95
"""A toy picture's pixels explained by its scene and two object colours, at least."""
MAX_COLORS = 24
"""A toy picture's colours (16 levels a channel) covering 90 % of it, at most."""

_warned = False
_read: set[str] = set()  # photos already read in this process (a job checks the same references again)


def toy_world_reading(image: PIL.Image.Image) -> tuple[float, int]:
    """(share of pixels explained by the detected scene and two object colours, colours covering 90 %)."""
    from lrkit.toyworld.scorers import explained_share

    small = image.convert("RGB").resize((READ_SIZE, READ_SIZE), PIL.Image.BILINEAR)
    explained = explained_share(small, num_colors=2, tolerance=COLOR_TOLERANCE)
    levels = np.asarray(small).astype(np.int64) // 16
    keys = (levels[..., 0] * 256 + levels[..., 1] * 16 + levels[..., 2]).ravel()
    counts = np.sort(np.unique(keys, return_counts=True)[1])[::-1]
    colors = int(np.searchsorted(counts.cumsum() / keys.size, 0.9) + 1)
    return explained, colors


def is_toy_picture(image: PIL.Image.Image) -> bool:
    """Whether the toy world's scorers can read `image` as one of its pictures (see the module docstring)."""
    explained, colors = toy_world_reading(image)
    return explained >= MIN_EXPLAINED and colors <= MAX_COLORS


def words_outside_toy_world(prompts: Iterable[str], known: Iterable[str] = ()) -> list[str]:
    """The words of `prompts` the toy world's captions never use (`known`: tokens and phrases to skip)."""
    from lrkit.toyworld.world import caption_words

    vocabulary = set(caption_words())
    for phrase in known:
        vocabulary |= set(str(phrase).lower().split())
    unknown = []
    for prompt in prompts:
        for word in re.findall(r"<[^>]*>|[\w'-]+", prompt.lower()):
            if word not in vocabulary and word not in unknown:
                unknown.append(word)
    return unknown


def warn_outside_toy_world(*, photos: Iterable[tuple[str, "PIL.Image.Image | Path"]] = (),
                           prompts: Iterable[str] = (), known: Iterable[str] = ()) -> bool:
    """Warn once per process when the toy base gets photos or prompt words from outside the toy world.

    `photos`: (name, image or image file) pairs, each read once per process (by name); `known`: concept
    tokens and phrases that are not toy words but belong (e.g. `sks`). Returns whether it warned now.
    """
    global _warned
    if _warned:
        return False
    unread = [(name, image) for name, image in photos if name not in _read]
    strange_photos = [name for name, image in unread
                      if not is_toy_picture(image if isinstance(image, PIL.Image.Image) else PIL.Image.open(image))]
    _read.update(name for name, _ in unread)
    strange_words = words_outside_toy_world(prompts, known)
    if not strange_photos and not strange_words:
        return False
    found = []
    if strange_photos:
        shown = ", ".join(Path(str(n)).name for n in strange_photos[:3])
        found.append(f"{len(strange_photos)} photo(s) that are not toy-world pictures ({shown}"
                     f"{', ...' if len(strange_photos) > 3 else ''})")
    if strange_words:
        found.append(f"words outside its vocabulary ({', '.join(strange_words[:6])}"
                     f"{', ...' if len(strange_words) > 6 else ''})")
    logger.warning(
        "the toy base only knows lrkit's procedural toy world (toy subjects and scenes, for the demo, tests and "
        "benchmarks), and this run gives it %s: it trains and draws, but the pictures will mean nothing. For real "
        "photos use a real base model: --base stable-diffusion-v1-5/stable-diffusion-v1-5, a local diffusers "
        "folder or a .safetensors file", " and ".join(found))
    _warned = True
    return True


__all__ = ["is_toy_picture", "toy_world_reading", "warn_outside_toy_world", "words_outside_toy_world"]
