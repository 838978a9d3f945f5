"""lrkit.masks: map operations with hand-computed answers, boxes, mask blending, mask files, segmenters.

SAM runs with random weights built from config (no checkpoint can be downloaded); its one image
encoder pass at 1024 px is shared by the module.
"""

import logging
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from lrkit.masks import (
    AttentionSegmenter,
    SamSegmenter,
    Segmenter,
    blend_target_mask,
    box_from_attention,
    largest_component,
    load_mask_png,
    load_segmenter,
    minmax,
    otsu_threshold,
    resize_map,
    save_mask_png,
)

# ------------------------------------------------------------------------------------ map operations


def test_minmax_normalises_each_map_and_zeroes_constant_maps():
    x = torch.tensor(
        [
            [[1.0, 3.0], [5.0, 9.0]],
            [[-2.0, -2.0], [-2.0, -2.0]],  # constant
            [[0.0, -4.0], [4.0, 2.0]],
        ]
    )
    out = minmax(x)
    expected = torch.tensor(
        [
            [[0.0, 0.25], [0.5, 1.0]],
            [[0.0, 0.0], [0.0, 0.0]],
            [[0.5, 0.0], [1.0, 0.75]],
        ]
    )
    assert torch.equal(out, expected)
    assert torch.equal(minmax(x[0]), expected[0])  # (h, w) works too
    assert torch.equal(minmax(torch.tensor([[0.0, 1e-6], [5e-7, 0.0]])), torch.tensor([[0.0, 1.0], [0.5, 0.0]]))
    assert minmax(x.double()).dtype == torch.float64
    assert minmax(torch.tensor([[0, 2], [4, 8]])).dtype == torch.float32  # integers -> float32
    with pytest.raises(ValueError, match="at least 2 dims"):
        minmax(torch.ones(4))


def test_resize_map_up_is_bilinear():
    m = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    # align_corners=False: output i samples input (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 (clamped),
    # so along x the values are 0, .25, .75, 1 and along y 0, .5, 1.5, 2; the map is their sum.
    expected = torch.tensor(
        [
            [0.0, 0.25, 0.75, 1.0],
            [0.5, 0.75, 1.25, 1.5],
            [1.5, 1.75, 2.25, 2.5],
            [2.0, 2.25, 2.75, 3.0],
        ]
    )
    assert torch.equal(resize_map(m, (4, 4)), expected)


def test_resize_map_down_is_area_and_keeps_leading_dims_and_dtype():
    m = torch.arange(16, dtype=torch.float64).view(4, 4)
    assert torch.equal(resize_map(m, (2, 2)), torch.tensor([[2.5, 4.5], [10.5, 12.5]], dtype=torch.float64))
    spike = torch.zeros(4, 4)
    spike[0, 0] = 1.0
    assert resize_map(spike, (1, 1)).item() == 1 / 16  # every cell counts (bilinear would read only the centre)
    batch = torch.stack([m, 2 * m]).expand(3, 2, 4, 4).to(torch.bfloat16)  # (3, 2, 4, 4)
    out = resize_map(batch, (2, 1))
    assert out.shape == (3, 2, 2, 1) and out.dtype == torch.bfloat16
    assert torch.equal(out[0, 1, :, 0].float(), torch.tensor([2 * 3.5, 2 * 11.5]))  # mean of each half


def test_resize_map_mixed_directions():
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]])  # (2, 4) -> (4, 2): up in h, down in w
    out = resize_map(m, (4, 2))
    assert torch.allclose(out, torch.tensor([[1.0, 1.0], [1.5, 1.5], [2.5, 2.5], [3.0, 3.0]]))
    with pytest.raises(ValueError, match="positive"):
        resize_map(m, (0, 2))


def test_otsu_two_values_splits_halfway():
    x = torch.tensor([0.25] * 30 + [0.75] * 70)
    assert otsu_threshold(x) == 0.5
    x = torch.tensor([[-3.0, 5.0], [5.0, 5.0]])
    assert otsu_threshold(x) == 1.0


