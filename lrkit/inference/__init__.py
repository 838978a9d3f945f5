"""Inference: Layout-and-Retouch and friends (never imports lrkit.training)."""

from lrkit.inference.options import (DualReferenceOptions, GenerationOptions, InferenceError, LayoutOptions,
                                     RetouchOptions)
from lrkit.inference.pipeline import Generation, LayoutRetouchPipeline

__all__ = ["DualReferenceOptions", "Generation", "GenerationOptions", "InferenceError", "LayoutOptions",
           "LayoutRetouchPipeline", "RetouchOptions"]
