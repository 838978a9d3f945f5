"""Loss weights shared by concept training and the toy base's pretraining."""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al., 2023) for a loss on the model's prediction target; `snr` from
    `diffusers.training_utils.compute_snr`.

    The x0-loss weight is min(SNR, γ); the same weighting on an ε loss is min(SNR, γ) / SNR and on a
    v loss min(SNR, γ) / (SNR + 1), since ||ε̂ − ε||² = SNR ||x̂0 − x0||² and ||v̂ − v||² = (SNR + 1) ||x̂0 − x0||².
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"prediction_type {prediction_type!r} is not one of {list(PREDICTION_TYPES)}")
