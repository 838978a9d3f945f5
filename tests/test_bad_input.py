"""Bad input through the CLI: a clear error naming the file or option, and no bundle left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lrkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def good_photo(path: Path, size: int = 96) -> None:
    Image.new("RGB", (size, size), (200, 40, 40)).save(path)


def train(tmp_path: Path, photos: Path, *extra: str) -> int:
    return main(["train", "--config", str(ROOT / "configs/demo.yaml"), "--data.photos", str(photos),
                 "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--validation.prompts", "[]", *extra])


def assert_nothing_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert not (out / "concept").exists()
    if out.exists():
        assert not [p for p in out.iterdir() if p.name.startswith(".concept")]


def photos_with(tmp_path: Path, name: str, writer) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    good_photo(folder / "ok.jpg")
    writer(folder / name)
    return folder


def corrupt_jpeg(path: Path) -> None:
    good_photo(path.with_suffix(".tmp.jpg"), 256)
    data = path.with_suffix(".tmp.jpg").read_bytes()
    path.with_suffix(".tmp.jpg").unlink()
    path.write_bytes(data[: len(data) // 2])


CASES = {
    "empty folder": (lambda p: None, None, "no .jpg"),
    "corrupt jpeg": (corrupt_jpeg, "broken.jpg", "broken.jpg"),
    "text named png": (lambda p: p.write_text("not an image"), "notes.png", "notes.png"),
    "16x16 image": (lambda p: good_photo(p, 16), "tiny.png", "tiny.png"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_photos(case, tmp_path, capsys):
    writer, name, expected = CASES[case]
    if name is None:
        folder = tmp_path / "photos"
        folder.mkdir()
    else:
        folder = photos_with(tmp_path, name, writer)
    assert train(tmp_path, folder) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert_nothing_written(tmp_path)


def test_small_image_message_says_size_and_minimum(tmp_path, capsys):
    folder = photos_with(tmp_path, "tiny.png", lambda p: good_photo(p, 16))
    assert train(tmp_path, folder) == 2
    err = capsys.readouterr().err
    assert "16x16" in err and "32" in err  # demo resolution 64 -> minimum short side 32


@pytest.fixture
def ok_photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    good_photo(folder / "a.jpg")
    return folder


def test_caption_template_without_token(tmp_path, ok_photos, capsys):
    assert train(tmp_path, ok_photos, "--data.caption_template", "a photo of a {class}") == 2
    err = capsys.readouterr().err
    assert "caption_template" in err and "{token}" in err
    assert_nothing_written(tmp_path)


def test_unknown_method(tmp_path, ok_photos, capsys):
    assert train(tmp_path, ok_photos, "--method", "hypernetwork") == 2
    err = capsys.readouterr().err
    assert "hypernetwork" in err and "lora" in err and "dreambooth" in err
    assert_nothing_written(tmp_path)


def test_missing_photo_folder(tmp_path, capsys):
    assert train(tmp_path, tmp_path / "nowhere") == 2
    assert "nowhere" in capsys.readouterr().err
    assert_nothing_written(tmp_path)


def test_existing_bundle_is_not_overwritten_without_flag(tmp_path, ok_photos, capsys):
    (tmp_path / "out" / "concept").mkdir(parents=True)
    (tmp_path / "out" / "concept" / "keep.txt").write_text("mine")
    assert main(["train", "--config", str(ROOT / "configs/demo.yaml"), "--data.photos", str(ok_photos),
                 "--output_dir", str(tmp_path / "out"), "--overwrite", "false"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "concept" / "keep.txt").read_text() == "mine"


def test_ti_token_already_in_vocabulary(tmp_path, ok_photos, capsys):
    assert train(tmp_path, ok_photos, "--method", "textual_inversion", "--data.token", "vase") == 2
    err = capsys.readouterr().err
    assert "vase" in err and "data.token" in err
    assert_nothing_written(tmp_path)


def test_export_of_a_missing_or_foreign_checkpoint(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "b")]) == 2
    assert "none.ckpt" in capsys.readouterr().err
    fake = tmp_path / "fake.ckpt"
    fake.write_bytes(b"\x80\x04not a checkpoint")
    assert main(["export", str(fake), "--out", str(tmp_path / "b")]) == 2
    assert "fake.ckpt" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
