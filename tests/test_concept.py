"""The concept bundle (DESIGN.md §3): manifest, path safety, atomic writes, applying to a pipeline."""

import json
import logging
import os

import pytest
import torch

from lrkit.concept import (
    EMBEDDINGS,
    LORA_WEIGHTS,
    MANIFEST,
    SCHEMA,
    Concept,
    ConceptError,
    LoraSpec,
    TokenSpec,
    default_adapter_name,
    write_bundle,
)
from lrkit.models import BaseFingerprint, fingerprint

PROMPT = "a photo of a cat"
FAKE_BASE = BaseFingerprint(id="tiny-random", unet_config_sha256="ab" * 32, weight_probe=[0.25, -0.5, 0.125])


def make_concept(base=FAKE_BASE, **overrides) -> Concept:
    fields = dict(
        name="vase",
        method="textual_inversion",
        tokens=[TokenSpec("<sks>", learned=True, num_vectors=2, initializer="vase")],
        class_word="vase",
        base=base,
        resolution=64,
    )
    fields.update(overrides)
    return Concept(**fields)


def full_concept() -> Concept:
    """A concept using every manifest field, for round trips."""
    return make_concept(
        method="pivotal",
        tokens=[
            TokenSpec("<v1>", learned=True, num_vectors=3, initializer="dog", mask="masks/v1.png"),
            TokenSpec("sks", learned=False),
        ],
        files={"lora": LORA_WEIGHTS, "embeddings": EMBEDDINGS},
        refs=["refs/0.png", "refs/1.png"],
        masks={"refs/0.png": "masks/0.png"},
        lora=LoraSpec(rank=4, alpha=8.0, unet_targets=["to_q", "to_v"], text_encoder_targets=["q_proj"],
                      dropout=0.1, dora=True),
        training={"lr": 1e-4, "steps": 400, "prior_loss_weight": 1.0},
        lrkit_version="0.1.0",
    )


def write_manifest(folder, data) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps(data), encoding="utf-8")


def touch(folder, *rels) -> None:
    """Placeholder files: a 1x1 PNG for `.png` names (`Concept.load` reads pictures' headers), else one byte."""
    from PIL import Image

    for rel in rels:
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".png":
            Image.new("L", (1, 1)).save(p)
        else:
            p.write_bytes(b"x")


def latents(pipe, seed: int = 0) -> torch.Tensor:
    out = pipe(PROMPT, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(seed))
    return out.images


# ---------------------------------------------------------------------------------------- manifest


def test_manifest_round_trip_in_memory_and_json():
    concept = full_concept()
    data = concept.to_manifest()
    assert data["schema"] == SCHEMA
    assert Concept.from_manifest(data) == concept
    assert Concept.from_manifest(json.loads(json.dumps(data))) == concept


def test_manifest_round_trip_through_a_written_bundle(tmp_path):
    concept = full_concept()

    def write_files(d):
        touch(d, LORA_WEIGHTS, EMBEDDINGS, "refs/0.png", "refs/1.png", "masks/0.png", "masks/v1.png")

    loaded = write_bundle(concept, tmp_path / "bundle", write_files)
    assert loaded.path == (tmp_path / "bundle").resolve()
    assert Concept.load(tmp_path / "bundle") == loaded
    loaded.path = None
    assert loaded == concept
    assert json.loads((tmp_path / "bundle" / MANIFEST).read_text())["tokens"][0]["num_vectors"] == 3


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(schema="lrkit.concept/2"), "schema 'lrkit.concept/2' is not supported"),
        (lambda d: d.pop("schema"), "schema None is not supported"),
        (lambda d: d.update(method="hypernetwork"), "method 'hypernetwork' is not one of"),
        (lambda d: d.update(tokens=[]), "'tokens' is empty"),
        (lambda d: d.pop("class_word"), "missing field(s) ['class_word']"),
        (lambda d: (d.pop("base"), d.pop("resolution")), "missing field(s) ['base', 'resolution']"),
        (lambda d: d.update(tokens=[{"learned": True}]), "'tokens[0]' is missing ['token']"),
        (lambda d: d.update(base={"id": "x"}), "'base' is missing ['unet_config_sha256']"),
        (lambda d: d.update(resolution="big"), "'resolution' must be a whole number, got str 'big'"),
        (lambda d: d.update(tokens=[{"token": ""}]), "'tokens[0].token' must not be empty"),
        (lambda d: d.update(tokens=[{"token": "<a>"}, {"token": "<a>"}]), "tokens are not unique"),
    ],
    ids=["schema", "no-schema", "method", "empty-tokens", "missing-one", "missing-two", "token-no-name", "base",
         "resolution", "empty-token", "duplicate-tokens"],
)
def test_bad_manifest_is_rejected_with_the_reason(mutate, expected):
    data = make_concept().to_manifest()
    mutate(data)
    with pytest.raises(ConceptError) as err:
        Concept.from_manifest(data)
    assert expected in str(err.value)


