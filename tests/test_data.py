"""Tests for lrkit.training.data: loading photos, training samples, class images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lrkit.photos import IMAGE_SUFFIXES, DataError, Photo, load_images
from lrkit.training.data import PhotoDataset, ensure_class_images, format_caption, sample_seed, validate_caption_template

REPO = Path(__file__).resolve().parents[1]
EXIF_ORIENTATION = 0x0112


def gradient(width: int, height: int) -> Image.Image:
    """An RGB image whose pixels differ everywhere: red grows with x, green with y."""
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, 90)], axis=-1).round().astype(np.uint8)
    return Image.fromarray(rgb)


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def photo_folder(tmp_path: Path, sizes=((96, 80), (80, 120), (100, 100))) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for k, (w, h) in enumerate(sizes):
        gradient(w, h).save(folder / f"{k:02d}.png")
    return folder


# --------------------------------------------------------------------------- load_images: formats


def test_folder_loads_sorted_images_and_ignores_other_files(tmp_path):
    folder = photo_folder(tmp_path)
    (folder / "notes.md").write_text("not a photo")
    (folder / "._00.png").write_bytes(b"macOS resource fork")  # hidden: skipped, not an error
    gradient(70, 70).save(folder / "03.JPG")  # upper-case suffix counts
    photos = load_images(folder)
    assert [p.name for p in photos] == ["00.png", "01.png", "02.png", "03.JPG"]
    assert [p.image.size for p in photos] == [(96, 80), (80, 120), (100, 100), (70, 70)]
    assert all(p.image.mode == "RGB" for p in photos)
    assert photos[1].path == folder / "01.png"
    assert all(p.caption is None for p in photos)


def test_exif_orientation_is_applied(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    source = gradient(120, 80)  # landscape; stored pixels are "sideways" per orientation 6
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # display rotated 90 degrees clockwise
    (folder / "rotated.jpg").write_bytes(jpeg_bytes(source, exif=exif.tobytes()))
    (photo,) = load_images(folder)
    assert photo.image.size == (80, 120)  # portrait after rotation
    expected = np.asarray(source.transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    got = np.asarray(photo.image, dtype=np.int16)
    assert np.abs(got - expected).mean() < 3  # JPEG noise only
    # Top-left of the displayed photo is the stored bottom-left: red 0, green 255.
    r, g, _ = photo.image.getpixel((2, 2))
    assert r < 20 and g > 235


def test_rgba_and_palette_transparency_composite_over_white(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 0), (0, 0, 255, 128))  # half-transparent blue
    rgba.save(folder / "a_rgba.png")
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.info["transparency"] = 0  # palette entry 0 (black) is transparent
    palette.save(folder / "b_palette.png", transparency=0)
    la = Image.new("LA", (64, 64), (10, 0))  # fully transparent dark grey
    la.save(folder / "c_la.png")

    a, b, c = load_images(folder)
    assert a.image.mode == "RGB"
    assert a.image.getpixel((0, 0)) == (255, 255, 255)
    assert a.image.getpixel((5, 5)) == (255, 0, 0)
    half = a.image.getpixel((1, 0))
    assert abs(half[0] - 127) <= 2 and abs(half[2] - 255) <= 1  # blue over white, half-way
    assert b.image.getpixel((0, 0)) == (255, 255, 255)
    assert b.image.getpixel((3, 3)) == (0, 200, 0)
    assert c.image.getpixel((3, 3)) == (255, 255, 255)


def test_grayscale_16bit_and_cmyk_become_rgb(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("L", (64, 64), 77).save(folder / "a_gray.png")
    sixteen = np.full((64, 64), 65535, dtype=np.uint16)
    sixteen[0, 0] = 0
    sixteen[0, 1] = 32896  # 128 * 257
    Image.fromarray(sixteen).save(folder / "b_16bit.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(folder / "c_cmyk.jpg", quality=100)

    gray, deep, cmyk = load_images(folder)
    assert Image.open(folder / "b_16bit.png").mode in ("I;16", "I")  # really a 16-bit file
    assert gray.image.mode == deep.image.mode == cmyk.image.mode == "RGB"
    assert gray.image.getpixel((5, 5)) == (77, 77, 77)
    assert deep.image.getpixel((5, 5)) == (255, 255, 255)  # scaled, not clipped garbage
    assert deep.image.getpixel((0, 0)) == (0, 0, 0)
    assert deep.image.getpixel((1, 0)) == (128, 128, 128)
    r, g, b = cmyk.image.getpixel((5, 5))
    assert r > 240 and g < 15 and b < 15  # CMYK (0, 100%, 100%, 0) is red


def test_webp_loads(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    gradient(80, 64).save(folder / "a.webp", lossless=True)
    (photo,) = load_images(folder)
    assert photo.image.size == (80, 64)
    assert photo.image.getpixel((79, 63)) == gradient(80, 64).getpixel((79, 63))


def test_caption_files_next_to_photos(tmp_path):
    folder = photo_folder(tmp_path)
    (folder / "00.txt").write_text("  a photo of {token} {class} on a beach \n", encoding="utf-8")
    (folder / "02.txt").write_text("\ufeffsks dog asleep", encoding="utf-8")  # BOM is dropped
    photos = load_images(folder)
    assert [p.caption for p in photos] == ["a photo of {token} {class} on a beach", None, "sks dog asleep"]


# --------------------------------------------------------------------------- load_images: errors


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does_not_exist.*does not exist"):
        load_images(tmp_path / "does_not_exist")


def test_folder_without_images(tmp_path):
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match=r"no \.jpg/\.jpeg/\.png/\.webp images in .*empty_folder"):
        load_images(folder)


def test_folder_with_images_only_in_subfolders_says_so(tmp_path):
    folder = tmp_path / "outer"
    (folder / "inner").mkdir(parents=True)
    gradient(64, 64).save(folder / "inner" / "a.png")
    with pytest.raises(DataError, match="subfolders are not searched.*inner/"):
        load_images(folder)


def test_truncated_jpeg_names_the_file(tmp_path):
    folder = photo_folder(tmp_path)
    data = jpeg_bytes(gradient(200, 200))
    (folder / "cut_short.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut_short\.jpg: not a readable image"):
        load_images(folder)


def test_text_file_named_png_names_the_file(tmp_path):
    folder = photo_folder(tmp_path)
    (folder / "actually_text.png").write_text("this is not a PNG")
    with pytest.raises(DataError, match=r"actually_text\.png: not a readable image"):
        load_images(folder)


def test_too_small_image_names_file_size_and_min(tmp_path):
    folder = photo_folder(tmp_path)
    gradient(16, 16).save(folder / "tiny.png")
    with pytest.raises(DataError, match=r"tiny\.png: 16x16 px is smaller than min_size=64"):
        load_images(folder)
    assert len(load_images(folder, min_size=16)) == 4


def test_all_bad_files_reported_in_one_error(tmp_path):
    folder = photo_folder(tmp_path)
    data = jpeg_bytes(gradient(200, 200))
    (folder / "bad_a.jpg").write_bytes(data[:300])
    (folder / "bad_b.png").write_text("nope")
    gradient(20, 200).save(folder / "bad_c.png")
    with pytest.raises(DataError) as info:
        load_images(folder)
    message = str(info.value)
    assert message.startswith("3 unusable image(s)")
    for name in ("bad_a.jpg", "bad_b.png", "bad_c.png: 20x200"):
        assert name in message
    for good in ("00.png", "01.png", "02.png"):
        assert good not in message


def png_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims `width` x `height` but whose pixel data is a few bytes: decoding it fails, so
    an error naming the pixel budget came from the header alone."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def test_pixel_budget_is_checked_from_the_header_before_decoding(tmp_path):
    folder = photo_folder(tmp_path)
    png_claiming(folder / "huge.png", 10000, 5000)  # 50 MP: over the 40 MP default, under PIL's own limits
    png_claiming(folder / "bomb.png", 30000, 30000)  # 900 MP: PIL itself refuses it from the header
    with pytest.raises(DataError) as info:
        load_images(folder)
    message = str(info.value)
    assert message.startswith("2 unusable image(s)")
    assert "huge.png: 10000x5000 px (50.0 megapixels) is over the budget of 40 megapixels" in message
    assert "bomb.png: too many pixels" in message and message.count("LRKIT_MAX_PIXELS") == 2


def test_pixel_budget_comes_from_the_argument_or_LRKIT_MAX_PIXELS(tmp_path, monkeypatch):
    folder = photo_folder(tmp_path)  # the largest photo is 100x100
    with pytest.raises(DataError, match=r"02\.png: 100x100 px .* budget of 0\.009 megapixels"):
        load_images(folder, max_pixels=9_000)
    assert len(load_images(folder, max_pixels=10_000)) == 3
    monkeypatch.setenv("LRKIT_MAX_PIXELS", "9000")
    with pytest.raises(DataError, match=r"02\.png: 100x100 px"):
        load_images(folder)
    monkeypatch.setenv("LRKIT_MAX_PIXELS", "40 MP")
    with pytest.raises(DataError, match="LRKIT_MAX_PIXELS='40 MP' is not a whole number of pixels"):
        load_images(folder)
    with pytest.raises(DataError, match="max_pixels must be a positive number"):
        load_images(folder, max_pixels=0)


def test_entries_named_like_photos_that_are_no_files_are_reported_by_name_and_reason(tmp_path):
    import os

    folder = photo_folder(tmp_path)
    (folder / "album.jpg").mkdir()
    os.symlink(folder / "loop_b.png", folder / "loop_a.png")
    os.symlink(folder / "loop_a.png", folder / "loop_b.png")
    os.symlink(tmp_path / "gone.jpg", folder / "dangling.jpg")
    os.mkfifo(folder / "pipe.webp")
    with pytest.raises(DataError) as info:
        load_images(folder)
    message = str(info.value)
    assert message.startswith("5 unusable image(s)")
    for expected in ("album.jpg: a folder, not an image", "loop_a.png: a symlink loop", "loop_b.png: a symlink loop",
                     "dangling.jpg: a symlink to", "pipe.webp: a FIFO, not an image file"):
        assert expected in message
    for good in ("00.png", "01.png", "02.png"):
        assert good not in message


def test_image_files_warns_about_each_entry_it_skips(tmp_path, caplog):
    from lrkit.photos import image_files

    folder = photo_folder(tmp_path)
    (folder / "album.jpg").mkdir()
    with caplog.at_level("WARNING", logger="lrkit.photos"):
        files = image_files(folder)
    assert [f.name for f in files] == ["00.png", "01.png", "02.png"]
    assert "album.jpg: a folder, not an image" in caplog.text


def test_source_that_is_a_file(tmp_path):
    gradient(64, 64).save(tmp_path / "single.png")
    with pytest.raises(DataError, match="single.png is a file"):
        load_images(tmp_path / "single.png")


# --------------------------------------------------------------------------- load_images: datasets


def _save_dataset(path: Path, n: int = 3, **columns):
    import datasets

    images = [gradient(64 + 8 * k, 72) for k in range(n)]
    features = {"image": datasets.Image(), **{name: datasets.Value("string") for name in columns}}
    ds = datasets.Dataset.from_dict({"image": images, **columns}, features=datasets.Features(features))
    ds.save_to_disk(str(path))
    return images


def test_save_to_disk_dataset_with_caption_column(tmp_path):
    images = _save_dataset(tmp_path / "ds", text=["  sks on grass ", "sks at night", ""])
    photos = load_images(tmp_path / "ds", caption_column="text")
    assert [p.name for p in photos] == ["dataset[0]", "dataset[1]", "dataset[2]"]
    assert [p.caption for p in photos] == ["sks on grass", "sks at night", None]
    assert [p.image.size for p in photos] == [im.size for im in images]
    assert np.array_equal(np.asarray(photos[1].image), np.asarray(images[1]))  # PNG-encoded: lossless
    assert all(p.path is None and p.image.mode == "RGB" for p in photos)
    assert all(p.caption is None for p in load_images(tmp_path / "ds"))


def test_dataset_dict_picks_split(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"img": [gradient(64, 64), gradient(80, 64)]}, features=datasets.Features({"img": datasets.Image()})
    )
    datasets.DatasetDict({"train": ds, "validation": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_images(tmp_path / "dd")) == 2
    assert [p.image.size for p in load_images(tmp_path / "dd", split="validation")] == [(80, 64)]
    with pytest.raises(DataError, match="split='test' is not in dataset"):
        load_images(tmp_path / "dd", split="test")


def test_dataset_without_image_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b"], "n": [1, 2]}).save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(DataError, match="no image column.*text, n.*image_column="):
        load_images(tmp_path / "noimg")
    with pytest.raises(DataError, match="image_column='picture' is not in dataset"):
        load_images(tmp_path / "noimg", image_column="picture")


def test_dataset_string_paths_column_and_bad_row(tmp_path):
    import datasets

    gradient(64, 64).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_text("garbage")
    paths = [str(tmp_path / "good.png"), str(tmp_path / "broken.png")]
    datasets.Dataset.from_dict({"file": paths}).save_to_disk(str(tmp_path / "paths"))
    with pytest.raises(DataError, match=r"dataset\[1\]: not a readable image") as info:
        load_images(tmp_path / "paths", image_column="file")
    assert "dataset[0]" not in str(info.value)


def test_unreachable_hub_id_says_what_to_do(monkeypatch):
    import datasets

    def offline(path, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="'someone/dogs'.*pass a local folder of photos or a `save_to_disk` path"):
        load_images("someone/dogs")


def test_hub_id_is_passed_to_load_dataset_with_split(monkeypatch):
    import datasets

    calls = []
    ds = datasets.Dataset.from_dict(
        {"pic": [gradient(64, 64)], "cap": ["hub caption"]},
        features=datasets.Features({"pic": datasets.Image(), "cap": datasets.Value("string")}),
    )

    def fake(path, **kwargs):
        calls.append((path, kwargs))
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake)
    (photo,) = load_images("someone/dogs", caption_column="cap", split="train[:1]")
    assert calls == [("someone/dogs", {"split": "train[:1]"})]
    assert photo.caption == "hub caption" and photo.image.size == (64, 64)


def test_real_subject_photos_load():
    photos = load_images(REPO / "data" / "subjects" / "vase")
    assert len(photos) == 6
    assert [p.name for p in photos] == [f"{k:02d}.jpg" for k in range(6)]
    assert all(p.image.mode == "RGB" and min(p.image.size) >= 567 for p in photos)
    assert all(p.path is not None and p.path.suffix.lower() in IMAGE_SUFFIXES for p in photos)


# --------------------------------------------------------------------------- captions


def test_format_caption():
    assert format_caption("a photo of {token} {class}", token="sks", class_word="dog") == "a photo of sks dog"
    assert format_caption("{token} {class}, {style}", token="sks", class_word="") == "sks , {style}"
    assert format_caption("{class} {token} {token}", token="<v>", class_word="cat") == "cat <v> <v>"


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("a photo of a {class}", "caption_template.*must contain \\{token\\}"),
        ("a photo of sks dog", "caption_template.*must contain \\{token\\}"),
        ("a photo of {token} {clas}", "caption_template.*unknown placeholder.*\\{clas\\}"),
        ("{token} in {style} style", "caption_template.*\\{style\\}"),
    ],
)
def test_bad_caption_templates(template, match):
    with pytest.raises(DataError, match=match):
        validate_caption_template(template)


def test_good_caption_templates_pass():
    validate_caption_template("a photo of {token} {class}")
    validate_caption_template("{token}")


# --------------------------------------------------------------------------- PhotoDataset


def make_photos(sizes=((96, 80), (80, 120), (100, 100)), captions=None) -> list[Photo]:
    captions = captions or [None] * len(sizes)
    return [Photo(f"{k}.png", gradient(w, h), c) for k, ((w, h), c) in enumerate(zip(sizes, captions, strict=True))]


def test_item_shape_range_and_caption():
    ds = PhotoDataset(make_photos(), resolution=32, token="sks", class_word="vase", repeats=4)
    assert len(ds) == 12
    item = ds[1]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1.0 and item["pixel_values"].max() <= 1.0
    assert item["pixel_values"].min() < -0.9 and item["pixel_values"].max() > 0.9  # full range used
    assert item["caption"] == "a photo of sks vase"
    assert item["photo_index"] == 1 and item["flipped"] is False


def test_center_crop_is_resized_middle_of_photo():
    photo = Photo("wide.png", gradient(200, 100))
    ds = PhotoDataset([photo], resolution=50, token="sks", class_word="vase")
    expected = np.asarray(photo.image.resize((100, 50), Image.Resampling.LANCZOS))[:, 25:75]
    got = ((ds[0]["pixel_values"] + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8)
    assert np.array_equal(got, expected)


def test_per_photo_captions_override_template():
    photos = make_photos(captions=["{token} {class} on a beach", None, "close-up of sks"])
    ds = PhotoDataset(photos, resolution=32, token="sks", class_word="dog", caption_template="{token} the {class}")
    assert [ds[i]["caption"] for i in range(3)] == ["sks dog on a beach", "sks the dog", "close-up of sks"]


def test_unknown_placeholder_in_a_caption_file_is_reported(caplog):
    """`{class_word}` (a natural slip for `{class}`) is not filled in; the warning names the photo."""
    photos = make_photos(captions=["a photo of {token} {class_word} at night", "{token} {class}", None])
    with caplog.at_level("WARNING", logger="lrkit.training.data"):
        ds = PhotoDataset(photos, resolution=32, token="sks", class_word="dog")
    assert ds[0]["caption"] == "a photo of sks {class_word} at night"  # kept as written, as before
    warned = [r.getMessage() for r in caplog.records if "{class_word}" in r.getMessage()]
    assert len(warned) == 1 and photos[0].name in warned[0] and "{class}" in warned[0]
    assert not any(photos[1].name in r.getMessage() for r in caplog.records)


def test_getitem_is_deterministic_per_index_and_seed():
    kwargs = dict(resolution=32, token="sks", class_word="vase", center_crop=False, random_flip=0.5)
    ds = PhotoDataset(make_photos(), **kwargs)
    again = PhotoDataset(make_photos(), **kwargs)
    torch.manual_seed(123)
    first = ds[7]["pixel_values"]
    torch.manual_seed(999)  # the global RNG must not matter
    assert torch.equal(first, ds[7]["pixel_values"])
    assert torch.equal(first, again[7]["pixel_values"])
    assert not torch.equal(ds[7]["pixel_values"], ds[10]["pixel_values"])  # same photo, other crop
    other_seed = PhotoDataset(make_photos(), **{**kwargs, "seed": 1})
    assert any(not torch.equal(ds[i]["pixel_values"], other_seed[i]["pixel_values"]) for i in range(3, 9))


def test_random_flip_sees_both_outcomes_and_any_index_works():
    ds = PhotoDataset(make_photos(), resolution=32, token="sks", class_word="vase", random_flip=0.5)
    indices = list(range(0, 60)) + [10**6, 10**9 + 7]  # global step counters beyond len(ds)
    flips = [ds[i]["flipped"] for i in indices]
    assert 15 <= sum(flips) <= 45
    assert ds[10**9 + 7]["photo_index"] == (10**9 + 7) % 3
    for i in indices[:12]:
        item = ds[i]
        base = ds.deterministic_variants(item["photo_index"])[0]["pixel_values"]
        expected = base.flip(-1) if item["flipped"] else base
        assert torch.equal(item["pixel_values"], expected)
    with pytest.raises(IndexError):
        ds[-1]


def test_no_flip_when_random_flip_is_zero_and_always_when_one():
    never = PhotoDataset(make_photos(), resolution=32, token="sks", class_word="vase", random_flip=0.0)
    always = PhotoDataset(make_photos(), resolution=32, token="sks", class_word="vase", random_flip=1.0)
    assert not any(never[i]["flipped"] for i in range(30))
    assert all(always[i]["flipped"] for i in range(30))


def test_random_crop_covers_different_offsets():
    photo = Photo("tall.png", gradient(40, 200))
    ds = PhotoDataset([photo], resolution=40, token="sks", class_word="vase", center_crop=False)
    assert not ds.cacheable
    tops = {round(float(ds[i]["pixel_values"][1, 0, 0]), 3) for i in range(40)}  # green encodes the row
    assert len(tops) > 10


def test_deterministic_variants():
    flip = PhotoDataset(make_photos(), resolution=32, token="sks", class_word="vase", random_flip=0.5)
    assert flip.cacheable
    plain, mirrored = flip.deterministic_variants(2)
    assert (plain["flipped"], mirrored["flipped"]) == (False, True)
    assert plain["photo_index"] == mirrored["photo_index"] == 2
    assert torch.equal(mirrored["pixel_values"], plain["pixel_values"].flip(-1))
    assert not torch.equal(mirrored["pixel_values"], plain["pixel_values"])
    no_flip = PhotoDataset(make_photos(), resolution=32, token="sks", class_word="vase")
    (only,) = no_flip.deterministic_variants(2)
    assert torch.equal(only["pixel_values"], plain["pixel_values"])
    with pytest.raises(IndexError):
        flip.deterministic_variants(3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"random_flip": 1.5}, "random_flip"),
        ({"repeats": 0}, "repeats"),
        ({"resolution": 0}, "resolution"),
        ({"caption_template": "a photo"}, "caption_template"),
    ],
)
def test_dataset_rejects_bad_options(kwargs, match):
    options = {"resolution": 32, "token": "sks", "class_word": "vase", **kwargs}
    with pytest.raises(DataError, match=match):
        PhotoDataset(make_photos(), **options)


def test_sample_seed_mixes_seed_and_index():
    seeds = {sample_seed(s, i) for s in range(3) for i in range(100)}
    assert len(seeds) == 300
    assert sample_seed(0, 5) == sample_seed(0, 5)
    assert all(0 <= s < 2**63 for s in seeds)


# --------------------------------------------------------------------------- ensure_class_images


class CountingPipe:
    """Forwards to a pipeline and counts the images it was asked for."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.generated = 0

    def __call__(self, prompt, **kwargs):
        self.generated += len(prompt) if isinstance(prompt, list) else 1
        return self.pipe(prompt, **kwargs)


