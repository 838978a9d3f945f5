"""lrkit.evaluation: metric maths against hand-computed cosines, embedders on tiny CLIP/DINO, loading errors,
prompt sets, and the tables."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lrkit.evaluation import metrics
from lrkit.evaluation.metrics import (ClipEmbedder, DinoEmbedder, MetricModelError, box_center, layout_diversity,
                                      mask_center, pairwise_diversity, reference_similarity, text_similarity)
from lrkit.evaluation.tiny import save_tiny_metric_models, tiny_clip, tiny_dino

ROOT = Path(__file__).resolve().parents[1]
SQ = math.sqrt(0.5)


@pytest.fixture(scope="module")
def clip():
    model, processor = tiny_clip(seed=0)
    return ClipEmbedder(model, processor, device="cpu")


@pytest.fixture(scope="module")
def dino():
    model, processor = tiny_dino(seed=0)
    return DinoEmbedder(model, processor, device="cpu")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    files = sorted((ROOT / "data" / "subjects" / "vase").glob("*.jpg"))[:2]
    files += sorted((ROOT / "data" / "subjects" / "red_teapot").glob("*.jpeg"))[:2]
    return [Image.open(f).convert("RGB").resize((64, 64)) for f in files]


# ------------------------------------------------------------------------------------ the maths


def test_reference_similarity_is_the_mean_cosine_to_the_references():
    generated = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -3.0]])
    references = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # cosines: row 0: (1, 0); row 1: (1/sqrt2, 1/sqrt2); row 2: (0, -1)
    expected = torch.tensor([0.5, SQ, -0.5])
    torch.testing.assert_close(reference_similarity(generated, references), expected)


def test_text_similarity_pairs_image_i_with_text_i():
    images = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    texts = torch.tensor([[4.0, 3.0], [0.0, -1.0]])
    torch.testing.assert_close(text_similarity(images, texts), torch.tensor([24 / 25, 0.0]))
    with pytest.raises(ValueError, match="pair up"):
        text_similarity(images, texts[:1])


def test_pairwise_diversity_is_the_mean_cosine_distance_over_pairs():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # pairs (0,1): 1 - 0; (0,2) and (1,2): 1 - 1/sqrt2
    assert pairwise_diversity(e) == pytest.approx((1 + 2 * (1 - SQ)) / 3, abs=1e-6)
    assert pairwise_diversity(e[:1]) == 0.0
    assert pairwise_diversity(torch.stack([e[2], 5 * e[2]])) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="embeddings"):
        pairwise_diversity(torch.zeros(0, 2))


def test_centres_from_masks_and_boxes_and_sigma2_avg():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:6, 4:8] = True  # rows 2..5, columns 4..7
    assert mask_center(mask) == pytest.approx((0.6, 0.4))
    assert mask_center(Image.fromarray(mask.astype(np.uint8) * 255)) == pytest.approx((0.6, 0.4))
    assert mask_center(torch.from_numpy(mask)) == pytest.approx((0.6, 0.4))
    assert mask_center(np.zeros((4, 4), dtype=bool)) is None
    assert box_center((4, 2, 8, 6), (10, 10)) == pytest.approx((0.6, 0.4))
    with pytest.raises(ValueError, match="x1 > x0"):
        box_center((5, 0, 5, 1), (10, 10))
    # prompt a: Var(x) = 0.04, Var(y) = 0; prompt b: Var(y) = 0.08 / 3
    centers = {"a": [(0.2, 0.5), (0.6, 0.5)], "b": [(0.5, 0.1), (0.5, 0.3), (0.5, 0.5)]}
    assert layout_diversity(centers) == pytest.approx((0.04 + 0.08 / 3) / 2)


# ------------------------------------------------------------------------------------ embedders


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) cosines, by hand."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def test_clip_scores_match_hand_computed_cosines(clip, photos):
    generated, refs = photos[:2], photos[2:]
    prompts = ["a photo of a vase", "a teapot on the beach"]
    model, processor = clip.model, clip.processor
    with torch.no_grad():  # the towers and projections directly, not get_*_features
        def image_features(images):
            pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).numpy()

        tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        text = model.text_projection(model.text_model(**tokens).pooler_output).numpy()
        gen, ref = image_features(generated), image_features(refs)
    expected_i = _cos(gen, ref).mean(axis=1)
    expected_t = np.diag(_cos(gen, text))
    np.testing.assert_allclose(metrics.clip_i(clip, generated, refs).numpy(), expected_i, atol=1e-5)
    np.testing.assert_allclose(metrics.clip_t(clip, generated, prompts).numpy(), expected_t, atol=1e-5)


def test_dino_is_the_cls_token_cosine(dino, photos):
    with torch.no_grad():
        pixels = dino.processor(images=photos, return_tensors="pt")["pixel_values"]
        cls = dino.model(pixel_values=pixels).last_hidden_state[:, 0].numpy()
    expected = _cos(cls[:2], cls[2:]).mean(axis=1)
    np.testing.assert_allclose(metrics.dino(dino, photos[:2], photos[2:]).numpy(), expected, atol=1e-5)


def test_an_image_scored_against_itself_gets_the_maximum(clip, dino, photos):
    for embedder in (clip, dino):
        e = embedder.embed_images(photos)
        self_scores = reference_similarity(e, e[:1])  # every image against photo 0
        assert self_scores[0] == pytest.approx(1.0, abs=1e-5)
        assert (self_scores[1:] < self_scores[0]).all()
        assert pairwise_diversity(torch.cat([e[:1], e[:1]])) == pytest.approx(0.0, abs=1e-5)


def test_batching_and_dtype_do_not_change_the_embeddings(photos):
    model, processor = tiny_clip(seed=0)
    one = ClipEmbedder(model, processor, device="cpu", batch_size=1).embed_images(photos)
    many = ClipEmbedder(model, processor, device="cpu", batch_size=3).embed_images(photos)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)
    half = ClipEmbedder(tiny_clip(seed=0)[0], processor, device="cpu", dtype="bfloat16").embed_images(photos)
    assert half.dtype == torch.float32 and half.shape == one.shape
    torch.testing.assert_close(half, one, atol=5e-2, rtol=0)
    torch.testing.assert_close(half.norm(dim=-1), torch.ones(len(photos)))


def test_saved_models_load_by_path_and_score_the_same(tmp_path, clip, dino, photos):
    clip_dir, dino_dir = save_tiny_metric_models(tmp_path, seed=0)
    loaded_clip = ClipEmbedder.from_pretrained(clip_dir, device="cpu")
    loaded_dino = DinoEmbedder.from_pretrained(str(dino_dir), device="cpu")
    torch.testing.assert_close(loaded_clip.embed_images(photos), clip.embed_images(photos))
    torch.testing.assert_close(loaded_clip.embed_texts(["a vase"]), clip.embed_texts(["a vase"]))
    torch.testing.assert_close(loaded_dino.embed_images(photos), dino.embed_images(photos))


def test_unloadable_metric_models_say_what_to_do(tmp_path):
    with pytest.raises(MetricModelError) as err:  # the hub is offline in tests
        ClipEmbedder.from_pretrained("openai/clip-vit-base-patch32")
    message = str(err.value)
    assert "'openai/clip-vit-base-patch32'" in message and "hf download openai/clip-vit-base-patch32" in message
    assert "--clip_model ./clip-vit-base-patch32" in message
    with pytest.raises(MetricModelError, match="(?s)'facebook/dino-vits16'.*--dino_model ./dino-vits16"):
        DinoEmbedder.from_pretrained("facebook/dino-vits16")
    with pytest.raises(MetricModelError, match="does not exist"):
        DinoEmbedder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(MetricModelError, match="no config.json"):
        ClipEmbedder.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------ prompt sets


@pytest.mark.parametrize("name, class_word, stem, count", [
    ("dreambench", "vase", "dreambench_objects", 25),
    ("dreambench", "dog", "dreambench_live", 25),
    ("vico", "teapot", "vico_nonlive", 31),
    ("dreammatcher", "cat", "dreammatcher_challenging_live", 24),
    ("dreammatcher_challenging_nonlive", "cat", "dreammatcher_challenging_nonlive", 24),
])
def test_prompt_sets_resolve_by_class_word(name, class_word, stem, count):
    from lrkit.evaluation.prompts import load_prompt_set

    resolved, prompts = load_prompt_set(name, class_word)
    assert resolved == stem and len(prompts) == count
    assert all("{}" in p for p in prompts)


def test_toy_prompt_set_names_every_scene_and_fills_with_the_concept():
    from types import SimpleNamespace

    from lrkit.evaluation.prompts import load_prompt_set
    from lrkit.jobs import fill_prompts
    from lrkit.toyworld.world import SCENES, scene_of

    name, prompts = load_prompt_set("toy")
    assert name == "toy"
    assert sorted(scene_of(p) for p in prompts) == sorted(s for s, style in SCENES.items() if style.phrase)
    concept = SimpleNamespace(token="<v>", subject_phrase=lambda: "<v> vase")
    assert fill_prompts(prompts, concept)[0] == prompts[0].replace("{}", "<v> vase")


def test_unknown_prompt_set_lists_the_known_ones():
    from lrkit.evaluation.prompts import load_prompt_set

    with pytest.raises(ValueError, match="dreambench_objects"):
        load_prompt_set("dreambenchh", "vase")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompt_set("missing.txt")


# ------------------------------------------------------------------------------------ tables


def test_summary_averages_images_and_prompts_and_skips_missing_values():
    from lrkit.evaluation.report import markdown_table, summarize

    images = [
        {"method": "a", "clip_i": 0.5, "clip_t": 0.1, "dino": None},
        {"method": "a", "clip_i": 0.7, "clip_t": 0.3, "dino": None},
        {"method": "b", "clip_i": 0.2, "clip_t": None, "dino": 0.4},
    ]
    prompts = [{"method": "a", "layout_var": 0.02, "dino_diversity": None},
               {"method": "a", "layout_var": 0.04, "dino_diversity": None},
               {"method": "b", "layout_var": None, "dino_diversity": 0.3}]
    a, b = summarize(images, prompts, ("method",))
    assert a["images"] == 2 and a["CLIP-I"] == pytest.approx(0.6) and a["sigma2_avg"] == pytest.approx(0.03)
    assert math.isnan(a["DINO"]) and b["DINO"] == pytest.approx(0.4) and b["DINO-div"] == pytest.approx(0.3)
    table = markdown_table([a, b], ("method",)).splitlines()
    assert table[0] == "| method | images | CLIP-I | CLIP-T | DINO | sigma2_avg | DINO-div |"  # empty columns dropped
    assert table[2] == "| a | 2 | 0.6000 | 0.2000 | - | 0.0300 | - |"
