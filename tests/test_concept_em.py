"""concept_em (DESIGN §6.3): config errors, E-step masks, the masked and attention losses, the
Lightning run from the shipped YAML, and the multi-token bundle (combined prompts, one-token views
for Layout-and-Retouch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from safetensors.torch import load_file

from lrkit.cli import main
from lrkit.concept import Concept, ConceptError
from lrkit.masks import load_mask_png, mask_iou
from lrkit.models import load_base
from lrkit.training.config import ConfigError, load_config
from lrkit.photos import DataError

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "configs" / "train" / "concept_em.yaml"
V, P = "<red-vase>", "<black-pot>"
BOTH = f"a photo of {V} and {P} on the beach"


def latents(pipe, prompt: str = BOTH) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def em_config(**concept_em):
    base = dict(concepts=[dict(token="<v1>", initializer="ball"), dict(token="<v2>", initializer="vase")],
                images=[dict(file="a.png", concepts=["<v1>", "<v2>"]), dict(file="b.png", concepts=["<v2>"])])
    base.update(concept_em)
    return load_config(dict(base="tiny-random", method="concept_em", data=dict(photos="x", resolution=64),
                            concept_em=base))


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("change, message", [
    (dict(images=[dict(file="a.png", concepts=["<v1>"])]), r"\['<v2>'\] are shown by no image"),
    (dict(concepts=[dict(token="<v1>", initializer="a"), dict(token="<v1>", initializer="b")],
          images=[dict(file="a.png", concepts=["<v1>"])]), "'<v1>' is listed twice"),
    (dict(concepts=[dict(token="<v1>", initializer="a"), dict(token="<v1>x", initializer="b")],
          images=[dict(file="a.png", concepts=["<v1>", "<v1>x"])]), "overlap"),
    (dict(images=[dict(file="a.png", concepts=["<v1>", "<v2>"]), dict(file="b.png", concepts=[])]),
     r"images\[1\] \(b.png\) lists no concept"),
    (dict(images=[dict(file="a.png", concepts=["<v1>", "<v3>"])]), r"lists \['<v3>'\], which are not in"),
    (dict(concepts=[]), "concept_em.concepts is empty"),
    (dict(concepts=[dict(token="<v1>", initializer=""), dict(token="<v2>", initializer="vase")]), "initializer is empty"),
    (dict(images=[dict(file="a.png", concepts=["<v1>"]), dict(file="a.png", concepts=["<v2>"])]), "more than once"),
])
def test_bad_concept_lists_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        em_config(**change)


def test_concept_em_needs_center_crops():
    with pytest.raises(ConfigError, match="center_crop"):
        load_config(em_config().to_dict(), data__center_crop=False)


def test_listed_image_missing_from_the_folder_is_named(tmp_path):
    from lrkit.photos import Photo
    from lrkit.training.em import select_images

    photo = Photo(name="a.png", image=None)
    with pytest.raises(DataError, match=r"images\[1\].file 'b.png' is not among the photos"):
        select_images([photo], em_config())


# ------------------------------------------------------------------------------------ E-step pieces


def two_blobs(size: int = 16):
    """Two coloured squares on a grey ground, and attention-like maps that overlap and bleed."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    left = (xs >= 2) & (xs < 7) & (ys >= 5) & (ys < 11)
    right = (xs >= 9) & (xs < 14) & (ys >= 4) & (ys < 12)
    image = torch.full((3, size, size), 0.5)
    image[:, left] = torch.tensor([0.9, 0.1, 0.1])[:, None]
    image[:, right] = torch.tensor([0.1, 0.2, 0.9])[:, None]

    def blur(m):  # attention is smooth and spills over the object edges
        k = torch.ones(1, 1, 5, 5) / 25
        return torch.nn.functional.conv2d(m[None, None].float(), k, padding=2)[0, 0]

    g = torch.Generator().manual_seed(0)
    maps = torch.stack([blur(left) + 0.3 * blur(right), blur(right) + 0.3 * blur(left)])
    maps = maps + 0.05 * torch.rand(maps.shape, generator=g)
    return image, maps, (left, right)


