"""The model card every bundle carries (docs/concept-bundle.md, "Model card"): README.md with YAML front matter in the
Hugging Face format, written with the bundle, read as data only; its diffusers code loads the bundle as lrkit does."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lrkit.card import GRID, CardError, card_text, hub_base_id, read_card
from lrkit.concept import Concept, LoraSpec, TokenSpec
from lrkit.models import BaseFingerprint, build_tiny_random, build_tiny_random_xl
from lrkit.training import train_concept
from stock_loading import diffusers_block, run_card_code

ROOT = Path(__file__).resolve().parents[1]
BUILD = {"tiny-random": build_tiny_random, "tiny-random-xl": build_tiny_random_xl}
TOKEN = {"lora": "sks", "dreambooth": "sks", "textual_inversion": "<vase-v>", "pivotal": "<vase-p>"}
METHOD_TAGS = {"lora": {"lora"}, "dreambooth": {"dreambooth"}, "textual_inversion": {"textual_inversion"},
               "pivotal": {"lora", "textual_inversion"}}
FAMILY_TAG = {"sd": "stable-diffusion", "sdxl": "stable-diffusion-xl"}


def hand_built(method: str, family: str, base_id: str) -> Concept:
    """A concept as training describes it, without weights on disk (the card reads only the description)."""
    files = {"lora": {"lora": "pytorch_lora_weights.safetensors", "kohya": "c.kohya.safetensors"},
             "dreambooth": {"unet": "unet", "text_encoder": "text_encoder"},
             "textual_inversion": {"embeddings": "learned_embeds.safetensors"},
             "pivotal": {"lora": "pytorch_lora_weights.safetensors", "kohya": "c.kohya.safetensors",
                         "embeddings": "learned_embeds.safetensors"}}[method]
    learned = method in ("textual_inversion", "pivotal")
    lora = LoraSpec(8, 8.0, ["to_q", "to_v"]) if "lora" in files else None
    return Concept(name="c", method=method, tokens=[TokenSpec(TOKEN[method], learned=learned, initializer="vase")],
                   class_word="vase", base=BaseFingerprint(base_id, "x", [], family), resolution=512, files=files,
                   refs=["refs/00.jpg", "refs/01.jpg", "refs/02.jpg"], lora=lora, lrkit_version="0.1.0",
                   training={"max_steps": 400, "seed": 0, "precision": "bf16-mixed",
                             "data": {"batch_size": 1, "caption_template": "a photo of {token} {class}"},
                             "optim": {"lr": None, "embedding_lr": 5e-3, "optimizer": "adamw",
                                       "lr_scheduler": "constant"}})


def card_of(concept: Concept, tmp_path: Path) -> tuple[dict, str]:
    path = tmp_path / "README.md"
    path.write_text(card_text(concept), encoding="utf-8")
    return read_card(path)


@pytest.mark.parametrize("method", list(TOKEN))
@pytest.mark.parametrize("family, base_id", [("sd", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                                             ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0")])
def test_the_front_matter_has_the_hub_fields(method, family, base_id, tmp_path):
    from huggingface_hub import ModelCard

    concept = hand_built(method, family, base_id)
    meta, body = card_of(concept, tmp_path)
    assert meta["base_model"] == base_id and meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "text-to-image" and meta["instance_prompt"] == f"{TOKEN[method]} vase"
    tags = set(meta["tags"])
    assert {"text-to-image", "diffusers", "lrkit", FAMILY_TAG[family]} | METHOD_TAGS[method] <= tags
    assert ({"lora", "dreambooth", "textual_inversion"} - METHOD_TAGS[method]).isdisjoint(tags)
    assert "license" not in meta and re.search(r"^# license: ", card_text(concept), re.M)  # left to the user
    assert "widget" not in meta  # no validation images
    assert body.lstrip().startswith("# c\n")
    # huggingface_hub reads the same front matter
    hub = ModelCard.load(tmp_path / "README.md").data
    assert hub.base_model == base_id and hub.library_name == "diffusers" and set(hub.tags) == tags


@pytest.mark.parametrize("base_id, expected", [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("toy", None), ("tiny-random", None), ("tiny-random-xl:3", None), ("/home/me/models/sd15", None),
    ("sd15.safetensors", None), ("owner/model.safetensors", None), ("a/../b", None)])
def test_base_model_is_written_only_for_a_hub_id(base_id, expected, tmp_path):
    assert hub_base_id(base_id) == expected
    meta, body = card_of(hand_built("lora", "sd", base_id), tmp_path)
    assert meta.get("base_model") == expected
    assert f"`{base_id}`" in body  # the body always names the base


def test_the_body_tells_each_tool_what_to_take(tmp_path):
    _, lora = card_of(hand_built("lora", "sd", "stable-diffusion-v1-5/stable-diffusion-v1-5"), tmp_path)
    assert "load_lora_weights" in lora and "models/loras/" in lora and "models/Lora/" in lora
    assert "<lora:c.kohya:1>" in lora and "Concept.load" in lora and "lrkit generate" in lora
    assert "| steps | 400 |" in lora and "| photos | 3 (in `refs/`) |" in lora and "rank 8, alpha 8" in lora
    _, ti = card_of(hand_built("textual_inversion", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0"), tmp_path)
    assert ti.count("load_textual_inversion") == 2 and 'state["clip_g"]' in ti and "text_encoder_2" in ti
    _, db = card_of(hand_built("dreambooth", "sd", "stable-diffusion-v1-5/stable-diffusion-v1-5"), tmp_path)
    assert "UNet2DConditionModel.from_pretrained" in db and "CLIPTextModel.from_pretrained" in db
    assert "load_lora_weights" not in db and "single-file checkpoints" in db


def test_a_card_is_data_never_code(tmp_path):
    """`read_card` parses with yaml.safe_load: a front matter asking for a Python object is refused, nothing runs;
    `Concept.load` does not read the card at all, so a bundle with such a card still loads."""
    from lrkit.reference import reference_concept

    bundle = reference_concept(ROOT / "data/subjects/vase/00.jpg", "vase", tmp_path / "c", base="tiny-random").path
    marker = tmp_path / "ran"
    (bundle / "README.md").write_text(f"---\nbad: !!python/object/apply:os.system ['touch {marker}']\n---\nhello\n")
    with pytest.raises(CardError, match="not valid YAML"):
        read_card(bundle)
    assert not marker.exists()
    assert Concept.load(bundle).name == "c"
    (bundle / "README.md").write_text("---\n- a list\n---\n")
    with pytest.raises(CardError, match="not a mapping"):
        read_card(bundle)
    (bundle / "README.md").write_text("no front matter\n")
    assert read_card(bundle) == ({}, "no front matter\n")


def test_a_card_that_links_outside_the_bundle_is_refused_by_load(tmp_path):
    from lrkit.reference import reference_concept

    bundle = reference_concept(ROOT / "data/subjects/vase/00.jpg", "vase", tmp_path / "c", base="tiny-random").path
    outside = tmp_path / "elsewhere.md"
    outside.write_text("x")
    (bundle / "README.md").unlink()
    (bundle / "README.md").symlink_to(outside)
    from lrkit.concept import ConceptError

    with pytest.raises(ConceptError, match="README.md"):
        Concept.load(bundle)


def test_a_reference_concept_gets_a_card_too(tmp_path):
    from lrkit.reference import reference_concept

    concept = reference_concept(ROOT / "data/subjects/vase/00.jpg", "vase", tmp_path / "ref", base="tiny-random")
    meta, body = read_card(concept.path)
    assert meta["library_name"] == "lrkit" and meta["instance_prompt"] == "vase" and "diffusers" not in meta["tags"]
    assert "reference-concept" in meta["tags"] and "### diffusers" not in body and "### lrkit" in body
    assert "base_model" not in meta  # tiny-random is a built-in


# ------------------------------------------------------------------------------------ trained bundles


RUNS = [("lora", "tiny-random"), ("textual_inversion", "tiny-random-xl"), ("dreambooth", "tiny-random"),
        ("pivotal", "tiny-random-xl")]
_TRAINED: dict = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vase_photos):
    """`trained(method, base)` -> the bundle of a tiny run (2 steps) that made validation images at its end."""

    def get(method: str, base: str) -> Path:
        if (method, base) not in _TRAINED:
            out = tmp_path_factory.mktemp(f"card-{method}-{base}")
            _TRAINED[method, base] = train_concept(dict(
                base=base, method=method, output_dir=str(out), max_steps=2, precision="32", accelerator="cpu",
                log_every_n_steps=1, data=dict(photos=str(vase_photos(2)), class_word="vase", resolution=64,
                                               repeats=1, token=TOKEN[method]),
                lora=dict(rank=4, alpha=8, train_text_encoder=method == "pivotal"),
                dreambooth=dict(prior_preservation=False, train_text_encoder=True),
                optim=dict(optimizer="adamw", lr=1e-3),
                validation=dict(prompts=["a photo of {token} {class}", "a {token} {class} on the beach"],
                                num_inference_steps=2)))
        return _TRAINED[method, base]

    return get


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory):
    """Each tiny base saved as a diffusers folder: what the card's `from_pretrained(BASE_MODEL)` loads here."""
    folders = {}

    def get(base: str) -> Path:
        if base not in folders:
            folders[base] = tmp_path_factory.mktemp(f"base-{base}")
            BUILD[base](0).save_pretrained(folders[base])
        return folders[base]

    return get


