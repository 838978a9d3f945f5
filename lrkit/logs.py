"""What lrkit prints besides its results: its own log messages, and third-party messages kept out of the way.

`configure_console` sets up the `lrkit` command's logging. `dropped` leaves out one third-party message
where lrkit makes the call that triggers it and knows the message does not apply (for instance diffusers'
"No LoRA keys associated to CLIPTextModel" when a concept's LoRA has no text-encoder part); such a message
stays out at every verbosity.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import contextmanager

FORMAT = "%(levelname)s %(name)s: %(message)s"

# Third-party messages the `lrkit` command leaves out unless run with -v: {logger name: message pattern}.
CONSOLE_NOISE = {
    # peft imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16, bitsandbytes then tries
    # to fetch an optional 4-bit matmul kernel from the Hub and logs this when it cannot (lrkit never runs
    # 4-bit layers). Neither library has a switch for it.
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
}


class DropMessages(logging.Filter):
    """A logger filter that drops the records whose message matches `pattern` (`re.match`)."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


@contextmanager
def dropped(logger_name: str, pattern: str):
    """Inside the block, logger `logger_name` drops its records whose message matches `pattern`."""
    logger = logging.getLogger(logger_name)
    drop = DropMessages(pattern)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


_console_filters: dict[str, DropMessages] = {}


def configure_console(verbosity: int = 0) -> None:
    """Logging of the `lrkit` command, on stderr.

    0: lrkit's INFO messages (and Lightning's), third-party loggers from WARNING, `CONSOLE_NOISE` left out.
    1 (-v): every logger from INFO, diffusers and transformers included, nothing left out.
    2 (-vv): every logger from DEBUG.
    """
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(max(verbosity, 0), 2)]
    logging.basicConfig(format=FORMAT)
    logging.getLogger().setLevel(level)
    logging.getLogger("lrkit").setLevel(min(level, logging.INFO))
    # The `lightning` package gives its logger a console handler of its own on import; without this its
    # messages would print twice, once there and once through the root handler.
    logging.getLogger("lightning").propagate = False
    if verbosity:
        # diffusers and transformers log through handlers of their own, from WARNING unless told otherwise.
        name = logging.getLevelName(level).lower()
        for library in ("diffusers", "transformers"):
            os.environ[f"{library.upper()}_VERBOSITY"] = name  # read when the library first logs
            if library in sys.modules:
                sys.modules[library].utils.logging.set_verbosity(level)
    for logger_name, pattern in CONSOLE_NOISE.items():
        logger = logging.getLogger(logger_name)
        drop = _console_filters.setdefault(logger_name, DropMessages(pattern))
        if verbosity:
            logger.removeFilter(drop)
        else:
            logger.addFilter(drop)  # once: a logger holds a filter at most once


__all__ = ["CONSOLE_NOISE", "DropMessages", "configure_console", "dropped"]