def _exact_otsu(values: np.ndarray) -> float:
    """Otsu by definition over every split of the sorted values (no histogram)."""
    v = np.sort(values.astype(np.float64))
    n = len(v)
    csum = np.cumsum(v)
    k = np.arange(1, n)  # lower class = v[:k]
    mu0 = csum[k - 1] / k
    mu1 = (csum[-1] - csum[k - 1]) / (n - k)
    between = k * (n - k) * (mu0 - mu1) ** 2
    best = int(np.argmax(between)) + 1
    return (v[best - 1] + v[best]) / 2


def test_otsu_bimodal_lands_between_the_modes_as_exact_otsu_does():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([0.2 + 0.05 * torch.randn(3000, generator=g), 0.8 + 0.08 * torch.randn(1000, generator=g)])
    t = otsu_threshold(x, bins=256)
    bin_width = float(x.max() - x.min()) / 256
    assert 0.35 < t < 0.65
    assert abs(t - _exact_otsu(x.numpy())) <= bin_width
    # the threshold sits between data values, so `>` and `>=` agree
    assert torch.equal(x > t, x >= t)


def test_otsu_degenerate_inputs():
    assert otsu_threshold(torch.full((3, 3), 0.3, dtype=torch.float64)) == 0.3  # nothing is above it
    with pytest.raises(ValueError, match="NaN"):
        otsu_threshold(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="empty"):
        otsu_threshold(torch.tensor([]))


def test_largest_component_matches_scipy_8_connectivity():
    from scipy import ndimage  # the oracle (in the test extra)
    g = torch.Generator().manual_seed(1)
    for density in (0.3, 0.45, 0.6):
        fg = torch.rand(24, 20, generator=g) < density
        labels, n = ndimage.label(fg.numpy(), structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel())[1:]
        assert (sizes == sizes.max()).sum() == 1, "pick a seed with a unique largest component"
        expected = labels == (int(np.argmax(sizes)) + 1)
        assert np.array_equal(largest_component(fg).numpy(), expected)
    diagonal = torch.eye(5, dtype=torch.bool)  # touches only at corners: one component
    assert torch.equal(largest_component(diagonal), diagonal)


# ------------------------------------------------------------------------------------ boxes


def test_box_from_attention_rectangle_with_otsu_and_padding():
    attn = 0.01 * torch.rand(16, 16, generator=torch.Generator().manual_seed(0))
    attn[3:6, 9:13] = 1.0  # rows 3..5, cols 9..12
    # 32 px per cell: x 288..416, y 96..192; pad 0.05 * 512 = 25.6 px, floored / ceiled outwards
    assert box_from_attention(attn, (512, 512)) == (262, 70, 442, 218)
    # non-square image (width 640, height 480): 40 x 30 px per cell, pad 32 / 24 px
    assert box_from_attention(attn, (640, 480), pad=0.05) == (360 - 32, 90 - 24, 520 + 32, 180 + 24)
    # pad 0.03 * 512 = 15.36 px: 272.64 -> 272, 80.64 -> 80, 431.36 -> 432, 207.36 -> 208 (always outwards)
    assert box_from_attention(attn, (512, 512), pad=0.03) == (272, 80, 432, 208)


def _gaussian(h, w, row, col, sigma):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.exp(-((ys - row) ** 2 + (xs - col) ** 2) / (2 * sigma**2))


def test_box_from_attention_gaussian_blob():
    attn = _gaussian(16, 16, row=4, col=10, sigma=1.0)
    # exp(-d^2 / 2) > 0.5 <=> d^2 < 2 ln 2 = 1.39: the peak and its 4 neighbours, rows 3..5, cols 9..11
    assert box_from_attention(attn, (512, 512), threshold=0.5, pad=0.0) == (288, 96, 384, 192)
    # Otsu: a square box centred on the peak cell (x 320..352, y 128..160)
    x0, y0, x1, y1 = box_from_attention(_gaussian(16, 16, 4, 10, sigma=1.5), (512, 512), pad=0.0)
    assert (x0 + x1) / 2 == 336 and (y0 + y1) / 2 == 144
    assert x1 - x0 == y1 - y0 and 32 < x1 - x0 < 256


def test_box_from_attention_keeps_the_larger_blob_not_the_brighter_one():
    attn = torch.zeros(16, 16)
    attn[1:3, 1:3] = 1.0  # small, bright
    attn[8:12, 6:11] = 0.9  # large: rows 8..11, cols 6..10
    assert box_from_attention(attn, (512, 512), pad=0.0) == (192, 256, 352, 384)


