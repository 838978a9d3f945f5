"""Dual-reference personalization (DESIGN §6.1): the entropy switch, the processors' attention masks,
and the invariants against stock diffusers pipelines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image

from lrkit.attention import AttentionLayerError
from lrkit.inference.processors import AttentionCache, DualReferenceProcessor, DualReferenceState
from lrkit.inference import GenerationOptions, InferenceError
from lrkit.inference.dual_reference import entropy_switch, image_entropy, phase_at, shift_to_style, switch_step
from test_layout_retouch import PROMPT, ROOT, STEPS, Made, as_np, stock_image

# ---------------------------------------------------------------------------- the entropy switch


def grey_image(levels: list[int], counts: list[int], width: int = 16) -> Image.Image:
    """A grey image holding `counts[k]` pixels of level `levels[k]` (rows of `width`)."""
    values = np.concatenate([np.full(c, v, dtype=np.uint8) for v, c in zip(levels, counts)])
    return Image.fromarray(values.reshape(-1, width), mode="L").convert("RGB")


@pytest.mark.parametrize("levels, counts, bits", [
    ([128], [256], 0.0),
    ([0, 255], [128, 128], 1.0),
    ([10, 80, 150, 220], [64] * 4, 2.0),
    ([0, 255], [192, 64], -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))),  # 0.811 bits
    (list(range(256)), [1] * 256, 8.0),
])
def test_image_entropy_of_synthetic_images(levels, counts, bits):
    assert image_entropy(grey_image(levels, counts)) == pytest.approx(bits, abs=1e-12)


def test_entropy_switch_is_the_clamped_share_of_the_customization_entropy():
    assert entropy_switch(2.0, 2.0) == 0.5
    assert entropy_switch(1.0, 3.0) == 0.25
    assert entropy_switch(3.0, 1.0) == 0.75
    assert entropy_switch(8.0, 0.0) == 0.8  # clamped to the default range [0.2, 0.8]
    assert entropy_switch(0.0, 8.0) == 0.2
    assert entropy_switch(0.0, 0.0) == 0.5  # no information in either: half and half
    assert entropy_switch(1.0, 3.0, low=0.3, high=0.9) == 0.3
    with pytest.raises(ValueError, match="low"):
        entropy_switch(1.0, 1.0, low=0.6, high=0.4)


def test_switch_step_from_images_and_its_override(tmp_path):
    one_bit = grey_image([0, 255], [128, 128])
    three_bits = grey_image([0, 30, 60, 90, 120, 150, 180, 210], [32] * 8)
    options = GenerationOptions.of(mode="dual-reference", num_inference_steps=10, style_reference="s.png")
    assert switch_step(options, one_bit, three_bits) == 3  # 1 / (1 + 3) = 0.25 of 10 steps -> step ceil(2.5)
    assert switch_step(options, three_bits, one_bit) == 8  # 0.75 -> step ceil(7.5)
    assert switch_step(options, three_bits, grey_image([0], [256])) == 8  # 1.0 clamped to 0.8
    override = GenerationOptions.of(mode="dual-reference", num_inference_steps=10, style_reference="s.png", switch=0.4)
    assert switch_step(override, one_bit, three_bits) == 4


def test_phases_over_the_steps():
    options = GenerationOptions.of(mode="dual-reference", style_reference="s.png")
    assert [phase_at(i, 3, options) for i in range(5)] == ["off", "customize", "customize", "stylize", "stylize"]
    no_style = GenerationOptions.of(mode="dual-reference", style_reference="s.png", stylize=False)
    assert [phase_at(i, 3, no_style) for i in range(5)] == ["off", "customize", "customize", "off", "off"]
    no_custom = GenerationOptions.of(mode="dual-reference", style_reference="s.png", customize=False)
    assert [phase_at(i, 3, no_custom) for i in range(5)] == ["off", "off", "off", "stylize", "stylize"]


# ---------------------------------------------------------------------------- the style shift


def test_style_shift_moves_the_subjects_channel_means_to_the_styles():
    g = torch.Generator().manual_seed(0)
    latents, style = torch.randn(3, 4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g) + 2.0
    masks = torch.zeros(3, 8, 8)
    masks[0, 2:6, 1:4] = 1
    masks[1, :, 5:] = 1  # row 2: no subject
    region = torch.zeros(8, 8)
    region[:4] = 1
    mu_s = style[:, :4].reshape(4, -1).mean(-1)
    full = shift_to_style(latents, masks, style, region, 1.0)
    half = shift_to_style(latents, masks, style, region, 0.5)
    for b in range(2):
        m = masks[b] > 0
        torch.testing.assert_close(full[b][:, m].mean(-1), mu_s)
        torch.testing.assert_close(half[b][:, m].mean(-1), (latents[b][:, m].mean(-1) + mu_s) / 2)
        torch.testing.assert_close(full[b][:, ~m], latents[b][:, ~m], rtol=0, atol=0)  # outside: untouched
        # a shift, not a rescale: the subject's own texture (deviations from its mean) is kept
        torch.testing.assert_close(full[b][:, m] - full[b][:, m].mean(-1, keepdim=True),
                                   latents[b][:, m] - latents[b][:, m].mean(-1, keepdim=True))
    torch.testing.assert_close(full[2], latents[2], rtol=0, atol=0)
    torch.testing.assert_close(shift_to_style(latents, masks, style, torch.zeros(8, 8), 1.0), latents, rtol=0, atol=0)


# ---------------------------------------------------------------------------- the processors

N, DIM, HEADS = 16, 8, 2  # a 4x4 token grid


def _attention() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS)


def _split(x: torch.Tensor) -> torch.Tensor:
    return x.view(*x.shape[:-1], HEADS, DIM // HEADS).transpose(-3, -2)  # (..., heads, tokens, head_dim)


def _kv(attn: Attention, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _split(attn.to_k(hidden)), _split(attn.to_v(hidden))  # (heads, n, d) each


def _by_hand(attn, q, key_sets, value_sets):
    """softmax(q k^T / sqrt(d)) v over the given (already selected) tokens: no masking involved."""
    k, v = torch.cat(key_sets, dim=-2), torch.cat(value_sets, dim=-2)
    w = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    return w @ v


@pytest.fixture
def toy_layer():
    """Two target rows, a customization and a style reference, and masks on a 4x4 grid."""
    attn = _attention()
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, N, DIM, generator=g)  # X_u, X_c
    custom_hidden, style_hidden = torch.randn(N, DIM, generator=g), torch.randn(N, DIM, generator=g)
    custom, style = AttentionCache(rows=[0], steps=range(1)), AttentionCache(rows=[0], steps=range(1))
    custom.data[("L", 0)] = _kv(attn, custom_hidden)
    style.data[("L", 0)] = _kv(attn, style_hidden)
    m_c, m_s, m_x = torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 4)
    m_c[1:, 1:3] = 1  # the customization reference's subject: 6 tokens
    m_s[:2, :] = 1  # the style reference's content: the top half
    m_x[2:, 2:] = 1  # the target's subject: 4 tokens
    state = DualReferenceState(custom=custom, style=style, custom_mask=m_c, style_mask=m_s,
                               target_mask=torch.stack([m_x, m_x]), record_weights=True)
    return attn, hidden, state, m_c.reshape(-1) > 0, m_s.reshape(-1) > 0, m_x.reshape(-1) > 0


def test_phase_off_is_the_stock_processor(toy_layer):
    attn, hidden, state, *_ = toy_layer
    out = DualReferenceProcessor(state, name="L")(attn, hidden)
    torch.testing.assert_close(out, AttnProcessor2_0()(attn, hidden), atol=1e-6, rtol=1e-5)
    assert state.weights == {}


def test_customize_attends_only_to_the_references_foregrounds(toy_layer):
    attn, hidden, state, c_fg, s_fg, x_fg = toy_layer
    state.set_phase("customize")
    out = DualReferenceProcessor(state, name="L")(attn, hidden)
    fg_w, bg_w = state.weights["L"]["fg"], state.weights["L"]["bg"]
    # foreground queries: [C ; X]; the customization reference's background gets exactly zero weight
    assert fg_w.shape == (2, HEADS, N, 2 * N)
    assert torch.all(fg_w[..., :N][..., ~c_fg] == 0) and torch.all(fg_w[..., :N][..., c_fg] > 0)
    # background queries: [C ; S ; X], foreground textures of both references only
    assert bg_w.shape == (2, HEADS, N, 3 * N)
    assert torch.all(bg_w[..., :N][..., ~c_fg] == 0) and torch.all(bg_w[..., :N][..., c_fg] > 0)
    assert torch.all(bg_w[..., N:2 * N][..., ~s_fg] == 0) and torch.all(bg_w[..., N:2 * N][..., s_fg] > 0)
    assert torch.all(bg_w[..., 2 * N:] > 0)  # the target's own tokens stay reachable
    # the output, by hand: fg rows from [C_fg ; X], bg rows from [C_fg ; S_fg ; X], then the projection
    q, k, v = _split(attn.to_q(hidden)), _split(attn.to_k(hidden)), _split(attn.to_v(hidden))
    (k_c, v_c), (k_s, v_s) = state.custom.get("L", 0), state.style.get("L", 0)
    fg = _by_hand(attn, q, [k_c[:, c_fg].expand(2, -1, -1, -1), k], [v_c[:, c_fg].expand(2, -1, -1, -1), v])
    bg = _by_hand(attn, q, [k_c[:, c_fg].expand(2, -1, -1, -1), k_s[:, s_fg].expand(2, -1, -1, -1), k],
                  [v_c[:, c_fg].expand(2, -1, -1, -1), v_s[:, s_fg].expand(2, -1, -1, -1), v])
    project = lambda x: attn.to_out[0](x.transpose(1, 2).reshape(2, N, DIM))  # noqa: E731
    torch.testing.assert_close(out[:, x_fg], project(fg)[:, x_fg], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, ~x_fg], project(bg)[:, ~x_fg], atol=1e-5, rtol=1e-5)
    stock = AttnProcessor2_0()(attn, hidden)
    assert (out - stock).abs().amax(-1).min() > 1e-3  # every token changed: fg and bg both use the references


def test_stylize_gives_the_subject_the_style_background_only(toy_layer):
    attn, hidden, state, c_fg, s_fg, x_fg = toy_layer
    state.set_phase("stylize")
    out = DualReferenceProcessor(state, name="L")(attn, hidden)
    fg_w = state.weights["L"]["fg"]
    assert fg_w.shape == (2, HEADS, N, 2 * N)  # [S ; X]: the customization reference plays no part
    assert torch.all(fg_w[..., :N][..., s_fg] == 0)  # the style image's content: exactly zero weight
    assert torch.all(fg_w[..., :N][..., ~s_fg] > 0)
    stock = AttnProcessor2_0()(attn, hidden)
    torch.testing.assert_close(out[:, ~x_fg], stock[:, ~x_fg], atol=1e-6, rtol=1e-5)  # background: its own
    q, k, v = _split(attn.to_q(hidden)), _split(attn.to_k(hidden)), _split(attn.to_v(hidden))
    k_s, v_s = state.style.get("L", 0)
    fg = _by_hand(attn, q, [k_s[:, ~s_fg].expand(2, -1, -1, -1), k], [v_s[:, ~s_fg].expand(2, -1, -1, -1), v])
    expected = attn.to_out[0](fg.transpose(1, 2).reshape(2, N, DIM))
    torch.testing.assert_close(out[:, x_fg], expected[:, x_fg], atol=1e-5, rtol=1e-5)
    assert (out[:, x_fg] - stock[:, x_fg]).abs().max() > 1e-3


def test_reference_weights_scale_the_softmax_mass_of_their_tokens(toy_layer):
    """style_weight w: each style token's weight relative to the target's own tokens is multiplied by w."""
    attn, hidden, state, c_fg, s_fg, x_fg = toy_layer
    state.set_phase("stylize")
    DualReferenceProcessor(state, name="L")(attn, hidden)
    plain = state.weights["L"]["fg"]
    state.style_weight = 5.0
    boosted = DualReferenceProcessor(state, name="L")(attn, hidden)
    strong = state.weights["L"]["fg"]
    ratio = lambda w: w[..., :N][..., ~s_fg] / w[..., N:].sum(-1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(ratio(strong), 5.0 * ratio(plain), atol=1e-6, rtol=1e-5)
    assert torch.all(strong[..., :N][..., s_fg] == 0)  # a weight never reopens a masked token
    stock = AttnProcessor2_0()(attn, hidden)
    torch.testing.assert_close(boosted[:, ~x_fg], stock[:, ~x_fg], atol=1e-6, rtol=1e-5)
    state.set_phase("customize")
    state.style_weight, state.custom_weight = 1.0, 3.0
    DualReferenceProcessor(state, name="L")(attn, hidden)
    bg = state.weights["L"]["bg"]
    state.custom_weight = 1.0
    DualReferenceProcessor(state, name="L")(attn, hidden)
    bg_plain = state.weights["L"]["bg"]
    custom_share = lambda w: w[..., :N].sum(-1) / w[..., N:].sum(-1)  # noqa: E731
    torch.testing.assert_close(custom_share(bg), 3.0 * custom_share(bg_plain), atol=1e-6, rtol=1e-5)


def test_masks_follow_each_layer_grid(toy_layer):
    _, _, state, *_ = toy_layer
    c_fg, s_fg, blend = state.masks_at((2, 2))  # a 2x2 layer: nearest neighbour reads cells (0, 0), (0, 2), (2, 0), (2, 2)
    assert c_fg.tolist() == [False, False, False, True] and s_fg.tolist() == [True, True, False, False]
    assert blend.shape == (2, 4, 1) and blend[0, :, 0].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_processor_refuses_cross_attention_and_unknown_phases(toy_layer):
    attn, hidden, state, *_ = toy_layer
    with pytest.raises(AttentionLayerError, match="self-attention"):
        DualReferenceProcessor(state, name="L")(attn, hidden, torch.randn(2, 3, DIM))
    with pytest.raises(ValueError, match="phase"):
        state.set_phase("late")


# ---------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return Made(tmp_path_factory.mktemp("dual-bundles"), tmp_path_factory.mktemp("dual-cache"))


@pytest.fixture(scope="module")
def bundles(made):
    return {kind: made.bundle("tiny-random", kind) for kind in ("lora", "ti")}


@pytest.fixture(scope="module")
def pipes(made, bundles):
    return {kind: made.pipe("tiny-random", kind) for kind in bundles}


@pytest.fixture(scope="module")
def style_png(tmp_path_factory) -> str:
    """A style reference with its own palette: orange stripes on grainy purple, a green square in the middle."""
    grain = np.random.default_rng(0).integers(-40, 41, size=(64, 64, 1))
    pixels = np.clip(np.array([120, 40, 160]) + grain, 0, 255).astype(np.uint8)
    pixels[::8] = (250, 140, 20)
    pixels[1::8] = (250, 140, 20)
    pixels[24:40, 24:40] = (30, 200, 60)
    path = tmp_path_factory.mktemp("style") / "style.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def dual(pipe, prompt, style, seed=0, **options):
    return pipe(prompt, seeds=seed, options=GenerationOptions.of(num_inference_steps=STEPS, mode="dual-reference",
                                                              style_reference=style, **options))


@pytest.mark.parametrize("base, kind", [("tiny-random", "lora"), ("tiny-random", "ti"), ("tiny-random-xl", "lora"),
                                        ("tiny-random-xl", "ti"), ("tiny-random-xl", "reference")])
def test_both_phases_off_is_the_personalized_pipeline(base, kind, made, style_png):
    expected = stock_image(PROMPT[kind], 0, made.bundle(base, kind), base)  # stock diffusers, the concept applied
    got = as_np(dual(made.pipe(base, kind), PROMPT[kind], style_png, customize=False, stylize=False)[0].image)
    np.testing.assert_allclose(got, np.round(expected * 255) / 255, atol=1.5 / 255)


@pytest.mark.parametrize("base", ["tiny-random", "tiny-random-xl"])
def test_each_phase_changes_the_image(base, made, style_png):
    pipe, prompt = made.pipe(base, "lora"), PROMPT["lora"]
    plain = as_np(dual(pipe, prompt, style_png, customize=False, stylize=False)[0].image)
    early = as_np(dual(pipe, prompt, style_png, stylize=False, switch=0.75)[0].image)
    late = as_np(dual(pipe, prompt, style_png, customize=False, switch=0.5)[0].image)
    both = as_np(dual(pipe, prompt, style_png, switch=0.5)[0].image)
    for image in (early, late, both):
        assert np.abs(image - plain).mean() > 1e-3
    assert np.abs(both - late).mean() > 1e-4


@pytest.mark.parametrize("base", ["tiny-random", "tiny-random-xl"])
def test_style_phase_touches_only_the_subject(base, made, style_png, monkeypatch):
    """M ≡ 0: the style phase has no foreground query to reconstruct, so the image is the personalized one;
    the customization phase still changes it (background queries see the references' foregrounds)."""
    import lrkit.masks

    pipe, prompt = made.pipe(base, "lora"), PROMPT["lora"]
    plain = as_np(dual(pipe, prompt, style_png, customize=False, stylize=False)[0].image)
    monkeypatch.setattr(lrkit.masks, "blend_target_mask", lambda attn, sam, sam_weight, mask_threshold: torch.zeros_like(attn))
    late = dual(pipe, prompt, style_png, customize=False, switch=0.25)[0]
    assert np.abs(as_np(late.image) - plain).max() <= 1.5 / 255
    assert not np.asarray(late.mask).any()
    early = as_np(dual(pipe, prompt, style_png, stylize=False, switch=1.0)[0].image)
    assert np.abs(early - plain).mean() > 1e-3


def test_style_shift_in_the_loop_gives_the_subject_the_styles_latent_means(pipes, style_png):
    from lrkit.inference.dual_reference import denoise_dual_reference

    pipe, prompt = pipes["lora"], PROMPT["lora"]
    options = GenerationOptions.of(num_inference_steps=STEPS, mode="dual-reference", style_reference=style_png,
                                style_subject="square", switch=0.5, style_shift=1.0)
    result = denoise_dual_reference(pipe.model, pipe.references, prompt, [torch.Generator().manual_seed(0)], options, 64, 64)
    m, region = result.shift_masks[0] > 0.5, result.style.mask < 0.5
    assert m.any() and region.any() and not region.all()
    mu_style = result.style.trajectory[STEPS][0][:, region].mean(-1)  # the clean style latents' background
    torch.testing.assert_close(result.latents[0][:, m].mean(-1), mu_style, rtol=1e-4, atol=1e-4)
    plain = denoise_dual_reference(pipe.model, pipe.references, prompt, [torch.Generator().manual_seed(0)],
                                   options.replace(style_shift=0.0), 64, 64)
    assert (plain.latents[0][:, m].mean(-1) - mu_style).abs().max() > 1e-2
    with pytest.raises(InferenceError, match="style_shift must be in"):
        GenerationOptions.of(mode="dual-reference", style_shift=1.5)
    with pytest.raises(InferenceError, match="style_shift is an option of mode 'dual-reference'"):
        GenerationOptions.of(mode="personalized", style_shift=0.5)


def test_style_shift_starts_at_style_shift_start(pipes, style_png):
    """Shifted at the last step only, the latents outside the subject are the plain run's bit for bit (only the
    mask's inside moves); shifted from the switch step, the later steps redraw the outside too."""
    from lrkit.inference.dual_reference import denoise_dual_reference

    pipe, prompt = pipes["lora"], PROMPT["lora"]
    base = dict(num_inference_steps=STEPS, mode="dual-reference", style_reference=style_png, style_subject="square",
                switch=0.5)

    def run(**kw):
        return denoise_dual_reference(pipe.model, pipe.references, prompt, [torch.Generator().manual_seed(0)],
                                      GenerationOptions.of(**base, **kw), 64, 64)

    plain = run()
    last = run(style_shift=1.0, style_shift_start=1.0)
    early = run(style_shift=1.0, style_shift_start=0.0)  # from the switch step on
    m = last.shift_masks[0] > 0.5
    assert m.any() and not m.all()
    assert torch.equal(last.latents[0][:, ~m], plain.latents[0][:, ~m])
    assert (last.latents[0][:, m] - plain.latents[0][:, m]).abs().max() > 1e-2
    assert (early.latents[0][:, ~m] - plain.latents[0][:, ~m]).abs().max() > 1e-4
    assert torch.equal(early.shift_masks, last.shift_masks)  # both read the masks of the switch step
    with pytest.raises(InferenceError, match="style_shift_start must be in"):
        GenerationOptions.of(mode="dual-reference", style_shift_start=1.5)
    with pytest.raises(InferenceError, match="style_shift_start is an option of mode 'dual-reference'"):
        GenerationOptions.of(mode="personalized", style_shift_start=0.5)


@pytest.mark.parametrize("base", ["tiny-random", "tiny-random-xl"])
def test_a_segmenter_gives_the_target_mask_from_the_switch_step(base, made, style_png, monkeypatch):
    from lrkit.inference.dual_reference import denoise_dual_reference

    pipe, prompt = made.pipe(base, "lora"), PROMPT["lora"]
    calls = []

    def left_half(image, box):  # a stand-in for SAM: the left half of the picture, whatever the box
        calls.append((image.size, tuple(box)))
        mask = torch.zeros(image.size[1], image.size[0], dtype=torch.bool)
        mask[:, : image.size[0] // 2] = True
        return mask

    options = GenerationOptions.of(num_inference_steps=STEPS, mode="dual-reference", style_reference=style_png,
                                switch=0.5, sam_weight=1.0, style_shift=0.5)
    monkeypatch.setattr(pipe, "segmenter", left_half)
    pipe.references.from_concept(options, 64)  # the reference's mask, memoized: the loop segments only x0
    calls.clear()
    result = denoise_dual_reference(pipe.model, pipe.references, prompt, [torch.Generator().manual_seed(0)] * 2, options, 64, 64)
    assert [size for size, _ in calls] == [(64, 64), (64, 64)]  # once per row, on the decoded x0 at the switch
    h, w = result.masks.shape[-2:]
    expected = torch.zeros(h, w)
    expected[:, : w // 2] = 1
    for masks in (result.masks, result.shift_masks):
        torch.testing.assert_close(masks.cpu(), expected.expand(2, h, w), rtol=0, atol=0)


def test_default_switch_is_the_entropy_rule(pipes, style_png):
    from lrkit.inference.inversion import center_square

    pipe, prompt = pipes["ti"], PROMPT["ti"]
    custom = center_square(Image.open(ROOT / "data/subjects/vase/00.jpg").convert("RGB"), 64)
    fraction = entropy_switch(image_entropy(custom), image_entropy(center_square(Image.open(style_png), 64)))
    assert 0.2 < fraction < 0.8  # not the clamp: the rule itself decides
    by_rule = dual(pipe, prompt, style_png)[0]
    given = dual(pipe, prompt, style_png, switch=fraction)[0]
    np.testing.assert_array_equal(np.asarray(by_rule.image), np.asarray(given.image))
    other = dual(pipe, prompt, style_png, switch=0.25 if fraction > 0.5 else 0.75)[0]
    assert np.abs(as_np(other.image) - as_np(by_rule.image)).mean() > 1e-4
    assert by_rule.style.size == (64, 64) and by_rule.reference.size == (64, 64) and by_rule.layout is None


def test_style_subject_and_custom_reference_photo(pipes, style_png, tmp_path):
    pipe, prompt = pipes["lora"], PROMPT["lora"]
    base = as_np(dual(pipe, prompt, style_png, switch=0.5)[0].image)
    masked = as_np(dual(pipe, prompt, style_png, switch=0.5, style_subject="square")[0].image)
    assert np.abs(masked - base).mean() > 1e-4  # the style image's content is now masked out of the style
    photo = tmp_path / "subject.png"
    Image.open(ROOT / "data/subjects/vase/01.jpg").convert("RGB").save(photo)
    other = dual(pipe, prompt, style_png, switch=0.5, custom_reference=str(photo))[0]
    assert np.abs(as_np(other.image) - base).mean() > 1e-4
    assert other.reference.size == (64, 64)


def test_errors_name_the_option(pipes, style_png, tmp_path):
    pipe, prompt = pipes["lora"], PROMPT["lora"]
    with pytest.raises(InferenceError, match="needs a style reference image: set style_reference"):
        pipe(prompt, options=GenerationOptions.of(num_inference_steps=STEPS, mode="dual-reference"))
    with pytest.raises(InferenceError, match="style_reference .*nope.png.* does not exist"):
        dual(pipe, prompt, str(tmp_path / "nope.png"))
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(InferenceError, match="custom_reference .*bad.png.* not a readable image"):
        dual(pipe, prompt, style_png, custom_reference=str(tmp_path / "bad.png"))
    with pytest.raises(InferenceError, match="style_reference is an option of mode 'dual-reference'"):
        GenerationOptions.of(mode="personalized", style_reference=style_png)
    with pytest.raises(InferenceError, match="ddim"):
        GenerationOptions.of(mode="dual-reference", scheduler="euler")
    with pytest.raises(InferenceError, match="switch must be in"):
        GenerationOptions.of(mode="dual-reference", switch=1.5)
    with pytest.raises(InferenceError, match="style_weight must be > 0"):
        GenerationOptions.of(mode="dual-reference", style_weight=0.0)
    with pytest.raises(InferenceError, match="switch_min"):
        GenerationOptions.of(mode="dual-reference", switch_min=0.9, switch_max=0.1)
    with pytest.raises(InferenceError, match="square"):
        dual(pipe, prompt, style_png, height=64, width=32)
    with pytest.raises(InferenceError, match="sks"):
        dual(pipe, "a photo of a vase", style_png)


def test_cli_generates_dual_reference(bundles, style_png, tmp_path, capsys):
    from lrkit.cli import main

    out = tmp_path / "out"
    args = ["generate", "--concept", str(bundles["ti"]), "--prompt", "a photo of {} in the snow", "--seeds", "[0]",
            "--options.num_inference_steps", str(STEPS), "--options.mode", "dual-reference", "--out", str(out)]
    assert main(args + ["--options.dual_reference.style_reference", style_png, "--intermediates", "true"]) == 0
    assert Image.open(out / "p000_s0.png").size == (64, 64)
    assert (out / "p000_s0_mask.png").is_file()
    style = np.asarray(Image.open(out / "p000_s0_style.png").convert("RGB"))
    np.testing.assert_array_equal(style, np.asarray(Image.open(style_png).convert("RGB").resize((64, 64))))
    grid = np.asarray(Image.open(out / "p000_s0_grid.png").convert("RGB"))
    assert grid.shape == (64, 4 * 64, 3)
    np.testing.assert_array_equal(grid[:, 64:128], style)  # reference | style | mask | result
    assert main(args) == 2
    assert "--options.dual_reference.style_reference" in capsys.readouterr().err
