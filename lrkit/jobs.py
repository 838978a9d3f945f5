"""End-to-end jobs that use both sides: photos -> concept bundle -> personalized images.

`lrkit.training` and `lrkit.inference` never import each other; this module composes them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from lrkit.concept import MANIFEST, Concept

logger = logging.getLogger(__name__)

BUILTIN_RESOLUTION = 64


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt a line (blank lines and `#` comments skipped); `{}` marks the subject phrase."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file {str(file)!r} does not exist")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {str(file)!r} holds no prompts")
    return prompts


def fill_prompts(prompts: list[str], concept: Concept, *, require_token: bool = True) -> list[str]:
    """`{}` -> `<token> <class>`; unless `require_token` is off, a prompt must then mention the token."""
    filled = [p.replace("{}", concept.subject_phrase()) for p in prompts]
    missing = [p for p in filled if require_token and concept.token not in p]
    if missing:
        raise ValueError(
            f"prompt {missing[0]!r} mentions neither the concept token {concept.token!r} nor '{{}}' "
            f"(which becomes {concept.subject_phrase()!r})"
        )
    return filled


def generate_to_folder(pipeline, prompts: list[str], seeds: list[int], out_dir: str | os.PathLike, options, *,
                       intermediates: bool = False, skip_existing: bool = True,
                       layout_image=None, indices: list[int] | None = None) -> list[tuple[str, list[Path]]]:
    """Every prompt x seed into `out_dir` (skipping finished images), with a progress bar; returns paths per prompt.

    `indices` limits the work to those prompt indices (file names keep their index in `prompts`).
    """
    from lrkit.inference.outputs import image_path, save_generation
    from lrkit.models import builtin_kind, fingerprint
    from lrkit.runtime import cpu_threads_for

    out = Path(out_dir)
    base_id = fingerprint(pipeline.pipe).id
    if builtin_kind(base_id) == "toy":
        _check_toy_inputs(pipeline.concept, prompts)
    wanted = list(range(len(prompts))) if indices is None else sorted(set(indices))
    if any(not 0 <= i < len(prompts) for i in wanted):
        raise ValueError(f"indices {wanted} must lie in [0, {len(prompts)})")
    done: list[tuple[str, list[Path]]] = []
    todo = [(i, prompts[i], s) for i in wanted for s in seeds
            if not (skip_existing and image_path(out, i, s).is_file())]
    skipped = len(wanted) * len(seeds) - len(todo)
    if skipped:
        logger.info("%d of %d images already exist in %s; skipping them", skipped, len(wanted) * len(seeds), out)
    threads = cpu_threads_for(base_id, pipeline.pipe.device.type)
    with threads, tqdm(total=len(todo), desc="generating", unit="img", disable=not todo) as bar:
        for index in wanted:
            prompt = prompts[index]
            pending = [s for i, _, s in todo if i == index]
            if pending:
                for gen in pipeline.generate(prompt, pending, options, prompt_index=index, layout_image=layout_image):
                    save_generation(gen, out, intermediates=intermediates)
                    bar.update(1)
            done.append((prompt, [image_path(out, index, s) for s in seeds]))
    return done


def _check_toy_inputs(concept: Concept, prompts: list[str]) -> None:
    """On the toy base: warn (once) about prompt words and reference photos from outside the toy world."""
    from lrkit.toyworld.inputs import warn_outside_toy_world

    refs = [(str(path), path) for path in concept.ref_paths()[:8]] if concept.path is not None else []
    warn_outside_toy_world(photos=refs, prompts=prompts, known=[t.token for t in concept.tokens])


def default_resolution(base: str) -> int:
    """64 px for the built-in bases (tiny-random, toy), 512 for anything else (SD 1.5-sized)."""
    from lrkit.models import builtin_kind

    return BUILTIN_RESOLUTION if builtin_kind(base) else 512


def subject_name(photos: str | os.PathLike) -> str:
    """The name a job gives the concept of `photos`: the photo folder's name (`data/subjects/vase` -> `vase`)."""
    name = Path(photos).expanduser().resolve().name
    return name or "concept"