def test_box_from_attention_flat_map_and_clamping():
    assert box_from_attention(torch.full((16, 16), 0.3), (512, 384)) == (0, 0, 512, 384)
    assert box_from_attention(torch.zeros(8, 8), (64, 64), threshold=0.5) == (0, 0, 64, 64)
    corner = torch.zeros(8, 8)
    corner[0:2, 6:8] = 1.0
    assert box_from_attention(corner, (64, 64), pad=0.25) == (32, 0, 64, 32)  # 48-16 .. 64+16 clamped
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        box_from_attention(torch.zeros(1, 8, 8), (64, 64))


# ------------------------------------------------------------------------------------ blending


def test_blend_alpha_0_is_thresholded_attention_and_alpha_1_is_sam():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(8, 8, generator=g) * 3 + 1
    sam = torch.rand(8, 8, generator=g) > 0.5
    tau = 0.4
    expected_attn = ((attn - attn.min()) / (attn.max() - attn.min()) >= tau).float()
    assert torch.equal(blend_target_mask(attn, sam, sam_weight=0.0, mask_threshold=tau), expected_attn)
    assert torch.equal(blend_target_mask(attn, None, sam_weight=0.7, mask_threshold=tau), expected_attn)  # no SAM: sam_weight = 0
    assert torch.equal(blend_target_mask(attn, sam, sam_weight=1.0, mask_threshold=tau), sam.float())
    assert torch.equal(blend_target_mask(attn, sam.float(), sam_weight=1.0, mask_threshold=tau), sam.float())


def test_blend_hand_computed_mixture_with_resized_sam_mask():
    attn = torch.tensor([[0.0, 1.0], [2.0, 4.0]])  # min-max -> [[0, .25], [.5, 1]]
    sam = torch.zeros(4, 4, dtype=torch.bool)
    sam[:2, :2] = True  # area-resized to (2, 2) -> [[1, 0], [0, 0]]
    # 0.5 * sam + 0.5 * attn = [[.5, .125], [.25, .5]] -> >= .5
    out = blend_target_mask(attn, sam, sam_weight=0.5, mask_threshold=0.5)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # a SAM mask covering half of a cell counts half: 0.5 * 0.5 + 0.5 * 0 = .25 < .5
    sam_half = torch.zeros(4, 4, dtype=torch.bool)
    sam_half[:2, :1] = True
    assert torch.equal(blend_target_mask(attn, sam_half, sam_weight=0.5, mask_threshold=0.5), torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="sam_weight"):
        blend_target_mask(attn, sam, sam_weight=1.5, mask_threshold=0.5)


# ------------------------------------------------------------------------------------ mask files


def test_mask_png_round_trip(tmp_path):
    mask = torch.rand(37, 53, generator=torch.Generator().manual_seed(0)) > 0.5
    path = save_mask_png(mask, tmp_path / "sub" / "mask.png")
    assert path == tmp_path / "sub" / "mask.png"
    with PIL.Image.open(path) as img:
        assert img.mode == "L" and img.size == (53, 37)
        assert set(np.unique(np.array(img))) == {0, 255}
    loaded = load_mask_png(path)
    assert loaded.dtype == torch.bool and torch.equal(loaded, mask)
    # float masks are foreground from 0.5; numpy input; overwriting in place
    save_mask_png(np.array([[0.0, 0.49], [0.5, 1.0]]), path)
    assert torch.equal(load_mask_png(path), torch.tensor([[False, False], [True, True]]))
    assert [p.name for p in path.parent.iterdir()] == ["mask.png"]  # no temporary files left


