"""Training from the shipped YAMLs through the CLI, and round trips through stock diffusers loaders, on both
built-in families: `tiny-random` (SD 1.x) and `tiny-random-xl` (SDXL: two text encoders, time ids)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lrkit.cli import main
from lrkit.concept import Concept
from lrkit.models import build_tiny_random, build_tiny_random_xl, load_base
from lrkit.training.config import load_config
from lrkit.training.model import ConceptModel
from lrkit.training.tokens import NewTokenEmbedding
from stock_loading import load_stock_embeddings

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["lora", "textual_inversion", "pivotal", "dreambooth"]
BASES = ["tiny-random", "tiny-random-xl"]
BUILD = {"tiny-random": build_tiny_random, "tiny-random-xl": build_tiny_random_xl}
PROMPT = {"lora": "a photo of sks vase", "dreambooth": "a photo of sks vase",
          "textual_inversion": "a photo of <vase-v> on the beach", "pivotal": "a photo of <vase-p> vase"}


@pytest.fixture(scope="session")
def two_photos(vase_photos) -> Path:
    return vase_photos(2)


def cli_overrides(out: Path, photos: Path, steps: int = 4, base: str = "tiny-random") -> list[str]:
    return ["--base", base, "--output_dir", str(out), "--data.photos", str(photos),
            "--data.resolution", "64", "--data.repeats", "1", "--max_steps", str(steps), "--precision", "32",
            "--accelerator", "cpu", "--validation.prompts", "[]", "--lora.alpha", "8", "--lora.rank", "4",
            "--optim.optimizer", "adamw", "--dreambooth.num_class_images", "2",
            "--dreambooth.class_inference_steps", "2", "--optim.lr", "1e-3", "--log_every_n_steps", "1"]


def shipped_config(method: str, base: str) -> Path:
    """The method's shipped YAML: configs/train/sdxl_<method>.yaml for the SDXL base where there is one."""
    sdxl = ROOT / f"configs/train/sdxl_{method}.yaml"
    return sdxl if base == "tiny-random-xl" and sdxl.is_file() else ROOT / f"configs/train/{method}.yaml"


class Trained:
    """A method trained through the CLI: its live model, bundle and config."""

    def __init__(self, model: ConceptModel, bundle: Path, out: Path, base: str):
        self.model, self.bundle, self.out, self.base = model, bundle, out, base


_TRAINED: dict[tuple[str, str], Trained] = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, two_photos, capture_trained_model):
    def get(method: str, base: str = "tiny-random") -> Trained:
        if (method, base) not in _TRAINED:
            out = tmp_path_factory.mktemp(f"run-{method}-{base}")
            with capture_trained_model() as captured:
                code = main(["train", "--config", str(shipped_config(method, base)),
                             *cli_overrides(out, two_photos, base=base)])
            assert code == 0
            _TRAINED[method, base] = Trained(captured["model"], out / "concept", out, base)
        return _TRAINED[method, base]

    return get


def latents(pipe, prompt: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, height=64, width=64, generator=generator,
                output_type="latent").images


