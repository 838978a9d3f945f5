"""Reference concepts (`lrkit.reference`): a subject from photos alone, no training."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lrkit.concept import Concept, ConceptError
from lrkit.inference import GenerationOptions, InferenceError, LayoutRetouchPipeline
from lrkit.reference import reference_concept
from lrkit.photos import DataError
from test_layout_retouch import ROOT, STEPS, as_np, stock_image

VASE = ROOT / "data" / "subjects" / "vase"
PROMPT = "a photo of a vase on the beach"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "my-vase"
    reference_concept([VASE / "00.jpg", VASE / "01.jpg"], "vase", out, base="tiny-random")
    return out


@pytest.fixture(scope="module")
def pipe(bundle, tmp_path_factory):
    return LayoutRetouchPipeline.from_concept("tiny-random", bundle, cache_dir=tmp_path_factory.mktemp("ref-cache"))


@pytest.fixture(scope="module")
def style_png(tmp_path_factory) -> str:
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[::4] = (250, 140, 20)
    pixels[2::4] = (40, 20, 160)
    path = tmp_path_factory.mktemp("ref-style") / "style.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def run(pipe, prompt=PROMPT, seed=0, **options):
    return pipe(prompt, seeds=seed, options=GenerationOptions.of(num_inference_steps=STEPS, **options))[0]


def test_bundle_holds_the_photos_and_no_weights(bundle):
    from lrkit.models import load_base

    concept = Concept.load(bundle)
    assert (concept.method, concept.token, concept.class_word, concept.files) == ("reference", "vase", "vase", {})
    assert concept.subject_phrase() == "vase"
    assert concept.resolution == 64 and concept.name == "my-vase"
    assert [p.read_bytes() for p in concept.ref_paths()] == [(VASE / n).read_bytes() for n in ("00.jpg", "01.jpg")]
    concept.check_base(load_base("tiny-random"))
    with pytest.raises(ConceptError, match="trained on base model"):
        concept.check_base(load_base("tiny-random:1"))


def test_personalized_and_dual_reference_without_phases_are_the_stock_base_model(pipe, style_png):
    expected = np.round(stock_image(PROMPT, 0, None) * 255) / 255  # stock diffusers, no concept at all
    np.testing.assert_allclose(as_np(run(pipe, mode="personalized").image), expected, atol=1.5 / 255)
    plain = run(pipe, mode="dual-reference", style_reference=style_png, customize=False, stylize=False)
    np.testing.assert_allclose(as_np(plain.image), expected, atol=1.5 / 255)


def test_the_photo_is_the_customization_and_retouch_reference(pipe, style_png):
    dual = [as_np(run(pipe, mode="dual-reference", style_reference=style_png, switch=0.5, reference=i).image)
            for i in (0, 1)]
    plain = as_np(run(pipe, mode="personalized").image)
    assert np.abs(dual[0] - plain).mean() > 1e-4  # (tiny random weights: a small but real change)
    assert np.abs(dual[0] - dual[1]).mean() > 1e-4  # another photo, another image
    retouched = [run(pipe, mode="layout-retouch", reference=i) for i in (0, 1)]
    assert np.abs(as_np(retouched[0].image) - as_np(retouched[1].image)).mean() > 1e-4
    assert [r.reference.size for r in retouched] == [Image.open(VASE / n).size for n in ("00.jpg", "01.jpg")]


def test_bad_input_names_what_to_fix(tmp_path, pipe):
    with pytest.raises(ConceptError, match="class_word is empty"):
        reference_concept(VASE / "00.jpg", " ", tmp_path / "a", base="tiny-random")
    with pytest.raises(ConceptError, match="plain words"):
        reference_concept(VASE / "00.jpg", "<vase>", tmp_path / "a", base="tiny-random")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .jpg"):
        reference_concept(tmp_path / "empty", "vase", tmp_path / "a", base="tiny-random")
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(DataError, match="fake.png"):
        reference_concept([VASE / "00.jpg", tmp_path / "fake.png"], "vase", tmp_path / "a", base="tiny-random")
    with pytest.raises(DataError, match="missing.jpg: no such file"):
        reference_concept([tmp_path / "missing.jpg"], "vase", tmp_path / "a", base="tiny-random")
    assert not (tmp_path / "a").exists()  # nothing half-written
    with pytest.raises(InferenceError, match="'vase'"):
        run(pipe, "a photo of a ball", mode="personalized")


def test_cli_writes_a_bundle_that_generate_uses(tmp_path, style_png, capsys):
    from lrkit.cli import main

    out = tmp_path / "ref"
    assert main(["reference", "--photos", str(VASE), "--class-word", "vase", "--base", "tiny-random",
                 "--out", str(out)]) == 0
    concept = Concept.load(out)
    assert len(concept.refs) == len(list(VASE.glob("*.jpg")))
    assert main(["reference", "--photos", str(VASE), "--class-word", "vase", "--base", "tiny-random",
                 "--out", str(out)]) == 2  # exists: needs --overwrite
    assert "overwrite" in capsys.readouterr().err
    images = tmp_path / "images"
    assert main(["generate", "--concept", str(out), "--prompt", "a photo of a {} in the snow", "--seeds", "[0]",
                 "--options.num_inference_steps", str(STEPS), "--options.mode", "dual-reference",
                 "--options.dual_reference.style_reference", style_png, "--out", str(images)]) == 0
    assert Image.open(images / "p000_s0.png").size == (64, 64)
