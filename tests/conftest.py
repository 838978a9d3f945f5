"""Shared fixtures: offline hub, and a cached factory of tiny random pipelines."""

import os

# Tests never reach the Hugging Face Hub; set before diffusers/huggingface_hub are imported.
os.environ["HF_HUB_OFFLINE"] = "1"

import lrkit  # noqa: E402,F401  (before any test module loads torch: the CPU thread settings of lrkit.runtime apply)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    """`tiny_pipe(seed=0)` -> a fresh `load_base("tiny-random[:seed]")` pipeline (never shared).

    Each call builds a new pipeline, so tests may mutate it (adapters, tokens) freely.
    """
    from lrkit.models import load_base

    def make(seed: int = 0):
        return load_base("tiny-random" if seed == 0 else f"tiny-random:{seed}")

    return make


@pytest.fixture(scope="session")
def vase_photos(tmp_path_factory):
    """`vase_photos(n)` -> a folder with the first n shipped vase photos (built once per n)."""
    import shutil
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "data" / "subjects" / "vase"
    folders = {}

    def make(n: int = 2) -> Path:
        if n not in folders:
            folder = tmp_path_factory.mktemp(f"vase{n}")
            for photo in sorted(source.glob("*.jpg"))[:n]:
                shutil.copy(photo, folder / photo.name)
            folders[n] = folder
        return folders[n]

    return make


@pytest.fixture(scope="session")
def capture_trained_model():
    """`with capture_trained_model() as captured:` -> captured["model"] is the ConceptModel a training run exported."""
    import contextlib

    @contextlib.contextmanager
    def capture():
        import lrkit.training.train as train_mod

        captured = {}
        original = train_mod.export_concept

        def export(model, config, out_dir, **kw):
            captured["model"] = model
            return original(model, config, out_dir, **kw)

        train_mod.export_concept = export
        try:
            yield captured
        finally:
            train_mod.export_concept = original

    return capture
