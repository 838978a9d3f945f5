"""Records of a job's inputs: canonical digests and the readable list of what changed between two records.

Training (`lrkit.training.folder`) and the end-to-end jobs (`lrkit.jobs`) both record what decides their outputs
and refuse to mix work made from other inputs; this is the part they share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json


def plain(value):
    """`value` as plain JSON data (dataclasses as dicts, tuples as lists, other objects as strings)."""
    return json.loads(json.dumps(value, default=_plain_default))


def _plain_default(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def inputs_digest(inputs: dict) -> str:
    """SHA-256 (hex) of `inputs` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(plain(inputs), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def differences(recorded: dict, current: dict) -> list[str]:
    """`key: old -> new` for every dotted key whose value differs (digests shortened, long values cut)."""
    old, new = _flatten(recorded), _flatten(current)
    return [f"{key}: {short_value(old.get(key))} -> {short_value(new.get(key))}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix or "(all)": value}


def short_value(value) -> str:
    """A value as a change list shows it: `(unset)` for None, a SHA-256 digest cut to 12 digits, at most 60 chars."""
    if value is None:
        return "(unset)"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return repr(value[:12] + "…")
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


__all__ = ["differences", "inputs_digest", "plain", "short_value"]