def test_masks_from_maps_separate_two_concepts_and_the_crf_sharpens_them():
    from lrkit.training.em import masks_from_maps

    image, maps, truth = two_blobs()
    with_crf = masks_from_maps(maps, image, em_config().concept_em)
    without = masks_from_maps(maps, image, em_config(crf=False).concept_em)
    assert not (with_crf[0] & with_crf[1]).any()  # one token per pixel
    ious = [mask_iou(m, t) for m, t in zip(with_crf, truth)]
    assert min(ious) >= 0.9, ious
    assert sum(ious) > sum(mask_iou(m, t) for m, t in zip(without, truth))  # the CRF helps


@pytest.mark.parametrize("latent, image, resolution, factor", [
    ((16, 16), (64, 64), 64, 4),     # the toy model: the CRF runs on the picture
    ((16, 16), (64, 64), 32, 2),
    ((16, 16), (64, 64), 16, 1),     # the latent grid
    ((16, 16), (64, 64), 8, 1),      # never coarser than the latent grid
    ((16, 16), (64, 64), 256, 4),    # never finer than the picture
    ((64, 64), (512, 512), 64, 1),   # SD 1.5 at 512 px: the latent grid, as DESIGN §6.3
    ((16, 12), (64, 48), 64, 4),
])
def test_crf_grid_lies_between_the_latent_grid_and_the_picture(latent, image, resolution, factor):
    from lrkit.training.em import crf_factor

    assert crf_factor(latent, image, resolution) == factor


def test_crf_on_the_latent_grid_is_the_latent_resolution_crf():
    """crf_resolution = the latent grid: the CRF of the binarised map on the area-averaged picture, unchanged."""
    from lrkit.masks import crf_refine, minmax, otsu_threshold, resize_map
    from lrkit.training.em import crf_params, masks_from_maps

    small, maps, _ = two_blobs()
    image = resize_map(small, (64, 64))  # the picture, 4 pixels per latent pixel
    options = em_config(crf_resolution=16).concept_em
    got = masks_from_maps(maps[:1], image, options)[0]
    c = options.crf_confidence
    binary = minmax(maps[:1])[0] > otsu_threshold(minmax(maps[:1])[0])
    want = crf_refine(torch.where(binary, c, 1.0 - c), resize_map(image, (16, 16)), crf_params(options))
    assert torch.equal(got, want)


@pytest.mark.slow
def test_toy_world_estep_masks_reach_the_target_on_the_picture_grid(tmp_path):
    """The mask target on the toy model: the first E-step's masks of two subjects in one picture reach
    IoU >= 0.7 with the renderer's ground truth; the CRF on the latent grid (16x16) misses the vase's ears and
    neck, whose latent pixels mix purple with sand and sky."""
    from lrkit.masks import resize_map
    from lrkit.toyworld import subject_pair
    from lrkit.training.train import train_concept

    sample = subject_pair(("toy_ball", "toy_vase"), "beach")  # the bench's picture
    (tmp_path / "photos").mkdir()
    sample.image.save(tmp_path / "photos" / "scene.png")
    truth = [resize_map(torch.from_numpy(m).float(), (16, 16)) >= 0.5 for m in sample.masks]

    def first_masks(resolution):
        out = tmp_path / f"crf{resolution}"
        train_concept(dict(
            base="toy", method="concept_em", output_dir=str(out), seed=0, max_steps=1, accelerator="cpu",
            precision="32", validation=dict(prompts=[]),
            data=dict(photos=str(tmp_path / "photos"), resolution=64, repeats=1, random_flip=0.0,
                      caption_template="a photo of {token} on the beach"),
            concept_em=dict(concepts=[dict(token="<v1>", initializer="red ball", class_word="ball"),
                                      dict(token="<v2>", initializer="purple vase", class_word="vase")],
                            images=[dict(file="scene.png", concepts=["<v1>", "<v2>"])], steps_per_round=1,
                            attention_levels=[0], update_masks=False, crf_resolution=resolution)))
        return [mask_iou(load_mask_png(out / "em" / "round00" / f"img00-v{k}.png"), t) for k, t in ((1, truth[0]),
                                                                                                   (2, truth[1]))]

    fine, coarse = first_masks(64), first_masks(16)
    assert min(fine) >= 0.7, fine
    assert coarse[1] < 0.7 and sum(fine) > sum(coarse), (fine, coarse)