def test_mask_png_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    with pytest.raises(ValueError, match="corrupt.png"):
        load_mask_png(corrupt)
    good = save_mask_png(torch.ones(64, 64, dtype=torch.bool), tmp_path / "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated.png"):
        load_mask_png(truncated)
    deep = tmp_path / "sixteen_bit.png"
    PIL.Image.fromarray(np.full((4, 4), 1000, dtype=np.uint16)).save(deep)
    with pytest.raises(ValueError, match=r"sixteen_bit.png.*mode"):
        load_mask_png(deep)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_mask_png(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        save_mask_png(torch.ones(1, 4, 4), tmp_path / "x.png")


# ------------------------------------------------------------------------------------ segmenters


def test_attention_segmenter_thresholds_the_upsampled_map():
    attn = torch.zeros(4, 4)
    attn[:2, :2] = 5.0
    seg = AttentionSegmenter(attn)
    assert isinstance(seg, Segmenter)
    image = PIL.Image.new("RGB", (8, 8))
    # bilinear 4 -> 8 along each axis: 1, 1, 1, .75, .25, 0, 0, 0; Otsu threshold .5
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True
    assert torch.equal(seg(image), expected)
    expected[:, 2:] = False
    assert torch.equal(seg(image, box=(0, 0, 2, 8)), expected)  # a box keeps what lies inside it
    wide = seg(PIL.Image.new("RGB", (16, 8)))  # (H, W) at the image's size
    # x4 along x: 1 up to column 5 (sample at 1.125 -> .875), 0 from column 10 (sample >= 2)
    assert wide.shape == (8, 16) and wide[:3, :6].all() and not wide[:, 8:].any() and not wide[4:].any()
    assert not AttentionSegmenter(torch.ones(4, 4))(image).any()  # flat map: no subject


@pytest.fixture(scope="module")
def sam_vit_b():
    return SamSegmenter.from_config("vit_b", seed=0)


@pytest.fixture(scope="module")
def sam_vit_b_pth(sam_vit_b, tmp_path_factory):
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_test.pth"
    torch.save(sam_vit_b.model.state_dict(), path)
    return path


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.slow
def test_sam_segmenter_box_prompt(sam_vit_b, monkeypatch):
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))  # width 80, height 48
    mask = sam_vit_b(image, box=(10, 5, 60, 40))  # the one image-encoder pass of this module
    assert isinstance(sam_vit_b, Segmenter)
    assert mask.dtype == torch.bool and mask.shape == (48, 80)
    # the segmenter passed the box through: asking SAM's predictor directly gives the same mask
    direct, _, _ = sam_vit_b.predictor.predict(box=np.array([10, 5, 60, 40]), multimask_output=False)
    assert np.array_equal(mask.numpy(), direct[0])

    # same image again: the embedding is reused; no box means the whole image
    seen = {}
    predict = sam_vit_b.predictor.predict

    def no_set_image(*args, **kwargs):
        raise AssertionError("set_image called again for the same image")

    def recording_predict(**kwargs):
        seen.update(kwargs)
        return predict(**kwargs)

    monkeypatch.setattr(sam_vit_b.predictor, "set_image", no_set_image)
    monkeypatch.setattr(sam_vit_b.predictor, "predict", recording_predict)
    whole = sam_vit_b(image.convert("RGBA"))
    assert whole.shape == (48, 80)
    assert seen["box"].tolist() == [0, 0, 80, 48] and seen["multimask_output"] is False
    with pytest.raises(ValueError, match="x0 < x1"):
        sam_vit_b(image, box=(50, 5, 10, 40))


