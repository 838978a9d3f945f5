"""The concept bundle: the ONLY contract between training and inference (DESIGN.md §3).

A concept is a folder::

    concept.json                       manifest, schema "lrkit.concept/1"
    pytorch_lora_weights.safetensors   LoRA, diffusers layout   -> pipe.load_lora_weights(dir)
    learned_embeds.safetensors         Textual-Inversion tokens -> pipe.load_textual_inversion(file)
                                       (SDXL: one token, `clip_l` / `clip_g` vectors, one call per text encoder)
    embeddings/<token>.safetensors     SDXL bundles of several learned tokens: one such file per token
    unet/, text_encoder/               full weights (DreamBooth), safetensors (SDXL: and text_encoder_2/)
    <name>.kohya.safetensors           the LoRA in kohya / A1111 / ComfyUI layout
    refs/                              the reference photos
    masks/                             subject masks of the refs (PNG)
    README.md                          the model card (`lrkit.card`), written with the rest by `write_bundle`

Training writes bundles with `write_bundle`; inference reads them with `Concept.load` and
`Concept.apply`. Neither side needs the other.

A bundle is data from someone else (docs/security.md). `Concept.load` reads at most `MAX_MANIFEST_BYTES` of
manifest, validates it field by field, keeps every file the bundle names or holds inside its folder (symlinks
resolved), accepts weights only as safetensors, and checks the pictures' pixel budget from their headers;
`Concept.apply` refuses damaged or non-finite weights and learned tokens that shadow a word the tokenizer
knows. Every problem is a `ConceptError` naming the file and field (the checks: `lrkit.bundle_checks`).
Nothing here writes into a bundle except `write_bundle`, into the temporary folder it is about to publish.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from lrkit.bundle_checks import (CARD, MANIFEST, MAX_MANIFEST_BYTES, MAX_RANK, MAX_RESOLUTION, MAX_VECTORS, MAX_WORD,
                                 WEIGHT_SUFFIX, ConceptError, boolean_field, check_finite, check_json_value,
                                 check_model_config, check_picture, check_tree, check_weight_file, check_weights_entry,
                                 inside_bundle, integer_field, number_field, object_field, path_fields, read_json,
                                 read_weights, resolved, shown_value, string_list, text_field, within, word_field)
from lrkit.card import write_card
from lrkit.families import FAMILIES, family_of
from lrkit.io import atomic_dir, atomic_save_png, atomic_write_json
from lrkit.logs import dropped
from lrkit.lora_io import require_text_encoder_lora_support
from lrkit.models import BaseFingerprint, dtype_kwarg, fingerprint, record_base_id

logger = logging.getLogger(__name__)

SCHEMA = "lrkit.concept/1"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
EMBEDDINGS = "learned_embeds.safetensors"
EMBEDDINGS_FOLDER = "embeddings"
"""`files.embeddings` of a bundle whose learned tokens have a file each (several tokens on SDXL: a vectors file holds
one token there); each token's `embeddings` names its file."""
METHODS = ("dreambooth", "lora", "textual_inversion", "pivotal", "concept_em", "reference")
# "reference": photos and a class word, no weights (`lrkit.reference`); its token IS the class word.

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
"""A concept name: letters, digits, `_`, `.` and `-`, first a letter, digit or `_`, at most 100 characters,
no `..`. Names become file and folder names (`<name>.kohya.safetensors`, `lrkit eval`'s images/<name>/)."""
def default_adapter_name(name: str) -> str:
    """The peft adapter name `Concept.apply` gives a concept called `name`: the name itself where peft can
    use it, else made usable. peft stores each adapter under its name as a child module, so a name with a dot
    or one that is an `nn.Module` attribute (a concept trained into a folder called `train`, `eval`, `to`)
    fails deep inside `load_lora_weights`: dots become `_`, and such names get `_lora` appended."""
    import torch

    safe = name.replace(".", "_") or "concept"
    return f"{safe}_lora" if hasattr(torch.nn.Module, safe) else safe


