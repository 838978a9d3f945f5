"""Reference concepts: a subject given by photos alone, with no training.

A *reference concept* is a concept bundle (`lrkit.concept/1`) of method `reference`: its only token
is the subject's class word ("vase"), it holds the photos under `refs/` and no weights, so the
personalized model is the base model itself. Every generation mode then works from the photo:

- `dual-reference`: the photo is the customization reference C (DESIGN §6.1: "a concept (or any
  subject photo)"), the style image S gives the look;
- `layout-retouch`: the vanilla layout retouched from the photo, zero-shot (the identity comes
  only from the attention swap of the photo's keys and values, not from fine-tuned weights);
- `personalized` / `vanilla`: the base model's own images, which a test compares with stock
  diffusers.

    lrkit reference --photos photo.jpg --class-word vase --base toy --out my-vase
    lrkit generate --concept my-vase --prompt "a photo of a vase in the snow" \\
        --options.mode dual-reference --options.dual_reference.style_reference style.png

Prompts name the subject by its class word. The bundle records the base model's fingerprint like any
other (the inversion caches are per base model); make one per base.
"""

from __future__ import annotations

import os
from pathlib import Path

from lrkit.concept import Concept, ConceptError, TokenSpec, concept_slug, write_bundle, write_refs
from lrkit.version import __version__

REFERENCE_METHOD = "reference"
MIN_REFERENCE_SIZE = 64


def _photos(photos) -> list:
    """Photos from a folder, one image file, or a list of image files (each decoded and checked)."""
    from lrkit.photos import DataError, Photo, load_images, raise_if_problems, read_image

    if isinstance(photos, (str, os.PathLike)):
        path = Path(photos).expanduser()
        if path.is_dir():
            return load_images(path, min_size=MIN_REFERENCE_SIZE)
        photos = [path]
    files = [Path(p).expanduser() for p in photos]
    if not files:
        raise DataError("reference concept: no photos given; pass a folder or image files (--photos)")
    out, problems = [], []
    for file in files:
        if not file.is_file():
            problems.append(f"{file}: no such file")
            continue
        try:
            out.append(Photo(name=file.name, image=read_image(file, file.name, MIN_REFERENCE_SIZE), path=file))
        except DataError as err:
            problems.append(str(err))
    raise_if_problems(problems, "the reference photos")
    return out


def reference_concept(photos, class_word: str, out_dir: str | os.PathLike, *, base="toy",
                      name: str | None = None, resolution: int | None = None, overwrite: bool = False) -> Concept:
    """Write a reference concept bundle of `photos` (folder, file, or files) showing a `class_word`.

    `base`: the base model it is meant for (id, folder, file, built-in name, or a loaded SD or SDXL
    pipeline), whose fingerprint the bundle records. `resolution`: the generation size the bundle suggests
    (default: 64 for the built-in bases, else the model family's: 512 for SD, 1024 for SDXL). Written atomically.
    """
    from lrkit.families import family_of
    from lrkit.jobs import BUILTIN_RESOLUTION
    from lrkit.models import builtin_kind, fingerprint, load_base

    word = (class_word or "").strip()
    if not word:
        raise ConceptError("reference concept: class_word is empty; name what the photos show, e.g. --class-word vase")
    if "<" in word or ">" in word:
        raise ConceptError(f"reference concept: class_word {class_word!r} must be plain words (prompts name the "
                           "subject by it), not a placeholder token")
    images = _photos(photos)
    pipe = load_base(base) if isinstance(base, (str, os.PathLike)) else base
    if resolution is None:
        builtin = isinstance(base, (str, os.PathLike)) and builtin_kind(str(base))
        resolution = BUILTIN_RESOLUTION if builtin else family_of(pipe).default_resolution
    out = Path(out_dir)
    concept = Concept(
        name=name or concept_slug(out.resolve().name), method=REFERENCE_METHOD, tokens=[TokenSpec(word)], class_word=word,
        base=fingerprint(pipe), resolution=int(resolution), training={"photos": [p.name for p in images]},
        lrkit_version=__version__,
    )

    def write_files(root: Path) -> None:
        concept.refs = write_refs(images, root / "refs")

    return write_bundle(concept, out, write_files, overwrite=overwrite)


def cli(argv: list[str]) -> int:
    """`lrkit reference`: write a reference concept bundle."""
    from lrkit.argparsing import plain_argument_parser

    parser = plain_argument_parser(
        prog="lrkit reference",
        description="Write a reference concept (photos, no training) that lrkit generate uses like any concept: "
                    "dual-reference and layout-retouch take the subject from the photo.",
    )
    parser.add_argument("--photos", nargs="+", required=True, help="a folder of photos, or image files")
    parser.add_argument("--class-word", required=True, help="what the photos show, e.g. vase; prompts use this word")
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument("--base", default="toy",
                        help="base model (SD or SDXL): hub id, folder, .safetensors file, toy, tiny-random, tiny-random-xl")
    parser.add_argument("--resolution", type=int, default=None, help="suggested generation size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    args = parser.parse_args(argv)
    photos = args.photos[0] if len(args.photos) == 1 else args.photos
    concept = reference_concept(photos, args.class_word, args.out, base=args.base, resolution=args.resolution,
                                overwrite=args.overwrite)
    print(f"wrote reference concept {concept.path} ({len(concept.refs)} photo(s), prompts name it {concept.token!r})")
    return 0


__all__ = ["REFERENCE_METHOD", "reference_concept"]