def latents(pipe, prompt: str) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0),
                output_type="latent").images


@pytest.mark.parametrize("method, base", RUNS, ids=[f"{m}-{b}" for m, b in RUNS])
def test_a_trained_bundle_carries_its_card_and_the_cards_code_loads_it(method, base, trained, base_folders):
    bundle = trained(method, base)
    concept = Concept.load(bundle)  # a bundle with its card loads
    meta, body = read_card(bundle)
    family = "sdxl" if base == "tiny-random-xl" else "sd"
    assert meta["instance_prompt"] == concept.subject_phrase() == f"{TOKEN[method]} vase"
    assert METHOD_TAGS[method] | {"lrkit", FAMILY_TAG[family], "diffusers"} <= set(meta["tags"])
    assert "base_model" not in meta and f"`{base}`" in body
    assert "| photos | 2 (in `refs/`) |" in body and "| steps | 2 |" in body
    # the validation grid: the two images of the last step, small, shown by the card and its widget
    grid = Image.open(bundle / GRID)
    assert grid.size == (2 * 64, 64) and (bundle / GRID).stat().st_size < 64_000
    assert meta["widget"] == [{"text": f"a photo of {TOKEN[method]} vase | a {TOKEN[method]} vase on the beach",
                               "output": {"url": GRID}}]
    assert f"![validation images]({GRID})" in body and "Step 2;" in body
    # the card's diffusers code gives the pipeline lrkit's Concept.apply gives
    prompt = f"a photo of {TOKEN[method]} vase"
    theirs = latents(run_card_code(diffusers_block(body), bundle, base_folders(base)), prompt)
    ours = BUILD[base](0)
    concept.apply(ours)
    torch.testing.assert_close(theirs, latents(ours, prompt), rtol=0, atol=1e-5)


def test_the_grid_holds_the_last_steps_images_only(tmp_path):
    from lrkit.card import validation_grid

    folder = tmp_path / "validation"
    folder.mkdir()
    for step, color in ((100, "red"), (200, "blue")):
        for i in range(3):
            Image.new("RGB", (512, 512), color).save(folder / f"step{step:06d}_{i:02d}.png")
    grid, step, count = validation_grid(folder)
    assert (step, count) == (200, 3) and grid.size == (3 * 256, 256)
    assert np.asarray(grid)[..., 2].min() == 255 and np.asarray(grid)[..., 0].max() == 0  # all blue
    assert validation_grid(tmp_path / "none") is None
