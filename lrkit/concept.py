"""The concept bundle: the ONLY contract between training and inference (DESIGN.md §3).

A concept is a folder::

    concept.json                       manifest, schema "lrkit.concept/1"
    pytorch_lora_weights.safetensors   LoRA, diffusers layout   -> pipe.load_lora_weights(dir)
    learned_embeds.safetensors         Textual-Inversion tokens -> pipe.load_textual_inversion(file)
    unet/, text_encoder/               full weights (DreamBooth), safetensors
    <name>.kohya.safetensors           the LoRA in kohya / A1111 / ComfyUI layout
    refs/                              the reference photos
    masks/                             subject masks of the refs (PNG)

Training writes bundles with `write_bundle`; inference reads them with `Concept.load` and
`Concept.apply`. Neither side needs the other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from lrkit.io import atomic_dir, atomic_save_png, atomic_write_json
from lrkit.logs import dropped
from lrkit.lora_io import require_text_encoder_lora_support
from lrkit.models import BaseFingerprint, dtype_kwarg, fingerprint, record_base_id

logger = logging.getLogger(__name__)

SCHEMA = "lrkit.concept/1"
MANIFEST = "concept.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
EMBEDDINGS = "learned_embeds.safetensors"
METHODS = ("dreambooth", "lora", "textual_inversion", "pivotal", "concept_em", "reference")
# "reference": photos and a class word, no weights (`lrkit.reference`); its token IS the class word.


def default_adapter_name(name: str) -> str:
    """The peft adapter name `Concept.apply` gives a concept called `name`: the name itself where peft can
    use it, else made usable. peft stores each adapter under its name as a child module, so a name with a dot
    or one that is an `nn.Module` attribute (a concept trained into a folder called `train`, `eval`, `to`)
    fails deep inside `load_lora_weights`: dots become `_`, and such names get `_lora` appended."""
    import torch

    safe = name.replace(".", "_") or "concept"
    return f"{safe}_lora" if hasattr(torch.nn.Module, safe) else safe


class ConceptError(ValueError):
    """A concept bundle is malformed or does not fit the pipeline; the message says why."""


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
            "tokens": [asdict(t) for t in self.tokens],
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
        where = f"{path / MANIFEST}" if path is not None else "manifest"
        if not isinstance(data, dict):
            raise ConceptError(f"{where}: expected a JSON object, got {type(data).__name__}")
        schema = data.get("schema")
        if schema != SCHEMA:
            raise ConceptError(f"{where}: schema {schema!r} is not supported (expected {SCHEMA!r})")
        missing = [k for k in ("name", "method", "tokens", "class_word", "base", "resolution") if k not in data]
        if missing:
            raise ConceptError(f"{where}: missing field(s) {missing}")
        if data["method"] not in METHODS:
            raise ConceptError(f"{where}: method {data['method']!r} is not one of {list(METHODS)}")
        if not data["tokens"]:
            raise ConceptError(f"{where}: 'tokens' is empty; a concept needs at least one token")
        try:
            tokens = [TokenSpec(**t) for t in data["tokens"]]
            lora = LoraSpec(**data["lora"]) if data.get("lora") else None
            base = BaseFingerprint.from_dict(data["base"])
            resolution = int(data["resolution"])
        except (TypeError, KeyError, ValueError) as err:
            raise ConceptError(f"{where}: malformed field ({err})") from err
        names = [t.token for t in tokens]
        if any(not isinstance(n, str) or not n or n != n.strip() for n in names):
            raise ConceptError(f"{where}: every token must be a non-empty word without surrounding spaces, got {names}")
        if len(set(names)) != len(names):
            raise ConceptError(f"{where}: tokens are not unique: {names}")
        return cls(
            name=data["name"], method=data["method"], tokens=tokens, class_word=data["class_word"],
            base=base, resolution=resolution, files=dict(data.get("files", {})),
            refs=list(data.get("refs", [])), masks=dict(data.get("masks", {})), lora=lora,
            training=dict(data.get("training", {})), lrkit_version=data.get("lrkit_version", ""),
            path=path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Concept":
        """Read and validate a bundle: schema, files present, every path inside the folder."""
        root = Path(path).expanduser()
        manifest = root / MANIFEST
        if not root.is_dir():
            raise ConceptError(f"concept folder {str(root)!r} does not exist")
        if not manifest.is_file():
            raise ConceptError(f"{str(root)!r} is not a concept bundle: {MANIFEST} is missing")
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConceptError(f"{manifest}: not valid JSON ({err})") from err
        concept = cls.from_manifest(data, root.resolve())
        concept._validate_paths()
        return concept

    def _validate_paths(self) -> None:
        assert self.path is not None
        root = self.path.resolve()
        rels = list(self.files.values()) + list(self.refs) + list(self.masks.values())
        rels += [t.mask for t in self.tokens if t.mask]
        rels += [m for t in self.tokens for m in t.masks.values()]
        for t in self.tokens:
            unknown = [r for r in t.masks if r not in self.refs]
            if unknown:
                raise ConceptError(f"{root / MANIFEST}: token {t.token!r} has masks for {unknown}, which are not in 'refs'")
        for rel in rels:
            p = Path(rel)
            if p.is_absolute():
                raise ConceptError(f"{root / MANIFEST}: path {rel!r} must be relative to the bundle")
            full = (root / p).resolve()
            if full != root and root not in full.parents:
                raise ConceptError(f"{root / MANIFEST}: path {rel!r} points outside the bundle folder")
            if not full.exists():
                raise ConceptError(f"concept {self.name!r}: file {rel!r} listed in {MANIFEST} is missing")

    # ------------------------------------------------------------------ apply

    def check_base(self, pipe, *, force: bool = False) -> None:
        """Raise unless `pipe` is the base model this concept was trained on (or `force`)."""
        current = fingerprint(pipe)
        if self.base.matches(current):
            return
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

        LoRA goes through `pipe.load_lora_weights`, tokens through `pipe.load_textual_inversion`,
        DreamBooth weights replace `pipe.unet` / `pipe.text_encoder`. The LoRA adapter is called
        `adapter_name`, by default `default_adapter_name(self.name)` (the concept's name, if peft can use it).
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
        if "unet" in self.files or "text_encoder" in self.files:
            self._apply_full_weights(pipe)
        for token, vectors in embeddings.items():
            pipe.load_textual_inversion({token: vectors}, token=token)
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
        """The learned tokens' vectors, `{token: (num_vectors, dim)}`, checked against the manifest and `pipe`."""
        from safetensors.torch import load_file

        rel = self.files["embeddings"]
        state = load_file(str(self.file("embeddings")))
        learned = [t for t in self.tokens if t.learned]
        if not learned:
            raise ConceptError(f"concept {self.name!r} lists {rel} but none of its tokens is marked learned=True")
        vocab = pipe.tokenizer.get_vocab()
        embeddings = {}
        for spec in learned:
            if spec.token not in state:
                raise ConceptError(f"concept {self.name!r}: {rel} has no entry for {spec.token!r}")
            vectors = state[spec.token]
            vectors = vectors.unsqueeze(0) if vectors.ndim == 1 else vectors  # (num_vectors, dim)
            if vectors.ndim != 2 or vectors.shape[0] != spec.num_vectors:
                raise ConceptError(
                    f"concept {self.name!r}: {rel} holds {tuple(vectors.shape)} for {spec.token!r}, but the "
                    f"manifest says {spec.num_vectors} vector(s)"
                )
            if spec.token in vocab:
                raise ConceptError(
                    f"token {spec.token!r} is already in this pipeline's tokenizer (concept applied twice?)"
                )
            embeddings[spec.token] = vectors
        return embeddings

    def _apply_full_weights(self, pipe) -> None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        device, dtype = pipe.unet.device, pipe.unet.dtype
        if "unet" in self.files:
            unet = UNet2DConditionModel.from_pretrained(str(self.file("unet")), **dtype_kwarg(dtype),
                                                        use_safetensors=True)
            # The trained UNet's fingerprint is not the base's; the id names the base and the concept.
            record_base_id(unet, f"{fingerprint(pipe).id}+{self.name}")
            pipe.register_modules(unet=unet.to(device))
        if "text_encoder" in self.files:
            te = CLIPTextModel.from_pretrained(str(self.file("text_encoder")),
                                               **dtype_kwarg(pipe.text_encoder.dtype, "transformers"),
                                               use_safetensors=True)
            pipe.register_modules(text_encoder=te.to(device))


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
    """Write a bundle atomically: `write_files(tmp)` fills a temp folder, the manifest goes last,
    then one rename publishes it. On any error nothing is left under `out_dir`."""
    out = Path(out_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_files(tmp)
        written = Concept.from_manifest(concept.to_manifest(), tmp)
        written._validate_paths()
        atomic_write_json(tmp / MANIFEST, concept.to_manifest())
    return Concept.load(out)
