"""The method registry: config name -> method class -> options class (`TrainConfig.<name>`).

Adding a method = one module (its options dataclass and `Method` subclass) + one row in `METHODS` + its
options field in `TrainConfig`.
"""

from __future__ import annotations

from lrkit.training.methods.base import Method
from lrkit.training.methods.concept_em import ConceptEMMethod
from lrkit.training.methods.dreambooth import DreamBoothMethod
from lrkit.training.methods.lora import LoraMethod
from lrkit.training.methods.pivotal import PivotalMethod
from lrkit.training.methods.textual_inversion import TextualInversionMethod

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (DreamBoothMethod, LoraMethod, TextualInversionMethod, PivotalMethod, ConceptEMMethod)
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> type[Method]:
    """The method class registered as `name`."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "METHOD_NAMES", "Method", "get_method"]
