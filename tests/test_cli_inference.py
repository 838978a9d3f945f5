"""`lrkit generate` and `lrkit run` (photos -> concept -> images) through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lrkit.cli import main
from lrkit.concept import Concept
from lrkit.jobs import subject_name

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


@pytest.fixture(scope="module")
def bundle(run_dir, photos) -> str:
    return str(run_dir / subject_name(photos) / "concept")


def test_run_writes_images_intermediates_and_a_contact_sheet(run_dir):
    images = sorted(p.name for p in (run_dir / "images").glob("*.png"))
    stems = [f"p{p:03d}_s{s}" for p in (0, 1) for s in (0, 1)]
    assert images == sorted(f"{st}{k}.png" for st in stems for k in ("", "_layout", "_mask", "_grid"))
    assert Image.open(run_dir / "images" / "p000_s0.png").size == (64, 64)
    assert Image.open(run_dir / "images" / "p000_s0_grid.png").size == (256, 64)  # reference | layout | mask | result
    sheet = Image.open(run_dir / "contact_sheet.png")
    assert sheet.width == 2 * 128


def test_run_names_the_bundle_after_the_subject(run_dir, photos, bundle):
    """OUT/<photo folder>/concept, named after the folder, as `lrkit train --output_dir OUT/<name>` writes it."""
    name = photos.name
    concept = Concept.load(bundle)
    assert Path(bundle) == run_dir / name / "concept" and concept.name == name
    assert (Path(bundle) / f"{name}.kohya.safetensors").is_file()
    assert (run_dir / name / "checkpoints" / "last.ckpt").is_file()  # the training run beside its bundle


def test_rerun_reuses_the_bundle_and_skips_finished_images(run_dir, photos, caplog):
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "images").glob("*.png")}
    (run_dir / "images" / "p001_s1.png").unlink()  # one image missing: only it is redone
    caplog.set_level("INFO")
    prompts = run_dir / "prompts.txt"
    assert main(["run", "--photos", str(photos), "--class_word", "vase", "--prompts", str(prompts), "--max_steps", "2",
                 "--out", str(run_dir), "--seeds", "[0, 1]", "--options.num_inference_steps", "3"]) == 0
    assert "phase 1/2: reusing the concept bundle" in caplog.text
    assert caplog.text.index("phase 1/2") < caplog.text.index("phase 2/2")
    assert "3 of 4 images already exist" in caplog.text
    after = {p: p.stat().st_mtime_ns for p in (run_dir / "images").glob("*.png")}
    changed = sorted(p.name for p in after if before.get(p) != after[p])
    assert changed == ["p001_s1.png", "p001_s1_grid.png", "p001_s1_layout.png", "p001_s1_mask.png"]


@pytest.mark.parametrize("mode", ["vanilla", "personalized", "layout", "layout-retouch"])
def test_generate_modes(bundle, tmp_path, mode):
    out = tmp_path / mode
    assert main(["generate", "--concept", bundle, "--prompt", "a {} on the moon",
                 "--options.mode", mode, "--seeds", "[3]", "--out", str(out), "--options.num_inference_steps", "3",
                 "--intermediates", "true"]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert "p000_s3.png" in names
    assert ("p000_s3_layout.png" in names) == (mode == "layout-retouch")


def test_generate_with_config_file(bundle, tmp_path):
    out = tmp_path / "cfg"
    assert main(["generate", "--config", str(ROOT / "configs/infer/layout_retouch.yaml"), "--concept",
                 bundle, "--prompt", "a {} at night", "--seeds", "[0]", "--out", str(out),
                 "--options.num_inference_steps", "3"]) == 0
    assert (out / "p000_s0.png").is_file()


def test_generate_errors(bundle, tmp_path, capsys):
    concept = bundle
    assert main(["generate", "--base", "tiny-random", "--concept", concept, "--prompt", "a vase", "--out", str(tmp_path / "x")]) == 2
    assert "sks" in capsys.readouterr().err
    assert main(["generate", "--concept", concept, "--out", str(tmp_path / "x")]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", "--concept", str(tmp_path / "nope"), "--prompt", "{}"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["generate", "--base", "tiny-random:1", "--concept", concept, "--prompt", "{}"]) == 2
    assert "tiny-random" in capsys.readouterr().err


def test_run_trains_a_first_concept_and_says_so_from_phase_one(tmp_path, photos, caplog):
    caplog.set_level("INFO")
    assert main(["run", "--photos", str(photos), "--class_word", "vase", "--prompt", "a photo of {}", "--max_steps", "1",
                 "--out", str(tmp_path), "--seeds", "[0]", "--options.num_inference_steps", "2"]) == 0
    first = caplog.text.index("phase 1/2: training a lora concept")
    assert first < caplog.text.index("phase 2/2")
    assert caplog.text[first:].split("\n")[0].endswith(str(tmp_path / photos.name / "concept"))


@pytest.fixture(scope="module")
def concept_on_seed_1(tmp_path_factory, photos) -> Path:
    """A reference concept (photos, no training) recorded on the base `tiny-random:1`."""
    out = tmp_path_factory.mktemp("ref") / "vase"
    assert main(["reference", "--photos", str(photos), "--class-word", "vase", "--base", "tiny-random:1",
                 "--out", str(out)]) == 0
    return out


def test_generate_without_base_uses_the_concepts_recorded_base(concept_on_seed_1, tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["generate", "--concept", str(concept_on_seed_1), "--prompt", "a photo of {}", "--seeds", "[0]",
            "--options.num_inference_steps", "2", "--options.mode", "personalized"]
    assert main([*args, "--out", str(out)]) == 0  # tiny-random:1 loaded; tiny-random would fail the base check
    assert (out / "p000_s0.png").is_file()
    assert main([*args, "--base", "tiny-random", "--out", str(tmp_path / "other")]) == 2
    assert "tiny-random:1" in capsys.readouterr().err


def test_a_recorded_base_that_cannot_be_loaded_names_it_and_the_fix(concept_on_seed_1, tmp_path, capsys):
    import json
    import shutil

    moved = tmp_path / "vase"
    shutil.copytree(concept_on_seed_1, moved)
    manifest = json.loads((moved / "concept.json").read_text())
    manifest["base"]["id"] = str(tmp_path / "sd15-somewhere-else")
    (moved / "concept.json").write_text(json.dumps(manifest))
    assert main(["generate", "--concept", str(moved), "--prompt", "a photo of {}", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "sd15-somewhere-else" in err and "pass --base" in err


def test_eval_without_base_uses_the_recorded_base(concept_on_seed_1, tmp_path):
    from lrkit.evaluation.cli import config_from_args

    config = config_from_args(["--concepts", str(concept_on_seed_1), "--out", str(tmp_path)])
    assert config.base == "tiny-random:1" and config.base_recorded
    given = config_from_args(["--concepts", str(concept_on_seed_1), "--out", str(tmp_path), "--base", "toy"])
    assert given.base == "toy" and not given.base_recorded


def test_eval_refuses_concepts_of_different_bases_without_base(concept_on_seed_1, bundle, tmp_path):
    from lrkit.concept import ConceptError
    from lrkit.evaluation.cli import config_from_args

    with pytest.raises(ConceptError, match="different base models.*pass --base"):
        config_from_args(["--concepts", str(concept_on_seed_1), bundle, "--out", str(tmp_path)])


def test_run_passes_its_generation_options_on(tmp_path, photos):
    """`--options.*` reach the generation without --resolution (they were dropped unless a height was set)."""
    out = tmp_path / "run"
    assert main(["run", "--photos", str(photos), "--class_word", "vase", "--prompt", "a photo of {}", "--max_steps", "1",
                 "--out", str(out), "--seeds", "[0]", "--options.mode", "personalized",
                 "--options.num_inference_steps", "2"]) == 0
    names = sorted(p.name for p in (out / "images").glob("*.png"))
    assert "p000_s0.png" in names and "p000_s0_layout.png" not in names  # personalized: no layout (nor mask)
    assert Image.open(out / "images" / "p000_s0.png").size == (64, 64)  # the concept's resolution
