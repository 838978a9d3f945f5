"""Inference: Layout-and-Retouch and friends (never imports lrkit.training)."""

from lrkit.inference.pipeline import GenerationOptions, Generation, InferenceError, LayoutRetouchPipeline

__all__ = ["Generation", "GenerationOptions", "InferenceError", "LayoutRetouchPipeline"]
