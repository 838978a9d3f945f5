"""`lrkit demo`: photos -> LoRA concept -> personalized and layout-retouch images, grid, toy scores; re-runs reuse."""

import json

import pytest
from PIL import Image

from lrkit.concept import Concept
from lrkit.demo import DEMO_MODES, run_demo
from lrkit.toyworld import SUBJECTS

FAST = dict(prompts=["a photo of {} on the beach", "a photo of {} in the snow"], seeds=[0, 1],
            train_overrides={"max_steps": 2}, options={"num_inference_steps": 4})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(out, subject="toy_ball", **FAST)


def test_demo_writes_photos_bundle_images_grid_and_scores(demo):
    photos = sorted((demo.out_dir / "photos").glob("*.png"))
    assert len(photos) == 5
    assert (demo.bundle / "concept.json").is_file()
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