def check_name(name, where: str = "concept") -> str:
    """`name` if it is a valid concept name (`NAME_RE`, no `..`), else a `ConceptError` with a valid spelling."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise ConceptError(
            f"{where}: 'name' {name!r} is not a concept name (letters, digits, '_', '.', '-', starting with a "
            f"letter, digit or '_', at most 100 characters, no '..'); use e.g. {concept_slug(str(name))!r}"
        )
    return name


def concept_slug(text: str) -> str:
    """`text` (a folder name, say) as a valid concept name: accents dropped, every run of other characters
    made one `-`, leading and trailing dots and dashes removed; `concept` when nothing is left."""
    import unicodedata

    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", plain)
    slug = re.sub(r"\.{2,}", ".", slug).strip(".-")[:100].strip(".-")
    return slug or "concept"


def token_clash(tokenizer, token: str, vocab: dict | None = None) -> str | None:
    """Why `token` cannot be a new (learned) token for `tokenizer`, or None when it is new in every form the
    tokenizer could match: as it is, as CLIP's word-final form `token</w>` (CLIP stores `teapot` so), lower-
    cased (CLIP lower-cases prompts), or as the single existing token it tokenizes to. A token is one
    whitespace-free string and holds no special token. The reason reads after the token: `'teapot' <reason>`."""
    vocab = tokenizer.get_vocab() if vocab is None else vocab
    if not token or any(ch.isspace() for ch in token):
        return "is not one whitespace-free word"
    if token in vocab:
        return "is already in the tokenizer"
    special = next((t for t in getattr(tokenizer, "all_special_tokens", []) if t and t in token), None)
    if special is not None:
        return f"contains the tokenizer's special token {special!r}"
    for form in (f"{token}</w>", token.lower(), f"{token.lower()}</w>"):
        if form in vocab:
            return f"is a word the tokenizer knows (as {form!r})"
    pieces = tokenizer.tokenize(token)
    if len(pieces) == 1 and pieces[0] in vocab:
        return f"is a word the tokenizer knows (it reads as {pieces[0]!r})"
    return None


@dataclass
class TokenSpec:
    """A word that stands for the concept in prompts.

    `learned=True` marks a new Textual-Inversion token with `num_vectors` embedding rows (prompts
    use the token once; diffusers expands it to `token token_1 ... token_{n-1}`). `learned=False` is
    an existing rare word (DreamBooth/LoRA identifiers such as `sks`).
    """

    token: str
    learned: bool = False
    num_vectors: int = 1
    initializer: str | None = None
    mask: str | None = None  # per-token mask for multi-concept bundles (relative path)
    masks: dict[str, str] = field(default_factory=dict)
    """Multi-concept bundles: {ref path: mask path} of this token in each reference that shows it."""
    class_word: str | None = None
    """Multi-concept bundles: this token's class (default: the bundle's `class_word`)."""
    embeddings: str | None = None
    """Bundles whose learned tokens have a file each (`files.embeddings` is `EMBEDDINGS_FOLDER`): this token's
    vectors, `embeddings/<token>.safetensors` in the family's one-token layout (SDXL: `clip_l` / `clip_g`)."""


def token_file_name(token: str) -> str:
    """`token` as part of a file name: `<red-vase>` -> `red-vase`."""
    return re.sub(r"[^A-Za-z0-9_-]+", "", token) or "token"


def token_embedding_files(tokens: list[str]) -> dict[str, str]:
    """{token: `embeddings/<token>.safetensors`}, the files of a bundle whose learned tokens have a file each; a
    name an earlier token took gets the later token's position (`-2`, counting from 1; the next free number on)."""
    files, taken = {}, set()
    for i, token in enumerate(tokens, 1):
        stem = name = token_file_name(token)
        number = i
        while stem.lower() in taken:  # distinct on case-insensitive file systems too
            stem, number = f"{name}-{number}", number + 1
        taken.add(stem.lower())
        files[token] = f"{EMBEDDINGS_FOLDER}/{stem}.safetensors"
    return files


@dataclass
class LoraSpec:
    """How the LoRA was built; alpha is the true alpha (scale = alpha / rank)."""

    rank: int
    alpha: float
    unet_targets: list[str]
    text_encoder_targets: list[str] | None = None
    dropout: float = 0.0
    dora: bool = False


