"""Checks of what a concept bundle holds, for `lrkit.concept`: JSON values and manifest fields by type and
range, the folder's entries (confined to it, symlinks resolved, no pickles, no FIFOs), pictures by their
headers, weight files by their safetensors headers and values.

A bundle is data from someone else (docs/security.md); every problem is a `ConceptError` that names the file and
the field. Nothing here writes anything.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import fields
from pathlib import Path

from lrkit.models import PICKLE_SUFFIXES

MANIFEST = "concept.json"
CARD = "README.md"
"""The model card (`lrkit.card`): Markdown with YAML front matter that describes the bundle. Nothing lrkit loads
reads it, so it is one more entry of the folder to `check_tree` (a file, or a symlink that stays inside)."""
MAX_MANIFEST_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
MAX_RESOLUTION = 8192
MAX_VECTORS = 75  # a CLIP prompt holds 75 tokens between its start and end tokens
MAX_RANK = 4096
MAX_WORD = 100  # characters of a token, class word, initializer
MAX_TEXT = 1024  # characters of any other string (paths, base id, LoRA targets)
MAX_ITEMS = 10_000  # entries of a list or mapping in the manifest
MAX_BUNDLE_ENTRIES = 100_000  # files and folders in a bundle
WEIGHT_SUFFIX = ".safetensors"
MODEL_FOLDER_SUFFIXES = (WEIGHT_SUFFIX, ".json", ".md", ".txt")
"""What `unet/` and `text_encoder/` may hold: safetensors weights, JSON configs and text."""


class ConceptError(ValueError):
    """A concept bundle is malformed or does not fit the pipeline; the message says why."""


def shown_value(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def check_json_value(value, what: str, where: str, depth: int) -> None:
    """`value` is JSON data (dicts with string keys, lists, strings, finite numbers, booleans, null) nested at
    most `MAX_JSON_DEPTH` levels, with at most `MAX_ITEMS` entries per list or object. Iterative, so depth
    itself cannot overflow the stack."""
    stack = [(value, what, depth)]
    while stack:
        item, at, level = stack.pop()
        if level > MAX_JSON_DEPTH:
            raise ConceptError(f"{where}: '{at[:200]}' is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            if len(item) > MAX_ITEMS:
                raise ConceptError(f"{where}: '{at[:200]}' has {len(item)} entries; at most {MAX_ITEMS}")
            for key, child in item.items():
                if not isinstance(key, str):
                    raise ConceptError(f"{where}: '{at[:200]}' has a key that is not a string: {shown_value(key)}")
                stack.append((child, key if at == "manifest" else f"{at}.{key}", level + 1))
        elif isinstance(item, (list, tuple)):
            if len(item) > MAX_ITEMS:
                raise ConceptError(f"{where}: '{at[:200]}' has {len(item)} entries; at most {MAX_ITEMS}")
            stack.extend((child, f"{at}[{i}]", level + 1) for i, child in enumerate(item))
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ConceptError(f"{where}: '{at[:200]}' is {item}; every number must be finite")
        elif not (item is None or isinstance(item, (str, int))):
            raise ConceptError(f"{where}: '{at[:200]}' holds a {type(item).__name__}, which is not JSON data")


def text_field(value, what: str, where: str, max_len: int = MAX_TEXT, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ConceptError(f"{where}: '{what}' must be a string, got {shown_value(value)}")
    if not value and not empty:
        raise ConceptError(f"{where}: '{what}' must not be empty")
    if len(value) > max_len:
        raise ConceptError(f"{where}: '{what}' is {len(value)} characters long; at most {max_len}")
    if not value.isprintable():
        raise ConceptError(f"{where}: '{what}' {value[:60]!r} holds control characters (newline, tab, NUL, ...)")
    return value


def word_field(value, what: str, where: str, *, empty: bool = False) -> str:
    return text_field(value, what, where, MAX_WORD, empty=empty)


def integer_field(value, what: str, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConceptError(f"{where}: '{what}' must be a whole number, got {shown_value(value)}")
    if not low <= value <= high:
        shown = value if abs(value) < 10**12 else f"a {len(str(abs(value)))}-digit number"
        raise ConceptError(f"{where}: '{what}' must be between {low} and {high}, got {shown}")
    return value


def number_field(value, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConceptError(f"{where}: '{what}' must be a number, got {shown_value(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ConceptError(f"{where}: '{what}' must be a finite number, got {shown_value(value)}")
    return number


def boolean_field(value, what: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConceptError(f"{where}: '{what}' must be true or false, got {shown_value(value)}")
    return value


def string_list(value, what: str, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise ConceptError(f"{where}: '{what}' must be a list of strings, got {shown_value(value)}")
    return [text_field(item, f"{what}[{i}]", where) for i, item in enumerate(value)]


def path_fields(value, what: str, where: str, *, mapping: bool = False, keys: str = "paths"):
    """A list of relative paths, or (`mapping`) an object whose values are paths and whose keys are paths or
    (`keys="names"`) short names. Containment is checked against the folder by `Concept._validate_paths`."""
    if not mapping:
        return string_list(value, what, where)
    if not isinstance(value, dict):
        raise ConceptError(f"{where}: '{what}' must be an object of relative paths, got {shown_value(value)}")
    check_key = word_field if keys == "names" else text_field
    return {check_key(k, f"{what} key", where): text_field(v, f"{what}.{k}", where) for k, v in value.items()}


def object_field(value, what: str, where: str, spec: type, required: tuple[str, ...]) -> dict:
    """`value` as an object with only `spec`'s fields and all of `required`."""
    if not isinstance(value, dict):
        raise ConceptError(f"{where}: '{what}' must be an object, got {shown_value(value)}")
    known = {f.name for f in fields(spec)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConceptError(f"{where}: '{what}' has unknown field(s) {unknown}; known: {sorted(known)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise ConceptError(f"{where}: '{what}' is missing {missing}")
    return value


def _not_json_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_at_most(path: Path, limit: int, rule: str, error: type[Exception] = ConceptError) -> bytes:
    """The bytes of `path`, reading at most `limit` + 1 of them; `error` naming the file when it cannot be read
    or holds more (`"<path>: over <limit> bytes; <rule>"`)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as err:
        raise error(f"{path}: cannot be read ({err.strerror or err})") from err
    if len(raw) > limit:
        raise error(f"{path}: over {limit} bytes; {rule}")
    return raw


def read_json(path: Path, what: str) -> object:
    """JSON from a regular file of at most `MAX_MANIFEST_BYTES`; a `ConceptError` naming it otherwise."""
    try:
        info = path.stat()
    except OSError as err:
        raise ConceptError(f"{path}: cannot be read ({err.strerror or err})") from err
    if not stat.S_ISREG(info.st_mode):
        raise ConceptError(f"{path}: not a regular file; {what} must be a JSON file")
    if info.st_size > MAX_MANIFEST_BYTES:
        raise ConceptError(f"{path}: {info.st_size} bytes; {what} is at most {MAX_MANIFEST_BYTES} bytes (1 MiB), "
                           "so this is not a bundle lrkit wrote")
    raw = read_at_most(path, MAX_MANIFEST_BYTES, f"{what} is at most 1 MiB")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_not_json_constant)
    except RecursionError:
        raise ConceptError(f"{path}: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, integers longer than Python parses
        raise ConceptError(f"{path}: not valid JSON ({err})") from err


def resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise ConceptError(f"{path}: cannot be resolved ({err}); remove the symlink loop") from err


def within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def inside_bundle(root: Path, rel: str, name: str) -> Path:
    """The file `rel` of the manifest resolved (symlinks included): relative, inside `root`, present."""
    if Path(rel).is_absolute():
        raise ConceptError(f"{root / MANIFEST}: path {rel!r} must be relative to the bundle")
    full = resolved(root / rel)
    if not within(full, root):
        raise ConceptError(f"{root / MANIFEST}: path {rel!r} points outside the bundle folder")
    if not full.exists():
        raise ConceptError(f"concept {name!r}: file {rel!r} listed in {MANIFEST} is missing")
    return full


def check_tree(root: Path) -> None:
    """Every entry of the bundle is a file or folder, and every symlink in it stays inside it (so a reader
    that walks a listed folder, such as diffusers in unet/, never reaches outside)."""
    count = 0
    for folder, dirs, files in os.walk(root, followlinks=False):
        for entry in dirs + files:
            count += 1
            if count > MAX_BUNDLE_ENTRIES:
                raise ConceptError(f"{root}: more than {MAX_BUNDLE_ENTRIES} files and folders; not a concept bundle")
            path = Path(folder) / entry
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                if not within(resolved(path), root):
                    raise ConceptError(f"{path}: a symlink that points outside the bundle folder; a bundle may link "
                                       "only to its own files (replace the link with the file)")
            elif not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
                raise ConceptError(f"{path}: {kind}; a bundle holds only files and folders")


def check_weights_entry(root: Path, what: str, rel: str) -> None:
    """A weights entry of the manifest (`what`: `files.lora`, `tokens[1].embeddings`) is a `.safetensors` file, or
    a model folder (unet/, text_encoder/) holding only safetensors weights, JSON configs and text; pickle formats
    are refused by name."""
    full = (root / rel).resolve()
    if full.is_dir():
        for folder, _, files in os.walk(full, followlinks=False):
            for name in files:
                suffix = Path(name).suffix.lower()
                path = Path(folder) / name
                if suffix in PICKLE_SUFFIXES:
                    raise ConceptError(f"{path}: {suffix} weights are pickles, which lrkit never loads; convert them "
                                       "to safetensors (save_pretrained(..., safe_serialization=True))")
                if suffix not in MODEL_FOLDER_SUFFIXES and not name.startswith("."):
                    raise ConceptError(f"{path}: a model folder holds only .safetensors weights and .json configs "
                                       f"({', '.join(MODEL_FOLDER_SUFFIXES)}); remove it")
        return
    suffix = Path(rel).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ConceptError(f"{root / MANIFEST}: {what} is {rel!r}, a pickle ({suffix}), which lrkit never "
                           "loads; convert it to .safetensors")
    if suffix != WEIGHT_SUFFIX:
        raise ConceptError(f"{root / MANIFEST}: {what} is {rel!r}; weights are read only as {WEIGHT_SUFFIX} "
                           "files (or a model folder)")
    if not full.is_file():
        raise ConceptError(f"{root / rel}: not a regular file; {what} must be a {WEIGHT_SUFFIX} file")


def check_picture(root: Path, rel: str) -> None:
    """A reference photo or mask: a regular image file whose header fits the pixel budget (`lrkit.photos`)."""
    from lrkit.photos import DataError, open_image

    full = (root / rel).resolve()
    if not full.is_file():
        raise ConceptError(f"{root / rel}: not a regular file; a bundle's refs and masks are image files")
    try:
        open_image(full, str(root / rel)).close()
    except DataError as err:
        raise ConceptError(str(err)) from err


def check_finite(tensors, where) -> None:
    """Raise unless every floating tensor of `(name, tensor)` pairs is finite: one reduction per tensor, one
    device sync in all."""
    import torch

    items = [(name, t) for name, t in tensors if t.is_floating_point() and t.numel()]
    if not items:
        return
    flags = torch.stack([torch.isfinite(t).all() for _, t in items])
    if not bool(flags.all()):
        bad = items[int((~flags).nonzero()[0, 0])][0]
        raise ConceptError(f"{where}: tensor {bad!r} holds NaN or infinite values; the training diverged or the file "
                           "is damaged: retrain (lower the learning rate) or download the bundle again")


_SAFETENSORS_ERRORS = (OSError, ValueError, RuntimeError)


def read_weights(path: Path) -> dict:
    """A safetensors file's tensors, checked finite; a damaged file is a `ConceptError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, *_SAFETENSORS_ERRORS) as err:
        raise ConceptError(f"{path}: not a readable safetensors file ({err}); download or export the bundle "
                           "again") from err
    check_finite(state.items(), path)
    return state


def check_weight_file(path: Path, *, header_only: bool = False) -> None:
    """A safetensors file whose header parses and (unless `header_only`) whose tensors are finite, read one
    tensor at a time."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            if not header_only:
                for name in names:
                    check_finite([(name, f.get_tensor(name))], path)
    except (SafetensorError, *_SAFETENSORS_ERRORS) as err:
        raise ConceptError(f"{path}: not a readable safetensors file ({err}); download or export the bundle "
                           "again") from err


# Architecture fields of a text encoder's config; the rest (dtype, versions, output flags) may differ.
_TEXT_ENCODER_SHAPE = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                       "num_attention_heads", "max_position_embeddings", "hidden_act")


def check_model_config(folder: Path, key: str, current) -> None:
    """A bundle's unet/ or text_encoder/ config describes the pipeline's own architecture, so a manifest
    cannot make lrkit build a model of another size (the weights fine-tune the base)."""
    config = read_json(folder / "config.json", f"{key}/config.json")
    if not isinstance(config, dict):
        raise ConceptError(f"{folder / 'config.json'}: expected a JSON object, got {type(config).__name__}")
    if key == "unet":
        mine = {k: v for k, v in dict(current.config).items() if not k.startswith("_")}
        keys = [k for k in config if k in mine]
    else:
        mine = current.config.to_dict()
        keys = [k for k in _TEXT_ENCODER_SHAPE if k in mine or k in config]
    mine = json.loads(json.dumps({k: mine.get(k) for k in keys}, default=str))  # tuples as lists
    differ = [k for k in keys if config.get(k) != mine[k]]
    if differ:
        raise ConceptError(f"{folder / 'config.json'}: the {key} differs from this pipeline's in {differ[:5]} (a "
                           "model of another base); load the base model it was trained on")


__all__ = ["CARD", "ConceptError", "MANIFEST", "boolean_field", "check_finite", "check_json_value", "check_model_config", "check_picture", "check_tree", "check_weight_file", "check_weights_entry", "inside_bundle", "integer_field", "number_field", "object_field", "path_fields", "read_at_most", "read_json", "read_weights", "resolved", "shown_value", "string_list", "text_field", "within", "word_field"]
