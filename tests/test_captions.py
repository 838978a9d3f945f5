"""Caption options: dropout and shuffled comma-separated parts, drawn per sample counter, the token kept in place;
applied to the subject's photos only; recorded as training inputs; refused where they cannot work."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lrkit.training import train_concept
from lrkit.training.config import load_config
from lrkit.training.data import CaptionVariation
from lrkit.training.folder import training_inputs
from lrkit.training.model import ConceptModel
from lrkit.training.module import ConceptDataModule, PairedDataset, collate
from lrkit.training.options import ConfigError, TrainingError

CAPTION = "a photo of sks vase, on a table, red flowers, morning light, wooden floor"
PARTS = ["a photo of sks vase", "on a table", "red flowers", "morning light", "wooden floor"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Two photos, one with a comma-separated caption file."""
    folder = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / name)
    (folder / "a.txt").write_text("a photo of {token} {class}, on a table, red flowers, morning light, wooden floor")
    return folder


def config(photos: Path, out: Path | str = "unused", *, data: dict | None = None, **overrides):
    base = dict(base="tiny-random", method="lora", output_dir=str(out), accelerator="cpu", validation=dict(prompts=[]),
                data={"photos": str(photos), "class_word": "vase", "resolution": 64, "repeats": 1, **(data or {})})
    return load_config(base, **overrides)


# ------------------------------------------------------------------------------------------------ the variation


def test_a_samples_caption_is_a_function_of_seed_and_counter():
    vary = CaptionVariation("sks", seed=3, dropout=0.3, shuffle=True, keep_tokens=1)
    first = [vary.apply(CAPTION, c) for c in range(50)]
    assert first == [CaptionVariation("sks", seed=3, dropout=0.3, shuffle=True, keep_tokens=1).apply(CAPTION, c)
                     for c in range(50)]
    assert [vary.apply(CAPTION, c) for c in reversed(range(50))] == first[::-1]  # no state between calls
    assert len(set(first)) > 10
    other_seed = [CaptionVariation("sks", seed=4, dropout=0.3, shuffle=True, keep_tokens=1).apply(CAPTION, c)
                  for c in range(50)]
    assert other_seed != first


def test_dropout_empties_the_caption_with_its_probability():
    n = 4000
    for p in (0.1, 0.5):
        dropped = sum(CaptionVariation("sks", dropout=p).apply(CAPTION, c) == "" for c in range(n))
        assert abs(dropped / n - p) < 4 * math.sqrt(p * (1 - p) / n), (p, dropped)
    kept = [CaptionVariation("sks", dropout=0.0).apply(CAPTION, c) for c in range(200)]
    assert kept == [CAPTION] * 200  # no dropout, no shuffle: the caption as it is
    # the draws are one stream: a sample dropped at 0.1 is dropped at 0.5 too
    at_01 = {c for c in range(n) if CaptionVariation("sks", dropout=0.1).apply(CAPTION, c) == ""}
    at_05 = {c for c in range(n) if CaptionVariation("sks", dropout=0.5).apply(CAPTION, c) == ""}
    assert at_01 <= at_05


@pytest.mark.parametrize("keep", [0, 1, 2, 3])
def test_shuffle_keeps_the_first_parts_in_place_and_permutes_the_rest(keep):
    vary = CaptionVariation("sks", shuffle=True, keep_tokens=keep)
    kept = max(keep, 1)  # the token is in the first part: it stays, whatever keep_tokens says
    orders = set()
    for c in range(300):
        parts = vary.apply(CAPTION, c).split(", ")
        assert parts[:kept] == PARTS[:kept]
        assert sorted(parts[kept:]) == sorted(PARTS[kept:])
        orders.add(tuple(parts))
    assert len(orders) == math.factorial(len(PARTS) - kept)  # every order of the rest occurs


def test_the_part_holding_the_token_and_every_part_before_it_stay_in_place():
    caption = "red flowers, studio light,  a photo of <my-vase> vase ,, on a table, wooden floor"
    vary = CaptionVariation("<my-vase>", shuffle=True, keep_tokens=1)
    for c in range(100):
        parts = vary.apply(caption, c).split(", ")
        assert parts[:3] == ["red flowers", "studio light", "a photo of <my-vase> vase"]  # stripped, empty dropped
        assert sorted(parts[3:]) == ["on a table", "wooden floor"]
    # the token is matched as a word: "sks" inside "asks" or "<sks>" is not the token "sks"
    assert CaptionVariation("sks", keep_tokens=0).kept_parts(["she asks", "a <sks> vase", "x"]) == 0
    assert CaptionVariation("sks", keep_tokens=0).kept_parts(["she asks", "a sks vase", "x"]) == 2
    assert CaptionVariation("sks", keep_tokens=5).kept_parts(["a sks vase", "x"]) == 2