@dataclass
class Concept:
    """A loaded (or about to be written) concept bundle."""

    name: str
    method: str
    tokens: list[TokenSpec]
    class_word: str
    base: BaseFingerprint
    resolution: int
    files: dict[str, str] = field(default_factory=dict)
    refs: list[str] = field(default_factory=list)
    masks: dict[str, str] = field(default_factory=dict)
    lora: LoraSpec | None = None
    training: dict = field(default_factory=dict)
    lrkit_version: str = ""
    path: Path | None = None

    def __repr__(self) -> str:
        path = None if self.path is None else str(self.path)
        return (f"Concept(name={self.name!r}, method={self.method!r}, tokens={[t.token for t in self.tokens]!r}, "
                f"class_word={self.class_word!r}, base={self.base.id!r}, path={path!r})")

    # ------------------------------------------------------------------ convenience

    @property
    def token(self) -> str:
        """The primary concept token (the first one)."""
        return self.tokens[0].token

    def subject_phrase(self) -> str:
        """`<token> <class>`, the phrase prompts use for the subject (a reference concept's: its class word)."""
        if self.method == "reference":
            return self.token
        return f"{self.token} {self.class_word}".strip()

    def for_token(self, token: str) -> "Concept":
        """This concept seen as a single-token concept of `token` (multi-concept bundles, DESIGN §6.3).

        The view lists `token` first (so `.token` and `subject_phrase()` are its), only the
        references that show it, and its masks as the reference masks, so Layout-and-Retouch
        (which reads `.token`, `refs` and `masks`) works for any one token of the bundle. All tokens
        stay in `tokens`: `apply` still loads every learned vector. Weights and folder are shared.
        """
        import dataclasses

        names = [t.token for t in self.tokens]
        if token not in names:
            raise ConceptError(f"concept {self.name!r} has no token {token!r}; its tokens are {names}")
        spec = self.tokens[names.index(token)]
        tokens = [spec] + [t for t in self.tokens if t.token != token]
        if not spec.masks:  # a single-token bundle, or a token without masks: refs and masks as they are
            return dataclasses.replace(self, tokens=tokens, class_word=spec.class_word or self.class_word)
        refs = [r for r in self.refs if r in spec.masks]
        return dataclasses.replace(self, tokens=tokens, class_word=spec.class_word or self.class_word,
                                   refs=refs, masks=dict(spec.masks))

    def token_files(self) -> dict[str, str]:
        """{token: its own vectors file} of the tokens that have one (several learned tokens on SDXL)."""
        return {t.token: t.embeddings for t in self.tokens if t.embeddings}

    def file(self, key: str) -> Path:
        if self.path is None:
            raise ConceptError(f"concept {self.name!r} has not been written to disk yet")
        if key not in self.files:
            raise ConceptError(f"concept {self.name!r} ({self.method}) has no {key!r} file")
        return self.path / self.files[key]

    def weights_digest(self) -> str:
        """Changes whenever a weight file is rewritten (name, size, mtime of every listed file)."""
        import hashlib

        assert self.path is not None
        h = hashlib.sha256()
        for key, rel in sorted(self.files.items()):
            root = self.path / rel
            for f in sorted([root] if root.is_file() else root.rglob("*")):
                if f.is_file():
                    st = f.stat()
                    h.update(f"{key}:{f.relative_to(self.path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def ref_paths(self) -> list[Path]:
        assert self.path is not None
        return [self.path / r for r in self.refs]

    # ------------------------------------------------------------------ (de)serialisation

    def to_manifest(self) -> dict:
        data = {
            "schema": SCHEMA,
            "name": self.name,
            "method": self.method,
            "tokens": [_token_entry(t) for t in self.tokens],
            "class_word": self.class_word,
            "base": self.base.to_dict(),
            "resolution": self.resolution,
            "files": dict(self.files),
            "refs": list(self.refs),
            "masks": dict(self.masks),
            "lora": asdict(self.lora) if self.lora is not None else None,
            "training": self.training,
            "lrkit_version": self.lrkit_version,
        }
        return data

    @classmethod
    def from_manifest(cls, data: dict, path: Path | None = None) -> "Concept":
        """The concept a manifest describes, validated field by field (types, ranges, sizes, nesting depth);
        every problem is a `ConceptError` naming the manifest and the field. Files are checked by `load`."""
        where = f"{path / MANIFEST}" if path is not None else "manifest"
        if not isinstance(data, dict):
            raise ConceptError(f"{where}: expected a JSON object, got {type(data).__name__}")
        check_json_value(data, "manifest", where, 1)
        schema = data.get("schema")
        if schema != SCHEMA:
            raise ConceptError(f"{where}: schema {schema!r} is not supported (expected {SCHEMA!r})")
        missing = [k for k in ("name", "method", "tokens", "class_word", "base", "resolution") if k not in data]
        if missing:
            raise ConceptError(f"{where}: missing field(s) {missing}")
        name = check_name(data["name"], where)
        method = data["method"]
        if not isinstance(method, str) or method not in METHODS:
            raise ConceptError(f"{where}: method {method!r} is not one of {list(METHODS)}")
        class_word = word_field(data["class_word"], "class_word", where, empty=method != "reference")
        tokens = _tokens(data["tokens"], where, method, class_word)
        resolution = integer_field(data["resolution"], "resolution", where, 8, MAX_RESOLUTION)
        if resolution % 8:
            raise ConceptError(f"{where}: 'resolution' must be a multiple of 8 (the VAE's scale), got {resolution}")
        lora = data.get("lora")
        training = data.get("training", {})
        if not isinstance(training, dict):
            raise ConceptError(f"{where}: 'training' must be an object (the training config), got "
                               f"{type(training).__name__}")
        return cls(
            name=name, method=method, tokens=tokens, class_word=class_word,
            base=_base(data["base"], where), resolution=resolution,
            files=path_fields(data.get("files", {}), "files", where, mapping=True, keys="names"),
            refs=path_fields(data.get("refs", []), "refs", where),
            masks=path_fields(data.get("masks", {}), "masks", where, mapping=True, keys="paths"),
            lora=None if lora is None else _lora(lora, where), training=dict(training),
            lrkit_version=text_field(data.get("lrkit_version", ""), "lrkit_version", where, MAX_WORD, empty=True),
            path=path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Concept":
        """Read and validate a bundle: the manifest field by field, every file it names or holds inside the
        folder (symlinks resolved), weights as safetensors, pictures within the pixel budget."""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ConceptError(f"concept folder {str(root)!r} does not exist")
        root = root.resolve()
        concept = cls.from_manifest(_read_manifest(root), root)
        concept._validate_paths()
        return concept

    def _validate_paths(self) -> None:
        """Every path the manifest names is relative, stays inside the folder once symlinks are resolved and
        exists; every entry of the folder stays inside it; weights are safetensors; pictures fit the budget."""
        assert self.path is not None
        root = self.path.resolve()
        manifest = root / MANIFEST
        for t in self.tokens:
            unknown = [r for r in t.masks if r not in self.refs]
            if unknown:
                raise ConceptError(f"{manifest}: token {t.token!r} has masks for {unknown}, which are not in 'refs'")
        pictures = list(self.refs) + list(self.masks.values())
        pictures += [t.mask for t in self.tokens if t.mask]
        pictures += [m for t in self.tokens for m in t.masks.values()]
        token_files = {f"tokens[{i}].embeddings": t.embeddings for i, t in enumerate(self.tokens) if t.embeddings}
        weights = {f"files.{key}": rel for key, rel in self.files.items()} | token_files
        for rel in list(weights.values()) + pictures:
            inside_bundle(root, rel, self.name)
        check_tree(root)
        self._check_token_files(root)
        for what, rel in weights.items():
            check_weights_entry(root, what, rel)
        for rel in dict.fromkeys(pictures):
            check_picture(root, rel)

    def _check_token_files(self, root: Path) -> None:
        """Tokens name their own vectors file exactly when `files.embeddings` is a folder: then every learned
        token names a file inside that folder, each its own."""
        manifest = root / MANIFEST
        folder = resolved(root / self.files["embeddings"]) if "embeddings" in self.files else None
        per_token = folder is not None and folder.is_dir()
        owners = {}
        for i, t in enumerate(self.tokens):
            what = f"'tokens[{i}].embeddings'"
            if t.embeddings and not (t.learned and per_token):
                why = "it is not a learned token" if not t.learned else "files.embeddings is not a folder"
                raise ConceptError(f"{manifest}: {what} is set, but {why}; remove the field")
            if not (per_token and t.learned):
                continue
            if not t.embeddings:
                raise ConceptError(f"{manifest}: files.embeddings is the folder {self.files['embeddings']!r}, but "
                                   f"learned token {t.token!r} (tokens[{i}]) names no file in it; set its 'embeddings'")
            file = resolved(root / t.embeddings)
            if folder not in file.parents or not file.is_file():
                raise ConceptError(f"{manifest}: {what} {t.embeddings!r} is not a file inside files.embeddings "
                                   f"{self.files['embeddings']!r}")
            if owners.setdefault(file, t.token) != t.token:
                raise ConceptError(f"{manifest}: tokens {owners[file]!r} and {t.token!r} name the same embeddings "
                                   f"file {t.embeddings!r}; a file holds one token")

    # ------------------------------------------------------------------ apply

    def check_base(self, pipe, *, force: bool = False) -> None:
        """Raise unless `pipe` is the base model this concept was trained on (or `force`)."""
        current = fingerprint(pipe)
        if self.base.matches(current):
            return
        if self.base.family != current.family:  # never applicable, even with force
            raise ConceptError(
                f"concept {self.name!r} is a {FAMILIES[self.base.family].label} concept (trained on "
                f"{self.base.id!r}), but this pipeline's base {current.id!r} is {FAMILIES[current.family].label}; "
                f"load a {FAMILIES[self.base.family].label} base model")
        msg = (
            f"concept {self.name!r} was trained on base model {self.base.id!r}, but this pipeline's "
            f"base is {current.id!r} (fingerprints differ). Load the matching base model, or pass "
            f"force=True (CLI: --force) to apply it anyway."
        )
        if not force:
            raise ConceptError(msg)
        logger.warning("%s Applying anyway (force=True).", msg)

    def apply(self, pipe, *, force: bool = False, adapter_name: str | None = None, lora_scale: float = 1.0):
        """Load this concept into a stock diffusers pipeline (in place); returns the pipeline.

        LoRA goes through `pipe.load_lora_weights`, tokens through `pipe.load_textual_inversion` (SDXL: once per
        text encoder, with its `clip_l` / `clip_g` vectors), DreamBooth weights replace `pipe.unet` and the text
        encoders (`pipe.text_encoder`, SDXL's `pipe.text_encoder_2`). The LoRA adapter is called
        `adapter_name`, by default `default_adapter_name(self.name)` (the concept's name, if peft can use it).
        Every weight file is read as safetensors and checked finite (one reduction per tensor) first; a damaged
        or non-finite file, or a learned token the tokenizer already knows, leaves the pipeline as it was.
        """
        self.check_base(pipe, force=force)
        if self.path is None:
            raise ConceptError(f"concept {self.name!r} has no folder; load it with Concept.load(path)")
        if adapter_name is not None and adapter_name != default_adapter_name(adapter_name):
            raise ConceptError(f"adapter_name {adapter_name!r} cannot name a peft adapter (it has a dot or is an "
                               f"nn.Module attribute); use e.g. {default_adapter_name(adapter_name)!r}")
        adapter = adapter_name or default_adapter_name(self.name)
        # Check everything before changing anything, so a refused concept leaves the pipeline as it was.
        embeddings = self._load_embeddings(pipe) if "embeddings" in self.files else {}
        if "lora" in self.files:
            if self.lora is not None and self.lora.text_encoder_targets:
                require_text_encoder_lora_support()
            loaded = pipe.get_list_adapters() if hasattr(pipe, "get_list_adapters") else {}
            if any(adapter in names for names in loaded.values()):
                raise ConceptError(f"adapter {adapter!r} is already loaded in this pipeline; pass another adapter_name")
            check_weight_file(self.file("lora"))
        models = self._load_full_weights(pipe)
        if "unet" in models:
            # The trained UNet's fingerprint is not the base's; the id names the base and the concept.
            record_base_id(models["unet"], f"{fingerprint(pipe).id}+{self.name}")
        if models:
            pipe.register_modules(**models)
        for token, per_encoder in embeddings.items():
            if list(per_encoder) == ["text_encoder"]:  # one text encoder: the stock call, as for any TI file
                pipe.load_textual_inversion({token: per_encoder["text_encoder"]}, token=token)
                continue
            family = family_of(pipe)
            for encoder, tokenizer in zip(family.text_encoders, family.tokenizers):
                pipe.load_textual_inversion(per_encoder[encoder], token=token, text_encoder=getattr(pipe, encoder),
                                            tokenizer=getattr(pipe, tokenizer))
        if "lora" in self.files:
            # diffusers looks for a text-encoder part in every LoRA and warns when there is none; a bundle whose
            # LoRA spec lists no text-encoder targets has none by design
            quiet = (dropped("diffusers.loaders.lora_base", r"No LoRA keys associated to \w+ found with the "
                                                            r"prefix='text_encoder'")
                     if self.lora is not None and not self.lora.text_encoder_targets else contextlib.nullcontext())
            with quiet:
                pipe.load_lora_weights(str(self.path), weight_name=self.files["lora"], adapter_name=adapter)
            if lora_scale != 1.0:
                pipe.set_adapters([adapter], adapter_weights=[lora_scale])
        return pipe

    def _load_embeddings(self, pipe) -> dict:
        """The learned tokens' vectors, `{token: {text encoder: (num_vectors, dim)}}`, checked against the manifest
        and `pipe`: finite, each text encoder's width, and every name diffusers registers new to each tokenizer.

        One text encoder (SD): the file is `{token: vectors}`. Several (SDXL): a file holds one token, its vectors
        per encoder under the family's `embedding_keys` (`clip_l`, `clip_g`); a bundle of several learned tokens
        has a file per token (`files.embeddings` is `EMBEDDINGS_FOLDER`, each token's `embeddings` its file)."""
        path = self.file("embeddings")
        learned = [t for t in self.tokens if t.learned]
        if not learned:
            raise ConceptError(f"{path}: concept {self.name!r} lists it, but none of its tokens is marked learned=True")
        family = family_of(pipe)
        keys = family.embedding_keys
        if path.is_dir():
            sources = [(spec, self.path / spec.embeddings) for spec in learned]  # each named: `_validate_paths`
        elif keys and len(learned) != 1:
            raise ConceptError(f"{path}: a {family.label} embeddings file holds one token ({', '.join(keys)}), but "
                               f"concept {self.name!r} lists {len(learned)} learned tokens; give each token its own "
                               f"file under {EMBEDDINGS_FOLDER}/ (the token's 'embeddings' field)")
        else:
            sources = [(spec, path) for spec in learned]
        states, embeddings = {}, {}
        for spec, file in sources:
            if file not in states:
                states[file] = read_weights(file)
            state = states[file]
            entries = [(spec.token, "text_encoder", "tokenizer")] if not keys else list(
                zip(keys, family.text_encoders, family.tokenizers))
            per_encoder = {}
            for key, encoder, tokenizer_name in entries:
                if key not in state:
                    raise ConceptError(f"{file}: no entry {key!r} for token {spec.token!r} of concept {self.name!r}")
                per_encoder[encoder] = self._checked_vectors(file, spec, key, state[key], getattr(pipe, encoder),
                                                             getattr(pipe, tokenizer_name))
            embeddings[spec.token] = per_encoder
        return embeddings

    @staticmethod
    def _checked_vectors(path: Path, spec: TokenSpec, key: str, vectors, text_encoder, tokenizer):
        """`vectors` of `spec` (file entry `key`) as (num_vectors, dim), refused unless they fit the manifest,
        `text_encoder`'s width and every name they register is new to `tokenizer`."""
        vectors = vectors.unsqueeze(0) if vectors.ndim == 1 else vectors  # (num_vectors, dim)
        if vectors.ndim != 2 or vectors.shape[0] != spec.num_vectors or not vectors.is_floating_point():
            raise ConceptError(
                f"{path}: holds a {vectors.dtype} tensor of shape {tuple(vectors.shape)} for {key!r}, but "
                f"the manifest says {spec.num_vectors} vector(s) of floats"
            )
        width = text_encoder.get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            raise ConceptError(f"{path}: {key!r} has {vectors.shape[1]}-wide vectors, but this pipeline's "
                               f"text encoder is {width} wide (a concept of another base model?)")
        vocab = tokenizer.get_vocab()
        for name in [spec.token] + [f"{spec.token}_{i}" for i in range(1, spec.num_vectors)]:
            why = token_clash(tokenizer, name, vocab)
            if why is not None:
                raise ConceptError(f"{path}: token {name!r} {why}; a learned token must be new to the tokenizer "
                                   f"(a concept applied twice? load a fresh pipeline)")
        return vectors

    def _load_full_weights(self, pipe) -> dict:
        """The bundle's own UNet / text encoders (DreamBooth), loaded on `pipe`'s device and checked (config as
        the base's, safetensors readable, weights finite) but not yet in `pipe`."""
        import transformers
        from diffusers import UNet2DConditionModel

        family = family_of(pipe)
        parts = [("unet", UNet2DConditionModel, "diffusers")]
        parts += [(name, getattr(transformers, cls), "transformers")
                  for name, cls in zip(family.text_encoders, family.text_encoder_classes)]
        models = {}
        for key, cls, library in parts:
            current = getattr(pipe, key)
            if key not in self.files:
                continue
            folder = self.file(key)
            check_model_config(folder, key, current)
            for file in sorted(folder.glob(f"*{WEIGHT_SUFFIX}")):
                check_weight_file(file, header_only=True)
            try:
                model = cls.from_pretrained(str(folder), **dtype_kwarg(current.dtype, library), use_safetensors=True)
            except (OSError, ValueError, TypeError, RuntimeError, KeyError) as err:
                raise ConceptError(f"{folder}: cannot load the {key} weights ({type(err).__name__}: {err}); "
                                   "download or export the bundle again") from err
            model = model.to(current.device)
            check_finite(model.state_dict().items(), folder)
            models[key] = model
        return models


# ------------------------------------------------------------------------------------- manifest fields


def _token_entry(spec: TokenSpec) -> dict:
    """A token of the manifest; `embeddings` only where the token has a file of its own."""
    entry = asdict(spec)
    if entry["embeddings"] is None:
        del entry["embeddings"]
    return entry


def _token(value, what: str, where: str) -> TokenSpec:
    data = object_field(value, what, where, TokenSpec, ("token",))
    optional_word = (lambda key: None if data.get(key) is None
                     else word_field(data[key], f"{what}.{key}", where, empty=True))
    return TokenSpec(
        token=word_field(data["token"], f"{what}.token", where),
        learned=boolean_field(data.get("learned", False), f"{what}.learned", where),
        num_vectors=integer_field(data.get("num_vectors", 1), f"{what}.num_vectors", where, 1, MAX_VECTORS),
        initializer=optional_word("initializer"),
        mask=None if data.get("mask") is None else text_field(data["mask"], f"{what}.mask", where),
        masks=path_fields(data.get("masks", {}), f"{what}.masks", where, mapping=True),
        class_word=optional_word("class_word"),
        embeddings=None if data.get("embeddings") is None else text_field(data["embeddings"], f"{what}.embeddings",
                                                                          where),
    )


def _tokens(value, where: str, method: str, class_word: str) -> list[TokenSpec]:
    """The token list: unique, one whitespace-free word each (a reference concept's token is its class word,
    which may be several words), a learned token never a class word, nor the name diffusers gives another
    token's extra vectors (`<v>_1`)."""
    if not isinstance(value, list):
        raise ConceptError(f"{where}: 'tokens' must be a list of token objects, got {shown_value(value)}")
    if not value:
        raise ConceptError(f"{where}: 'tokens' is empty; a concept needs at least one token")
    tokens = [_token(t, f"tokens[{i}]", where) for i, t in enumerate(value)]
    names = [t.token for t in tokens]
    if len(set(names)) != len(names):
        raise ConceptError(f"{where}: tokens are not unique: {names}")
    for i, t in enumerate(tokens):
        if any(ch.isspace() for ch in t.token) and not (method == "reference" and t.token == class_word):
            raise ConceptError(f"{where}: 'tokens[{i}].token' {t.token!r} holds whitespace; a token is one word, "
                               f"e.g. {'-'.join(t.token.split())!r}")
        if t.learned and t.token in (class_word, t.class_word):
            raise ConceptError(f"{where}: learned token {t.token!r} is the class word; a learned token is a new "
                               f"word, e.g. '<{t.token}>'")
        extra = {f"{t.token}_{k}" for k in range(1, t.num_vectors)} if t.learned else set()
        taken = sorted(extra.intersection(names))
        if taken:
            raise ConceptError(f"{where}: token {taken[0]!r} is also the name of one of {t.token!r}'s "
                               f"{t.num_vectors} vectors; rename it")
    return tokens


def _base(value, where: str) -> BaseFingerprint:
    if not isinstance(value, dict):
        raise ConceptError(f"{where}: 'base' must be an object, got {shown_value(value)}")
    missing = [k for k in ("id", "unet_config_sha256") if k not in value]
    if missing:
        raise ConceptError(f"{where}: 'base' is missing {missing}")
    text_field(value["id"], "base.id", where)
    text_field(value["unet_config_sha256"], "base.unet_config_sha256", where, 128)
    probe = value.get("weight_probe", [])
    if not isinstance(probe, (list, tuple)):
        raise ConceptError(f"{where}: 'base.weight_probe' must be a list of numbers, got {shown_value(probe)}")
    probe = [number_field(v, f"base.weight_probe[{i}]", where) for i, v in enumerate(probe)]
    family = value.get("family", "sd")
    if family not in FAMILIES:
        raise ConceptError(f"{where}: 'base.family' {shown_value(family)} is not one of {sorted(FAMILIES)}")
    try:
        return BaseFingerprint.from_dict({**value, "weight_probe": probe})
    except (TypeError, KeyError, ValueError) as err:
        raise ConceptError(f"{where}: 'base' is malformed ({err})") from err


def _lora(value, where: str) -> LoraSpec:
    data = object_field(value, "lora", where, LoraSpec, ("rank", "alpha", "unet_targets"))
    alpha = number_field(data["alpha"], "lora.alpha", where)
    if alpha <= 0:
        raise ConceptError(f"{where}: 'lora.alpha' must be > 0 (scale = alpha / rank), got {alpha}")
    dropout = number_field(data.get("dropout", 0.0), "lora.dropout", where)
    if not 0.0 <= dropout < 1.0:
        raise ConceptError(f"{where}: 'lora.dropout' must be in [0, 1), got {dropout}")
    te_targets = data.get("text_encoder_targets")
    return LoraSpec(
        rank=integer_field(data["rank"], "lora.rank", where, 1, MAX_RANK), alpha=alpha,
        unet_targets=string_list(data["unet_targets"], "lora.unet_targets", where),
        text_encoder_targets=None if te_targets is None else string_list(te_targets, "lora.text_encoder_targets", where),
        dropout=dropout, dora=boolean_field(data.get("dora", False), "lora.dora", where),
    )


# ------------------------------------------------------------------------------------- bundle files


def _read_manifest(root: Path) -> object:
    manifest = root / MANIFEST
    if not (manifest.exists() or manifest.is_symlink()):
        raise ConceptError(f"{str(root)!r} is not a concept bundle: {MANIFEST} is missing")
    real = resolved(manifest)
    if not within(real, root):
        raise ConceptError(f"{manifest}: a symlink that points outside the bundle folder; a bundle may link only "
                           "to its own files")
    return read_json(real, "a manifest")


def recorded_base(concepts: "list[Concept]", option: str = "--base") -> str:
    """The base model the concepts were trained on (their manifests' `base.id`): what generation and
    evaluation load when no base is given. Concepts trained on different bases need `option`."""
    ids = sorted({c.base.id for c in concepts})
    if len(ids) != 1:
        raise ConceptError(f"the concepts were trained on different base models ({', '.join(map(repr, ids))}); "
                           f"pass {option} to choose one")
    logger.info("base model %s (recorded in the concept)", ids[0])
    return ids[0]


def recorded_base_error(err: Exception, base: str, option: str = "--base") -> ConceptError:
    """The error for a recorded base model that cannot be loaded here: the loader's reason, and the fix."""
    return ConceptError(f"cannot load base model {base!r}, which the concept records ({err}); "
                        f"pass {option} NAME_OR_PATH to load it from elsewhere")


def write_refs(photos, folder: Path) -> list[str]:
    """Copy photos (`lrkit.photos.Photo`) into a bundle's refs/ folder (originals when on disk, else PNG); the
    manifest's `refs` entries."""
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for i, photo in enumerate(photos):
        if photo.path is not None:
            name = f"{i:02d}_{Path(photo.path).name}"
            shutil.copyfile(photo.path, folder / name)
        else:
            name = f"{i:02d}.png"
            atomic_save_png(photo.image, folder / name)
        refs.append(f"refs/{name}")
    return refs


def write_bundle(concept: Concept, out_dir: str | os.PathLike, write_files: Callable[[Path], None], *,
                 overwrite: bool = False) -> Concept:
    """Write a bundle atomically: `write_files(tmp)` fills a temp folder, the model card (`README.md`,
    `lrkit.card.write_card`) follows unless `write_files` wrote one, the manifest goes last, then one rename
    publishes it. The manifest is validated before anything is written (the name becomes file names) and again,
    with every file, before the rename; on any error nothing is left under `out_dir`."""
    Concept.from_manifest(concept.to_manifest())
    out = Path(out_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_files(tmp)
        if not (tmp / CARD).exists():
            write_card(concept, tmp)
        manifest = concept.to_manifest()
        written = Concept.from_manifest(manifest, tmp)
        written._validate_paths()
        size = len(json.dumps(manifest, indent=2).encode("utf-8"))
        if size > MAX_MANIFEST_BYTES:
            raise ConceptError(f"{out / MANIFEST}: the manifest would be {size} bytes; at most {MAX_MANIFEST_BYTES} "
                               "(is the training config holding data?)")
        atomic_write_json(tmp / MANIFEST, manifest)
    return Concept.load(out)