def test_dataset_samples_non_empty_concept_subsets_deterministically():
    from PIL import Image

    from lrkit.photos import Photo
    from lrkit.training.em import ConceptImageDataset

    photos = [Photo(name=n, image=Image.new("RGB", (64, 64), c)) for n, c in (("a.png", "red"), ("b.png", "blue"))]
    config = load_config(em_config().to_dict(), data__caption_template="a photo of {token} on the beach")
    ds = ConceptImageDataset(photos, config)
    seen = set()
    for i in range(40):
        item = ds[i]
        names = config.concept_em.images[item["photo_index"]].concepts
        chosen = [names[k] for k in item["concepts"]]
        assert chosen and item["caption"] == f"a photo of {' and '.join(chosen)} on the beach"
        assert ds[i]["caption"] == item["caption"]  # same index, same sample
        seen.add(tuple(chosen))
    assert {("<v1>",), ("<v2>",), ("<v1>", "<v2>")} <= seen


def test_each_image_may_bring_its_own_caption_template():
    from lrkit.photos import Photo
    from lrkit.training.em import ConceptImageDataset

    photos = [Photo(name="a.png", image=Image.new("RGB", (64, 64), "red"), caption="{token} in the snow"),
              Photo(name="b.png", image=Image.new("RGB", (64, 64), "blue"))]
    config = load_config(em_config().to_dict(), data__caption_template="a photo of {token} on the beach")
    ds = ConceptImageDataset(photos, config)
    assert ds.caption_for(["<v1>", "<v2>"], 0) == "<v1> and <v2> in the snow"
    assert ds.caption_for(["<v2>"], 1) == "a photo of <v2> on the beach"
    for i in range(8):
        expected = "in the snow" if ds[i]["photo_index"] == 0 else "on the beach"
        assert ds[i]["caption"].endswith(expected)
    assert ds.deterministic_variants(0)[0]["caption"] == "<v1> and <v2> in the snow"
    photos[0] = Photo(name="a.png", image=photos[0].image, caption="a red ball in the snow")
    with pytest.raises(DataError, match=r"a.png: concept_em reads its caption as a template.*must contain \{token\}"):
        ConceptImageDataset(photos, config)


# ------------------------------------------------------------------------------------ the M-step losses


@pytest.fixture(scope="module")
def em_model():
    from lrkit.training.model import ConceptModel

    return ConceptModel(em_config(attention_loss_weight=1.0))


def batch_for(model, chosen=((0, 1),)):
    g = torch.Generator().manual_seed(3)
    tokens = [" and ".join(["<v1>", "<v2>"][k] for k in c) for c in chosen]
    return {"pixel_values": torch.rand((len(chosen), 3, 64, 64), generator=g) * 2 - 1,
            "caption": [f"a photo of {t}" for t in tokens], "photo_index": torch.zeros(len(chosen), dtype=torch.long),
            "flipped": torch.tensor([False] * len(chosen)), "concepts": [list(c) for c in chosen],
            "num_instance": len(chosen), "original_size": torch.tensor([[64, 64]] * len(chosen)),
            "crop_top_left": torch.zeros(len(chosen), 2, dtype=torch.long)}


