"""The web app's data root and the actions on it that need no browser.

A data root holds everything the app reads or writes::

    concepts/<name>/     concept bundles (trained here or imported)
    uploads/<folder>/    checked photo uploads (a training's photos), uploads/styles/ style images
    outputs/             generations (outputs/generate/...), evaluations (outputs/eval/...), zips (outputs/zips/)
    jobs/<id>/           training runs: config, logs, validation images (the bundle moves to concepts/)
    cache/               inversion and mask caches of generation
    tmp/                 unpacking and uploads in progress (and Gradio's upload cache)

Names the page sends (a concept, a photo folder) are looked up in these folders, never joined onto paths
unchecked. Uploaded photos pass the training checks (`lrkit.photos.read_image`: type, pixel budget, decoding,
size) before anything is written; every folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

from lrkit.bundle_checks import MANIFEST
from lrkit.concept import Concept, ConceptError, check_name
from lrkit.photos import IMAGE_SUFFIXES, CAPTION_SUFFIX, DataError, raise_if_problems, read_image
from lrkit.training.options import ConfigError

logger = logging.getLogger(__name__)

SUBFOLDERS = ("concepts", "uploads", "outputs", "jobs", "cache", "tmp")
TRAIN_METHODS = ("lora", "dreambooth", "textual_inversion", "pivotal")
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "train"
"""The shipped training configs the Train tab starts from: configs/train/<method>.yaml, on an SDXL base
configs/train/sdxl_<method>.yaml (1024 px, gradient checkpointing, 8-bit AdamW) where there is one."""
FORM_KEYS = ("base", "method", "name", "output_dir", "max_steps", "seed", "resume", "overwrite", "data.photos",
             "data.class_word", "data.token", "data.resolution", "validation.every_n_steps")
"""Training options the Train tab's form (or the app) sets; the YAML under it holds every other option."""
MAX_PHOTOS = 200
MAX_PHOTO_BYTES = 50 << 20
MAX_CAPTION_BYTES = 4096
STYLE_FOLDER = "styles"
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


class UIError(ValueError):
    """Bad input from the page; the message says what to change."""


def stamp() -> str:
    """A sortable, unique folder stem: `20260102-153045-1a2b`."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"


def safe_file_name(name: str) -> str:
    """An uploaded file's name reduced to letters, digits, `_`, `.` and `-` (its suffix kept)."""
    stem = _SAFE_CHARS.sub("-", Path(name).stem).strip(".-") or "photo"
    return f"{stem[:80]}{Path(name).suffix.lower()}"


