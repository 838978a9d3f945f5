"""`lrkit demo`: photos -> LoRA concept -> personalized and layout-retouch images, grid, toy scores; re-runs reuse."""

import json

import numpy as np
import pytest
from PIL import Image

from lrkit.concept import Concept
from lrkit.demo import DEMO_MODES, TOY_BACKDROPS, run_demo, write_photos
from lrkit.toyworld import SUBJECTS, classify_scene, segment_object
from lrkit.photos import load_images
from lrkit.training.data import PhotoDataset

FAST = dict(prompts=["a photo of {} on the beach", "a photo of {} in the snow"], seeds=[0, 1],
            train_overrides={"max_steps": 2}, options={"num_inference_steps": 4})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(out, subject="toy_ball", **FAST)


def test_demo_writes_photos_bundle_images_grid_and_scores(demo):
    photos = sorted((demo.out_dir / "photos").glob("*.png"))
    assert len(photos) == 5 + 3 * 5 * len(TOY_BACKDROPS)  # studio photos + 3 backdrop copies of each
    assert (demo.bundle / "concept.json").is_file()
    assert Concept.load(demo.bundle).class_word == SUBJECTS["toy_ball"].description == "red checked ball"
    for mode in DEMO_MODES:
        assert sorted(p.name for p in (demo.out_dir / mode).glob("p*.png")) == [
            "p000_s0.png", "p000_s1.png", "p001_s0.png", "p001_s1.png"]
    with Image.open(demo.grid) as grid:
        tile, label, gap = 96, 14, 6  # the grid's layout: photo column, then 2 seeds per mode
        assert grid.size == (tile + len(DEMO_MODES) * (2 * tile + gap), label + 2 * (tile + label))
    saved = json.loads((demo.out_dir / "scores.json").read_text())
    assert len(saved["images"]) == len(DEMO_MODES) * 4
    for mode in DEMO_MODES:  # the summary is the records' mean, not a separate computation
        rows = [r for r in saved["images"] if r["mode"] == mode]
        assert demo.scores[mode]["subject_rate"] == pytest.approx(sum(r["is_subject"] for r in rows) / 4)
        assert demo.scores[mode]["scene_rate"] == pytest.approx(sum(r["scene_ok"] for r in rows) / 4)
        phrase = Concept.load(demo.bundle).subject_phrase()
        assert {r["prompt"] for r in rows} == {p.format(phrase) for p in FAST["prompts"]}
    assert "subject" in demo.summary() and str(demo.grid) in demo.summary()


def test_demo_rerun_reuses_the_bundle_and_the_images(demo, monkeypatch):
    import lrkit.training

    def no_training(*args, **kwargs):
        raise AssertionError("the demo retrained although its bundle exists")

    monkeypatch.setattr(lrkit.training, "train_concept", no_training)
    images = sorted(demo.out_dir.glob("*/p*.png"))
    before = {p: p.stat().st_mtime_ns for p in images}
    again = run_demo(demo.out_dir, subject="toy_ball", **FAST)
    assert {p: p.stat().st_mtime_ns for p in images} == before
    assert again.scores == demo.scores


def test_backdrop_photos_paste_the_subject_on_the_scene_and_name_it(tmp_path):
    subject = SUBJECTS["toy_ball"]
    write_photos(subject, tmp_path, n=2, backdrops=("night",), copies=2)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "night_0_0.png", "night_0_1.png", "night_1_0.png", "night_1_1.png", "photo_0.png", "photo_1.png"]
    photos = {p.name: p for p in load_images(tmp_path)}
    studio = [np.asarray(photos[f"photo_{i}.png"].image) for i in range(2)]
    for copy in range(2):
        for i in range(2):
            pasted = photos[f"night_{copy}_{i}.png"]
            mask = segment_object(studio[i], scene="studio")
            pixels = np.asarray(pasted.image)
            assert np.array_equal(pixels[mask], studio[i][mask])  # the subject, pixel for pixel
            assert classify_scene(pasted.image)[0] == "night" and not np.array_equal(pixels[~mask], studio[i][~mask])
    assert not np.array_equal(np.asarray(photos["night_0_0.png"].image), np.asarray(photos["night_1_0.png"].image))
    dataset = PhotoDataset(list(photos.values()), resolution=64, token="sks", class_word=subject.description)
    captions = {p.name: dataset[k]["caption"] for k, p in enumerate(dataset.photos)}
    assert captions["night_1_0.png"] == "a photo of sks red checked ball under the night sky"
    assert captions["photo_0.png"] == "a photo of sks red checked ball"
    with pytest.raises(ValueError, match="backdrops.*'moon'.*choose from"):
        write_photos(subject, tmp_path / "bad", backdrops=("moon",))


def test_demo_rejects_unknown_subject_and_empty_inputs(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        run_demo(tmp_path, subject="my_cat")
    with pytest.raises(ValueError, match="prompts, seeds and modes"):
        run_demo(tmp_path, seeds=[])
    assert set(SUBJECTS) >= {"toy_vase", "toy_ball"}


def test_demo_cli_help_lists_the_subjects(capsys):
    from lrkit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "toy_vase" in capsys.readouterr().out


@pytest.mark.slow
def test_the_demo_recipe_learns_the_subject_and_keeps_the_scenes(tmp_path):
    """The identity bar on the shipped toy model: the demo's LoRA recipe (about 90 s of CPU training) is recognised as
    the subject in most generations of scenes it never saw, and keeps those scenes. Measured: 73-78 % subject over 3
    training seeds x 64 images (bench/RESULTS.md); the bars below leave room for a few misses in 16 images."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lrkit.demo import DEMO_SUBJECT, TOY_LORA_RECIPE, toy_training_data
    from lrkit.jobs import train_or_reuse
    from lrkit.models import load_base
    from lrkit.toyworld import score_image

    subject = SUBJECTS[DEMO_SUBJECT]
    photos, class_word = toy_training_data(subject, tmp_path / "photos")
    recipe = dict(TOY_LORA_RECIPE)
    concept = train_or_reuse(photos, class_word, tmp_path / "concept", base="toy", method=recipe.pop("method"),
                             train_overrides=recipe)
    pipe = StableDiffusionPipeline(**load_base("toy").components)  # a stock pipeline + the bundle
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    concept.apply(pipe)
    scenes = {"beach": "on the beach", "snow": "in the snow", "grass": "on the grass", "desert": "in the desert"}
    records = []
    for scene, phrase in scenes.items():  # none of them is a training backdrop
        images = pipe([f"a photo of {concept.subject_phrase()} {phrase}"] * 4, num_inference_steps=25,
                      guidance_scale=7.5, height=64, width=64,
                      generator=[torch.Generator().manual_seed(s) for s in range(4)]).images
        records += [score_image(image, subject, scene) for image in images]
    subject_rate = np.mean([r["is_subject"] for r in records])
    scene_rate = np.mean([r["scene_ok"] for r in records])
    assert subject_rate >= 0.5 and scene_rate >= 0.75, (subject_rate, scene_rate)
