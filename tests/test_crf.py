"""The pure-torch dense CRF (lrkit.crf, re-exported by lrkit.masks): recovery, exact limits, errors."""

import pytest
import torch

from lrkit.masks import CRFParams, crf_refine, dense_crf, mask_iou


def two_region_image(size: int = 32, seed: int = 0):
    """An orange disc on a teal background with a little pixel noise -> (image (3, h, w), truth (h, w))."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    truth = (ys - size * 0.45) ** 2 + (xs - size * 0.55) ** 2 <= (size * 0.3) ** 2
    fg, bg = torch.tensor([0.95, 0.55, 0.1]), torch.tensor([0.1, 0.5, 0.55])
    image = torch.where(truth[None], fg[:, None, None], bg[:, None, None])
    image = (image + 0.02 * torch.randn(image.shape, generator=g)).clamp(0, 1)
    return image, truth


def noisy_unary(truth: torch.Tensor, seed: int = 1, noise: float = 0.35) -> torch.Tensor:
    """P(foreground) = 0.6 on the true label, plus strong per-pixel noise (many pixels flipped)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.where(truth, 0.6, 0.4) + noise * torch.randn(truth.shape, generator=g)
    return p.clamp(0.02, 0.98)


def test_crf_recovers_a_two_region_image_from_a_noisy_unary():
    image, truth = two_region_image()
    p = noisy_unary(truth)
    before = mask_iou(p > 0.5, truth)
    after = mask_iou(crf_refine(p, image), truth)
    assert before < 0.75, before  # the unary alone is far off: the test can fail
    assert after >= 0.95, (before, after)


def test_crf_follows_colour_edges_not_just_smoothing():
    # The same noisy unary without the appearance kernel (smoothness only, wide) blurs across the
    # disc boundary; with the colour kernel the boundary is kept: the appearance term matters.
    image, truth = two_region_image()
    p = noisy_unary(truth)
    blur = CRFParams(appearance_weight=0.0, smoothness_weight=3.0, theta_gamma=4.0)
    both = CRFParams()
    assert mask_iou(crf_refine(p, image, both), truth) > mask_iou(crf_refine(p, image, blur), truth)


def test_zero_iterations_return_the_normalised_unary_and_q_is_a_distribution():
    image, truth = two_region_image(16)
    unary = torch.stack([torch.full((16, 16), 2.0), torch.full((16, 16), 6.0), torch.full((16, 16), 2.0)])
    q0 = dense_crf(unary, image, CRFParams(iterations=0))
    assert torch.allclose(q0[1], torch.full((16, 16), 0.6))
    q = dense_crf(unary, image)
    assert torch.allclose(q.sum(0), torch.ones(16, 16), atol=1e-5)


def test_chunked_kernel_equals_the_dense_kernel(monkeypatch):
    """The kernel computed at once, built in chunks of rows and kept, or recomputed in chunks every iteration (a
    grid over `_KEPT_LIMIT`): the same posterior."""
    import lrkit.crf as crf

    image, truth = two_region_image(24)
    unary = torch.stack([1 - noisy_unary(truth), noisy_unary(truth)])
    dense = dense_crf(unary, image)
    monkeypatch.setattr(crf, "_DENSE_LIMIT", 24 * 24 * 7)  # forces row chunks of 7
    kept = dense_crf(unary, image)
    monkeypatch.setattr(crf, "_KEPT_LIMIT", 24 * 24 * 24 * 24 - 1)  # one entry too many: recomputed
    recomputed = dense_crf(unary, image)
    assert torch.allclose(dense, kept, atol=1e-5) and torch.allclose(dense, recomputed, atol=1e-5)
    assert not torch.allclose(dense, dense_crf(unary, image, crf.CRFParams(iterations=0)), atol=1e-2)


def test_crf_bad_input_is_named():
    image, truth = two_region_image(8)
    with pytest.raises(ValueError, match="unary must be"):
        dense_crf(torch.ones(8, 8), image)
    with pytest.raises(ValueError, match="image must be"):
        dense_crf(torch.ones(2, 8, 8), image[:, :4])
    with pytest.raises(ValueError, match="at least 2 labels"):
        dense_crf(torch.ones(1, 8, 8), image)
    with pytest.raises(ValueError, match="non-negative"):
        dense_crf(-torch.ones(2, 8, 8), image)
    with pytest.raises(ValueError, match="theta_beta"):
        CRFParams(theta_beta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        mask_iou(torch.ones(2, 2), torch.ones(3, 3))
