"""End-to-end jobs that use both sides: photos -> concept bundle -> personalized images.

`lrkit.training` and `lrkit.inference` never import each other; this module composes them.

Jobs know their inputs. Each job records what decides its outputs in a `job.json` in its output folder,
as readable JSON plus its SHA-256 (`inputs_digest`):

- a training folder (TRAIN_DIR/job.json, `train_or_reuse`): the photos' bytes, class word, method,
  training overrides, base and resolution, and once trained the bundle's digest;
- a generation folder (`generate_to_folder`): the generation options, base, dtype, the concept (its
  files' digest), and what else the caller names (the SAM checkpoint), plus, readable only, the prompts by
  index and the seeds generated so far.

Prompts and seeds are not part of the digest, so more prompts or seeds can be added into a folder; each
unit's own record (`lrkit.inference.outputs`) holds its prompt text and the digest. Re-running with the same
inputs resumes: finished units are kept, partial or corrupted ones made again. Different inputs (or another
prompt at an index already used) are refused with a `JobInputsError` that names what changed, before
anything in the folder is touched; `overwrite` replaces that work instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from lrkit.concept import MANIFEST, Concept
from lrkit.io import atomic_write_json, file_sha256, read_json_record
from lrkit.records import differences, inputs_digest, plain, short_value

logger = logging.getLogger(__name__)

BUILTIN_RESOLUTION = 64
JOB_FILE = "job.json"
TRAINING_FORMAT = "lrkit.training-job/1"
GENERATION_FORMAT = "lrkit.generation-job/1"
OVERWRITE_HINT = "use a new output folder (--out), or --overwrite to replace that work"


class JobInputsError(ValueError):
    """An output folder holds work made from other inputs; the message names them and how to proceed."""


# ------------------------------------------------------------------------------------ inputs and digests


def files_digest(root: Path, files: list[Path]) -> str:
    """SHA-256 over each file's path relative to `root` and its bytes, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        h.update(f"{path.relative_to(root).as_posix()}\0{file_sha256(path)}\n".encode())
    return h.hexdigest()


def photos_identity(photos: str | os.PathLike) -> dict:
    """What training reads from `photos`: a folder's photos and caption files (or, for a `datasets` folder, all
    its files) as a count and a digest of their names and bytes; a hub dataset id as itself."""
    from lrkit.photos import CAPTION_SUFFIX, image_files

    folder = Path(photos).expanduser()
    if not folder.is_dir():
        return {"source": str(photos)}
    files = image_files(folder)
    if files:
        files += [c for f in files if (c := f.with_suffix(CAPTION_SUFFIX)).is_file()]
    else:
        files = [f for f in folder.rglob("*")
                 if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts)]
    return {"files": len(files), "sha256": files_digest(folder, files)}


_BUNDLE_DIGESTS: dict[tuple, str] = {}  # (folder, (file, size, mtime) ...) -> digest: each bundle hashed once


