"""Gradient clipping under mixed precision with fused and unfused AdamW (`lrkit.training.module.clip_grad_norm`)."""

from __future__ import annotations

import pytest
import torch

from lrkit.training.module import clip_grad_norm

MAX_NORM = 0.5


def _model_and_loss(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    x = torch.randn(16, 8)
    return model, lambda: (model(x) ** 2).mean() * 10.0  # gradient norm well above MAX_NORM


def _reference(seed: int = 0):
    """fp32, no scaler: gradients clipped by hand, then one plain AdamW step."""
    model, loss = _model_and_loss(seed)
    loss().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > 4 * MAX_NORM
    clipped = [g * (MAX_NORM / (norm + 1e-6)) for g in grads]
    for p, g in zip(model.parameters(), clipped):
        p.grad = g
    torch.optim.AdamW(model.parameters(), lr=0.1, foreach=False).step()
    return clipped, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("scaled", [True, False], ids=["16-mixed-scaler", "bf16-no-scaler"])
def test_clipping_sees_true_gradients_and_the_step_matches_fp32(fused, scaled):
    clipped_ref, params_ref = _reference()
    model, loss = _model_and_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused or None, foreach=None if fused else True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if scaled else None
    (scaler.scale(loss()) if scaled else loss()).backward()
    if scaled and not fused:
        scaler.unscale_(optimizer)  # what Lightning's plugin does before clipping for unfused optimizers
    clip_grad_norm(optimizer, MAX_NORM, scaler)
    for p, g in zip(model.parameters(), clipped_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)  # clipped in true (unscaled) units
    if scaled:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    for p, ref in zip(model.parameters(), params_ref):
        torch.testing.assert_close(p.detach(), ref, rtol=1e-5, atol=1e-6)


def test_a_fused_step_with_an_inf_gradient_is_still_skipped():
    model, loss = _model_and_loss()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaler.scale(loss()).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    clip_grad_norm(optimizer, MAX_NORM, scaler)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 12  # the scaler saw the inf
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
