"""Benchmark prompt sets: DreamBench, ViCo, DreamMatcher-challenging (in `data/prompts/`), and the toy world's.

A set is named by its file stem (`dreambench_objects`, `vico_live`, ...), by a family name that
picks the live or non-live list from the concept's class word (`dreambench`, `vico`,
`dreammatcher`), by `toy` (one prompt per toy-world scene), or by a path to a prompt file. `{}` in
a prompt is the subject phrase; `lrkit.jobs.fill_prompts` fills it.
"""

from __future__ import annotations

import os
from pathlib import Path

from lrkit.jobs import read_prompts

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "data" / "prompts"
FAMILIES: dict[str, tuple[str, str]] = {  # family -> (live set, non-live set)
    "dreambench": ("dreambench_live", "dreambench_objects"),
    "vico": ("vico_live", "vico_nonlive"),
    "dreammatcher": ("dreammatcher_challenging_live", "dreammatcher_challenging_nonlive"),
}
LIVE_CLASSES = frozenset({"cat", "dog", "puppy", "kitten", "pet", "animal", "bird", "horse", "person", "man", "woman",
                          "boy", "girl", "baby", "monkey", "rabbit", "bear"})
"""Class words whose family set is the live-subject list (DreamBench's live subjects are cats and dogs)."""
TOY_SET = "toy"


def toy_prompts() -> list[str]:
    """One prompt per toy-world scene with a caption phrase: `a photo of {} on the beach`, ..."""
    from lrkit.toyworld.world import SCENES

    return [f"a photo of {{}} {style.phrase}" for style in SCENES.values() if style.phrase]


def set_names() -> list[str]:
    """Every name `load_prompt_set` accepts besides a file path."""
    stems = sorted(p.stem for p in PROMPTS_DIR.glob("*.txt")) if PROMPTS_DIR.is_dir() else []
    return sorted(FAMILIES) + stems + [TOY_SET]


def resolve_set(name: str, class_word: str) -> str:
    """The concrete set a name stands for: a family becomes its live or non-live list."""
    if name in FAMILIES:
        live, nonlive = FAMILIES[name]
        return live if class_word.strip().lower() in LIVE_CLASSES else nonlive
    return name


def load_prompt_set(name: str | os.PathLike, class_word: str = "") -> tuple[str, list[str]]:
    """(set name, prompts with `{}`) for a set name or a prompt file."""
    text = str(name)
    if text == TOY_SET:
        return TOY_SET, toy_prompts()
    path = Path(text).expanduser()
    if path.suffix == ".txt" or path.is_file():
        return path.stem, read_prompts(path)
    concrete = resolve_set(text, class_word)
    file = PROMPTS_DIR / f"{concrete}.txt"
    if not file.is_file():
        if not PROMPTS_DIR.is_dir():
            raise FileNotFoundError(
                f"prompt set {text!r}: the bundled sets live in data/prompts/ of the lrkit source tree, which is not "
                f"at {PROMPTS_DIR}; pass a prompt file (one prompt a line, '{{}}' for the subject) instead"
            )
        raise ValueError(f"--prompts {text!r} is neither a prompt file nor one of {set_names()}")
    return concrete, read_prompts(file)


__all__ = ["FAMILIES", "LIVE_CLASSES", "PROMPTS_DIR", "load_prompt_set", "resolve_set", "set_names", "toy_prompts"]
