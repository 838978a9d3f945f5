"""What every options dataclass shares: the error that names an invalid option, and the check raising it."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid option; the message names it."""


def check(cond: bool, msg: str) -> None:
    """Raise `ConfigError(msg)` unless `cond`."""
    if not cond:
        raise ConfigError(msg)
