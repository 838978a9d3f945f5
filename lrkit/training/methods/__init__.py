"""Method registry: config name -> method class. Adding a method = one module + one row here."""

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


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "get_method"]