def bundle_digest(folder: str | os.PathLike) -> str:
    """SHA-256 over every file of a concept bundle (manifest, weights, refs, masks, model card)."""
    root = Path(folder).resolve()
    files = sorted(f for f in root.rglob("*") if f.is_file() and not f.name.startswith("."))
    key = (str(root), *((f.relative_to(root).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _BUNDLE_DIGESTS:
        _BUNDLE_DIGESTS[key] = files_digest(root, files)
    return _BUNDLE_DIGESTS[key]


def concept_identity(concept: Concept) -> dict:
    """A concept as a job input: its name, method, token, class word and the digest of its bundle's files."""
    identity = {"name": concept.name, "method": concept.method, "token": concept.token, "class_word": concept.class_word}
    if concept.path is not None:
        identity["sha256"] = bundle_digest(concept.path)
    else:
        identity["manifest_sha256"] = inputs_digest(concept.to_manifest())
    return identity


def generation_inputs(concept: Concept, base: str, *, dtype=None, **extra) -> dict:
    """What decides a generated image besides the options, its prompt and its seed: the base model (as named),
    the dtype, the concept (`concept_identity`), and `extra` (e.g. `sam_checkpoint`)."""
    return plain({"base": str(base), "dtype": None if dtype is None else str(dtype),
                  "concept": concept_identity(concept), **extra})


def _refusal(what: str, changes: list[str], fix: str) -> JobInputsError:
    shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
    return JobInputsError(f"{what} ({shown}); {fix}")


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
                       intermediates: bool = False, skip_existing: bool = True, layout_image=None,
                       indices: list[int] | None = None, inputs: dict | None = None,
                       overwrite: bool = False) -> list[tuple[str, list[Path]]]:
    """Every prompt x seed into `out_dir` (resuming: complete units are kept), with a progress bar; returns paths per
    prompt.

    `indices` limits the work to those prompt indices (file names keep their index in `prompts`). `inputs` is
    what besides `options`, a unit's prompt and its seed decides the images (`generation_inputs`; default: the
    pipeline's base, dtype, concept and segmenter). With `skip_existing`, a folder made from other inputs is
    refused (`check_generation_folder`) unless `overwrite`; without it, every unit is made again and written over.
    A prompt's seeds are always generated as one batch, as in an uninterrupted run, so a resumed prompt gives
    the same bytes (only its missing units are written).
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
    if inputs is None:
        inputs = _pipeline_inputs(pipeline, base_id)
    current = _folder_inputs(options, inputs, layout_image)
    job = _check_folder(out, prompts, current, overwrite=overwrite) if skip_existing else inputs_digest(current)
    _record_generation(out, prompts, seeds, current, job)
    todo = _incomplete(out, prompts, seeds, wanted, job, intermediates) if skip_existing else \
        {index: list(seeds) for index in wanted}
    total = len(wanted) * len(seeds)
    pending = sum(len(s) for s in todo.values())
    if skip_existing and pending < total:
        logger.info("%d of %d images already exist in %s; skipping them", total - pending, total, out)
    threads = cpu_threads_for(base_id, pipeline.pipe.device.type)
    done: list[tuple[str, list[Path]]] = []
    with threads, tqdm(total=pending, desc="generating", unit="img", disable=not pending) as bar:
        for index in wanted:
            prompt = prompts[index]
            if index in todo:
                for gen in pipeline.generate(prompt, list(seeds), options, prompt_index=index, layout_image=layout_image):
                    if gen.seed in todo[index]:
                        save_generation(gen, out, intermediates=intermediates, job=job)
                        bar.update(1)
            done.append((prompt, [image_path(out, index, s) for s in seeds]))
    return done


def incomplete_units(out_dir: str | os.PathLike, prompts: list[str], seeds: list[int], options, inputs: dict, *,
                     indices: list[int] | None = None, intermediates: bool = False,
                     layout_image=None) -> list[tuple[int, int]]:
    """(prompt index, seed) of every unit `generate_to_folder` would make in `out_dir`: those not complete there for
    these inputs (`lrkit.inference.outputs.unit_problem`)."""
    wanted = list(range(len(prompts))) if indices is None else sorted(set(indices))
    job = inputs_digest(_folder_inputs(options, inputs, layout_image))
    todo = _incomplete(Path(out_dir), prompts, seeds, wanted, job, intermediates, warn=False)
    return [(index, seed) for index, pending in todo.items() for seed in pending]


def _incomplete(out: Path, prompts: list[str], seeds: list[int], wanted: list[int], job: str, intermediates: bool,
                warn: bool = True) -> dict[int, list[int]]:
    """The seeds of each prompt index whose unit is not complete; a partial or corrupted one is logged (`warn`)."""
    from lrkit.inference.outputs import NOT_WRITTEN, record_path, unit_problem

    todo: dict[int, list[int]] = {}
    for index in wanted:
        for seed in seeds:
            problem = unit_problem(out, index, seed, prompt=prompts[index], job=job, intermediates=intermediates)
            if problem is None:
                continue
            if warn and problem != NOT_WRITTEN:
                logger.warning("%s: %s; generating it again", record_path(out, index, seed).with_suffix(""), problem)
            todo.setdefault(index, []).append(seed)
    return todo


def _pipeline_inputs(pipeline, base_id: str) -> dict:
    segmenter = pipeline.segmenter
    return generation_inputs(pipeline.concept, base_id, dtype=pipeline.pipe.dtype, segmenter=None if segmenter is None
                             else {"kind": type(segmenter).__name__, "source": getattr(segmenter, "source", None)})


def _folder_inputs(options, inputs: dict, layout_image) -> dict:
    """The inputs a generation folder records: `inputs`, the options, and the layout image's digest if any."""
    folder = plain({"options": options, **inputs})
    if layout_image is not None:
        if isinstance(layout_image, (str, os.PathLike)):
            folder["layout_image"] = file_sha256(layout_image)
        else:
            folder["layout_image"] = hashlib.sha256(layout_image.tobytes()).hexdigest()
    return folder


def check_generation_folder(out_dir: str | os.PathLike, prompts: list[str], options, inputs: dict, *,
                            layout_image=None, overwrite: bool = False, fix: str = OVERWRITE_HINT) -> str:
    """The digest of this generation's inputs, after checking that `out_dir` holds nothing made from others.

    Compared: the folder's job.json (its inputs and the prompt text at each index) and every unit record (its
    prompt and digest). A difference raises `JobInputsError` naming it, with `fix` as the way out, before
    anything is written; with `overwrite` the units made from other inputs are deleted instead.
    """
    return _check_folder(Path(out_dir), prompts, _folder_inputs(options, inputs, layout_image), overwrite=overwrite,
                         fix=fix)


def _check_folder(out: Path, prompts: list[str], current: dict, *, overwrite: bool, fix: str = OVERWRITE_HINT) -> str:
    from lrkit.inference.outputs import remove_unit, unit_keys, unit_records

    digest = inputs_digest(current)
    changes = []
    record = read_json_record(out / JOB_FILE)
    if record is not None and record.get("digest") != digest:
        recorded = record.get("inputs")
        changes += differences(recorded if isinstance(recorded, dict) else {}, current)
    units = unit_records(out)
    known = [(int(i), text) for i, text in _recorded_prompts(record).items() if i.isdigit()]
    known += [(index, unit.get("prompt")) for (index, _), unit in units.items()]
    moved = {}
    for index, text in known:
        if index < len(prompts) and text != prompts[index]:
            moved.setdefault(index, text)
    changes += [f"prompt {i}: {short_value(text)} -> {short_value(prompts[i])}" for i, text in sorted(moved.items())]
    others = sorted(key for key, unit in units.items() if unit.get("job") != digest)
    if others and not changes:
        names = ", ".join(f"p{i:03d}_s{s}" for i, s in others[:4]) + (" …" if len(others) > 4 else "")
        changes.append(f"{len(others)} unit(s) made from other inputs: {names}")
    if not changes:
        return digest
    if not overwrite:
        raise _refusal(f"{out} holds images made from other inputs", changes, fix)
    kept = {key for key, unit in units.items()
            if unit.get("job") == digest and key[0] < len(prompts) and unit.get("prompt") == prompts[key[0]]}
    stale = sorted(unit_keys(out) - kept)
    for key in stale:
        remove_unit(out, *key)
    (out / JOB_FILE).unlink(missing_ok=True)
    logger.info("overwrite: removed %d unit(s) of other inputs from %s (%s)", len(stale), out, "; ".join(changes[:3]))
    return digest


def _recorded_prompts(record: dict | None) -> dict[str, str]:
    prompts = record.get("prompts") if record is not None else None
    return {str(i): text for i, text in prompts.items()} if isinstance(prompts, dict) else {}


def _record_generation(out: Path, prompts: list[str], seeds: list[int], current: dict, digest: str) -> None:
    """Write the folder's job.json before generating (unless it already says this): the inputs, the prompts by
    index and the seeds (merged with the record's prompts and seeds when it names the same inputs)."""
    record = read_json_record(out / JOB_FILE)
    same = record is not None and record.get("digest") == digest
    known = _recorded_prompts(record) if same else {}
    seeds_before = record.get("seeds") if same else None
    seen = [s for s in seeds_before if isinstance(s, int)] if isinstance(seeds_before, list) else []
    new = {"format": GENERATION_FORMAT, "inputs": current, "digest": digest,
           "prompts": {**known, **{str(i): p for i, p in enumerate(prompts)}}, "seeds": sorted(set(seen) | set(seeds))}
    if new != record:
        atomic_write_json(out / JOB_FILE, new)


def _check_toy_inputs(concept: Concept, prompts: list[str]) -> None:
    """On the toy base: warn (once) about prompt words and reference photos from outside the toy world."""
    from lrkit.toyworld.inputs import warn_outside_toy_world

    refs = [(str(path), path) for path in concept.ref_paths()[:8]] if concept.path is not None else []
    warn_outside_toy_world(photos=refs, prompts=prompts, known=[t.token for t in concept.tokens])


def default_resolution(base: str, family: str | None = None) -> int:
    """64 px for the built-in bases (tiny-random, tiny-random-xl, toy); else the family's (SD: 512, SDXL: 1024):
    `family` or the one the base is (`family_of_base`: a folder's or hub repository's model_index.json, a
    checkpoint's tensor names). 512 where that cannot be told: loading the base then says why."""
    from lrkit.models import builtin_kind

    if builtin_kind(base):
        return BUILTIN_RESOLUTION
    known = _known_family(base, family)
    return known.default_resolution if known is not None else 512


def _known_family(base: str, family: str | None):
    """`family` or the model family `base` is (`family_of_base`); None where that cannot be told."""
    from lrkit.models import BaseModelError, family_of_base

    try:
        return family_of_base(base, family)
    except BaseModelError:
        return None


def subject_name(photos: str | os.PathLike) -> str:
    """The name a job gives the concept of `photos`: the photo folder's name (`data/subjects/vase` -> `vase`)."""
    name = Path(photos).expanduser().resolve().name
    return name or "concept"


def training_inputs(photos: str | os.PathLike, class_word: str, *, base: str, method: str, resolution: int,
                    train_overrides: dict | None = None) -> dict:
    """What decides a concept trained by `train_or_reuse`: the photos' bytes (`photos_identity`), class word, method,
    training overrides, base and resolution (not the photo folder's path: a moved folder is the same input)."""
    return plain({"photos": photos_identity(photos), "class_word": class_word, "method": method,
                  "overrides": train_overrides or {}, "base": base, "resolution": resolution})


def run_training_options(base: str, family: str | None = None) -> dict:
    """The training options `lrkit run` sets for `base`'s model family (`ModelFamily.run_training_options`: on SDXL
    gradient checkpointing, cached latents, bf16-mixed on a GPU); none on SD, or where the family cannot be told
    (loading the base then says why)."""
    import torch

    known = _known_family(base, family)
    return known.run_training_options(cuda=torch.cuda.is_available()) if known is not None else {}


def train_or_reuse(photos: str | os.PathLike, class_word: str, train_dir: str | os.PathLike, *, base: str,
                   method: str = "lora", resolution: int | None = None, train_overrides: dict | None = None,
                   phase: str = "", overwrite: bool = False, family: str | None = None) -> Concept:
    """The concept bundle in TRAIN_DIR/concept, trained from `photos` unless this job already trained it.

    The training run (checkpoints, logs, validation images) lives in TRAIN_DIR, as `lrkit train
    --output_dir TRAIN_DIR` would write it, and the concept is named after TRAIN_DIR. TRAIN_DIR/job.json
    records the training inputs (`training_inputs`) before training and the bundle's digest after. The bundle
    is reused, and a checkpoint resumed, only when the recorded inputs (and bundle digest) match; otherwise
    `JobInputsError` names what changed, before anything is written. With `overwrite`, training starts afresh
    and replaces the bundle instead. `phase` prefixes the log line that says which of the two happens
    (e.g. `phase 1/2: `). `family` ("sd" or "sdxl") overrides the base's detected model family.
    """
    from lrkit.training import train_concept

    train_dir = Path(train_dir)
    bundle = train_dir / "concept"
    resolution = resolution or default_resolution(base, family)
    inputs = training_inputs(photos, class_word, base=base, method=method, resolution=resolution,
                             train_overrides=train_overrides)
    digest = inputs_digest(inputs)
    record_file = train_dir / JOB_FILE
    record = read_json_record(record_file)
    trained = (bundle / MANIFEST).is_file()
    started = trained or any((train_dir / "checkpoints").glob("*.ckpt"))
    changes = _training_changes(record, inputs, digest, bundle if trained else None) if started else []
    if changes and not overwrite:
        fix = "use a new output folder (--out), or --overwrite to train it again"
        work = f"{bundle} was trained" if trained else f"the training in {train_dir} was started"
        if record is None:
            raise JobInputsError(f"{work} without a record of its inputs ({record_file} is missing or unreadable); {fix}")
        raise _refusal(f"{work} from other inputs", changes, fix)
    if trained and not changes:
        if record.get("concept_sha256") is None:  # killed between the export and this record
            atomic_write_json(record_file, {**record, "concept_sha256": bundle_digest(bundle)})
        logger.info("%sreusing the concept bundle %s", phase, bundle)
        return Concept.load(bundle)
    atomic_write_json(record_file, {"format": TRAINING_FORMAT, "inputs": inputs, "digest": digest})
    overrides = {"base": base, "family": family, "method": method, "output_dir": str(train_dir),
                 "data": {"photos": str(photos), "class_word": class_word, "resolution": resolution}}
    if changes:
        overrides.update(overwrite=True, resume=None)
        logger.info("%soverwrite: training again (%s)", phase, "; ".join(changes[:3]))
    logger.info("%straining a %s concept from %s on %s into %s", phase, method, photos, base, bundle)
    train_concept(overrides, **(train_overrides or {}))
    atomic_write_json(record_file, {"format": TRAINING_FORMAT, "inputs": inputs, "digest": digest,
                                    "concept_sha256": bundle_digest(bundle)})
    return Concept.load(bundle)


def _training_changes(record: dict | None, inputs: dict, digest: str, bundle: Path | None) -> list[str]:
    """What differs between TRAIN_DIR's record and `inputs` (and the bundle's files and their recorded digest)."""
    if record is None:
        return ["no record"]
    if record.get("digest") != digest:
        recorded = record.get("inputs")
        return differences(recorded if isinstance(recorded, dict) else {}, inputs) or ["the record's digest"]
    expected = record.get("concept_sha256")
    if bundle is not None and expected is not None and bundle_digest(bundle) != expected:
        return [f"{bundle}'s files changed since it was trained"]
    return []


def photos_to_images(photos: str | os.PathLike, class_word: str, prompts: list[str], *, base: str | None = None,
                     out_dir: str | os.PathLike = "outputs/run", method: str = "lora", seeds: list[int] | None = None,
                     options=None, resolution: int | None = None, train_overrides: dict | None = None,
                     sam_checkpoint: str | None = None, intermediates: bool = True, overwrite: bool = False,
                     family: str | None = None) -> Path:
    """Train (or reuse) a concept from `photos`, then Layout-and-Retouch every prompt x seed.

    The concept is named after the photo folder and its bundle is OUT_DIR/<name>/concept (`lrkit run
    --photos data/subjects/vase` -> OUT_DIR/vase/concept); the images go to OUT_DIR/images. Re-running with
    the same inputs reuses the bundle and keeps finished images; more prompts or seeds may be added. Other
    photos, class word, method, overrides, base, resolution, options or another prompt at an index already
    used are refused (`JobInputsError`) unless `overwrite`, which trains and generates again what they change.
    `base` defaults to the reused bundle's recorded base, else `tiny-random`; `family` ("sd" or "sdxl") overrides
    its detected model family. Returns the contact sheet's path
    (OUT_DIR/contact_sheet.png).
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
    resolution = resolution or default_resolution(base, family)
    train_overrides = {**run_training_options(base, family), **(train_overrides or {})}
    concept = train_or_reuse(photos, class_word, train_dir, base=base, method=method, resolution=resolution,
                             train_overrides=train_overrides, phase="phase 1/2: ", overwrite=overwrite, family=family)
    filled = fill_prompts(prompts, concept)
    options = options or GenerationOptions()  # unset height/width: the concept's training resolution
    inputs = generation_inputs(concept, base, sam_checkpoint=sam_checkpoint)
    check_generation_folder(out / "images", filled, options, inputs, overwrite=overwrite)  # before loading anything
    logger.info("phase 2/2: %s for %d prompts x %d seeds into %s", options.mode, len(filled), len(seeds),
                out / "images")
    try:
        pipeline = LayoutRetouchPipeline.from_concept(base, concept, sam_checkpoint=sam_checkpoint,
                                                      cache_dir=out / "cache", family=family)
    except BaseModelError as err:
        if given:
            raise
        raise recorded_base_error(err, base) from err
    done = generate_to_folder(pipeline, filled, seeds, out / "images", options, intermediates=intermediates,
                              inputs=inputs)
    return atomic_save_png(contact_sheet(done), out / "contact_sheet.png")


__all__ = ["GENERATION_FORMAT", "JOB_FILE", "JobInputsError", "TRAINING_FORMAT", "bundle_digest", "check_generation_folder",
           "concept_identity", "default_resolution", "fill_prompts", "generate_to_folder", "generation_inputs",
           "incomplete_units", "inputs_digest", "photos_identity", "photos_to_images", "read_prompts", "run_training_options", "subject_name", "train_or_reuse",
           "training_inputs"]