def stock_pipe(base: str):
    pipe = BUILD[base](0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _original_name(name: str) -> str:
    return name.replace(".base_layer.", ".").replace("token_embedding.base.", "token_embedding.")


def _unused_by_sdxl(key: str, model: ConceptModel) -> bool:
    """SDXL reads the first text encoder's penultimate hidden states: its last layer and final norm get no gradient."""
    if len(model.text_encoders) < 2 or not key.startswith("text_encoder."):
        return False
    last = model.text_encoder.config.num_hidden_layers - 1
    return f"encoder.layers.{last}." in key or "final_layer_norm" in key


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_from_shipped_yaml(method, base, trained):
    run = trained(method, base)
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
        if _unused_by_sdxl(key, run.model):
            assert torch.equal(before[key], after[key]), f"{key} changed without a gradient"
            continue
        assert not torch.equal(before[key], after[key]), f"{key} did not change"

    # Frozen parameters bitwise unchanged against a fresh base model.
    fresh = BUILD[base](0)
    reference = {f"{m}.{k}": v for m in ("unet", *run.model.family.text_encoders, "vae")
                 for k, v in getattr(fresh, m).state_dict().items()}
    frozen = [(n, p) for n, p in run.model.named_parameters() if not p.requires_grad]
    assert frozen
    for name, param in frozen:
        original = reference[_original_name(name)]
        if "token_embedding.base." in name and original.shape != param.shape:
            original = original[: param.shape[0]]
        assert torch.equal(param, original), f"frozen {name} changed"


@pytest.mark.parametrize("base", BASES)
def test_textual_inversion_changes_only_new_rows(base, trained):
    run = trained("textual_inversion", base)
    fresh = BUILD[base](0)
    for name, tokenizer in zip(run.model.family.text_encoders, run.model.tokenizers):  # SDXL: both encoders
        embedding = getattr(run.model, name).get_input_embeddings()
        original = getattr(fresh, name).get_input_embeddings().weight
        assert isinstance(embedding, NewTokenEmbedding)
        assert torch.equal(embedding.base.weight, original)  # every original row
        assert embedding.new_rows.shape[0] == 2  # num_vectors: 2 in the YAML
        init = original[tokenizer("vase", add_special_tokens=False).input_ids].mean(0)
        assert not torch.allclose(embedding.new_rows, init.expand(2, -1))


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("method", ["lora", "textual_inversion", "pivotal", "dreambooth"])
def test_bundle_round_trip_through_stock_loaders(method, base, trained):
    from diffusers import UNet2DConditionModel

    run = trained(method, base)
    run.model.eval()
    expected = latents(run.model.pipeline(), PROMPT[method])

    # lrkit's own loader onto a freshly loaded base.
    concept = Concept.load(run.bundle)
    assert concept.base.family == run.model.family.name
    ours = latents(concept.apply(load_base(base)), PROMPT[method])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)

    # Stock diffusers only: a plain pipeline on the same base plus the stock loaders.
    stock = stock_pipe(base)
    if method == "dreambooth":
        stock.unet = UNet2DConditionModel.from_pretrained(str(run.bundle / "unet"), use_safetensors=True)
    if (run.bundle / "learned_embeds.safetensors").is_file():
        load_stock_embeddings(stock, concept)
    if (run.bundle / "pytorch_lora_weights.safetensors").is_file():
        stock.load_lora_weights(str(run.bundle))
    torch.testing.assert_close(latents(stock, PROMPT[method]), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base", BASES)
def test_lora_actually_changes_the_output(base, trained):
    run = trained("lora", base)
    before = latents(BUILD[base](0), PROMPT["lora"])
    assert not torch.allclose(before, latents(run.model.pipeline(), PROMPT["lora"]), atol=1e-4)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("method", ["lora", "pivotal"])
def test_kohya_file_equals_diffusers_layout(method, base, trained):
    run = trained(method, base)
    concept = Concept.load(run.bundle)
    assert concept.lora.alpha == 8 and concept.lora.rank == 4  # alpha != rank
    outputs = []
    for weight_name in (concept.files["lora"], concept.files["kohya"]):
        pipe = stock_pipe(base)
        if "embeddings" in concept.files:
            load_stock_embeddings(pipe, concept)
        pipe.load_lora_weights(str(run.bundle), weight_name=weight_name)
        outputs.append(latents(pipe, PROMPT[method]))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base", BASES)
def test_export_from_checkpoint_equals_end_of_training_bundle(base, trained, tmp_path):
    run = trained("pivotal", base)
    out = tmp_path / "exported"
    assert main(["export", str(run.out / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    concept = Concept.load(out)
    prompt = PROMPT["pivotal"]
    a = latents(concept.apply(load_base(base)), prompt)
    b = latents(Concept.load(run.bundle).apply(load_base(base)), prompt)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert sorted(concept.files) == sorted(Concept.load(run.bundle).files)
    assert len(concept.refs) == 2 and all((out / r).is_file() for r in concept.refs)


@pytest.mark.parametrize("base", BASES)
def test_dreambooth_generated_class_images(base, trained):
    run = trained("dreambooth", base)
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
