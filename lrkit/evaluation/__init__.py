"""Evaluation (DESIGN §8): CLIP-I, CLIP-T, DINO, layout diversity, prompt sets, the benchmark runner.

- `metrics`: embedders (`ClipEmbedder`, `DinoEmbedder`, by hub id or local folder) and the metric maths.
- `prompts`: DreamBench, ViCo, DreamMatcher-challenging and toy prompt sets.
- `runner`: `EvalConfig` / `run_eval`, methods x concepts x prompts x seeds -> images, CSV, table, plots;
  resumable, and sharded over processes under `accelerate launch` / `torchrun`.
- `cli`: `lrkit eval`.

The names below load on first use, so `lrkit eval --help` does not import torch and transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "lrkit.evaluation.metrics": ("DEFAULT_CLIP", "DEFAULT_DINO", "ClipEmbedder", "DinoEmbedder", "MetricModelError",
                                 "box_center", "clip_i", "clip_t", "dino", "layout_diversity", "mask_center",
                                 "pairwise_diversity", "reference_similarity", "text_similarity"),
    "lrkit.evaluation.prompts": ("load_prompt_set",),
    "lrkit.evaluation.runner": ("EvalConfig", "EvalResult", "run_eval"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'lrkit.evaluation' has no attribute {name!r}")


__all__ = sorted(_WHERE)
