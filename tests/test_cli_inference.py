"""`lrkit generate` and `lrkit run` (photos -> concept -> images) through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lrkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(vase_photos) -> Path:
    return vase_photos(2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, photos) -> Path:
    out = tmp_path_factory.mktemp("run")
    prompts = out / "prompts.txt"
    prompts.write_text("# two prompts\na photo of {} on the beach\n\na {} in the snow\n")
    code = main(["run", "--photos", str(photos), "--class_word", "vase", "--prompts", str(prompts), "--max_steps", "2",
                 "--out", str(out), "--seeds", "[0, 1]", "--options.num_inference_steps", "3"])
    assert code == 0
    return out


def test_run_writes_images_intermediates_and_a_contact_sheet(run_dir):
    images = sorted(p.name for p in (run_dir / "images").glob("*.png"))
    stems = [f"p{p:03d}_s{s}" for p in (0, 1) for s in (0, 1)]
    assert images == sorted(f"{st}{k}.png" for st in stems for k in ("", "_layout", "_mask", "_grid"))
    assert Image.open(run_dir / "images" / "p000_s0.png").size == (64, 64)
    assert Image.open(run_dir / "images" / "p000_s0_grid.png").size == (256, 64)  # reference | layout | mask | result
    sheet = Image.open(run_dir / "contact_sheet.png")
    assert sheet.width == 2 * 128
    assert (run_dir / "concept" / "concept" / "concept.json").is_file()


def test_rerun_reuses_the_bundle_and_skips_finished_images(run_dir, photos, caplog):
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "images").glob("*.png")}
    (run_dir / "images" / "p001_s1.png").unlink()  # one image missing: only it is redone
    caplog.set_level("INFO")
    prompts = run_dir / "prompts.txt"
    assert main(["run", "--photos", str(photos), "--class_word", "vase", "--prompts", str(prompts), "--max_steps", "2",
                 "--out", str(run_dir), "--seeds", "[0, 1]", "--options.num_inference_steps", "3"]) == 0
    assert "reusing the concept bundle" in caplog.text
    assert "3 of 4 images already exist" in caplog.text
    after = {p: p.stat().st_mtime_ns for p in (run_dir / "images").glob("*.png")}
    changed = sorted(p.name for p in after if before.get(p) != after[p])
    assert changed == ["p001_s1.png", "p001_s1_grid.png", "p001_s1_layout.png", "p001_s1_mask.png"]


@pytest.mark.parametrize("mode", ["vanilla", "personalized", "layout", "layout-retouch"])
def test_generate_modes(run_dir, tmp_path, mode):
    out = tmp_path / mode
    assert main(["generate", "--concept", str(run_dir / "concept" / "concept"), "--prompt", "a {} on the moon",
                 "--options.mode", mode, "--seeds", "[3]", "--out", str(out), "--options.num_inference_steps", "3",
                 "--intermediates", "true"]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert "p000_s3.png" in names
    assert ("p000_s3_layout.png" in names) == (mode == "layout-retouch")


def test_generate_with_config_file(run_dir, tmp_path):
    out = tmp_path / "cfg"
    assert main(["generate", "--config", str(ROOT / "configs/infer/layout_retouch.yaml"), "--concept",
                 str(run_dir / "concept" / "concept"), "--prompt", "a {} at night", "--seeds", "[0]", "--out", str(out),
                 "--options.num_inference_steps", "3"]) == 0
    assert (out / "p000_s0.png").is_file()


def test_generate_errors(run_dir, tmp_path, capsys):
    concept = str(run_dir / "concept" / "concept")
    assert main(["generate", "--concept", concept, "--prompt", "a vase", "--out", str(tmp_path / "x")]) == 1
    assert "sks" in capsys.readouterr().err
    assert main(["generate", "--concept", concept, "--out", str(tmp_path / "x")]) == 1
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", "--concept", str(tmp_path / "nope"), "--prompt", "{}"]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["generate", "--base", "tiny-random:1", "--concept", concept, "--prompt", "{}"]) == 1
    assert "tiny-random" in capsys.readouterr().err
