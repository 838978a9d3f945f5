"""Inference: Layout-and-Retouch (never imports lrkit.training)."""
