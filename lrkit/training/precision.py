"""The dtypes of a training run's precision: frozen weights are stored in the autocast dtype, trainable ones in float32."""

from __future__ import annotations

import torch

AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a mixed `precision`; None at full precision (32, 32-true)."""
    return AUTOCAST_DTYPES.get(precision)


def frozen_dtype(precision: str) -> torch.dtype:
    """Frozen weights are stored in the autocast dtype under mixed precision, else float32."""
    dtype = autocast_dtype(precision)
    return torch.float32 if dtype is None else dtype


def autocast_for(model, precision: str):
    """The autocast context of `precision` on the device of `model.unet` (disabled at full precision)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(model.unet.device.type, dtype=dtype)