def test_pixel_weights_of_ones_give_the_plain_loss_and_a_mask_restricts_it(em_model):
    batch = batch_for(em_model)
    plain, _ = em_model.diffusion_loss(batch, torch.Generator().manual_seed(0))
    ones, _ = em_model.diffusion_loss(batch, torch.Generator().manual_seed(0), pixel_weights=torch.ones(1, 1, 16, 16))
    assert torch.allclose(plain, ones, rtol=1e-6)
    half = torch.zeros(1, 1, 16, 16)
    half[..., :8] = 1
    left, _ = em_model.diffusion_loss(batch, torch.Generator().manual_seed(0), pixel_weights=half)
    right, _ = em_model.diffusion_loss(batch, torch.Generator().manual_seed(0), pixel_weights=1 - half)
    assert not torch.allclose(left, plain)
    assert torch.allclose((left + right) / 2, plain, rtol=1e-5)  # equal halves: the mean of the two


def test_attention_loss_moves_each_tokens_attention_towards_its_mask(em_model):
    """M-steps with fixed masks (left half <v1>, right half <v2>) cut the attention loss (one fixed noise draw)."""
    from lrkit.training.em import EMState, attention_loss

    method = em_model.method
    rows = em_model.text_encoder.get_input_embeddings().new_rows
    start = rows.detach().clone()
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, :, :8], masks[1, :, 8:] = True, True
    method.em = EMState(masks=[masks])
    batch = batch_for(em_model)
    optimizer = torch.optim.Adam([rows], lr=0.1)

    def attn_term() -> float:
        _, logs = method.loss(em_model, batch, torch.Generator().manual_seed(0))
        return float(logs["loss/attention"])

    try:
        before = attn_term()
        for step in range(25):
            loss, logs = method.loss(em_model, batch, torch.Generator().manual_seed(0))
            optimizer.zero_grad()
            loss.backward()
            assert rows.grad is not None and (rows.grad.abs().sum(1) > 0).all()  # both tokens learn
            optimizer.step()
        after = attn_term()
    finally:
        with torch.no_grad():
            rows.copy_(start)
    assert after < 0.85 * before, (before, after)
    assert attention_loss(torch.stack([masks[0].float(), masks[1].float()]) * 0.3, masks) == 0  # max-normalised


@pytest.mark.parametrize("base", ["tiny-random", "tiny-random-xl"])
def test_gradient_checkpointing_gives_the_same_gradients(base):
    """The masked diffusion loss and the attention loss through gradient checkpointing (the UNet blocks run again
    in the backward, with the recording processors still in place) give the token rows the gradients of the
    plain backward."""
    from lrkit.training.em import EMState
    from lrkit.training.model import ConceptModel

    grads = []
    for checkpointing in (False, True):
        config = em_config(attention_loss_weight=1.0)
        config.base, config.gradient_checkpointing = base, checkpointing
        model = ConceptModel(config)
        assert model.unet.is_gradient_checkpointing == checkpointing
        masks = torch.zeros(2, 16, 16, dtype=torch.bool)
        masks[0, :, :8], masks[1, :, 8:] = True, True
        model.method.em = EMState(masks=[masks])
        model.unet.train()
        loss, logs = model.method.loss(model, batch_for(model), torch.Generator().manual_seed(0))
        loss.backward()
        model.method.release_hooks()
        assert logs["loss/attention"] > 0
        grads.append(torch.cat([encoder.get_input_embeddings().new_rows.grad for encoder in model.text_encoders], 1))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)


def test_batch_masks_pick_the_sampled_concepts_and_mirror_flipped_samples():
    from lrkit.training.em import EMState

    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :, 0], masks[1, 0, :] = True, True
    state = EMState(masks=[masks])
    batch = {"photo_index": torch.tensor([0, 0]), "flipped": torch.tensor([False, True]), "concepts": [[1], [0, 1]]}
    plain, flipped = state.batch_masks(batch)
    assert torch.equal(plain, masks[[1]].float())
    assert torch.equal(flipped, masks.flip(-1).float()) and flipped[0, :, 3].all()
    with pytest.raises(RuntimeError, match="no masks yet"):
        EMState().batch_masks(batch)