# ------------------------------------------------------------------------------------------------ in the run


def test_the_options_vary_the_photos_captions_and_leave_class_images_theirs(photos, tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (64, 64), "gray").save(class_dir / "class_00000.png")
    cfg = config(photos, method="dreambooth", data=dict(caption_dropout=0.25, shuffle_caption=True, keep_tokens=1),
                 dreambooth=dict(class_dir=str(class_dir), num_class_images=1))
    dm = ConceptDataModule(cfg)
    dm.setup()
    dataset = PairedDataset(dm.instance, dm.prior, captions=dm.captions)
    vary = CaptionVariation("sks", seed=0, dropout=0.25, shuffle=True, keep_tokens=1)
    photo_captions = [dm.instance[c]["caption"] for c in range(2)]
    for c in range(40):
        item = dataset[c]
        assert item["instance"]["caption"] == vary.apply(photo_captions[c % 2], c)
        assert item["prior"]["caption"] == "a photo of vase"
    captions = [dataset[c]["instance"]["caption"] for c in range(0, 80, 2)]  # photo a
    assert "" in captions and len(set(captions)) > 5
    assert all(c == "" or c.startswith("a photo of sks vase, ") for c in captions)


def test_caption_dropout_with_cached_text_embeddings_gives_the_uncached_loss(photos):
    plain_config = config(photos, data=dict(caption_dropout=0.5))
    dm = ConceptDataModule(plain_config)
    dataset = PairedDataset(dm.instance, None, captions=dm.captions)
    items = [dataset[c] for c in range(8)]
    assert {it["caption"] == "" for it in items} == {True, False}
    batch = collate(items)
    plain = ConceptModel(plain_config)
    cached = ConceptModel(config(photos, data=dict(caption_dropout=0.5), cache_text_embeddings=True))
    cached.load_state_dict(plain.state_dict())
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(8)]  # noqa: E731
    expected, _ = plain.loss(batch, generators())
    torch.testing.assert_close(cached.loss(batch, generators())[0], expected, atol=1e-6, rtol=1e-6)
    assert "" in cached._text_cache  # the empty caption is one more cached entry


def test_shuffle_with_cached_text_embeddings_is_refused_naming_both(photos):
    with pytest.raises(ConfigError) as err:
        config(photos, data=dict(shuffle_caption=True), cache_text_embeddings=True)
    message = str(err.value)
    assert "data.shuffle_caption" in message and "cache_text_embeddings" in message and "\n" not in message


def test_concept_em_refuses_caption_options_and_buckets():
    em = dict(concepts=[dict(token="<v1>", initializer="ball")], images=[dict(file="a.png", concepts=["<v1>"])])
    for data, named in ((dict(caption_dropout=0.1), "data.caption_dropout"),
                        (dict(shuffle_caption=True), "data.shuffle_caption"), (dict(buckets=True), "data.buckets")):
        with pytest.raises(ConfigError, match=named):
            load_config(dict(method="concept_em", concept_em=em, data=dict(photos="x", resolution=64, **data)))


def test_caption_options_are_training_inputs(photos):
    shots = ConceptDataModule(config(photos)).photos
    plain = training_inputs(config(photos), shots)["data"]
    assert (plain["caption_dropout"], plain["shuffle_caption"], plain["keep_tokens"]) == (None, None, None)
    assert training_inputs(config(photos, data=dict(keep_tokens=3)), shots)["data"] == plain  # no shuffle: no effect
    varied = training_inputs(config(photos, data=dict(caption_dropout=0.1, shuffle_caption=True, keep_tokens=2)),
                             shots)["data"]
    assert (varied["caption_dropout"], varied["shuffle_caption"], varied["keep_tokens"]) == (0.1, True, 2)


def test_resuming_with_other_caption_options_is_refused(photos, tmp_path):
    out = tmp_path / "run"
    train_concept(config(photos, out, max_steps=2, data=dict(caption_dropout=0.1, shuffle_caption=True)))
    with pytest.raises(TrainingError, match=r"data.caption_dropout: 0.1 -> 0.2"):
        train_concept(config(photos, out, max_steps=4, overwrite=True,
                             data=dict(caption_dropout=0.2, shuffle_caption=True)))
    with pytest.raises(TrainingError, match=r"data.keep_tokens: 0 -> 2"):
        train_concept(config(photos, out, max_steps=4, overwrite=True,
                             data=dict(caption_dropout=0.1, shuffle_caption=True, keep_tokens=2)))
    with pytest.raises(TrainingError,
                       match=r"data.keep_tokens: 0 -> \(unset\); data.shuffle_caption: True -> \(unset\)"):
        train_concept(config(photos, out, max_steps=4, overwrite=True, data=dict(caption_dropout=0.1)))
