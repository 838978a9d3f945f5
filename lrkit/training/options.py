"""The errors of `lrkit.training` and the checks every options dataclass runs.

`ConfigError` names an invalid option (raised before any work starts); `TrainingError` says why a run cannot
start or go on (its training folder is in use, its checkpoint was trained from other inputs, it diverged).
"""

from __future__ import annotations

import dataclasses
import math


class ConfigError(ValueError):
    """An invalid option; the message names it."""


class TrainingError(RuntimeError):
    """A training run that cannot start or go on; the message says why and what to do."""


def check(cond: bool, msg: str) -> None:
    """Raise `ConfigError(msg)` unless `cond`."""
    if not cond:
        raise ConfigError(msg)


def check_finite(options, group: str = "") -> None:
    """Raise `ConfigError` naming the first float field of the dataclass `options` (or float in a tuple/list field)
    that is NaN or infinite; `group` prefixes the names (`optim` -> `optim.lr`)."""
    prefix = f"{group}." if group else ""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{prefix}{f.name} must be a finite number, got {value}")