@pytest.fixture(scope="module")
def tiny_pipe():
    from lrkit.models import build_tiny_random

    return build_tiny_random(0)


def test_class_images_generate_resume_and_reproduce(tmp_path, tiny_pipe):
    options = dict(prompt="a photo of a vase", resolution=64, num_inference_steps=2, seed=3)
    counting = CountingPipe(tiny_pipe)
    first = ensure_class_images(counting, tmp_path / "resumed", num_images=2, batch_size=1, **options)
    assert counting.generated == 2
    assert [p.name for p in first] == ["class_00000.png", "class_00001.png"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in first}

    second = ensure_class_images(counting, tmp_path / "resumed", num_images=3, batch_size=1, **options)
    assert counting.generated == 3  # only the missing one
    assert [p.name for p in second] == [f"class_{k:05d}.png" for k in range(3)]
    assert {p.name: p.stat().st_mtime_ns for p in second[:2]} == mtimes

    assert len(ensure_class_images(counting, tmp_path / "resumed", num_images=2, **options)) == 2
    assert counting.generated == 3  # nothing to do

    for path in second:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    arrays = [np.asarray(Image.open(p), dtype=np.int16) for p in second]
    assert arrays[0].std() > 5 and np.abs(arrays[0] - arrays[1]).mean() > 5  # distinct, not blank

    # Image k depends only on seed + k: one batched go gives the same pictures as the resumed run.
    one_go = ensure_class_images(tiny_pipe, tmp_path / "one_go", num_images=3, batch_size=4, **options)
    for a, b in zip(second, one_go, strict=True):
        difference = np.asarray(Image.open(a), dtype=np.int16) - np.asarray(Image.open(b), dtype=np.int16)
        assert np.abs(difference).max() <= 2  # batched vs. single UNet calls: float noise only


def test_class_images_count_user_images_and_fill_gaps(tmp_path, tiny_pipe):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    gradient(64, 64).save(class_dir / "mine.jpg")
    gradient(64, 64).save(class_dir / "class_00000.png")
    counting = CountingPipe(tiny_pipe)
    paths = ensure_class_images(
        counting, class_dir, prompt="a vase", num_images=3, resolution=64, num_inference_steps=2
    )
    assert counting.generated == 1
    assert [p.name for p in paths] == ["class_00000.png", "class_00001.png", "mine.jpg"]
    assert not [p for p in class_dir.iterdir() if p.name.startswith(".")]  # no temp files left
    assert tiny_pipe._progress_bar_config.get("disable") is not True  # the caller's setting is restored
