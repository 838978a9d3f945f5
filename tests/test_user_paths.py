"""The user-path matrix: every YAML under configs/ runs as shipped, through the CLI a user types.

Each config runs in a checkout made by `tests/user_paths.py` (`make_checkout`): the same files, with the base
swapped to `tiny-random` and only the size fields of `SIZE_KEYS` shrunk. Method, precision (bf16-mixed runs
for real on the CPU), optimizer, caches, schedules and validation stay as shipped. Training configs train and
export a bundle that loads and changes the base model's output; inference configs generate every mode they
name, with the command their header comment gives. A config that is not in the matrix fails
`test_every_shipped_config_is_in_the_matrix`.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lrkit.cli import main
from lrkit.concept import Concept
from lrkit.models import load_base
from user_paths import ROOT, SIZE_KEYS, make_checkout

pytestmark = pytest.mark.slow

TRAIN_CONFIGS = ["configs/demo.yaml", "configs/train/concept_em.yaml", "configs/train/dreambooth.yaml",
                 "configs/train/lora.yaml", "configs/train/pivotal.yaml", "configs/train/textual_inversion.yaml",
                 "configs/train/sdxl_concept_em.yaml", "configs/train/sdxl_dreambooth.yaml", "configs/train/sdxl_dreambooth_fsdp.yaml", "configs/train/sdxl_lora.yaml",
                 "configs/train/sdxl_textual_inversion.yaml"]
INFER_CONFIGS = {  # config -> (the training config of the concept it generates with, the extra arguments its
    # header comment tells the user to give)
    "configs/infer/layout_retouch.yaml": ("configs/train/lora.yaml", []),
    "configs/infer/dual_reference.yaml": ("configs/train/lora.yaml",
                                          ["--options.dual_reference.style_reference", "data/subjects/vase/03.jpg"]),
    "configs/infer/layout_retouch_sdxl.yaml": ("configs/train/sdxl_lora.yaml", []),
}
PROMPT = "a photo of {} on the beach"


def test_every_shipped_config_is_in_the_matrix():
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.y*ml")}
    assert shipped == set(TRAIN_CONFIGS) | set(INFER_CONFIGS), "add the new config to tests/test_user_paths.py"


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return make_checkout(tmp_path_factory.mktemp("checkout"))


@pytest.mark.parametrize("config", TRAIN_CONFIGS + list(INFER_CONFIGS))
def test_shrinking_changes_only_sizes(config, checkout):
    shipped = _flatten(yaml.safe_load((ROOT / config).read_text()))
    shrunk = _flatten(yaml.safe_load((checkout / config).read_text()))
    changed = {k for k in shipped.keys() | shrunk.keys() if shipped.get(k) != shrunk.get(k)}
    assert changed <= set(SIZE_KEYS), f"{config}: shrinking changed {sorted(changed - set(SIZE_KEYS))}"
    for key in ("method", "precision", "optim.optimizer", "cache_latents", "cache_text_embeddings", "options.mode"):
        assert shrunk.get(key) == shipped.get(key)


_BUNDLES: dict[str, Path] = {}


def _train(config: str, checkout: Path, monkeypatch) -> Path:
    """`lrkit train --config CONFIG` in the checkout, once per config; returns its bundle folder."""
    if config not in _BUNDLES:
        monkeypatch.chdir(checkout)
        assert main(["train", "--config", config]) == 0
        shrunk = yaml.safe_load((checkout / config).read_text())
        _BUNDLES[config] = checkout / shrunk["output_dir"] / "concept"
    return _BUNDLES[config]


def _latents(pipe, prompt: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=generator, output_type="latent").images


@pytest.mark.parametrize("config", TRAIN_CONFIGS)
def test_training_config_trains_and_exports_as_shipped(config, checkout, monkeypatch):
    bundle = _train(config, checkout, monkeypatch)
    shipped = yaml.safe_load((ROOT / config).read_text())
    concept = Concept.load(bundle)
    assert concept.method == shipped["method"]
    assert concept.training["precision"] == shipped.get("precision", "32")
    assert concept.training["optim"]["optimizer"] == shipped.get("optim", {}).get("optimizer", "adamw")

    run = bundle.parent
    metrics = run / "logs" / "metrics.csv"
    losses = [float(r["loss"]) for r in csv.DictReader(open(metrics)) if r.get("loss")] if metrics.is_file() else []
    assert all(math.isfinite(x) for x in losses)
    weights = [load_file(f) for f in bundle.rglob("*.safetensors")]
    assert weights and all(torch.isfinite(t).all() for w in weights for t in w.values())
    if shipped.get("validation", {}).get("prompts"):
        assert sorted((run / "validation").glob("step*.png")), "no validation images"

    # The bundle applies to the base it records and changes what it draws.
    prompt = f"a photo of {concept.subject_phrase()} on the beach"
    base = yaml.safe_load((checkout / config).read_text())["base"]  # the shrunk base of the config's family
    before = _latents(load_base(base), prompt)
    pipe = load_base(base)
    concept.apply(pipe)
    after = _latents(pipe, prompt)
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after), f"{config}: the trained concept does not change the output"


@pytest.mark.parametrize("config", list(INFER_CONFIGS))
def test_inference_config_generates_every_mode_it_names(config, checkout, monkeypatch, tmp_path):
    concept_config, extra = INFER_CONFIGS[config]
    bundle = _train(concept_config, checkout, monkeypatch)
    monkeypatch.chdir(checkout)
    shrunk = yaml.safe_load((checkout / config).read_text())
    out = tmp_path / "images"
    assert main(["generate", "--config", config, "--concept", str(bundle), "--prompt", PROMPT, "--out", str(out),
                 *extra]) == 0
    seeds = shrunk["seeds"]
    stems = [f"p000_s{s}" for s in seeds]
    names = {p.name for p in out.glob("*.png")}
    assert {f"{s}.png" for s in stems} <= names
    if shrunk.get("intermediates"):
        assert {f"{s}_grid.png" for s in stems} <= names, f"{config}: intermediates: true wrote no grids"