def test_unclaimed_pixels_are_those_of_no_concept_of_the_image():
    from lrkit.training.em import EMState

    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :, 0], masks[1, 0, :] = True, True
    state = EMState(masks=[masks])
    batch = {"photo_index": torch.tensor([0, 0]), "flipped": torch.tensor([False, True]), "concepts": [[1], [0, 1]]}
    free = state.unclaimed(batch)
    assert free.shape == (2, 1, 4, 4)
    assert torch.equal(free[0, 0], (~(masks[0] | masks[1])).float())
    assert torch.equal(free[1, 0], free[0, 0].flip(-1))


def test_loss_on_unclaimed_pixels_leaves_out_only_the_unnamed_concepts(em_model, monkeypatch):
    """The loss region is the named concepts' masks, plus (loss_on_unclaimed) every pixel no concept claims."""
    from lrkit.training.em import EMState

    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, :, :5], masks[1, :, 11:] = True, True
    method = em_model.method
    method.em = EMState(masks=[masks])
    seen = []
    original = em_model.diffusion_loss
    monkeypatch.setattr(em_model, "diffusion_loss",
                        lambda batch, gens, pixel_weights=None: seen.append(pixel_weights) or original(batch, gens, pixel_weights))
    batch = batch_for(em_model, chosen=((0,), (0, 1)))
    for flag in (False, True):
        monkeypatch.setattr(method.options, "loss_on_unclaimed", flag)
        method.loss(em_model, batch, torch.Generator().manual_seed(0))
    named, with_unclaimed = seen
    assert torch.equal(named[0, 0], masks[0].float()) and torch.equal(named[1, 0], (masks[0] | masks[1]).float())
    assert torch.equal(with_unclaimed[0, 0], (~masks[1]).float())  # all but <v2>, which the caption leaves out
    assert with_unclaimed[1].eq(1).all()  # both named: the whole picture


def test_mask_state_survives_a_checkpoint():
    from lrkit.training.em import EMState, MaskEstimation

    config = em_config()
    masks = [torch.rand(2, 16, 16) > 0.5, torch.rand(1, 16, 16) > 0.5]
    saved = MaskEstimation(config, EMState(masks=masks, last_step=50, rounds=[{"round": 0, "step": 0}])).state_dict()
    restored = MaskEstimation(config, EMState())
    restored.load_state_dict(saved)
    assert restored.state.last_step == 50 and all(torch.equal(a, b) for a, b in zip(restored.state.masks, masks))


@pytest.mark.parametrize("after", ["stop", "freeze"])
def test_converged_masks_stop_training_or_stay_fixed_while_the_tokens_train_on(after, monkeypatch):
    from types import SimpleNamespace

    from lrkit.training.em import EMState, MaskEstimation

    callback = MaskEstimation(em_config(steps_per_round=5, after_convergence=after), EMState(last_step=0))
    estep_steps = []

    def fake_estep(trainer, pl_module):  # the second E-step finds the masks unchanged
        estep_steps.append(trainer.global_step)
        callback.state.last_step, callback.state.converged = trainer.global_step, len(estep_steps) >= 2

    monkeypatch.setattr(callback, "run_estep", fake_estep)
    trainer = SimpleNamespace(global_step=0, max_steps=30, should_stop=False)
    for step in range(1, 31):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None, None, None, 0)
        if trainer.should_stop:
            break
    callback.on_train_end(trainer, None)
    assert estep_steps == [5, 10]
    assert (trainer.should_stop, trainer.global_step) == ((True, 10) if after == "stop" else (False, 30))


