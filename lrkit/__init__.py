"""lrkit: personalized text-to-image generation (concept training + Layout-and-Retouch)."""

from __future__ import annotations

from lrkit.runtime import configure_cpu_threads

configure_cpu_threads()  # before torch loads: OpenMP reads these once (lrkit.runtime)

from lrkit.version import __version__  # noqa: E402

__all__ = ["Concept", "LayoutRetouchPipeline", "load_base", "train_concept", "__version__"]


def __getattr__(name: str):
    # Lazy: `import lrkit` stays cheap; torch/diffusers load on first use.
    if name == "Concept":
        from lrkit.concept import Concept

        return Concept
    if name == "load_base":
        from lrkit.models import load_base

        return load_base
    if name == "LayoutRetouchPipeline":
        from lrkit.inference import LayoutRetouchPipeline

        return LayoutRetouchPipeline
    if name == "train_concept":
        from lrkit.training import train_concept

        return train_concept
    raise AttributeError(f"module 'lrkit' has no attribute {name!r}")
