"""A dense (fully connected) CRF in pure torch: mean-field inference with Gaussian edge potentials.

Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials"
(NeurIPS 2011), with the Potts label compatibility. The pairwise kernel of pixels i, j is

    k(i, j) = w_a * exp(-|p_i - p_j|^2 / (2 theta_alpha^2) - |c_i - c_j|^2 / (2 theta_beta^2))   appearance
            + w_s * exp(-|p_i - p_j|^2 / (2 theta_gamma^2))                                        smoothness

with p the pixel position (in grid pixels) and c the colour (image values in [0, 1]). lrkit runs it
on small grids (the E-step's `crf_resolution`: 64 x 64 for SD 1.5 at 512 px, 128 x 128 for SDXL at 1024 px), where
the N x N kernel is computed exactly (no permutohedral lattice, no native extension), in chunks of `_DENSE_LIMIT`
entries, once, and kept through the iterations up to `_KEPT_LIMIT` entries (1 GiB); above that its rows are
computed again every iteration, so memory stays bounded.

Used by the EM mask estimation of `concept_em` (DESIGN §6.3); re-exported from `lrkit.masks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DENSE_LIMIT = 4096 * 4096  # kernel entries computed at once (64 MiB in float32)
_KEPT_LIMIT = 1 << 28  # kernel entries kept through the iterations (1 GiB in float32: a 128 x 128 grid's)


@dataclass(frozen=True)
class CRFParams:
    """Dense-CRF parameters (defaults suit a 16-64 px latent grid and colours in [0, 1])."""

    iterations: int = 10
    """Mean-field iterations."""
    appearance_weight: float = 10.0
    """w_a: weight of the appearance (bilateral) kernel."""
    smoothness_weight: float = 3.0
    """w_s: weight of the smoothness (spatial) kernel."""
    theta_alpha: float = 6.0
    """Spatial range of the appearance kernel, in grid pixels."""
    theta_beta: float = 0.08
    """Colour range of the appearance kernel, in image units ([0, 1] per channel)."""
    theta_gamma: float = 1.0
    """Spatial range of the smoothness kernel, in grid pixels."""

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"CRFParams.iterations must be >= 0, got {self.iterations}")
        for name in ("appearance_weight", "smoothness_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"CRFParams.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("theta_alpha", "theta_beta", "theta_gamma"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CRFParams.{name} must be > 0, got {getattr(self, name)}")


def _features(image: torch.Tensor, params: CRFParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled appearance features (N, 2 + C) and smoothness features (N, 2) of an image (C, h, w)."""
    c, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    pos = torch.stack([ys, xs], dim=-1).reshape(h * w, 2).to(image.device)  # (N, 2)
    colour = image.float().reshape(c, h * w).t()  # (N, C)
    appearance = torch.cat([pos / params.theta_alpha, colour / params.theta_beta], dim=1)
    return appearance, pos / params.theta_gamma


def _kernel_rows(appearance: torch.Tensor, smooth: torch.Tensor, rows: slice, params: CRFParams) -> torch.Tensor:
    """Rows `rows` of the combined pairwise kernel (n_rows, N), self-connections removed."""
    k = params.appearance_weight * torch.exp(-0.5 * torch.cdist(appearance[rows], appearance).square())
    k = k + params.smoothness_weight * torch.exp(-0.5 * torch.cdist(smooth[rows], smooth).square())
    start = rows.start or 0
    idx = torch.arange(k.shape[0], device=k.device)
    k[idx, idx + start] = 0.0  # no message from a pixel to itself
    return k


def dense_crf(unary: torch.Tensor, image: torch.Tensor, params: CRFParams | None = None,
              eps: float = 1e-6) -> torch.Tensor:
    """Mean-field posterior Q (L, h, w) of a dense CRF with Potts compatibility (Krähenbühl & Koltun 2011, Alg. 1).

    `unary`: (L, h, w) label probabilities per pixel (normalised here; clamped to [eps, 1]);
    `image`: (C, h, w) colours in [0, 1] at the same grid. Each iteration computes the message
    m_i(l) = sum_j k(i, j) Q_j(l) and sets Q_i(l) ∝ P_i(l) exp(m_i(l)), the Potts update up to a
    per-pixel constant. 0 iterations return the normalised unary.
    """
    params = params or CRFParams()
    if unary.ndim != 3:
        raise ValueError(f"dense_crf: unary must be (labels, h, w), got shape {tuple(unary.shape)}")
    if image.ndim != 3 or image.shape[1:] != unary.shape[1:]:
        raise ValueError(f"dense_crf: image must be (channels, h, w) with the unary's (h, w) = "
                         f"{tuple(unary.shape[1:])}, got shape {tuple(image.shape)}")
    if unary.shape[0] < 2:
        raise ValueError(f"dense_crf: needs at least 2 labels, got {unary.shape[0]}")
    if not torch.isfinite(unary).all() or (unary < 0).any():
        raise ValueError("dense_crf: unary must hold finite, non-negative probabilities")
    labels, h, w = unary.shape
    n = h * w
    prob = unary.float().reshape(labels, n).clamp_min(eps)
    log_p = (prob / prob.sum(0, keepdim=True)).log()  # (L, N)
    q = log_p.softmax(0)
    if params.iterations == 0:
        return q.reshape(labels, h, w)
    appearance, smooth = _features(image.to(unary.device), params)
    chunk = max(1, _DENSE_LIMIT // n)
    dense = None  # (N, N), symmetric: computed once, in chunks of rows, where it is kept
    if n * n <= _KEPT_LIMIT:
        dense = torch.empty(n, n, device=unary.device)
        for s in range(0, n, chunk):
            dense[s:s + chunk] = _kernel_rows(appearance, smooth, slice(s, min(s + chunk, n)), params)
    for _ in range(params.iterations):
        if dense is not None:
            message = q @ dense  # (L, N)
        else:
            message = torch.cat([q @ _kernel_rows(appearance, smooth, slice(s, min(s + chunk, n)), params).t()
                                 for s in range(0, n, chunk)], dim=1)
        q = (log_p + message).softmax(0)
    return q.reshape(labels, h, w)


def crf_refine(foreground: torch.Tensor, image: torch.Tensor, params: CRFParams | None = None) -> torch.Tensor:
    """Refine a foreground probability map (h, w) in [0, 1] with a two-label dense CRF -> bool (h, w)."""
    if foreground.ndim != 2:
        raise ValueError(f"crf_refine: foreground must be (h, w), got shape {tuple(foreground.shape)}")
    p = foreground.float().clamp(0.0, 1.0)
    q = dense_crf(torch.stack([1.0 - p, p]), image, params)
    return q[1] > q[0]


__all__ = ["CRFParams", "crf_refine", "dense_crf"]
