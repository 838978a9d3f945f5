"""A bundle is data from someone else (docs/security.md): every hostile bundle below is refused with a
`ConceptError` naming the file or field, and nothing on disk changes (the whole surrounding tree is compared
before and after: paths, types, sizes, mtimes, content hashes). Bundles are written file by file from
ingredients made once per module on the `tiny-random` base; nothing trains."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lrkit.concept import (EMBEDDINGS, LORA_WEIGHTS, MANIFEST, Concept, ConceptError, LoraSpec, TokenSpec,
                           check_name, concept_slug, token_clash)
from lrkit.models import fingerprint

KINDS = ("ti", "tis", "lora", "db")


# ------------------------------------------------------------------------------------------- helpers


def tree_state(root: Path) -> dict:
    """Every entry under `root`: (type and mode, size, mtime, sha256 of a regular file's bytes, a link's target)."""
    state = {}
    for path in sorted([root, *root.rglob("*")]):
        info = path.lstat()
        regular = stat.S_ISREG(info.st_mode)
        state[path.relative_to(root).as_posix()] = (
            info.st_mode, info.st_size, info.st_mtime_ns,
            hashlib.sha256(path.read_bytes()).hexdigest() if regular else None,
            os.readlink(path) if stat.S_ISLNK(info.st_mode) else None,
        )
    return state


def png(path: Path, size=(64, 64), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path)
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims `width` x `height` and whose pixel data is a few bytes: decoding it would
    fail, so a refusal that names the pixel budget was made from the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def read_manifest(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def write_manifest(bundle: Path, data: dict) -> None:
    (bundle / MANIFEST).write_text(json.dumps(data))


def edit(bundle: Path, change) -> None:
    data = read_manifest(bundle)
    change(data)
    write_manifest(bundle, data)


def link(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def rewrite_tensors(file: Path, change) -> None:
    """Load a safetensors file, let `change(tensors)` edit it, save it back with its header metadata."""
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata=metadata)


def poison(tensors: dict, value: float = float("nan"), key: str | None = None) -> None:
    key = key or sorted(k for k, v in tensors.items() if v.is_floating_point() and v.numel())[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value


# ------------------------------------------------------------------------------------------- good bundles


@pytest.fixture(scope="module")
def good(tiny_pipe, tmp_path_factory) -> dict[str, Path]:
    """One valid bundle of each kind (Textual Inversion with refs and masks, two learned tokens with a vectors file
    each, LoRA, DreamBooth UNet and text encoder)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("good")
    base = fingerprint(tiny_pipe(0))
    common = dict(class_word="vase", base=base, resolution=64, refs=["refs/00.png"],
                  masks={"refs/00.png": "masks/00.png"})
    concepts = {
        "ti": Concept(name="ti", method="textual_inversion", files={"embeddings": EMBEDDINGS},
                      tokens=[TokenSpec("<sks>", learned=True, num_vectors=2, initializer="vase")], **common),
        "tis": Concept(name="tis", method="concept_em", files={"embeddings": "embeddings"},
                       tokens=[TokenSpec("<a>", learned=True, initializer="vase", embeddings="embeddings/a.safetensors"),
                               TokenSpec("<b>", learned=True, initializer="pot", embeddings="embeddings/b.safetensors")],
                       **common),
        "lora": Concept(name="lora", method="lora", files={"lora": LORA_WEIGHTS}, tokens=[TokenSpec("sks")],
                        lora=LoraSpec(rank=4, alpha=4.0, unet_targets=["to_q", "to_v"]), **common),
        "db": Concept(name="db", method="dreambooth", files={"unet": "unet", "text_encoder": "text_encoder"},
                      tokens=[TokenSpec("sks")], **common),
    }
    bundles = {}
    for kind, concept in concepts.items():
        bundle = root / kind
        png(bundle / "refs" / "00.png")
        png(bundle / "masks" / "00.png", mode="L")
        write_manifest(bundle, concept.to_manifest())
        bundles[kind] = bundle
    save_file({"<sks>": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
              str(bundles["ti"] / EMBEDDINGS))
    (bundles["tis"] / "embeddings").mkdir()
    for i, token in enumerate(("<a>", "<b>")):
        save_file({token: torch.randn(1, 32, generator=torch.Generator().manual_seed(i))},
                  str(bundles["tis"] / "embeddings" / f"{token[1]}.safetensors"))
    pipe = tiny_pipe(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
    StableDiffusionPipeline.save_lora_weights(str(bundles["lora"]),
                                              unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    fresh = tiny_pipe(0)
    fresh.unet.save_pretrained(bundles["db"] / "unet")
    fresh.text_encoder.save_pretrained(bundles["db"] / "text_encoder")
    return bundles


@pytest.fixture
def scene(tmp_path, good):
    """`scene(kind)` -> (bundle, outside): a copy of a good bundle and, beside it, files an attacker would aim
    at (a picture, a safetensors file, a folder, a manifest)."""

    def make(kind: str) -> tuple[Path, Path]:
        bundle = tmp_path / "bundle"
        shutil.copytree(good[kind], bundle)
        outside = tmp_path / "outside"
        png(outside / "secret.png")
        png(outside / "folder" / "00.png")
        save_file({"<sks>": torch.zeros(2, 32)}, str(outside / "weights.safetensors"))
        shutil.copy(bundle / MANIFEST, outside / MANIFEST)
        (outside / "notes.txt").write_text("mine")
        return bundle, outside

    return make


@pytest.mark.parametrize("kind", KINDS)
def test_the_good_bundles_load_and_apply(kind, scene, tmp_path, tiny_pipe):
    """The control: each hostile case below differs from one of these by the change it names."""
    bundle, _ = scene(kind)
    before = tree_state(tmp_path)
    Concept.load(bundle).apply(tiny_pipe(0))
    assert tree_state(tmp_path) == before


# ------------------------------------------------------------------------ refused by Concept.load


def _relative_escape(bundle, outside):
    edit(bundle, lambda d: d.update(refs=["../outside/secret.png"], masks={}))


def _absolute(bundle, outside):
    edit(bundle, lambda d: d["files"].update(embeddings=str(outside / "weights.safetensors")))


def _deep_json(depth):
    def change(bundle, outside):
        data = read_manifest(bundle)
        text = json.dumps(data)[:-1] + ', "training": ' + "[" * depth + "]" * depth + "}"
        (bundle / MANIFEST).write_text(text)
    return change


def _raw(replace: str, by: str):
    def change(bundle, outside):
        text = (bundle / MANIFEST).read_text()
        assert replace in text
        (bundle / MANIFEST).write_bytes(text.replace(replace, by, 1).encode("utf-8", "surrogateescape"))
    return change


def _field(**values):
    return lambda bundle, outside: edit(bundle, lambda d: d.update(values))


def _nested(key, **values):
    return lambda bundle, outside: edit(bundle, lambda d: d[key].update(values))


def _token(**values):
    return lambda bundle, outside: edit(bundle, lambda d: d["tokens"][0].update(values))


def _add_file(rel, writer=lambda p: p.write_bytes(b"x")):
    def change(bundle, outside):
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        writer(bundle / rel)
    return change


def _rename_weights(old, new, key):
    def change(bundle, outside):
        torch.save({"w": torch.zeros(1)}, bundle / new)  # a real pickle
        (bundle / old).unlink()
        edit(bundle, lambda d: d["files"].update({key: new}))
    return change


def _mkfifo(rel):
    return lambda bundle, outside: os.mkfifo(bundle / rel)


def _both(*changes):
    def change(bundle, outside):
        for c in changes:
            c(bundle, outside)
    return change


# id -> (kind of good bundle, change(bundle, outside), regex the message matches)
LOAD_CASES = {
    # every file a bundle names or holds stays inside it, symlinks resolved
    "refs entry links outside": ("ti", lambda b, o: link(b / "refs/00.png", o / "secret.png"), "points outside"),
    "masks entry links outside": ("ti", lambda b, o: link(b / "masks/00.png", o / "secret.png"), "points outside"),
    "refs folder links outside": ("ti", lambda b, o: (link(b / "refs", o / "folder")), "points outside"),
    "masks folder links outside": ("lora", lambda b, o: link(b / "masks", o / "folder"), "points outside"),
    "embeddings link outside": ("ti", lambda b, o: link(b / EMBEDDINGS, o / "weights.safetensors"), "points outside"),
    "unet weights link outside": ("db", lambda b, o: link(b / "unet/diffusion_pytorch_model.safetensors",
                                                          o / "weights.safetensors"),
                                  r"unet/diffusion_pytorch.*outside"),
    "unet folder links outside": ("db", lambda b, o: link(b / "unet", o / "folder"), "points outside"),
    "unet holds a link outside": ("db", lambda b, o: link(b / "unet/extra", o / "folder"), r"unet/extra.*outside"),
    "unlisted file links outside": ("lora", lambda b, o: link(b / "README.md", o / "notes.txt"),
                                    r"README\.md.*outside"),
    "manifest links outside": ("ti", lambda b, o: link(b / MANIFEST, o / MANIFEST), r"concept\.json.*outside"),
    "relative path escapes": ("ti", _relative_escape, r"'\.\./outside/secret\.png' points outside"),
    "absolute path": ("ti", _absolute, "must be relative to the bundle"),
    "token mask escapes": ("ti", _token(mask="../outside/secret.png"), "points outside"),
    "symlink loop": ("ti", lambda b, o: (link(b / "refs/a.png", b / "refs/b.png"),
                                         link(b / "refs/b.png", b / "refs/a.png")),
                     r"refs/[ab]\.png: cannot be resolved .*symlink loop"),
    "fifo in the bundle": ("lora", _mkfifo("refs/pipe.png"), r"refs/pipe\.png: a FIFO"),
    "fifo as the manifest": ("lora", lambda b, o: ((b / MANIFEST).unlink(), os.mkfifo(b / MANIFEST)),
                             r"concept\.json: not a regular file"),
    # a token's own vectors file: inside the embeddings folder, one token each, safetensors
    "token file escapes": ("tis", _token(embeddings="../outside/weights.safetensors"), "points outside"),
    "token file links outside": ("tis", lambda b, o: link(b / "embeddings/a.safetensors", o / "weights.safetensors"),
                                 r"'embeddings/a\.safetensors' points outside"),
    "token file outside its folder": ("tis", _both(_add_file("x.safetensors", lambda p: save_file({}, str(p))),
                                                   _token(embeddings="x.safetensors")),
                                      r"'tokens\[0\]\.embeddings' 'x\.safetensors' is not a file inside "
                                      r"files\.embeddings 'embeddings'"),
    "token file a folder": ("tis", _both(_add_file("embeddings/sub/c.safetensors", lambda p: save_file({}, str(p))),
                                         _token(embeddings="embeddings/sub")), "is not a file inside"),
    "two tokens one file": ("tis", lambda b, o: edit(b, lambda d: d["tokens"][1].update(
        embeddings="embeddings/a.safetensors")), "tokens '<a>' and '<b>' name the same embeddings file"),
    "learned token without its file": ("tis", _token(embeddings=None),
                                       r"learned token '<a>' \(tokens\[0\]\) names no file in it"),
    "token file on a word not learned": ("tis", _token(learned=False),
                                         r"'tokens\[0\]\.embeddings' is set, but it is not a learned token"),
    "token file beside one shared file": ("ti", _token(embeddings=EMBEDDINGS),
                                          "is set, but files.embeddings is not a folder"),
    "token file a pickle": ("tis", _both(_add_file("embeddings/a.pt", lambda p: torch.save({}, p)),
                                         _token(embeddings="embeddings/a.pt")), r"embeddings/a\.pt: \.pt weights are pickles"),
    "token file a number": ("tis", _token(embeddings=5), r"'tokens\[0\]\.embeddings' must be a string"),
    # the name is a slug
    "name ../../x": ("ti", _field(name="../../x"), r"'name' '\.\./\.\./x' is not a concept name"),
    "name with a slash": ("ti", _field(name="a/b"), "'name' 'a/b' is not a concept name.*'a-b'"),
    "name hidden": ("ti", _field(name=".vase"), "'name' '.vase' is not a concept name"),
    "name with spaces": ("ti", _field(name="my vase"), "'name' 'my vase' is not a concept name.*'my-vase'"),
    "name too long": ("ti", _field(name="x" * 101), "is not a concept name"),
    "name a number": ("ti", _field(name=5), "'name' 5 is not a concept name"),
    # weights are safetensors only
    "lora listed as .bin": ("lora", _rename_weights(LORA_WEIGHTS, "pytorch_lora_weights.bin", "lora"),
                            r"files\.lora is 'pytorch_lora_weights\.bin', a pickle \(\.bin\)"),
    "embeddings listed as .pt": ("ti", _rename_weights(EMBEDDINGS, "learned_embeds.pt", "embeddings"),
                                 r"a pickle \(\.pt\)"),
    "extra file listed as .ckpt": ("ti", _both(_add_file("model.ckpt"), _nested("files", extra="model.ckpt")),
                                   r"files\.extra is 'model\.ckpt', a pickle"),
    "lora listed as .pth": ("lora", _rename_weights(LORA_WEIGHTS, "lora.pth", "lora"), r"a pickle \(\.pth\)"),
    "weights listed as text": ("lora", _both(_add_file("w.txt"), _nested("files", lora="w.txt")),
                               r"files\.lora is 'w\.txt'; weights are read only as \.safetensors"),
    ".bin inside unet": ("db", _add_file("unet/diffusion_pytorch_model.bin", lambda p: torch.save({}, p)),
                         r"unet/diffusion_pytorch_model\.bin: \.bin weights are pickles"),
    ".ckpt inside unet": ("db", _add_file("unet/sub/model.ckpt"), r"unet/sub/model\.ckpt: \.ckpt weights are pickles"),
    "other file inside unet": ("db", _add_file("unet/model.onnx"), r"unet/model\.onnx: a model folder holds only"),
    ".pth inside text_encoder": ("db", _add_file("text_encoder/pytorch_model.pth"),
                                 r"text_encoder/pytorch_model\.pth: \.pth weights are pickles"),
    "text_encoder weights link outside": ("db", lambda b, o: link(b / "text_encoder/model.safetensors",
                                                                  o / "weights.safetensors"),
                                          r"text_encoder/model\.safetensors: a symlink that points outside"),
    # the manifest, field by field
    "resolution negative": ("ti", _field(resolution=-64), "'resolution' must be between 8 and 8192, got -64"),
    "resolution huge": ("ti", _field(resolution=10**30), "'resolution' must be between 8 and 8192, got a 31-digit"),
    "resolution not a multiple of 8": ("ti", _field(resolution=100), "'resolution' must be a multiple of 8"),
    "resolution a string": ("ti", _field(resolution="512"), "'resolution' must be a whole number, got str"),
    "resolution a float": ("ti", _field(resolution=512.0), "'resolution' must be a whole number, got float"),
    "resolution true": ("ti", _field(resolution=True), "'resolution' must be a whole number, got bool"),
    "resolution overflows a float": ("ti", _raw('"resolution": 64', '"resolution": 1e400'), "'resolution' is inf"),
    "class_word null": ("ti", _field(class_word=None), "'class_word' must be a string, got NoneType"),
    "class_word a list": ("ti", _field(class_word=["vase"]), "'class_word' must be a string, got list"),
    "class_word with a newline": ("ti", _field(class_word="va\nse"), "'class_word' .* holds control characters"),
    "class_word too long": ("ti", _field(class_word="v" * 101), "'class_word' is 101 characters long"),
    "tokens a string": ("ti", _field(tokens="<sks>"), "'tokens' must be a list"),
    "token a number": ("ti", _field(tokens=[5]), r"'tokens\[0\]' must be an object, got int"),
    "token name a number": ("ti", _token(token=5), r"'tokens\[0\]\.token' must be a string"),
    "token with a space": ("lora", _token(token="s ks"), r"'tokens\[0\]\.token' 's ks' holds whitespace.*'s-ks'"),
    "token with a tab": ("ti", _token(token="<s\tks>"), r"'tokens\[0\]\.token' .* holds control characters"),
    "learned token is the class word": ("ti", _token(token="vase"), "learned token 'vase' is the class word"),
    "learned token is its own class word": ("ti", _token(class_word="<sks>"),
                                            "learned token '<sks>' is the class word"),
    "token too long": ("lora", _token(token="s" * 101), r"'tokens\[0\]\.token' is 101 characters long"),
    "num_vectors zero": ("ti", _token(num_vectors=0), r"'tokens\[0\]\.num_vectors' must be between 1 and 75, got 0"),
    "num_vectors huge": ("ti", _token(num_vectors=10**40), r"'tokens\[0\]\.num_vectors' must be between 1 and 75"),
    "num_vectors a string": ("ti", _token(num_vectors="2"), r"'tokens\[0\]\.num_vectors' must be a whole number"),
    "learned not a bool": ("ti", _token(learned="yes"), r"'tokens\[0\]\.learned' must be true or false"),
    "token unknown field": ("ti", _token(evil=1), r"'tokens\[0\]' has unknown field\(s\) \['evil'\]"),
    "token masks a list": ("ti", _token(masks=["x"]), r"'tokens\[0\]\.masks' must be an object"),
    "lora rank a string": ("lora", _nested("lora", rank="x"), "'lora.rank' must be a whole number, got str 'x'"),
    "lora rank zero": ("lora", _nested("lora", rank=0), "'lora.rank' must be between 1 and 4096, got 0"),
    "lora alpha NaN": ("lora", _raw('"alpha": 4.0', '"alpha": NaN'), "not valid JSON .*NaN is not a JSON number"),
    "lora alpha infinite": ("lora", _raw('"alpha": 4.0', '"alpha": 1e999'),
                            "'lora.alpha' is inf; every number must be finite"),
    "lora alpha zero": ("lora", _nested("lora", alpha=0), "'lora.alpha' must be > 0"),
    "lora alpha a string": ("lora", _nested("lora", alpha="4"), "'lora.alpha' must be a number, got str"),
    "lora dropout 1": ("lora", _nested("lora", dropout=1.0), r"'lora\.dropout' must be in \[0, 1\)"),
    "lora targets a string": ("lora", _nested("lora", unet_targets="to_q"),
                              "'lora.unet_targets' must be a list of strings"),
    "lora target a number": ("lora", _nested("lora", unet_targets=[1]), r"'lora\.unet_targets\[0\]' must be a string"),
    "lora unknown field": ("lora", _nested("lora", hook="x"), r"'lora' has unknown field\(s\) \['hook'\]"),
    "lora a list": ("lora", _field(lora=[4]), "'lora' must be an object, got list"),
    "base a string": ("ti", _field(base="tiny-random"), "'base' must be an object, got str"),
    "base id a number": ("ti", _nested("base", id=5), "'base.id' must be a string"),
    "base probe strings": ("ti", _nested("base", weight_probe=["x"]), r"'base\.weight_probe\[0\]' must be a number"),
    "files a list": ("ti", _field(files=[EMBEDDINGS]), "'files' must be an object of relative paths, got list"),
    "files entry a number": ("ti", _nested("files", embeddings=5), "'files.embeddings' must be a string"),
    "files entry with NUL": ("ti", _nested("files", embeddings="learned\x00.safetensors"), "holds control characters"),
    "refs a string": ("ti", _field(refs="refs/00.png"), "'refs' must be a list of strings, got str"),
    "masks a list": ("ti", _field(masks=["masks/00.png"]), "'masks' must be an object of relative paths"),
    "training a list": ("ti", _field(training=[1]), "'training' must be an object"),
    "lrkit_version a number": ("ti", _field(lrkit_version=1), "'lrkit_version' must be a string"),
    "method a list": ("ti", _field(method=["lora"]), r"method \['lora'\] is not one of"),
    "schema an object": ("ti", _field(schema={}), "schema {} is not supported"),
    "manifest a list": ("ti", lambda b, o: (b / MANIFEST).write_text("[]"), "expected a JSON object, got list"),
    # JSON size and depth
    "JSON nested 40 deep": ("ti", _deep_json(40), r"'training\[0\](\[0\])*' is nested deeper than 32 levels"),
    "JSON nested 100000 deep": ("ti", _deep_json(100_000), "nested deeper than 32 levels"),
    "JSON over 1 MiB": ("ti", _field(training={"pad": "x" * (1 << 20)}), r"bytes; a manifest is at most 1048576"),
    "JSON integer of 5000 digits": ("ti", _raw('"resolution": 64', '"resolution": ' + "9" * 5000), "not valid JSON"),
    "JSON not UTF-8": ("ti", _raw('"vase"', '"\udcff\udcfe"'), "not valid JSON"),
    # pictures: headers within the pixel budget
    "ref header of 50 megapixels": ("ti", lambda b, o: png_header(b / "refs/00.png", 10000, 5000),
                                    r"refs/00\.png: 10000x5000 px \(50\.0 megapixels\) is over the budget of 40 "
                                    r"megapixels .*LRKIT_MAX_PIXELS"),
    "mask header of 900 megapixels": ("ti", lambda b, o: png_header(b / "masks/00.png", 30000, 30000),
                                      r"masks/00\.png: too many pixels .*LRKIT_MAX_PIXELS"),
    "ref not an image": ("lora", lambda b, o: (b / "refs/00.png").write_text("hello"),
                         r"refs/00\.png: not a readable image"),
    "mask a folder": ("ti", lambda b, o: ((b / "masks/00.png").unlink(), (b / "masks/00.png").mkdir()),
                      r"masks/00\.png: not a regular file"),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_a_hostile_bundle_is_refused_at_load_and_nothing_changes(case, scene, tmp_path):
    kind, change, match = LOAD_CASES[case]
    bundle, outside = scene(kind)
    change(bundle, outside)
    before = tree_state(tmp_path)
    with pytest.raises(ConceptError, match=match) as err:
        Concept.load(bundle)
    assert type(err.value) is ConceptError
    assert "\n" not in str(err.value)
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("field", ["resolution", "tokens", "class_word", "base"])
def test_field_errors_name_the_manifest_file_and_the_field(field, scene):
    bundle, _ = scene("lora")
    edit(bundle, lambda d: d.update({field: None}))
    with pytest.raises(ConceptError) as err:
        Concept.load(bundle)
    assert str(err.value).startswith(f"{bundle.resolve() / MANIFEST}: '{field}' must be")


def test_pixel_budget_of_bundle_pictures_follows_LRKIT_MAX_PIXELS(scene, monkeypatch):
    bundle, _ = scene("ti")
    monkeypatch.setenv("LRKIT_MAX_PIXELS", "4000")  # the 64x64 ref holds 4096
    with pytest.raises(ConceptError, match=r"refs/00\.png: 64x64 px .* budget of 0\.004 megapixels"):
        Concept.load(bundle)
    monkeypatch.setenv("LRKIT_MAX_PIXELS", "4096")
    Concept.load(bundle)


# ------------------------------------------------------------------------ refused by Concept.apply


def _weights(rel, change):
    return lambda bundle: rewrite_tensors(bundle / rel, change)


def _bytes(rel, change):
    return lambda bundle: (bundle / rel).write_bytes(change((bundle / rel).read_bytes()))


def _ti_token(token):
    def change(bundle):
        edit(bundle, lambda d: d["tokens"][0].update(token=token))
        rewrite_tensors(bundle / EMBEDDINGS, lambda t: t.update({token: t.pop("<sks>")}))
    return change


def _config(folder, **values):
    def change(bundle):
        config = json.loads((bundle / folder / "config.json").read_text())
        config.update(values)
        (bundle / folder / "config.json").write_text(json.dumps(config))
    return change


UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def _last_lora_b(tensors: dict) -> str:
    return sorted(k for k in tensors if "lora_B" in k)[-1]

# id -> (kind, change(bundle), regex)
APPLY_CASES = {
    "embeddings NaN": ("ti", _weights(EMBEDDINGS, poison), r"learned_embeds\.safetensors: tensor '<sks>' holds NaN"),
    "embeddings Inf": ("ti", _weights(EMBEDDINGS, lambda t: poison(t, float("inf"))),
                       "tensor '<sks>' holds NaN or infinite"),
    "token file NaN": ("tis", _weights("embeddings/b.safetensors", poison),
                       r"embeddings/b\.safetensors: tensor '<b>' holds NaN"),
    "token file without its token": ("tis", _weights("embeddings/b.safetensors", lambda t: t.update({"<c>": t.pop("<b>")})),
                                     r"embeddings/b\.safetensors: no entry '<b>' for token '<b>'"),
    "lora NaN": ("lora", _weights(LORA_WEIGHTS, poison),
                 r"pytorch_lora_weights\.safetensors: tensor '.*lora.*' holds NaN"),
    "lora Inf in lora_B": ("lora", _weights(LORA_WEIGHTS, lambda t: poison(t, -float("inf"), _last_lora_b(t))),
                           r"tensor '.*lora_B.*' holds NaN or infinite"),
    "unet NaN": ("db", _weights(UNET_FILE, poison), r"unet: tensor '.*' holds NaN"),
    "embeddings header corrupt": ("ti", _bytes(EMBEDDINGS, lambda b: b"\xff" * 8 + b"junk"),
                                  r"learned_embeds\.safetensors: not a readable safetensors file"),
    "embeddings truncated": ("ti", _bytes(EMBEDDINGS, lambda b: b[: len(b) // 2]), "not a readable safetensors file"),
    "embeddings empty": ("ti", _bytes(EMBEDDINGS, lambda b: b""), "not a readable safetensors file"),
    "lora header corrupt": ("lora", _bytes(LORA_WEIGHTS, lambda b: b[:8] + b"{not json" + b[17:]),
                            r"pytorch_lora_weights\.safetensors: not a readable safetensors file"),
    "lora truncated": ("lora", _bytes(LORA_WEIGHTS, lambda b: b[:-100]), "not a readable safetensors file"),
    "unet truncated": ("db", _bytes(UNET_FILE, lambda b: b[: len(b) // 2]),
                       r"diffusion_pytorch_model\.safetensors: not a readable safetensors file"),
    "unet config of another size": ("db", _config("unet", block_out_channels=[4096, 4096]),
                                    r"unet/config\.json: the unet differs .*'block_out_channels'"),
    "text encoder config of another size": ("db", _config("text_encoder", num_hidden_layers=48),
                                            r"text_encoder/config\.json: the text_encoder differs .*num_hidden_layers"),
    "text encoder Inf": ("db", _weights("text_encoder/model.safetensors", lambda t: poison(t, float("inf"))),
                         r"text_encoder: tensor '.*' holds NaN or infinite"),
    "unet config not JSON": ("db", lambda b: (b / "unet/config.json").write_text("{"),
                             r"unet/config\.json: not valid JSON"),
    "embeddings of another width": ("ti", _weights(EMBEDDINGS, lambda t: t.update({"<sks>": torch.zeros(2, 16)})),
                                    "16-wide vectors, but this pipeline's text encoder is 32 wide"),
    "embeddings not floats": ("ti", _weights(EMBEDDINGS, lambda t: t.update({"<sks>": torch.zeros(2, 32).int()})),
                              "torch.int32 tensor"),
    # a learned token must be new to the tokenizer in every form
    "token teapot (teapot</w>)": ("ti", _ti_token("teapot"),
                                  r"token 'teapot' is a word the tokenizer knows \(as 'teapot</w>'\)"),
    "token Teapot (lower-cased)": ("ti", _ti_token("Teapot"), "token 'Teapot' is a word the tokenizer knows"),
    "token a, a vocabulary entry": ("ti", _ti_token("a"), "token 'a' is already in the tokenizer"),
    "token holds a special token": ("ti", _ti_token("x<|endoftext|>"),
                                    "contains the tokenizer's special token '<|endoftext|>'"),
}


@pytest.mark.parametrize("case", list(APPLY_CASES))
def test_hostile_weights_are_refused_at_apply_and_the_pipeline_is_unchanged(case, scene, tmp_path, tiny_pipe):
    kind, change, match = APPLY_CASES[case]
    bundle, _ = scene(kind)
    change(bundle)
    concept = Concept.load(bundle)  # the manifest is fine; the weights are not
    pipe = tiny_pipe(0)
    vocab, unet, text_encoder = len(pipe.tokenizer), pipe.unet, pipe.text_encoder
    before = tree_state(tmp_path)
    with pytest.raises(ConceptError, match=match) as err:
        concept.apply(pipe)
    assert type(err.value) is ConceptError
    assert "\n" not in str(err.value)
    assert len(pipe.tokenizer) == vocab and pipe.unet is unet and pipe.text_encoder is text_encoder
    assert not getattr(pipe.unet, "peft_config", None)
    assert tree_state(tmp_path) == before


def test_the_names_of_extra_vectors_must_be_new_too(scene, tiny_pipe):
    """diffusers registers `<t>_1`, ... for the extra vectors; those names must be new too."""
    bundle, _ = scene("ti")
    pipe = tiny_pipe(0)
    pipe.tokenizer.add_tokens(["<sks>_1"])
    with pytest.raises(ConceptError, match="token '<sks>_1' is already in the tokenizer"):
        Concept.load(bundle).apply(pipe)
    assert "<sks>" not in pipe.tokenizer.get_vocab()


@pytest.mark.parametrize(("token", "clash"), [
    ("teapot", "as 'teapot</w>'"), ("TEAPOT", "as 'teapot</w>'"), ("vase", "as 'vase</w>'"),
    ("<|endoftext|>", "already in the tokenizer"), ("a b", "not one whitespace-free word"), ("", "not one"),
    ("<sks>", None), ("<teapot>", None), ("sksvase", None),
])
def test_token_clash_checks_every_form_the_tokenizer_matches(token, clash, tiny_pipe):
    why = token_clash(tiny_pipe(0).tokenizer, token)
    assert why is None if clash is None else clash in why


def test_training_refuses_a_token_that_shadows_a_word(tiny_pipe):
    from lrkit.training.tokens import add_new_tokens

    pipe = tiny_pipe(0)
    for token in ("teapot", "Teapot", "a b"):
        with pytest.raises(ValueError, match=f"token '{token}' .*data.token"):
            add_new_tokens(pipe.tokenizer, pipe.text_encoder, [(token, 1, "pot")])
    add_new_tokens(pipe.tokenizer, pipe.text_encoder, [("<teapot>", 2, "pot")])
    assert "<teapot>_1" in pipe.tokenizer.get_vocab()


# ------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("text", ["my vase", "Müller's ..vase..", "..", "", "-x-", "a/b", "x" * 300, "日本", "./"])
def test_concept_slug_always_gives_a_valid_name(text):
    assert check_name(concept_slug(text)) == concept_slug(text)


@pytest.mark.parametrize("name", ["vase", "my-dog_2", "v1.5", "_x", "A" * 100])
def test_valid_names_pass(name):
    assert check_name(name) == name


def test_write_bundle_refuses_a_bad_name_before_writing_any_file(tmp_path):
    from lrkit.concept import write_bundle
    from lrkit.models import BaseFingerprint

    concept = Concept(name="../../escaped", method="lora", tokens=[TokenSpec("sks")], class_word="vase",
                      base=BaseFingerprint(id="x", unet_config_sha256="ab" * 32), resolution=64)
    called = []
    with pytest.raises(ConceptError, match="'name' '../../escaped' is not a concept name"):
        write_bundle(concept, tmp_path / "out" / "concept", lambda d: called.append(d))
    assert called == [] and sorted(tmp_path.rglob("*")) == []
