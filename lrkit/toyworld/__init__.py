"""Toy world (placeholder)."""
