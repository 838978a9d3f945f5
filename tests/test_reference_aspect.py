"""Layout-and-Retouch with a reference photo of another aspect ratio (docs/layout-retouch.md, "References of another
aspect ratio"): the reference is inverted at its own aspect ratio, about the generation's area, and the swap reads
its tokens as a set of keys/values on its own token grid. A square reference keeps today's exact path."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lrkit.families import family_of
from lrkit.inference import GenerationOptions, LayoutRetouchPipeline
from lrkit.inference.inversion import ddim_invert
from lrkit.inference.processors import AttentionCache, MultiSourceSwapProcessor, SwapState
from lrkit.inference.references import crop_to, reference_size, size_multiple
from test_layout_retouch import PROMPT, ROOT, STEPS, Made, as_np, fresh_copy

PORTRAIT = ROOT / "data/subjects/red_teapot/1.jpeg"  # 1200 x 1600, a phone photo
SQUARE = ROOT / "data/subjects/vase/00.jpg"  # 1080 x 1080


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return Made(tmp_path_factory.mktemp("aspect-bundles"), tmp_path_factory.mktemp("aspect-cache"))


def with_reference(made: Made, base: str, kind: str, photo, folder) -> LayoutRetouchPipeline:
    """A copy of the (base, kind) test bundle whose reference photo is `photo` (a path or a PIL image)."""
    from lrkit.concept import Concept

    bundle = fresh_copy(made.bundle(base, kind), folder / "bundle")
    target = bundle / Concept.load(bundle).refs[0]
    if isinstance(photo, Image.Image):
        photo.convert("RGB").save(target, format="JPEG", quality=95)
    else:
        shutil.copyfile(photo, target)
    return LayoutRetouchPipeline.from_concept(base, bundle, cache_dir=folder / "cache")


def retouch_options(**kw) -> GenerationOptions:
    return GenerationOptions.of(num_inference_steps=STEPS, mode="layout-retouch", lam=0.25, **kw)


# ------------------------------------------------------------------------------------ the size rule


def test_the_documented_reference_sizes():
    """The examples of docs/layout-retouch.md: SD 1.5 (multiple 64) and SDXL (multiple 32) at their own sizes."""
    assert reference_size((1200, 1600), (512, 512), 64) == (576, 448)  # 3:4 portrait
    assert reference_size((1600, 1200), (512, 512), 64) == (448, 576)
    assert reference_size((1080, 1920), (512, 512), 64) == (640, 384)  # 9:16
    assert reference_size((1200, 1600), (1024, 1024), 32) == (1184, 864)
    assert reference_size((1080, 1920), (1024, 1024), 32) == (1344, 768)


@pytest.mark.parametrize("photo", [(1080, 1080), (1282, 1281), (640, 480), (480, 640), (3000, 1000), (500, 4000)])
@pytest.mark.parametrize("target, multiple", [((512, 512), 64), ((1024, 1024), 32), ((64, 64), 16), ((96, 64), 16),
                                              ((520, 520), 64)])
def test_a_reference_size_is_a_candidate_nearest_the_photos_aspect(photo, target, multiple):
    """The rule as documented, checked against every candidate: sides multiples of `multiple` (or the target's own
    size), area at most the target's, and no candidate nearer the photo's aspect ratio (nor, as near, larger)."""
    import math

    h, w = reference_size(photo, target, multiple)
    area = target[0] * target[1]
    assert (h, w) == target or (h % multiple == 0 and w % multiple == 0)
    assert h * w <= area
    want = math.log(photo[1] / photo[0])
    side = math.isqrt(area) // multiple * multiple
    candidates = {target, (side, side)}
    for cw in range(multiple, area // multiple + 1, multiple):
        ch = area // cw // multiple * multiple
        if ch:
            candidates |= {(ch, cw), (cw, ch)}
    best = min(abs(math.log(ch / cw) - want) for ch, cw in candidates)
    assert abs(math.log(h / w) - want) == best
    assert h * w == max(ch * cw for ch, cw in candidates if abs(math.log(ch / cw) - want) == best)


@pytest.mark.parametrize("target", [(64, 64), (512, 512), (520, 520), (96, 64)])
def test_a_photo_of_the_generations_aspect_takes_its_size(target):
    assert reference_size((target[1] * 3, target[0] * 3), target, 64 if target[0] > 100 else 16) == target


def test_crop_to_a_square_is_center_square_and_covers_otherwise():
    from lrkit.inference.inversion import center_square

    photo = Image.open(PORTRAIT).convert("RGB")
    assert np.array_equal(np.asarray(crop_to(photo, 64, 64)), np.asarray(center_square(photo, 64)))
    assert crop_to(photo, 48, 80).size == (48, 80)
    # 1200 x 1600 (3:4) covers 48 x 80 (3:5) when scaled to 60 x 80; the middle 48 columns are kept
    expected = photo.resize((60, 80), Image.Resampling.BICUBIC).crop((6, 0, 54, 80))
    assert np.array_equal(np.asarray(crop_to(photo, 48, 80)), np.asarray(expected))


# ------------------------------------------------------------------------------------ the inversion


def test_a_square_photo_is_inverted_exactly_as_before(made):
    """own_aspect changes nothing for a square photo and a square generation: the trajectory, mask and cache key of
    Layout-and-Retouch's reference are those of the square path (`from_concept(options, size)`), bit for bit."""
    pipe = made.pipe("tiny-random", "ti")
    options = retouch_options()
    pipe.pipe.scheduler.set_timesteps(STEPS)
    square = pipe.references.from_concept(options, 64)
    own = pipe.references.from_concept(options, (64, 64), own_aspect=True)
    assert own.key == square.key
    assert torch.equal(own.trajectory, square.trajectory) and torch.equal(own.mask, square.mask)
    assert own.trajectory.shape[-2:] == (16, 16)