def test_after_convergence_must_be_stop_or_freeze():
    with pytest.raises(ConfigError, match="after_convergence must be 'stop' or 'freeze'"):
        em_config(after_convergence="continue")


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module", params=["tiny-random", "tiny-random-xl"])
def trained(request, tmp_path_factory, vase_photos, capture_trained_model):
    """The shipped YAML on each family's tiny base: 4 photos (2 with both concepts), 2 rounds of 3 steps.
    Returns (the trained model, the run folder, the base)."""
    base = request.param
    out = tmp_path_factory.mktemp(f"em-run-{base}")
    with capture_trained_model() as captured:
        code = main(["train", "--config", str(YAML), "--base", base, "--output_dir", str(out),
                     "--data.photos", str(vase_photos(4)), "--data.resolution", "64", "--data.repeats", "1",
                     "--max_steps", "6", "--concept_em.steps_per_round", "3", "--concept_em.attention_timesteps", "4",
                     "--precision", "32", "--accelerator", "cpu", "--validation.prompts", "[]",
                     "--log_every_n_steps", "1", "--concept_em.convergence_iou", "1.0"])
    assert code == 0
    return captured["model"], out, base


def test_em_run_writes_rounds_and_a_bundle_with_per_token_masks(trained):
    model, out, base = trained
    rounds = json.loads((out / "em" / "rounds.json").read_text())
    assert [r["step"] for r in rounds][:2] == [0, 3] and len(rounds) >= 2
    assert all(0.0 <= r["min_iou_change"] <= 1.0 for r in rounds[1:])
    concept = Concept.load(out / "concept")
    assert concept.method == "concept_em" and [t.token for t in concept.tokens] == [V, P]
    vase, pot = concept.tokens
    assert len(vase.masks) == 4 and len(pot.masks) == 2  # per photo that shows the token
    assert set(pot.masks) == {concept.refs[0], concept.refs[1]}
    final = model.method.em.masks
    step = 64 // final[0].shape[-1]  # latent pixel in picture pixels
    for i, ref in enumerate(concept.refs[:2]):
        for k, spec in enumerate(concept.tokens):
            png = load_mask_png(concept.path / spec.masks[ref])
            assert png.shape == (64, 64)
            assert torch.equal(png[::step, ::step], final[i][k])  # the exported mask is the last E-step's
        assert not (final[i][0] & final[i][1]).any()


def test_the_token_vectors_are_in_the_familys_layout(trained):
    """SD: one file, `{token: vectors}`. SDXL, where a file holds one token (`clip_l` / `clip_g`, as A1111 reads it):
    a file per token under embeddings/, each token naming its own."""
    model, out, base = trained
    concept = Concept.load(out / "concept")
    widths = [encoder.get_input_embeddings().weight.shape[1] for encoder in model.text_encoders]
    if base == "tiny-random":
        assert concept.files == {"embeddings": "learned_embeds.safetensors"}
        assert all(t.embeddings is None for t in concept.tokens)
        state = load_file(concept.file("embeddings"))
        assert {k: tuple(v.shape) for k, v in state.items()} == {V: (1, widths[0]), P: (1, widths[0])}
        return
    assert concept.files == {"embeddings": "embeddings"}
    assert [t.embeddings for t in concept.tokens] == ["embeddings/red-vase.safetensors", "embeddings/black-pot.safetensors"]
    for spec in concept.tokens:
        state = load_file(concept.path / spec.embeddings)
        assert {k: tuple(v.shape) for k, v in state.items()} == {"clip_l": (1, widths[0]), "clip_g": (1, widths[1])}
    manifest = json.loads((out / "concept" / "concept.json").read_text())
    assert [t["embeddings"] for t in manifest["tokens"]] == [t.embeddings for t in concept.tokens]


def test_the_bundle_gives_the_trained_models_output_through_lrkit_and_stock_loaders(trained):
    """`Concept.apply` and diffusers' own `load_textual_inversion` calls (per text encoder on SDXL) draw what the
    trained model draws, for a prompt with both tokens."""
    from stock_loading import load_stock_embeddings

    model, out, base = trained
    concept = Concept.load(out / "concept")
    model.eval()
    expected = latents(model.pipeline())
    torch.testing.assert_close(latents(concept.apply(load_base(base))), expected, atol=1e-5, rtol=1e-5)
    stock = load_base(base)
    load_stock_embeddings(stock, concept)
    torch.testing.assert_close(latents(stock), expected, atol=1e-5, rtol=1e-5)


