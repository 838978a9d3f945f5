"""Which errors are the user's to fix: the rule the CLI and the web app share to print a message or report a bug."""

from __future__ import annotations


def is_user_error(err: BaseException) -> bool:
    """An error whose message tells the user what to fix: one of lrkit's own (any exception class defined in
    lrkit) or an ordinary user-input error (a bad value, a missing or unreadable file, a missing optional
    dependency). Anything else is a bug."""
    if any(cls.__module__.split(".")[0] == "lrkit" for cls in type(err).__mro__):
        return True
    return isinstance(err, (ValueError, OSError, ImportError))
