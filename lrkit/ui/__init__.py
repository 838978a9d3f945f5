"""`lrkit ui`: a local web app over the library — train a concept, generate, manage bundles, evaluate.

The page (`app`, Gradio) holds layout and wiring only; everything it does goes through the library's own
functions (`train_concept`, `LayoutRetouchPipeline`, `Concept.load`, `run_eval`):

- `workspace`: the data root (concepts/, uploads/, outputs/, jobs/) and the actions on it that need no browser:
  listing and describing bundles, training presets and configs, checked photo uploads, evaluation.
- `training`: a training run as a child process (`worker`), its progress, loss and validation images, and
  cancelling it.
- `generation`: the generation modes side by side, PNGs carrying their settings (`pngmeta`).
- `zips`: bundle zips out and in, unpacked safely.

Only `app` imports gradio (`pip install 'lrkit[ui]'`).
"""
