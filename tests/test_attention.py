"""Attention layers: identity from names, installation, capture, and the multi-source swap maths."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from lrkit.attention import (AttentionLayerError, AttentionStore, AttentionStoreProcessor, attention_layers,
                             cross_layers_at, decoder_self_layers, parse_layer, processors)
from lrkit.inference.processors import MultiSourceSwapProcessor, SwapState, reference_attention

# SD 1.5 and SD 2 block layouts at a small width (the names and levels are what matter).
SD15 = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8, sample_size=16,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD2 = dict(SD15, attention_head_dim=(2, 4, 8, 8), use_linear_projection=True, cross_attention_dim=48)
# SDXL base 1.0's block layout (no attention at the highest resolution; 1, 2 and 10 transformer blocks per level).
SDXL = dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=(2, 4, 8),
            norm_num_groups=8, sample_size=16, transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
SD_SWAP = {f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1.processor" for b in (2, 3) for a in range(3)}
SDXL_SWAP = {f"up_blocks.{b}.attentions.{a}.transformer_blocks.{t}.attn1.processor"
             for b, blocks in ((0, 10), (1, 2)) for a in range(3) for t in range(blocks)}


@pytest.mark.parametrize("config, count, swap, swap_levels, cross_level", [
    (SD15, 32, SD_SWAP, {0, 1}, 2),  # 16 transformer blocks (6 down, 1 mid, 9 up), attn1 + attn2 each
    (SD2, 32, SD_SWAP, {0, 1}, 2),
    (SDXL, 140, SDXL_SWAP, {1, 2}, 1),  # 70 transformer blocks (4 + 20 down, 10 mid, 30 + 6 up)
], ids=["sd15", "sd2", "sdxl"])
def test_swap_layers_are_the_decoder_self_attention_at_the_two_highest_resolutions(config, count, swap, swap_levels,
                                                                                  cross_level):
    """SD: up_blocks.2 and .3 (levels 0 and 1). SDXL has no attention at level 0: the two highest resolutions with
    attention are levels 1 and 2, i.e. every decoder self-attention layer, up_blocks.1 and up_blocks.0."""
    unet = UNet2DConditionModel(**config)
    layers = attention_layers(unet)
    assert len(layers) == count
    chosen = {l.name for l in decoder_self_layers(unet)}
    assert chosen == swap
    assert {l.level for l in decoder_self_layers(unet)} == swap_levels
    # Cross-attention capture: the second-lowest resolution with cross-attention (SD: 16x16 of a 64x64 latent;
    # SDXL: 64x64 of a 128x128 latent, down_blocks.1 and up_blocks.1).
    cross = cross_layers_at(unet)
    assert {l.level for l in cross} == {cross_level} and all(l.is_cross for l in cross)
    assert {l.place for l in cross} == {"down", "up"}

    with processors(unet, {n: AttnProcessor2_0() for n in chosen}):
        installed = unet.attn_processors
        assert len(installed) == count
    assert len(unet.attn_processors) == count


def test_parse_names():
    layer = parse_layer("mid_block.attentions.0.transformer_blocks.1.attn2.processor", num_levels=4)
    assert (layer.place, layer.level, layer.transformer, layer.kind) == ("mid", 3, 1, "cross")
    layer = parse_layer("up_blocks.1.attentions.2.transformer_blocks.0.attn1.processor", num_levels=4)
    assert (layer.place, layer.block, layer.attention, layer.level, layer.is_self) == ("up", 1, 2, 2, True)
    assert parse_layer("down_blocks.2.attentions.0.transformer_blocks.0.attn1.processor", 4).level == 2


def test_unparseable_names_raise_and_nothing_is_hooked():
    class Strange:
        config = type("C", (), {"block_out_channels": (32, 64)})()
        attn_processors = {"encoder.layer.0.self_attention.processor": None}

    with pytest.raises(AttentionLayerError, match="encoder.layer.0.self_attention"):
        attention_layers(Strange())
    unet = UNet2DConditionModel(**SD15)
    with pytest.raises(AttentionLayerError, match="no attention layer"):
        with processors(unet, {}):
            pass
    with pytest.raises(AttentionLayerError, match="unknown"):
        with processors(unet, {"up_blocks.9.attentions.0.transformer_blocks.0.attn1.processor": AttnProcessor2_0()}):
            pass


def _attention(dim=8, heads=2) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=dim, heads=heads, dim_head=dim // heads)


def test_store_processor_output_is_the_stock_output_and_maps_are_softmax_mass():
    attn = _attention()
    hidden = torch.randn(2, 16, 8)
    context = torch.randn(2, 5, 8)
    store = AttentionStore(rows=[1], tokens=[[2, 3]], size=(4, 4))
    out = AttentionStoreProcessor(store)(attn, hidden, context)
    torch.testing.assert_close(out, AttnProcessor2_0()(attn, hidden, context), atol=0, rtol=0)
    maps = store.take()
    assert maps.shape == (1, 4, 4)
    # by hand: softmax over the 5 context tokens, mass on tokens 2 and 3, mean over heads
    q = attn.to_q(hidden[1]).view(16, 2, 4).transpose(0, 1)
    k = attn.to_k(context[1]).view(5, 2, 4).transpose(0, 1)
    probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    torch.testing.assert_close(maps[0].reshape(-1), probs[..., [2, 3]].sum(-1).mean(0), atol=1e-6, rtol=1e-5)
    assert store.take() is None  # taken and cleared


def test_foreground_queries_never_attend_to_reference_background():
    g = torch.Generator().manual_seed(0)
    n, d = 16, 4
    q, kx, vx = (torch.randn(2, 2, n, d, generator=g) for _ in range(3))
    kr, vr = torch.randn(2, n, d, generator=g), torch.randn(2, n, d, generator=g)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[5:9] = True  # the reference subject
    out, weights = reference_attention(q, kr, vr, kx, vx, keep, return_weights=True)
    assert weights.shape == (2, 2, n, 2 * n)
    assert torch.all(weights[..., :n][..., ~keep] == 0)  # reference background: exactly zero weight
    assert torch.all(weights[..., :n][..., keep] > 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, n))
    torch.testing.assert_close(out, reference_attention(q, kr, vr, kx, vx, keep), atol=1e-5, rtol=1e-5)


def test_reference_weight_scales_the_references_softmax_mass_and_replace_drops_the_targets_own_tokens():
    g = torch.Generator().manual_seed(1)
    n, d = 16, 4
    q, kx, vx = (torch.randn(2, 2, n, d, generator=g) for _ in range(3))
    kr, vr = torch.randn(2, n, d, generator=g), torch.randn(2, n, d, generator=g)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[3:10] = True
    plain, w1 = reference_attention(q, kr, vr, kx, vx, keep, return_weights=True)
    assert torch.equal(reference_attention(q, kr, vr, kx, vx, keep, weight=1.0), reference_attention(q, kr, vr, kx, vx,
                                                                                                      keep))
    _, w3 = reference_attention(q, kr, vr, kx, vx, keep, weight=3.0, return_weights=True)
    ref1, own1 = w1[..., :n].sum(-1), w1[..., n:].sum(-1)
    ref3, own3 = w3[..., :n].sum(-1), w3[..., n:].sum(-1)
    torch.testing.assert_close(ref3 / own3, 3 * ref1 / own1, rtol=1e-4, atol=1e-6)  # odds of R scale by the weight
    out, weights = reference_attention(q, kr, vr, kx, vx, keep, replace=True, return_weights=True)
    assert weights.shape == (2, 2, n, n) and torch.all(weights[..., ~keep] == 0)  # R's subject tokens only
    expected = torch.softmax((q @ kr[None].transpose(-1, -2)) * d ** -0.5 + torch.where(keep, 0.0, float("-inf")), -1)
    torch.testing.assert_close(out, expected @ vr[None], atol=1e-5, rtol=1e-5)
    empty = torch.zeros(n, dtype=torch.bool)  # no reference token at this layer: the concatenation stands
    torch.testing.assert_close(reference_attention(q, kr, vr, kx, vx, empty, replace=True),
                               reference_attention(q, kr, vr, kx, vx, empty), atol=0, rtol=0)


def test_swap_blends_foreground_and_keeps_the_context_background():
    attn = _attention()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 16, 8, generator=g)  # rows: R, C_u, C_c, X_u, X_c
    target = torch.zeros(4, 4)
    target[1:3, 1:3] = 1.0  # the subject in the target: 4 of 16 tokens
    ref = torch.zeros(4, 4)
    ref[2:, :] = 1.0
    state = SwapState(ref=0, pairs=[(3, 1), (4, 2)], ref_mask=ref, target_mask=torch.stack([target, target]))
    stock = AttnProcessor2_0()(attn, hidden)

    state.active = False
    torch.testing.assert_close(MultiSourceSwapProcessor(state)(attn, hidden), stock, atol=1e-6, rtol=1e-5)

    state.active = True
    out = MultiSourceSwapProcessor(state)(attn, hidden)
    fg_tokens = target.reshape(-1) > 0
    # Rows other than X: untouched. Background of X: exactly the context path's output.
    torch.testing.assert_close(out[:3], stock[:3], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[3][~fg_tokens], stock[1][~fg_tokens], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[4][~fg_tokens], stock[2][~fg_tokens], atol=1e-6, rtol=1e-5)
    # Foreground of X: attention over [reference subject ; X itself], then the output projection.
    q = attn.to_q(hidden).view(5, 16, 2, 4).transpose(1, 2)
    k = attn.to_k(hidden).view(5, 16, 2, 4).transpose(1, 2)
    v = attn.to_v(hidden).view(5, 16, 2, 4).transpose(1, 2)
    fg = reference_attention(q[[3, 4]], k[0], v[0], k[[3, 4]], v[[3, 4]], ref.reshape(-1) > 0)
    expected = attn.to_out[0](fg.transpose(1, 2).reshape(2, 16, 8))
    torch.testing.assert_close(out[3:][:, fg_tokens], expected[:, fg_tokens], atol=1e-5, rtol=1e-5)
    assert (out[3][fg_tokens] - stock[3][fg_tokens]).abs().max() > 1e-3  # the swap did change the subject


def test_swap_processor_refuses_cross_attention():
    state = SwapState(ref=0, pairs=[], ref_mask=torch.ones(4, 4), target_mask=torch.zeros(0, 4, 4))
    with pytest.raises(AttentionLayerError, match="self-attention"):
        MultiSourceSwapProcessor(state)(_attention(), torch.randn(1, 16, 8), torch.randn(1, 3, 8))