def train_or_reuse(photos: str | os.PathLike, class_word: str, train_dir: str | os.PathLike, *, base: str,
                   method: str = "lora", resolution: int | None = None, train_overrides: dict | None = None,
                   phase: str = "") -> Concept:
    """The concept bundle in TRAIN_DIR/concept, trained from `photos` unless it is already there.

    The training run (checkpoints, logs, validation images) lives in TRAIN_DIR, as `lrkit train
    --output_dir TRAIN_DIR` would write it, and the concept is named after TRAIN_DIR. `phase` prefixes
    the log line that says which of the two happens (e.g. `phase 1/2: `).
    """
    from lrkit.training import train_concept

    bundle = Path(train_dir) / "concept"
    if (bundle / MANIFEST).is_file():
        logger.info("%sreusing the concept bundle %s", phase, bundle)
    else:
        overrides = {"base": base, "method": method, "output_dir": str(train_dir),
                     "data": {"photos": str(photos), "class_word": class_word,
                              "resolution": resolution or default_resolution(base)}}
        logger.info("%straining a %s concept from %s on %s into %s", phase, method, photos, base, bundle)
        train_concept(overrides, **(train_overrides or {}))
    return Concept.load(bundle)


def photos_to_images(photos: str | os.PathLike, class_word: str, prompts: list[str], *, base: str | None = None,
                     out_dir: str | os.PathLike = "outputs/run", method: str = "lora", seeds: list[int] | None = None,
                     options=None, resolution: int | None = None, train_overrides: dict | None = None,
                     sam_checkpoint: str | None = None, intermediates: bool = True) -> Path:
    """Train (or reuse) a concept from `photos`, then Layout-and-Retouch every prompt x seed.

    The concept is named after the photo folder and its bundle is OUT_DIR/<name>/concept (`lrkit run
    --photos data/subjects/vase` -> OUT_DIR/vase/concept). Re-running reuses the bundle and skips
    finished images. `base` defaults to the reused bundle's recorded base, else `tiny-random`. Returns the
    contact sheet's path (OUT_DIR/contact_sheet.png).
    """
    from lrkit.concept import recorded_base, recorded_base_error
    from lrkit.inference import GenerationOptions, LayoutRetouchPipeline
    from lrkit.inference.outputs import contact_sheet
    from lrkit.io import atomic_save_png
    from lrkit.models import BaseModelError

    out = Path(out_dir)
    seeds = list(seeds if seeds is not None else [0, 1])
    train_dir = out / subject_name(photos)
    reused = train_dir / "concept" / MANIFEST
    given = base is not None
    if not given:
        base = recorded_base([Concept.load(reused.parent)]) if reused.is_file() else "tiny-random"
    resolution = resolution or default_resolution(base)
    concept = train_or_reuse(photos, class_word, train_dir, base=base, method=method, resolution=resolution,
                             train_overrides=train_overrides, phase="phase 1/2: ")
    filled = fill_prompts(prompts, concept)
    options = options or GenerationOptions()  # unset height/width: the concept's training resolution
    logger.info("phase 2/2: %s for %d prompts x %d seeds into %s", options.mode, len(filled), len(seeds),
                out / "images")
    try:
        pipeline = LayoutRetouchPipeline.from_concept(base, concept, sam_checkpoint=sam_checkpoint,
                                                      cache_dir=out / "cache")
    except BaseModelError as err:
        if given:
            raise
        raise recorded_base_error(err, base) from err
    done = generate_to_folder(pipeline, filled, seeds, out / "images", options, intermediates=intermediates)
    return atomic_save_png(contact_sheet(done), out / "contact_sheet.png")


__all__ = ["default_resolution", "fill_prompts", "generate_to_folder", "photos_to_images", "read_prompts", "subject_name",
           "train_or_reuse"]