def test_the_cards_diffusers_code_loads_every_token(trained, tmp_path):
    """The model card's diffusers code (a loop over the token files on SDXL) gives `Concept.apply`'s pipeline."""
    from lrkit.card import read_card
    from stock_loading import diffusers_block, run_card_code

    _, out, base = trained
    concept = Concept.load(out / "concept")
    load_base(base).save_pretrained(tmp_path / "base")
    _, body = read_card(concept.path)
    theirs = latents(run_card_code(diffusers_block(body), concept.path, tmp_path / "base"))
    torch.testing.assert_close(theirs, latents(concept.apply(load_base(base))), rtol=0, atol=1e-5)


@pytest.mark.parametrize("trained", ["tiny-random-xl"], indirect=True)
def test_several_tokens_in_one_sdxl_file_are_refused_naming_the_fix(trained, tmp_path):
    """On SDXL a vectors file holds one token (`clip_l` / `clip_g`): a bundle that lists several learned tokens
    against one file is refused, and the pipeline is left as it was."""
    import shutil

    _, out, base = trained
    bundle = tmp_path / "bundle"
    shutil.copytree(out / "concept", bundle)
    shutil.copy(bundle / "embeddings" / "red-vase.safetensors", bundle / "learned_embeds.safetensors")
    shutil.rmtree(bundle / "embeddings")
    manifest = json.loads((bundle / "concept.json").read_text())
    manifest["files"]["embeddings"] = "learned_embeds.safetensors"
    for token in manifest["tokens"]:
        del token["embeddings"]
    (bundle / "concept.json").write_text(json.dumps(manifest))
    pipe = load_base(base)
    vocab = len(pipe.tokenizer)
    with pytest.raises(ConceptError, match=r"holds one token \(clip_l, clip_g\), but concept .* lists 2 learned "
                                           r"tokens; give each token its own file under embeddings/"):
        Concept.load(bundle).apply(pipe)
    assert len(pipe.tokenizer) == vocab


def test_combined_prompt_uses_both_learned_tokens(trained):
    _, out, base = trained
    concept = Concept.load(out / "concept")
    pipe = concept.apply(load_base(base))
    both = latents(pipe)
    assert not torch.allclose(both, latents(pipe, f"a photo of {V} and {V} on the beach"))
    assert not torch.allclose(both, latents(pipe, f"a photo of {P} and {P} on the beach"))


def test_one_token_view_runs_layout_retouch(trained):
    from lrkit.inference import GenerationOptions, LayoutRetouchPipeline

    _, out, base = trained
    concept = Concept.load(out / "concept")
    view = concept.for_token(P)
    assert view.token == P and view.class_word == "teapot" and view.refs == concept.refs[:2]
    assert view.masks == concept.tokens[1].masks and [t.token for t in view.tokens] == [P, V]
    assert concept.for_token(V).refs == concept.refs
    with pytest.raises(ConceptError, match="has no token '<nope>'"):
        concept.for_token("<nope>")
    pipe = LayoutRetouchPipeline.from_concept(base, view)
    result = pipe(f"a photo of {P} on the beach", seeds=0, options=GenerationOptions.of(num_inference_steps=3, lam=0.5))
    image = np.asarray(result[0].image)
    assert image.shape == (64, 64, 3)
    manifest = json.loads((out / "concept" / "concept.json").read_text())
    assert [t["token"] for t in manifest["tokens"]] == [V, P]  # the view never rewrote the bundle