def test_sam_from_config_is_seeded_and_leaves_the_global_rng_alone(sam_vit_b):
    state = torch.random.get_rng_state()
    again = SamSegmenter.from_config("vit_b", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    _assert_same_weights(again.model, sam_vit_b.model)
    other = SamSegmenter.from_config("vit_b", seed=1).model.mask_decoder.iou_token.weight
    assert not torch.equal(other, sam_vit_b.model.mask_decoder.iou_token.weight)
    with pytest.raises(ValueError, match="vit_b, vit_l, vit_h"):
        SamSegmenter.from_config("vit_x")


def test_sam_from_checkpoint_loads_weights_only(sam_vit_b, sam_vit_b_pth, monkeypatch):
    import segment_anything

    calls = []
    real_load = torch.load

    def checking_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, kwargs
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    build = segment_anything.sam_model_registry["vit_b"]

    def checking_build(checkpoint=None):
        assert checkpoint is None, "segment-anything's own loader unpickles"
        return build(checkpoint=None)

    monkeypatch.setattr(torch, "load", checking_load)
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", checking_build)
    loaded = SamSegmenter.from_checkpoint(sam_vit_b_pth)  # type from the name: vit_b
    assert len(calls) == 1
    assert loaded.model is not sam_vit_b.model
    _assert_same_weights(loaded.model, sam_vit_b.model)


def test_sam_from_checkpoint_safetensors(sam_vit_b, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "my_sam.safetensors"  # no type in the name: read from the weights
    save_file({k: v.contiguous() for k, v in sam_vit_b.model.state_dict().items()}, path)
    _assert_same_weights(SamSegmenter.from_checkpoint(path).model, sam_vit_b.model)


class _Marker:
    """Unpickling this would create a file: proof that a checkpoint ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_sam_from_checkpoint_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "sam_vit_b_evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "x": _Marker(str(marker))}, path)
    with pytest.raises(ValueError, match=r"sam_vit_b_evil.pth.*weights_only=True"):
        SamSegmenter.from_checkpoint(path)
    assert not marker.exists()
    not_a_state_dict = tmp_path / "sam_vit_b_list.pth"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(ValueError, match=r"sam_vit_b_list.pth.*not a state dict"):
        SamSegmenter.from_checkpoint(not_a_state_dict)


def test_sam_from_checkpoint_wrong_type_and_bad_files(sam_vit_b, sam_vit_b_pth, tmp_path):
    misnamed = tmp_path / "sam_vit_l_0b3195.pth"
    misnamed.symlink_to(sam_vit_b_pth)
    with pytest.raises(ValueError, match=r"sam_vit_l_0b3195.pth holds vit_b weights.*not vit_l"):
        SamSegmenter.from_checkpoint(misnamed)
    with pytest.raises(ValueError, match=r"holds vit_b weights.*not vit_h"):
        SamSegmenter.from_checkpoint(sam_vit_b_pth, model_type="vit_h")
    with pytest.raises(ValueError, match="model_type must be one of vit_b, vit_l, vit_h"):
        SamSegmenter.from_checkpoint(sam_vit_b_pth, model_type="vit_x")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        SamSegmenter.from_checkpoint(tmp_path / "nowhere.pth")
    # right width, but not a whole SAM: the error summarises what does not fit, briefly
    partial = tmp_path / "sam_vit_b_partial.pth"
    torch.save(
        {
            "image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
            "mask_decoder.iou_token.weight": torch.zeros(1),
            "extra.weight": torch.zeros(1),
        },
        partial,
    )
    with pytest.raises(ValueError, match=r"sam_vit_b_partial.pth does not fit .* vit_b model") as e:
        SamSegmenter.from_checkpoint(partial)
    n_keys = len(sam_vit_b.model.state_dict())
    message = str(e.value)
    assert f"{n_keys - 2} missing keys (image_encoder.pos_embed, " in message
    assert "1 unexpected keys (extra.weight)" in message
    assert "1 shape mismatches, checkpoint vs model (mask_decoder.iou_token.weight (1,) vs (1, 256))" in message
    assert len(message) < 800
    unknown = tmp_path / "weights.pth"
    torch.save({"foo": torch.zeros(2)}, unknown)
    with pytest.raises(ValueError, match=r"cannot tell the SAM model type of .*weights.pth"):
        SamSegmenter.from_checkpoint(unknown)
    garbage = tmp_path / "sam_vit_b_garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="sam_vit_b_garbage.pth"):
        SamSegmenter.from_checkpoint(garbage)


def test_sam_needs_segment_anything(monkeypatch):
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'lrkit\[sam\]'"):
        SamSegmenter.from_config("vit_b")


def test_load_segmenter(sam_vit_b, sam_vit_b_pth, caplog):
    with caplog.at_level(logging.WARNING, logger="lrkit.masks"):
        assert load_segmenter(None) is None
    records = [r for r in caplog.records if r.name == "lrkit.masks"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "sam_weight = 0" in records[0].getMessage() and "sam_checkpoint" in records[0].getMessage()
    caplog.clear()
    segmenter = load_segmenter(str(sam_vit_b_pth))
    assert isinstance(segmenter, SamSegmenter) and not caplog.records
    _assert_same_weights(segmenter.model, sam_vit_b.model)


def test_import_needs_neither_segment_anything_nor_training_nor_inference():
    code = (
        "import sys, lrkit.masks\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'segment_anything'"
        " or m.startswith(('lrkit.training', 'lrkit.inference'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
