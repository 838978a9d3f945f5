"""What a user's checkout holds, shrunk to CPU-test size: the one place that decides how configs shrink.

Tests that run lrkit the way a user does (`tests/test_docs_examples.py`, `tests/test_user_paths.py`) give
it a working directory like the user's checkout, with the shipped configs and prompt files made small.
Shrinking changes only how much work a run does, never what it does: the base model becomes the built-in
`tiny-random` (`tiny-random-xl` for a config of `family: sdxl`), and the size fields in `SIZE_KEYS` get small values; precision, optimizer, caches,
schedules, methods and every other option stay as shipped.

API (kept small on purpose):

- `SIZE_KEYS`: dotted option -> the small value it gets.
- `shrunk_config(path) -> dict`: a YAML config with `SIZE_KEYS` applied (the file itself is not changed).
- `PROMPTS_PER_FILE`: how many prompts a shrunk prompt file keeps.
- `make_checkout(dest) -> Path`: DEST filled like a checkout (`CHECKOUT`), with shrunk configs and prompt files.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

SIZE_KEYS: dict[str, object] = {
    "base": "tiny-random",                      # every shipped base -> the built-in random model of its family
    "data.resolution": 64,
    "data.repeats": 1,
    "max_steps": 4,                             # 4, not 2: pivotal's first 30 % (token only) is then one step
    "validation.every_n_steps": 2,              # validation images still run, once mid-run
    "validation.num_inference_steps": 2,
    "dreambooth.num_class_images": 2,
    "dreambooth.class_inference_steps": 2,
    "concept_em.steps_per_round": 2,            # two EM rounds in max_steps
    "concept_em.attention_timesteps": 2,
    "concept_em.crf_resolution": 8,             # the latent grid, as 64 is at 512 px (the CRF cost grows as side^4)
    "options.num_inference_steps": 4,
    "options.height": 64,                       # an SDXL config's 1024 px (SD configs take the concept's size)
    "options.width": 64,
    "seeds": [0, 1],
}
"""Dotted option -> small value. A key is set where the file sets it or, for a nested key, where the file
has its section (`validation:` without `num_inference_steps` gets it too: the default is sized for SD 1.5).
A top-level key the file does not set stays unset."""

TINY_BASE = {"sdxl": "tiny-random-xl"}
"""A config's `family` -> the built-in random model `base` shrinks to (others: SIZE_KEYS' `tiny-random`)."""

PROMPTS_PER_FILE = 1
"""A shrunk prompt file (data/prompts/*.txt) keeps its first prompts, this many."""

CHECKOUT = ("configs", "data", "train", "infer")
"""What a checkout holds that commands read: configs and prompt files are shrunk copies, the rest links."""


def _set(config: dict, dotted: str, value) -> None:
    *sections, key = dotted.split(".")
    node = config
    for section in sections:
        node = node.get(section)
        if not isinstance(node, dict):
            return
    if sections or key in node:
        node[key] = value


def shrunk_config(path: str | os.PathLike) -> dict:
    """The YAML config at `path` with every `SIZE_KEYS` entry applied (same keys, small sizes)."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    for dotted, value in SIZE_KEYS.items():
        _set(config, dotted, value)
    if "base" in config and config.get("family") in TINY_BASE:
        config["base"] = TINY_BASE[config["family"]]
    return config


def make_checkout(dest: str | os.PathLike) -> Path:
    """DEST holding `CHECKOUT` like the repository: configs/**.yaml shrunk, data/prompts/*.txt cut to
    `PROMPTS_PER_FILE` prompts, everything else a symlink into the repository."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("train", "infer"):
        (dest / name).symlink_to(ROOT / name)
    for source in sorted((ROOT / "configs").rglob("*.yaml")):
        target = dest / source.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(shrunk_config(source), sort_keys=False))
    for source in sorted((ROOT / "data").iterdir()):
        target = dest / "data" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.name != "prompts":
            target.symlink_to(source)
            continue
        target.mkdir()
        for prompts in sorted(source.iterdir()):
            lines = [line for line in prompts.read_text().splitlines() if line.strip() and not line.startswith("#")]
            (target / prompts.name).write_text("\n".join(lines[:PROMPTS_PER_FILE]) + "\n")
    return dest


__all__ = ["CHECKOUT", "PROMPTS_PER_FILE", "SIZE_KEYS", "TINY_BASE", "make_checkout", "shrunk_config"]