def test_export_from_the_checkpoint_keeps_the_masks(trained, tmp_path):
    from lrkit.training.train import export_checkpoint

    _, out, base = trained
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    saved = ckpt["callbacks"]["MaskEstimation"]["masks"]
    bundle = Concept.load(export_checkpoint(out / "checkpoints" / "last.ckpt", tmp_path / "exported"))
    assert [t.token for t in bundle.tokens] == [V, P] and len(bundle.refs) == 4
    step = 64 // saved[0].shape[-1]
    for i, ref in enumerate(bundle.refs[:2]):
        for k, spec in enumerate(bundle.tokens):
            assert torch.equal(load_mask_png(bundle.path / spec.masks[ref])[::step, ::step], saved[i][k])
    trained_bundle = Concept.load(out / "concept")
    assert bundle.files == trained_bundle.files and bundle.tokens == trained_bundle.tokens
    for rel in [t.embeddings or bundle.files["embeddings"] for t in bundle.tokens]:
        a, b = load_file(bundle.path / rel), load_file(trained_bundle.path / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_cli_picks_one_token_of_a_multi_concept_bundle(trained, tmp_path, capsys):
    _, out, base = trained
    args = ["generate", "--base", base, "--concept", str(out / "concept"), "--prompt", "a photo of {}",
            "--seeds", "[0]", "--options.num_inference_steps", "2", "--options.mode", "personalized"]
    assert main([*args, "--token", P, "--out", str(tmp_path / "pot")]) == 0
    assert main([*args, "--token", V, "--out", str(tmp_path / "vase")]) == 0
    pot, vase = (np.asarray(Image.open(tmp_path / name / "p000_s0.png")) for name in ("pot", "vase"))
    assert not np.array_equal(pot, vase)  # '{}' became each token's own phrase
    assert main([*args, "--token", "<nope>", "--out", str(tmp_path / "bad")]) == 2
    assert "has no token '<nope>'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("base", ["tiny-random", "tiny-random-xl"])
def test_lora_with_the_text_encoder_round_trips_through_stock_loaders(base, tmp_path, vase_photos,
                                                                      capture_trained_model):
    """train_lora + lora.train_text_encoder: the tokens, the UNet LoRA and the text-encoder LoRA (SDXL: both
    encoders') all train, and the bundle gives the trained model's output through lrkit's loader and through
    diffusers' own."""
    from lrkit.models import build_tiny_random, build_tiny_random_xl
    from stock_loading import load_stock_embeddings

    out = tmp_path / "em-lora"
    with capture_trained_model() as captured:
        code = main(["train", "--config", str(YAML), "--base", base, "--output_dir", str(out),
                     "--data.photos", str(vase_photos(4)), "--data.resolution", "64", "--data.repeats", "1",
                     "--max_steps", "3", "--concept_em.steps_per_round", "3", "--concept_em.attention_timesteps", "2",
                     "--concept_em.train_lora", "true", "--lora.train_text_encoder", "true", "--lora.rank", "4",
                     "--lora.alpha", "8", "--optim.lr", "1e-2", "--precision", "32", "--accelerator", "cpu",
                     "--validation.prompts", "[]"])
    assert code == 0
    model = captured["model"]
    groups = {g["name"]: g["params"] for g in model.method.param_groups(model)}
    encoders = {"embeddings", "unet_lora"} | {f"{name}_lora" for name in model.family.text_encoders}
    assert set(groups) == encoders and all(groups.values())
    for encoder in model.text_encoders:  # every encoder's LoRA moved (SDXL's first: not its unused last layer)
        assert any(p.abs().sum() > 0 for name, p in encoder.named_parameters() if "lora_B" in name)
    concept = Concept.load(out / "concept")
    assert concept.lora.text_encoder_targets and concept.files["lora"]

    model.eval()
    expected = latents(model.pipeline())
    torch.testing.assert_close(latents(concept.apply(load_base(base))), expected, atol=1e-5, rtol=1e-5)
    stock = {"tiny-random": build_tiny_random, "tiny-random-xl": build_tiny_random_xl}[base](0)
    load_stock_embeddings(stock, concept)
    stock.load_lora_weights(str(concept.path))
    torch.testing.assert_close(latents(stock), expected, atol=1e-5, rtol=1e-5)