def test_manifest_must_be_an_object():
    with pytest.raises(ConceptError, match="expected a JSON object, got list"):
        Concept.from_manifest([])


def test_load_names_the_manifest_file_in_errors(tmp_path):
    data = make_concept().to_manifest()
    data["method"] = "nope"
    write_manifest(tmp_path / "b", data)
    with pytest.raises(ConceptError, match="concept.json: method 'nope'"):
        Concept.load(tmp_path / "b")


def test_load_rejects_a_folder_without_manifest_and_invalid_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConceptError, match="concept.json is missing"):
        Concept.load(tmp_path / "empty")
    with pytest.raises(ConceptError, match="does not exist"):
        Concept.load(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text("{not json")
    with pytest.raises(ConceptError, match="not valid JSON"):
        Concept.load(tmp_path / "bad")


def _bundle_with(tmp_path, **overrides):
    folder = tmp_path / "bundle"
    write_manifest(folder, make_concept(**overrides).to_manifest())
    return folder


def test_relative_path_escaping_the_bundle_is_rejected(tmp_path):
    touch(tmp_path, "x.safetensors")  # exists, so only the escape can be the reason
    folder = _bundle_with(tmp_path, files={"embeddings": "../x.safetensors"})
    with pytest.raises(ConceptError, match=r"path '\.\./x\.safetensors' points outside the bundle folder"):
        Concept.load(folder)


def test_absolute_path_is_rejected(tmp_path):
    touch(tmp_path, "abs.png")
    absolute = str((tmp_path / "abs.png").resolve())
    folder = _bundle_with(tmp_path, refs=[absolute])
    with pytest.raises(ConceptError, match="must be relative to the bundle"):
        Concept.load(folder)


def test_symlink_pointing_outside_is_rejected(tmp_path):
    touch(tmp_path, "outside.safetensors")
    folder = _bundle_with(tmp_path, files={"embeddings": EMBEDDINGS})
    os.symlink(tmp_path / "outside.safetensors", folder / EMBEDDINGS)
    with pytest.raises(ConceptError, match="points outside the bundle folder"):
        Concept.load(folder)


def test_symlink_inside_the_bundle_is_allowed(tmp_path):
    folder = _bundle_with(tmp_path, files={"embeddings": EMBEDDINGS})
    touch(folder, "real.safetensors")
    os.symlink(folder / "real.safetensors", folder / EMBEDDINGS)
    assert Concept.load(folder).file("embeddings") == folder.resolve() / EMBEDDINGS


@pytest.mark.parametrize(
    ("field", "value", "missing"),
    [
        ("files", {"lora": LORA_WEIGHTS}, LORA_WEIGHTS),
        ("refs", ["refs/0.png"], "refs/0.png"),
        ("masks", {"refs/0.png": "masks/0.png"}, "masks/0.png"),
    ],
)
def test_listed_file_missing_is_named(tmp_path, field, value, missing):
    folder = _bundle_with(tmp_path, **{field: value})
    touch(folder, "refs/0.png") if field == "masks" else None
    with pytest.raises(ConceptError, match=f"file '{missing}' listed in concept.json is missing"):
        Concept.load(folder)


# ----------------------------------------------------------------------------------- write_bundle


def test_write_bundle_failure_midway_leaves_nothing(tmp_path):
    parent = tmp_path / "out"
    parent.mkdir()

    def write_files(d):
        touch(d, EMBEDDINGS)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_bundle(make_concept(files={"embeddings": EMBEDDINGS}), parent / "c", write_files)
    assert list(parent.iterdir()) == []


def test_write_bundle_with_a_listed_file_not_written_leaves_nothing(tmp_path):
    parent = tmp_path / "out"
    with pytest.raises(ConceptError, match=f"file '{EMBEDDINGS}' listed in concept.json is missing"):
        write_bundle(make_concept(files={"embeddings": EMBEDDINGS}), parent / "c", lambda d: None)
    assert list(parent.iterdir()) == []


def test_write_bundle_refuses_to_overwrite_by_default(tmp_path):
    out = tmp_path / "c"
    write_bundle(make_concept(name="first"), out, lambda d: touch(d, "keep.txt"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_bundle(make_concept(name="second"), out, lambda d: None)
    assert Concept.load(out).name == "first"
    assert (out / "keep.txt").exists()


def test_write_bundle_overwrite_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "c"
    write_bundle(make_concept(name="first"), out, lambda d: touch(d, "old.txt", "refs/old.png"))
    write_bundle(make_concept(name="second", refs=["refs/new.png"]), out, lambda d: touch(d, "refs/new.png"),
                 overwrite=True)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert files == ["README.md", MANIFEST, "refs", "refs/new.png"]  # the model card comes with every bundle
    assert Concept.load(out).name == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp or old folder left behind


# ------------------------------------------------------------------------------------------ apply


def write_ti_bundle(out, base, vectors: torch.Tensor, token: str = "<sks>"):
    from safetensors.torch import save_file

    concept = make_concept(base=base, tokens=[TokenSpec(token, learned=True, num_vectors=vectors.shape[0])],
                           files={"embeddings": EMBEDDINGS})
    return write_bundle(concept, out, lambda d: save_file({token: vectors}, str(d / EMBEDDINGS)))


def test_apply_refuses_a_different_base_and_names_both(tmp_path, tiny_pipe):
    base = fingerprint(tiny_pipe(0))
    concept = write_ti_bundle(tmp_path / "c", base, torch.randn(2, 32))
    other = tiny_pipe(1)
    with pytest.raises(ConceptError) as err:
        concept.apply(other)
    msg = str(err.value)
    assert "'tiny-random'" in msg and "'tiny-random:1'" in msg and "force=True" in msg
    assert "<sks>" not in other.tokenizer.get_vocab()  # nothing was applied


def test_apply_force_applies_with_a_warning(tmp_path, tiny_pipe, caplog):
    concept = write_ti_bundle(tmp_path / "c", fingerprint(tiny_pipe(0)), torch.randn(2, 32))
    other = tiny_pipe(1)
    with caplog.at_level(logging.WARNING, logger="lrkit.concept"):
        concept.apply(other, force=True)
    warnings = [r for r in caplog.records if r.name == "lrkit.concept" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'tiny-random:1'" in warnings[0].getMessage() and "force=True" in warnings[0].getMessage()
    assert "<sks>" in other.tokenizer.get_vocab()


def test_apply_same_base_in_half_precision_is_accepted(tmp_path, tiny_pipe):
    from lrkit.models import load_base

    concept = write_ti_bundle(tmp_path / "c", fingerprint(tiny_pipe(0)), torch.randn(1, 32))
    pipe = load_base("tiny-random", dtype="bf16")
    concept.apply(pipe)
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<sks>")]
    assert row.dtype == torch.bfloat16


def test_apply_textual_inversion_multi_vector(tmp_path, tiny_pipe):
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    pipe = tiny_pipe(0)
    concept = write_ti_bundle(tmp_path / "c", fingerprint(pipe), vectors)
    vocab_before = len(pipe.tokenizer)
    concept.apply(pipe)

    ids = pipe.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
    assert ids == [vocab_before, vocab_before + 1]
    table = pipe.text_encoder.get_input_embeddings().weight
    assert table.shape[0] == vocab_before + 2
    torch.testing.assert_close(table[ids].detach(), vectors, rtol=0, atol=0)
    # Prompts use the token once; the pipeline expands it to all of its vectors.
    assert pipe.maybe_convert_prompt("a <sks> vase", pipe.tokenizer) == "a <sks> <sks>_1 vase"
    assert pipe.tokenizer("a <sks> vase").input_ids[2] == ids[0]

    with pytest.raises(ConceptError, match="token '<sks>' is already in the tokenizer.*applied twice"):
        concept.apply(pipe)
    assert len(pipe.tokenizer) == vocab_before + 2


def test_apply_textual_inversion_vector_count_must_match_manifest(tmp_path, tiny_pipe):
    from safetensors.torch import save_file

    pipe = tiny_pipe(0)
    concept = make_concept(base=fingerprint(pipe), tokens=[TokenSpec("<sks>", learned=True, num_vectors=3)],
                           files={"embeddings": EMBEDDINGS})
    concept = write_bundle(concept, tmp_path / "c",
                           lambda d: save_file({"<sks>": torch.randn(2, 32)}, str(d / EMBEDDINGS)))
    with pytest.raises(ConceptError, match="3 vector"):
        concept.apply(pipe)
    assert "<sks>" not in pipe.tokenizer.get_vocab()


def test_apply_embeddings_without_learned_tokens_is_refused(tmp_path, tiny_pipe):
    from safetensors.torch import save_file

    pipe = tiny_pipe(0)
    concept = make_concept(base=fingerprint(pipe), tokens=[TokenSpec("sks")], files={"embeddings": EMBEDDINGS})
    concept = write_bundle(concept, tmp_path / "c",
                           lambda d: save_file({"sks": torch.randn(1, 32)}, str(d / EMBEDDINGS)))
    with pytest.raises(ConceptError, match="none of its tokens is marked learned=True"):
        concept.apply(pipe)


@pytest.fixture(scope="module")
def lora_source(tiny_pipe, tmp_path_factory):
    """A tiny pipe with a non-zero peft LoRA on its UNet, and that LoRA saved in diffusers layout."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_pipe(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    out_dir = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(str(out_dir), unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return pipe, out_dir / LORA_WEIGHTS


def write_lora_bundle(out, base, lora_file, extra_files=None, **overrides):
    """A bundle holding `lora_file` (plus `extra_files`: {rel: tensors}); a LoRA concept unless overridden."""
    import shutil

    from safetensors.torch import save_file

    fields = dict(method="lora", tokens=[TokenSpec("sks")], files={"lora": LORA_WEIGHTS},
                  lora=LoraSpec(rank=4, alpha=4.0, unet_targets=["to_q", "to_k", "to_v", "to_out.0"]), base=base)
    fields.update(overrides)

    def write_files(d):
        shutil.copy(lora_file, d / LORA_WEIGHTS)
        for rel, tensors in (extra_files or {}).items():
            save_file(tensors, str(d / rel))

    return write_bundle(make_concept(**fields), out, write_files)


def test_apply_lora_matches_the_adapted_pipe(tmp_path, tiny_pipe, lora_source):
    adapted, lora_file = lora_source
    fresh = tiny_pipe(0)
    concept = write_lora_bundle(tmp_path / "c", fingerprint(fresh), lora_file)

    base_latents = latents(fresh)
    concept.apply(fresh)
    assert fresh.get_list_adapters() == {"unet": ["vase"]}
    expected = latents(adapted)
    assert not torch.allclose(expected, base_latents, atol=1e-3)  # the LoRA does change the output
    torch.testing.assert_close(latents(fresh), expected, rtol=0, atol=1e-5)

    with pytest.raises(ConceptError, match="'vase' is already loaded"):
        concept.apply(fresh)
    assert fresh.get_list_adapters() == {"unet": ["vase"]}


@pytest.mark.parametrize("name, adapter", [("train", "train_lora"), ("my.vase", "my_vase"), ("vase", "vase")])
def test_default_adapter_name_is_one_peft_can_use(name, adapter):
    assert default_adapter_name(name) == adapter


def test_apply_lora_of_a_concept_named_like_a_module_attribute(tmp_path, tiny_pipe, lora_source):
    # a concept trained into OUTPUT_DIR=train is named "train"; peft cannot store an adapter under that name
    adapted, lora_file = lora_source
    pipe = tiny_pipe(0)
    concept = write_lora_bundle(tmp_path / "c", fingerprint(pipe), lora_file, name="train")
    concept.apply(pipe)
    assert pipe.get_list_adapters() == {"unet": ["train_lora"]}
    torch.testing.assert_close(latents(pipe), latents(adapted), rtol=0, atol=1e-5)
    with pytest.raises(ConceptError, match="adapter_name 'eval' cannot name a peft adapter.*'eval_lora'"):
        concept.apply(tiny_pipe(0), adapter_name="eval")


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_refused_pivotal_concept_leaves_the_pipeline_unchanged(tmp_path, tiny_pipe, lora_source):
    _, lora_file = lora_source
    pipe = tiny_pipe(0)
    base = fingerprint(pipe)
    write_lora_bundle(tmp_path / "lora", base, lora_file).apply(pipe)
    pivotal = write_lora_bundle(
        tmp_path / "pivotal", base, lora_file, method="pivotal",
        tokens=[TokenSpec("<sks>", learned=True, num_vectors=1)],
        files={"lora": LORA_WEIGHTS, "embeddings": EMBEDDINGS},
        extra_files={EMBEDDINGS: {"<sks>": torch.randn(1, 32)}},
    )
    vocab_size = len(pipe.tokenizer)
    with pytest.raises(ConceptError, match="'vase' is already loaded"):
        pivotal.apply(pipe)
    assert len(pipe.tokenizer) == vocab_size and "<sks>" not in pipe.tokenizer.get_vocab()
    pivotal.apply(pipe, adapter_name="vase-pivotal")
    assert "<sks>" in pipe.tokenizer.get_vocab()
    assert pipe.get_list_adapters() == {"unet": ["vase", "vase-pivotal"]}


def test_apply_dreambooth_full_unet(tmp_path, tiny_pipe):
    perturbed = tiny_pipe(0)
    base = fingerprint(perturbed)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in perturbed.unet.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    concept = make_concept(method="dreambooth", tokens=[TokenSpec("sks")], files={"unet": "unet"}, base=base)
    concept = write_bundle(concept, tmp_path / "c", lambda d: perturbed.unet.save_pretrained(d / "unet"))
    assert (tmp_path / "c" / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    fresh = tiny_pipe(0)
    base_latents = latents(fresh)
    old_unet = fresh.unet
    concept.apply(fresh)
    assert fresh.unet is not old_unet
    expected = latents(perturbed)
    assert not torch.allclose(expected, base_latents, atol=1e-3)
    torch.testing.assert_close(latents(fresh), expected, rtol=0, atol=0)
    # The pipeline's UNet is no longer the base: applying the concept again is refused.
    with pytest.raises(ConceptError, match=r"'tiny-random\+vase'"):
        concept.apply(fresh)


def test_text_encoder_lora_with_a_too_old_peft_is_refused_before_anything_changes(tmp_path, tiny_pipe, monkeypatch):
    """transformers 5.24+ asks for a peft newer than PyPI's; a text-encoder LoRA then fails in diffusers'
    loader. lrkit names both versions and the fix, and leaves the pipeline untouched."""
    import transformers.integrations.peft as hf_peft

    from lrkit.lora_io import LoraVersionError

    pipe = tiny_pipe(0)
    concept = make_concept(base=fingerprint(pipe), method="lora", tokens=[TokenSpec("sks", learned=False)],
                           files={"lora": LORA_WEIGHTS},
                           lora=LoraSpec(rank=4, alpha=4.0, unet_targets=["to_q"], text_encoder_targets=["q_proj"]))
    concept = write_bundle(concept, tmp_path / "c", lambda d: (d / LORA_WEIGHTS).write_bytes(b"x"))
    monkeypatch.setattr(hf_peft, "MIN_PEFT_VERSION", "99.0")
    with pytest.raises(LoraVersionError, match=r"needs peft >= 99.0 .* but peft \S+ is installed.*transformers<"):
        concept.apply(pipe)
    assert not getattr(pipe.unet, "peft_config", None) and not getattr(pipe.text_encoder, "peft_config", None)


def test_text_encoder_lora_training_is_refused_whole_with_a_too_old_peft(tiny_pipe, monkeypatch):
    from types import SimpleNamespace

    import transformers.integrations.peft as hf_peft

    from lrkit.lora_io import LoraVersionError, require_text_encoder_lora_support
    from lrkit.training.config import LoraOptions
    from lrkit.training.methods.lora import add_lora

    require_text_encoder_lora_support()  # the installed pair is a working one
    pipe = tiny_pipe(0)
    monkeypatch.setattr(hf_peft, "MIN_PEFT_VERSION", "99.0")
    with pytest.raises(LoraVersionError, match="text-encoder LoRA"):
        add_lora(SimpleNamespace(unet=pipe.unet, text_encoder=pipe.text_encoder), LoraOptions(), text_encoder=True)
    assert not getattr(pipe.unet, "peft_config", None)  # no UNet adapter left half-configured
    add_lora(SimpleNamespace(unet=pipe.unet, text_encoder=pipe.text_encoder), LoraOptions(), text_encoder=False)
    assert getattr(pipe.unet, "peft_config", None)  # a UNet-only LoRA does not need the text-encoder integration


@pytest.mark.parametrize("tokens, names", [
    (["<red-vase>", "<black-pot>"], ["red-vase", "black-pot"]),
    (["<A>", "<a>"], ["A", "a-2"]),  # distinct where case does not count
    (["<a-3>", "<a>", "[a]"], ["a-3", "a", "a-4"]),  # the position's number is taken: the next free one
    (["<>", "[]"], ["token", "token-2"]),
])
def test_each_learned_token_gets_a_file_name_of_its_own(tokens, names):
    from lrkit.concept import token_embedding_files

    assert token_embedding_files(tokens) == {t: f"embeddings/{n}.safetensors" for t, n in zip(tokens, names)}
