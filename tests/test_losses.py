"""Min-SNR-γ loss weights (Hang et al., 2023), checked against the definition: weight the x0 error by min(SNR, γ)."""

import pytest
import torch

from lrkit.losses import min_snr_weight

GAMMA = 5.0


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # SD's schedule


def _losses_of_one_x0_prediction(seed: int = 0):
    """Per-sample (ε loss, v loss, x0 loss) of the ε, v and x0 predictions that all stand for the same estimate x̂0,
    the SNR of each sample's timestep (from ᾱ, not from lrkit or compute_snr) and the timesteps."""
    g = torch.Generator().manual_seed(seed)
    scheduler = _scheduler()
    t = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (30,), generator=g)])
    shape = (len(t), 4, 8, 8)
    x0, eps = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    x0_hat = x0 + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    abar = scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x_t = scheduler.add_noise(x0, eps, t)
    eps_hat = (x_t - alpha * x0_hat) / sigma  # the ε prediction with the same x̂0
    v, v_hat = scheduler.get_velocity(x0, eps, t), alpha * eps_hat - sigma * x0_hat
    snr = (abar / (1 - abar)).flatten()
    return _mse(eps_hat, eps), _mse(v_hat, v), _mse(x0_hat, x0), snr, t


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error of (B, C, H, W) tensors."""
    return ((a - b) ** 2).mean(dim=(1, 2, 3))


def test_epsilon_and_v_losses_weighted_by_min_snr_equal_the_x0_loss_weighted_by_min_of_snr_and_gamma():
    from diffusers.training_utils import compute_snr

    eps_loss, v_loss, x0_loss, snr, t = _losses_of_one_x0_prediction()
    assert snr.min() < GAMMA < snr.max()  # both sides of the clip
    expected = torch.clamp(snr, max=GAMMA) * x0_loss
    snr_used_in_training = compute_snr(_scheduler(), t)
    for loss, prediction_type in ((eps_loss, "epsilon"), (v_loss, "v_prediction"), (x0_loss, "sample")):
        weighted = loss * min_snr_weight(snr_used_in_training, GAMMA, prediction_type).double()
        torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=0, msg=prediction_type)


def test_below_gamma_the_epsilon_loss_is_unweighted_and_above_it_the_x0_weight_is_gamma():
    snr = torch.logspace(-4, 4, 81)
    for gamma in (1.0, GAMMA, 20.0):
        below, above = snr <= gamma, snr > gamma
        eps = min_snr_weight(snr, gamma, "epsilon")
        torch.testing.assert_close(eps[below], torch.ones(int(below.sum())))
        torch.testing.assert_close((eps * snr)[above], torch.full((int(above.sum()),), gamma))
        v = min_snr_weight(snr, gamma, "v_prediction")
        torch.testing.assert_close((v * (snr + 1))[above], torch.full((int(above.sum()),), gamma))
        torch.testing.assert_close(min_snr_weight(snr, gamma, "sample"), torch.clamp(snr, max=gamma))


def test_an_unknown_prediction_type_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"'x0'.*epsilon.*v_prediction"):
        min_snr_weight(torch.ones(3), GAMMA, "x0")
