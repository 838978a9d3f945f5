"""Training from the shipped YAMLs through the CLI, and round trips through stock diffusers loaders."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lrkit.cli import main
from lrkit.concept import Concept
from lrkit.models import build_tiny_random, load_base
from lrkit.training.config import load_config
from lrkit.training.model import ConceptModel
from lrkit.training.tokens import NewTokenEmbedding

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["lora", "textual_inversion", "pivotal", "dreambooth"]
PROMPT = {"lora": "a photo of sks vase", "dreambooth": "a photo of sks vase",
          "textual_inversion": "a photo of <vase-v> on the beach", "pivotal": "a photo of <vase-p> vase"}


@pytest.fixture(scope="session")
def two_photos(vase_photos) -> Path:
    return vase_photos(2)


def cli_overrides(out: Path, photos: Path, steps: int = 4) -> list[str]:
    return ["--base", "tiny-random", "--output_dir", str(out), "--data.photos", str(photos),
            "--data.resolution", "64", "--data.repeats", "1", "--max_steps", str(steps), "--precision", "32",
            "--accelerator", "cpu", "--validation.prompts", "[]", "--lora.alpha", "8", "--lora.rank", "4",
            "--optim.optimizer", "adamw", "--dreambooth.num_class_images", "2",
            "--dreambooth.class_inference_steps", "2", "--optim.lr", "1e-3", "--log_every_n_steps", "1"]


class Trained:
    """A method trained through the CLI: its live model, bundle and config."""

    def __init__(self, model: ConceptModel, bundle: Path, out: Path):
        self.model, self.bundle, self.out = model, bundle, out


_TRAINED: dict[str, Trained] = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, two_photos, capture_trained_model):
    def get(method: str) -> Trained:
        if method not in _TRAINED:
            out = tmp_path_factory.mktemp(f"run-{method}")
            with capture_trained_model() as captured:
                code = main(["train", "--config", str(ROOT / f"configs/train/{method}.yaml"),
                             *cli_overrides(out, two_photos)])
            assert code == 0
            _TRAINED[method] = Trained(captured["model"], out / "concept", out)
        return _TRAINED[method]

    return get


def latents(pipe, prompt: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, height=64, width=64, generator=generator,
                output_type="latent").images


def _original_name(name: str) -> str:
    return name.replace(".base_layer.", ".").replace("token_embedding.base.", "token_embedding.")


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_from_shipped_yaml(method, trained):
    run = trained(method)
    # Loss finite: read what Lightning logged.
    rows = list(csv.DictReader(open(run.out / "logs" / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert losses and all(math.isfinite(x) for x in losses)

    # Trainable parameters changed: compare with the same model freshly initialised (same seed).
    config = load_config(run.model.config)
    L.seed_everything(config.seed, verbose=False)
    initial = ConceptModel(config)
    before, after = initial.trainable_state_dict(), run.model.trainable_state_dict()
    assert before.keys() == after.keys() and before
    for key in before:
        assert not torch.equal(before[key], after[key]), f"{key} did not change"

    # Frozen parameters bitwise unchanged against a fresh base model.
    fresh = build_tiny_random(0)
    reference = {f"{m}.{k}": v for m in ("unet", "text_encoder", "vae")
                 for k, v in getattr(fresh, m).state_dict().items()}
    frozen = [(n, p) for n, p in run.model.named_parameters() if not p.requires_grad]
    assert frozen
    for name, param in frozen:
        original = reference[_original_name(name)]
        if isinstance(run.model.text_encoder.get_input_embeddings(), NewTokenEmbedding) and original.shape != param.shape:
            original = original[: param.shape[0]]
        assert torch.equal(param, original), f"frozen {name} changed"


def test_textual_inversion_changes_only_new_rows(trained):
    run = trained("textual_inversion")
    embedding = run.model.text_encoder.get_input_embeddings()
    fresh = build_tiny_random(0).text_encoder.get_input_embeddings().weight
    assert isinstance(embedding, NewTokenEmbedding)
    assert torch.equal(embedding.base.weight, fresh)  # every original row
    assert embedding.new_rows.shape[0] == 2  # num_vectors: 2 in the YAML
    init = fresh[run.model.tokenizer("vase", add_special_tokens=False).input_ids].mean(0)
    assert not torch.allclose(embedding.new_rows, init.expand(2, -1))


@pytest.mark.parametrize("method", ["lora", "textual_inversion", "pivotal", "dreambooth"])
def test_bundle_round_trip_through_stock_loaders(method, trained):
    run = trained(method)
    run.model.eval()
    expected = latents(run.model.pipeline(), PROMPT[method])

    # lrkit's own loader onto a freshly loaded base.
    concept = Concept.load(run.bundle)
    ours = latents(concept.apply(load_base("tiny-random")), PROMPT[method])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)

    if method == "dreambooth":
        assert (run.bundle / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        return
    # Stock diffusers only: a plain pipeline on the same base plus the stock loaders.
    stock = build_tiny_random(0)
    stock.set_progress_bar_config(disable=True)
    if (run.bundle / "learned_embeds.safetensors").is_file():
        stock.load_textual_inversion(str(run.bundle / "learned_embeds.safetensors"))
    if (run.bundle / "pytorch_lora_weights.safetensors").is_file():
        stock.load_lora_weights(str(run.bundle))
    torch.testing.assert_close(latents(stock, PROMPT[method]), expected, atol=1e-5, rtol=1e-5)


def test_lora_actually_changes_the_output(trained):
    run = trained("lora")
    base = latents(build_tiny_random(0), PROMPT["lora"])
    assert not torch.allclose(base, latents(run.model.pipeline(), PROMPT["lora"]), atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "pivotal"])
def test_kohya_file_equals_diffusers_layout(method, trained):
    run = trained(method)
    concept = Concept.load(run.bundle)
    assert concept.lora.alpha == 8 and concept.lora.rank == 4  # alpha != rank
    outputs = []
    for weight_name in (concept.files["lora"], concept.files["kohya"]):
        pipe = build_tiny_random(0)
        pipe.set_progress_bar_config(disable=True)
        if "embeddings" in concept.files:
            pipe.load_textual_inversion(str(concept.file("embeddings")))
        pipe.load_lora_weights(str(run.bundle), weight_name=weight_name)
        outputs.append(latents(pipe, PROMPT[method]))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)


def test_export_from_checkpoint_equals_end_of_training_bundle(trained, tmp_path):
    run = trained("pivotal")
    out = tmp_path / "exported"
    assert main(["export", str(run.out / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    concept = Concept.load(out)
    prompt = PROMPT["pivotal"]
    a = latents(concept.apply(load_base("tiny-random")), prompt)
    b = latents(Concept.load(run.bundle).apply(load_base("tiny-random")), prompt)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert sorted(concept.files) == sorted(Concept.load(run.bundle).files)
    assert len(concept.refs) == 2 and all((out / r).is_file() for r in concept.refs)


def test_dreambooth_generated_class_images(trained):
    run = trained("dreambooth")
    images = sorted((run.out / "class_images").glob("*.png"))
    assert len(images) == 2  # num_class_images, generated by the base model


@pytest.mark.slow
def test_cli_prints_each_lightning_message_once(tmp_path, two_photos):
    """The `lightning` package adds a console handler of its own; beside the CLI's root handler, each
    Lightning message must still print once."""
    import sys

    from launching import run

    proc = run([sys.executable, "-m", "lrkit.cli", "train", "--config", str(ROOT / "configs/train/lora.yaml"),
                *cli_overrides(tmp_path / "run", two_photos, steps=1)])
    lines = [line for line in proc.stderr.splitlines() if "max_steps=1` reached" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
