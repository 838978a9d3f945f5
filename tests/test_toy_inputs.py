"""The toy base warns, once, when given photos or words from outside the toy world (`lrkit.toyworld.inputs`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lrkit.toyworld import SUBJECTS, inputs, sample

ROOT = Path(__file__).resolve().parents[1]
REAL_PHOTOS = sorted((ROOT / "data" / "subjects").glob("*/*.jpg"))


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    monkeypatch.setattr(inputs, "_warned", False)  # "once per process": each test is a new process
    monkeypatch.setattr(inputs, "_read", set())


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lrkit.toyworld.inputs" and r.levelno == logging.WARNING]


def test_shipped_real_photos_are_not_toy_pictures():
    from PIL import Image

    assert len(REAL_PHOTOS) >= 10
    read_as_toy = [p.name for p in REAL_PHOTOS if inputs.is_toy_picture(Image.open(p))]
    assert read_as_toy == []


@pytest.mark.slow
def test_rendered_toy_pictures_are_toy_pictures(tmp_path):
    from PIL import Image

    from lrkit.demo import toy_training_data

    pictures = [photo.image for subject in SUBJECTS.values() for photo in subject.photos()]
    for name, subject in SUBJECTS.items():  # studio photos, and the subject pasted on brick and night
        photos, _ = toy_training_data(subject, tmp_path / name)
        pictures += [Image.open(p) for p in sorted(photos.glob("*.png"))[::3]]
    pictures += [sample(seed, num_objects=1 + seed % 2).image for seed in range(40)]
    not_toy = [i for i, picture in enumerate(pictures) if not inputs.is_toy_picture(picture)]
    assert not_toy == []


def test_prompt_words_outside_the_vocabulary_are_named():
    assert inputs.words_outside_toy_world(["a photo of sks red checked ball on the beach"], known=["sks"]) == []
    assert inputs.words_outside_toy_world(["a photo of <dog-v> dog surfing a wave"], known=["<dog-v>"]) == [
        "dog", "surfing", "wave"]


def test_the_warning_comes_once_and_names_the_photo_the_words_and_the_fix(caplog):
    from PIL import Image

    real = [(p.name, Image.open(p)) for p in REAL_PHOTOS[:2]]
    assert inputs.warn_outside_toy_world(photos=real, prompts=["a photo of sks dog"], known=["sks"])
    assert not inputs.warn_outside_toy_world(photos=real, prompts=["a photo of sks dog"], known=["sks"])
    [message] = _warnings(caplog)
    assert REAL_PHOTOS[0].name in message and "dog" in message and "--base" in message


def test_toy_inputs_give_no_warning(caplog):
    toy = [(f"toy_{i}", photo.image) for i, photo in enumerate(SUBJECTS["toy_vase"].photos())]
    assert not inputs.warn_outside_toy_world(photos=toy, prompts=["a photo of sks vase in the snow"], known=["sks"])
    assert _warnings(caplog) == []


def test_lrkit_run_on_the_toy_base_with_real_photos_warns_once(vase_photos, tmp_path, caplog):
    from lrkit.cli import main

    caplog.set_level(logging.INFO)
    assert main(["run", "--base", "toy", "--photos", str(vase_photos(2)), "--class_word", "vase",
                 "--prompt", "a photo of {} on the beach", "--max_steps", "1", "--seeds", "[0]", "--out", str(tmp_path),
                 "--options.num_inference_steps", "2"]) == 0
    [message] = _warnings(caplog)  # training saw the photos; generation does not repeat it
    assert "2 photo(s)" in message and "00.jpg" in message