@contextmanager
def new_folder(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; it becomes `path` in one rename, or is removed on error."""
    if path.exists():
        raise UIError(f"{path.name} already exists in {path.parent}")
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclasses.dataclass
class ConceptRow:
    """One bundle of concepts/, as the Concepts tab lists it."""

    folder: str
    concept: Concept | None
    problem: str = ""

    def cells(self) -> list:
        c = self.concept
        if c is None:
            return [self.folder, "-", "-", "-", "-", "-", 0, f"unreadable: {self.problem}"]
        return [self.folder, c.method, c.token, c.class_word, c.base.id, c.resolution, len(c.refs), ""]


ROW_HEADERS = ["name", "method", "token", "class word", "base", "resolution", "photos", "problem"]


class Workspace:
    """A data root, the base model the app runs on, and the device it generates on."""

    def __init__(self, root: str | os.PathLike, base: str = "toy", device: str | None = None):
        self.root = Path(root).expanduser().resolve()
        self.base = base
        self.device = device or default_device()
        for name in SUBFOLDERS:
            (self.root / name).mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------- folders

    def folder(self, name: str) -> Path:
        """One of `SUBFOLDERS`."""
        assert name in SUBFOLDERS, name
        return self.root / name

    def inside(self, path: str | os.PathLike) -> bool:
        """Whether `path` (symlinks resolved) lies in the data root."""
        real = Path(path).resolve()
        return real == self.root or self.root in real.parents

    # -------------------------------------------------------------- concepts

    def concept_rows(self) -> list[ConceptRow]:
        """Every folder of concepts/ holding a manifest, loaded (a refused bundle is listed with its problem)."""
        rows = []
        for folder in sorted(p for p in self.folder("concepts").iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (folder / MANIFEST).exists():
                continue
            try:
                rows.append(ConceptRow(folder.name, Concept.load(folder)))
            except ConceptError as err:
                rows.append(ConceptRow(folder.name, None, str(err)))
        return rows

    def concept_names(self) -> list[str]:
        """The usable bundles of concepts/, by folder name."""
        return [row.folder for row in self.concept_rows() if row.concept is not None]

    def concept(self, name: str | None) -> Concept:
        """The bundle concepts/<name>, loaded and validated (`Concept.load`)."""
        if not name:
            raise UIError("choose a concept (train one in the Train tab, or import a bundle zip in the Concepts tab)")
        if name not in {p.name for p in self.folder("concepts").iterdir()}:
            raise UIError(f"there is no concept {name!r} in {self.folder('concepts')}")
        return Concept.load(self.folder("concepts") / name)

    def summary(self, name: str) -> str:
        """The manifest's main fields as markdown."""
        c = self.concept(name)
        lora = f"rank {c.lora.rank}, alpha {c.lora.alpha:g}" if c.lora else "-"
        training = c.training or {}
        lines = [
            f"**{c.name}** — {c.method}, token `{c.token}`, class word *{c.class_word}*",
            "",
            f"- phrase in prompts: `{c.subject_phrase()}`",
            f"- base: `{c.base.id}` ({c.base.family}), resolution {c.resolution} px",
            f"- files: {', '.join(f'`{v}`' for v in c.files.values()) or '-'}",
            f"- LoRA: {lora}",
            f"- trained: {training.get('max_steps', '-')} steps, seed {training.get('seed', '-')}, "
            f"lrkit {c.lrkit_version or '-'}",
            f"- reference photos: {len(c.refs)}",
        ]
        return "\n".join(lines)

    def kohya_file(self, name: str) -> Path:
        """The concept's LoRA in kohya / A1111 / ComfyUI layout."""
        c = self.concept(name)
        if "kohya" not in c.files:
            raise UIError(f"concept {name!r} ({c.method}) has no kohya-layout LoRA file; only LoRA and pivotal "
                          "concepts carry one (download the bundle zip instead)")
        return c.file("kohya")

    def export_zip(self, name: str) -> Path:
        """The bundle as a zip in outputs/zips/ (written again each time)."""
        from lrkit.ui.zips import zip_bundle

        c = self.concept(name)
        return zip_bundle(c.path, self.folder("outputs") / "zips" / f"{c.path.name}.zip")

    def import_zip(self, file: str | os.PathLike, limits=None) -> Concept:
        """Unpack an uploaded bundle zip safely (`lrkit.ui.zips.unpack_zip`) into tmp/, validate it as `Concept.load`
        does, and rename it to concepts/<its name>. On any refusal nothing stays behind."""
        from lrkit.ui.zips import ZipLimits, unpack_zip

        if not file:
            raise UIError("choose a bundle zip to import")
        scratch = self.folder("tmp") / f"import-{stamp()}"
        try:
            bundle = unpack_zip(file, scratch, limits or ZipLimits())
            concept = Concept.load(bundle)
            target = self.folder("concepts") / concept.name
            if target.exists():
                raise UIError(f"a concept named {concept.name!r} already exists in {self.folder('concepts')}; "
                              "nothing was imported")
            os.replace(bundle, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        logger.info("imported concept %s", target)
        return Concept.load(target)

    # -------------------------------------------------------------- presets and training configs

    def preset(self, method: str) -> tuple[str, dict]:
        """(the YAML the Train tab shows for `method`, the form's defaults from the preset).

        The YAML is configs/train/<method>.yaml (on an SDXL base sdxl_<method>.yaml where it exists) without
        `FORM_KEYS` (and without an initializer naming the preset's example subject); on a machine without CUDA a
        mixed precision becomes 32 (bf16 autocast on a CPU is many times slower)."""
        import yaml

        from lrkit.jobs import default_resolution
        from lrkit.models import family_of_base

        if method not in TRAIN_METHODS:
            raise UIError(f"method {method!r} is not one of {list(TRAIN_METHODS)}")
        path = PRESETS_DIR / f"{method}.yaml"
        family = family_of_base(self.base).name
        if family != "sd" and (PRESETS_DIR / f"{family}_{method}.yaml").is_file():
            path = PRESETS_DIR / f"{family}_{method}.yaml"
        header, data = [], {}
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            header = [line for line in text.splitlines() if line.startswith("#") and not line.startswith("# lrkit ")]
            data = yaml.safe_load(text) or {}
        else:
            header = [f"# no preset file {path}; the training defaults apply"]
        defaults = {"steps": int(data.get("max_steps", 400)),
                    "validation_every": int((data.get("validation") or {}).get("every_n_steps", 0)),
                    "resolution": default_resolution(self.base)}
        example = (data.get("data") or {}).get("class_word")
        for key in FORM_KEYS:
            _pop_dotted(data, key)
        if example and (data.get("textual_inversion") or {}).get("initializer") == example:
            _pop_dotted(data, "textual_inversion.initializer")
        for group in [k for k, v in data.items() if v == {}]:
            data.pop(group)
        if default_device() == "cpu" and data.get("precision") in ("16-mixed", "bf16-mixed"):
            header.append(f"# precision: the preset's {data['precision']} is for GPUs; 32 on this CPU machine")
            data["precision"] = "32"
        header.append("# Set by the form above (and the app): " + ", ".join(FORM_KEYS) + ".")
        return "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False), defaults

    def training_config(self, yaml_text: str, *, photos: Path, name: str, class_word: str, method: str, steps: int,
                        resolution: int, seed: int, token: str | None, validation_every: int, output_dir: Path) -> dict:
        """The training config: the YAML's options and the form's, checked as `lrkit train` checks them
        (`ConfigError` names the option)."""
        import yaml

        from lrkit.training.config import load_config, merge_nested

        try:
            data = yaml.safe_load(yaml_text or "") or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"the config YAML is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError("the config YAML must hold a mapping of options (key: value lines)")
        for key in FORM_KEYS:
            if _has_dotted(data, key):
                raise ConfigError(f"{key} is set by the form above the YAML; remove it from the YAML")
        form = {"base": self.base, "method": method, "name": name, "output_dir": str(output_dir),
                "max_steps": steps, "seed": seed, "resume": None, "overwrite": False,
                "data": {"photos": str(photos), "class_word": class_word, "token": token or None,
                         "resolution": resolution},
                "validation": {"every_n_steps": validation_every}}
        merged = merge_nested(data, form)
        load_config(merged)
        return merged

    def check_training_form(self, *, name: str, class_word: str, method: str, steps, resolution, seed,
                            validation_every) -> tuple[str, int, int, int, int]:
        """The form's values checked before anything is written: (name, steps, resolution, seed, every)."""
        name = (name or "").strip()
        if not name:
            raise UIError("give the concept a name (letters, digits, '_', '.', '-'), e.g. my-dog")
        check_name(name, "concept name")
        if (self.folder("concepts") / name).exists():
            raise UIError(f"a concept named {name!r} already exists in {self.folder('concepts')}; choose another name")
        if not (class_word or "").strip():
            raise UIError("give the class word of the subject, e.g. dog, vase, 'red checked ball'")
        if method not in TRAIN_METHODS:
            raise UIError(f"method {method!r} is not one of {list(TRAIN_METHODS)}")
        numbers = {"steps": (steps, 1), "resolution": (resolution, 8), "seed": (seed, 0),
                   "validation every N steps": (validation_every, 0)}
        checked = {}
        for label, (value, low) in numbers.items():
            if value is None or float(value) != int(float(value)) or int(float(value)) < low:
                raise UIError(f"{label} must be a whole number >= {low}, got {value!r}")
            checked[label] = int(float(value))
        return (name, checked["steps"], checked["resolution"], checked["seed"], checked["validation every N steps"])

    # -------------------------------------------------------------- photos

    def photo_folders(self) -> list[str]:
        """Folders of uploads/ that hold photos (a training picks one by name)."""
        out = []
        for folder in sorted(p for p in self.folder("uploads").iterdir() if p.is_dir() and not p.name.startswith(".")):
            if folder.name != STYLE_FOLDER and any(f.suffix.lower() in IMAGE_SUFFIXES for f in folder.iterdir()):
                out.append(folder.name)
        return out

    def photo_folder(self, name: str) -> Path:
        if name not in self.photo_folders():
            raise UIError(f"there is no photo folder {name!r} in {self.folder('uploads')}")
        return self.folder("uploads") / name

    def store_photos(self, files: list[str | os.PathLike], stem: str, min_size: int) -> Path:
        """Check uploaded photos (and same-name .txt captions) as training reads them, then copy them into a new
        folder of uploads/; returns it. Every problem is reported together (`DataError`) and nothing is written."""
        if not files:
            raise DataError("no photos: upload 3-10 photos of the subject, or pick a photo folder")
        if len(files) > MAX_PHOTOS:
            raise DataError(f"{len(files)} files uploaded; at most {MAX_PHOTOS}")
        problems, photos, captions = [], {}, {}
        for file in map(Path, files):
            name = safe_file_name(file.name)
            suffix = name.rsplit(".", 1)[-1] if "." in name else ""
            size = file.stat().st_size
            if f".{suffix}" not in (*IMAGE_SUFFIXES, CAPTION_SUFFIX):
                problems.append(f"{file.name}: not a photo (.jpg, .jpeg, .png, .webp) or a caption (.txt)")
            elif size > (MAX_CAPTION_BYTES if f".{suffix}" == CAPTION_SUFFIX else MAX_PHOTO_BYTES):
                problems.append(f"{file.name}: {size} bytes is too large for a {suffix} file")
            elif name in photos or name in captions:
                problems.append(f"{file.name}: uploaded twice (as {name})")
            elif f".{suffix}" == CAPTION_SUFFIX:
                try:
                    file.read_bytes().decode("utf-8-sig")
                    captions[name] = file
                except UnicodeDecodeError:
                    problems.append(f"{file.name}: a caption must be UTF-8 text")
            else:
                try:
                    read_image(file, file.name, min_size).close()
                    photos[name] = file
                except DataError as err:
                    problems.append(str(err))
        stems = {Path(n).stem for n in photos}
        problems += [f"{n}: caption without a photo of the same name" for n in captions if Path(n).stem not in stems]
        if not photos and not problems:
            problems.append("no photos among the uploaded files")
        raise_if_problems(problems, "the uploaded files")
        target = self.folder("uploads") / f"{stem}-{stamp()}"
        with new_folder(target) as tmp:
            for name, file in {**photos, **captions}.items():
                shutil.copyfile(file, tmp / name)
        logger.info("stored %d photos in %s", len(photos), target)
        return target

    def store_style(self, file: str | os.PathLike) -> Path:
        """A style image (dual-reference), checked like a photo and copied into uploads/styles/ by content."""
        import hashlib

        file = Path(file)
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{file.name}: a style image must be .jpg, .jpeg, .png or .webp")
        if file.stat().st_size > MAX_PHOTO_BYTES:
            raise DataError(f"{file.name}: over {MAX_PHOTO_BYTES >> 20} MiB")
        read_image(file, file.name, 8).close()
        digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
        target = self.folder("uploads") / STYLE_FOLDER / f"{digest}{file.suffix.lower()}"
        if not target.is_file():
            from lrkit.io import atomic_write_bytes

            atomic_write_bytes(target, file.read_bytes())
        return target

    # -------------------------------------------------------------- evaluation

    def evaluate(self, name: str, *, subject: str | None, methods: list[str], seeds: list[int], max_prompts: int,
                 steps: int):
        """The toy world's scores of a concept (`lrkit.evaluation.run_eval` on the toy prompt set, no CLIP or DINO):
        returns the `EvalResult` (its table and plots). The output folder is removed again if the run fails."""
        from lrkit.evaluation.runner import EvalConfig, run_eval
        from lrkit.inference import GenerationOptions
        from lrkit.models import builtin_kind

        if builtin_kind(self.base) != "toy":
            raise UIError(f"the toy-world scores need the toy base (lrkit ui --base toy); this app runs {self.base!r}")
        concept = self.concept(name)
        if not methods:
            raise UIError("choose at least one mode to evaluate")
        out = self.folder("outputs") / "eval" / f"{concept.name}-{stamp()}"
        config = EvalConfig(concepts=[str(concept.path)], out=str(out), base=self.base, prompts="toy", methods=methods,
                            seeds=seeds, max_prompts=max_prompts,
                            options=GenerationOptions.of(num_inference_steps=steps), clip_model="none",
                            dino_model="none", toy_subjects=[subject] if subject else None, device=self.device)
        try:
            return run_eval(config)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise


def default_device() -> str:
    """cuda when torch sees a GPU, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _pop_dotted(data: dict, key: str) -> None:
    *groups, last = key.split(".")
    for group in groups:
        data = data.get(group)
        if not isinstance(data, dict):
            return
    data.pop(last, None)


def _has_dotted(data: dict, key: str) -> bool:
    *groups, last = key.split(".")
    for group in groups:
        data = data.get(group)
        if not isinstance(data, dict):
            return False
    return last in data


__all__ = ["FORM_KEYS", "ROW_HEADERS", "TRAIN_METHODS", "UIError", "Workspace", "default_device",
           "new_folder", "safe_file_name", "stamp"]