@pytest.mark.parametrize("base", ["tiny-random", "tiny-random-xl"])
def test_a_portrait_reference_is_inverted_at_its_own_size(base, made, tmp_path, caplog):
    """1200 x 1600 for a 64 x 64 generation on the tiny models (multiple 16): 48 x 80 px, a 12 x 20 latent; the
    trajectory is the DDIM inversion of the photo covered-and-cropped to that size, with the prompt's conditioning
    at that size (SDXL: time ids 80, 48, 0, 0, 80, 48)."""
    pipe = with_reference(made, base, "ti", PORTRAIT, tmp_path)
    assert size_multiple(pipe.pipe) == 16
    options = retouch_options()
    pipe.pipe.scheduler.set_timesteps(STEPS)
    caplog.set_level("INFO")
    ref = pipe.references.from_concept(options, (64, 64), own_aspect=True)
    assert "1200x1600" in caplog.text and "48x80" in caplog.text
    assert ref.trajectory.shape == (STEPS + 1, 1, 4, 20, 12) and ref.mask.shape == (20, 12)
    prompt = f"a photo of {pipe.subject_phrase()}"
    cond = family_of(pipe.pipe).conditioning(pipe.pipe, [prompt], None, height=80, width=48, guidance=False)[0]
    if base == "tiny-random-xl":
        assert ref.embeds.time_ids.tolist() == [[80.0, 48.0, 0.0, 0.0, 80.0, 48.0]]
    torch.testing.assert_close(ref.embeds.states, cond.states, rtol=0, atol=0)
    # the inversion by hand: crop, VAE posterior mean, scaled, DDIM-inverted
    vae = pipe.pipe.vae
    pixels = pipe.pipe.image_processor.preprocess(crop_to(Image.open(PORTRAIT).convert("RGB"), 48, 80))
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    expected = ddim_invert(pipe.pipe, latents, cond, STEPS)
    torch.testing.assert_close(ref.trajectory, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ the swap


def _heads(attn, x):
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


@pytest.mark.parametrize("replace", [False, True], ids=["concatenate", "replace"])
def test_the_swap_reads_the_references_tokens_as_a_set_on_its_own_grid(replace):
    """The processor with a portrait R (6 x 4 tokens at the layer, its mask given at twice that) beside a square X
    (4 x 4) equals the attention written out by hand: X's subject queries attend to [R's kept tokens ; X's own]
    (replace: R's kept tokens alone), R's mask taken nearest-neighbour on R's grid, X blended with C by its mask."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    heads, d = 2, 4
    attn = Attention(query_dim=heads * d, heads=heads, dim_head=d).eval()
    hidden = torch.randn(2, 16, heads * d)  # rows: C, X; a 4 x 4 grid
    k_ref, v_ref = torch.randn(heads, 24, d), torch.randn(heads, 24, d)  # R on a 6 x 4 grid
    ref_mask = (torch.rand(12, 8) > 0.4).float()  # R's latent grid, twice the layer's
    target_mask = (torch.rand(1, 8, 8) > 0.5).float()
    cache = AttentionCache(rows=[0], steps=range(1), data={("layer", 0): (k_ref, v_ref)})
    state = SwapState(ref=None, pairs=[(1, 0)], ref_mask=ref_mask, target_mask=target_mask, active=True,
                      ref_cache=cache, replace=replace)
    with torch.no_grad():
        got = MultiSourceSwapProcessor(state, aspect=1.0, name="layer")(attn, hidden)
        q, k, v = (t.view(2, 16, heads, d).transpose(1, 2) for t in _heads(attn, hidden))
        keep = ref_mask[::2, ::2].reshape(-1) > 0.5  # nearest from 12 x 8 to 6 x 4
        keys = k_ref[:, keep] if replace else torch.cat([k_ref[:, keep], k[1]], dim=1)
        values = v_ref[:, keep] if replace else torch.cat([v_ref[:, keep], v[1]], dim=1)
        fg = (q[1] @ keys.transpose(-1, -2) / d ** 0.5).softmax(-1) @ values
        bg = (q[0] @ k[0].transpose(-1, -2) / d ** 0.5).softmax(-1) @ v[0]
        m = target_mask[0, ::2, ::2].reshape(1, 16, 1)
        out = torch.stack([bg, m * fg + (1 - m) * bg]).transpose(1, 2).reshape(2, 16, heads * d)
        expected = attn.to_out[1](attn.to_out[0](out))
    assert 0 < int(keep.sum()) < 24
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("base, kind, photo, size", [
    ("tiny-random", "ti", "portrait", (64, 64)),  # a portrait photo, a square generation
    ("tiny-random", "lora", "landscape", (64, 64)),  # a landscape photo, a square generation
    ("tiny-random", "ti", "square", (96, 64)),  # the reverse: a square photo, a portrait generation
    ("tiny-random-xl", "reference", "portrait", (64, 64)),
], ids=["portrait-ref", "landscape-ref", "portrait-target", "xl-portrait-ref"])
def test_retouch_with_a_reference_of_another_aspect(base, kind, photo, size, made, tmp_path, monkeypatch):
    """It runs at the asked size; cached attention equals the uncached path (where R, of another latent size, comes
    from its own pass beside [C_u, C_c, X_u, X_c]); the swap changes the image; an all-zero target mask returns
    the layout."""
    import lrkit.masks

    photos = {"portrait": PORTRAIT, "square": SQUARE,
              "landscape": Image.open(PORTRAIT).convert("RGB").transpose(Image.Transpose.ROTATE_90)}
    pipe = with_reference(made, base, kind, photos[photo], tmp_path)
    height, width = size
    kw = dict(height=height, width=width)
    cached = pipe(PROMPT[kind], seeds=[0, 1], options=retouch_options(**kw))
    plain = pipe(PROMPT[kind], seeds=[0, 1], options=retouch_options(cache_attention=False, **kw))
    ref = pipe.references.from_concept(retouch_options(**kw), size, own_aspect=True)
    assert tuple(ref.trajectory.shape[-2:]) != (height // 4, width // 4)  # R has another latent size than X
    for a, b in zip(cached, plain):
        assert a.image.size == (width, height) and a.mask.size == (width, height)
        np.testing.assert_allclose(as_np(a.image), as_np(b.image), atol=1.5 / 255)
        np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
        assert np.abs(as_np(a.image) - as_np(a.layout)).mean() > 2e-4  # the swap changed the image
    monkeypatch.setattr(lrkit.masks, "blend_target_mask",
                        lambda attn, sam, sam_weight, mask_threshold: torch.zeros_like(attn))
    for cache in (True, False):
        zero = pipe(PROMPT[kind], seeds=[0], options=retouch_options(cache_attention=cache, **kw))[0]
        assert np.abs(as_np(zero.image) - as_np(zero.layout)).max() <= 1.5 / 255


def test_the_correspondence_view_of_a_portrait_reference(made, tmp_path, monkeypatch):
    """The finest swap layers read R on its own grid (16 x 16 target tokens read 20 x 12 reference tokens); the view
    shows the reference as inverted, at the image's height, beside the image."""
    import lrkit.inference.pipeline as pipeline_module
    from lrkit.inference.retouch import correspondence_view

    seen = []

    def recording(*args, **kwargs):
        seen.append(args)
        return correspondence_view(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "correspondence_view", recording)
    pipe = with_reference(made, "tiny-random", "ti", PORTRAIT, tmp_path)
    out = pipe(PROMPT["ti"], seeds=[0], options=retouch_options(correspondence=True))[0]
    reads, grid, _, reference_mask, _, mask = seen[0]
    assert grid == (16, 16) and tuple(reference_mask.shape) == (20, 12) and tuple(mask.shape) == (16, 16)
    assert reads.shape == (256,) and 0 <= int(reads.min()) and int(reads.max()) < 20 * 12
    assert out.correspondence.size == (round(64 * 12 / 20) + 4 + 64, 64)


def test_the_correspondence_records_the_references_grid():
    from lrkit.inference.processors import Correspondence

    corr = Correspondence(rows=[0])
    corr.add(torch.randn(1, 2, 256, 4), torch.randn(2, 240, 4), torch.ones(240, dtype=torch.bool), (16, 16), (20, 12))
    corr.add(torch.randn(1, 2, 64, 4), torch.randn(2, 60, 4), torch.ones(60, dtype=torch.bool), (8, 8), (10, 6))
    assert corr.grid == (16, 16) and corr.ref_grid == (20, 12) and corr.calls == 1  # the coarser layer left out
    assert corr.reads_from().shape == (1, 256) and int(corr.reads_from().max()) < 240
