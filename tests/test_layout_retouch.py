"""DESIGN §5.2 invariants of Layout-and-Retouch, each against stock diffusers pipelines, same seed, on both model
families: `tiny-random` (StableDiffusionPipeline) and `tiny-random-xl` (StableDiffusionXLPipeline)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save
from PIL import Image

from lrkit.concept import EMBEDDINGS, Concept, TokenSpec, write_bundle
from lrkit.inference import GenerationOptions, InferenceError, LayoutRetouchPipeline
from lrkit.io import atomic_write_bytes
from lrkit.lora_io import save_diffusers_lora
from lrkit.models import build_tiny_random, fingerprint, load_base

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
BASES = ["tiny-random", "tiny-random-xl"]
# The concepts each base's exactness tests run on. SD: LoRA (UNet + text encoder), Textual Inversion, DreamBooth
# UNet. SDXL: LoRA made by hand (UNet + both text encoders), Textual Inversion (clip_l / clip_g vectors), DreamBooth
# (UNet + both text encoders), and a reference concept (no weights).
KINDS = {"tiny-random": ["lora", "ti", "db"], "tiny-random-xl": ["lora", "ti", "db", "reference"]}
CASES = [pytest.param(base, kind, id=f"{base}-{kind}") for base in BASES for kind in KINDS[base]]


def _perturb_lora(module, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _xl_lora_files(pipe):
    """Random LoRA adapters on the tiny SDXL UNet and both text encoders, saved as diffusers' SDXL examples do."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights="gaussian"))
    for seed, name in enumerate(("text_encoder", "text_encoder_2"), start=2):
        encoder = getattr(pipe, name)
        encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
        _perturb_lora(encoder, seed, 0.5)
    _perturb_lora(pipe.unet, 1)

    def write(folder: Path) -> None:
        layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(getattr(pipe, name)))
                  for name in ("text_encoder", "text_encoder_2")}
        StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                                    **layers)
    return write


def make_bundle(root: Path, kind: str, base: str = "tiny-random") -> Path:
    """A concept with a strong effect: random LoRA (UNet + text encoders), a random TI vector, a perturbed
    DreamBooth UNet; or a reference concept (the photo alone)."""
    out = root / f"{base}-{kind}-concept"
    if kind == "reference":
        from lrkit.reference import reference_concept

        return reference_concept(ROOT / "data/subjects/vase/00.jpg", "vase", out, base=base).path
    pipe = build_tiny_random(0) if base == "tiny-random" else load_base(base)
    write_lora = None
    if kind == "lora" and base != "tiny-random":
        write_lora = _xl_lora_files(pipe)
        tokens, files = [TokenSpec("sks")], {"lora": "pytorch_lora_weights.safetensors"}
    elif kind == "lora":
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                         init_lora_weights="gaussian"))
        pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights="gaussian"))
        _perturb_lora(pipe.unet, 1)
        _perturb_lora(pipe.text_encoder, 2, 0.5)
        tokens, files = [TokenSpec("sks")], {"lora": "pytorch_lora_weights.safetensors"}
    elif kind == "db":  # SDXL: both text encoders too, so the vanilla model must swap all three
        replaced = ["unet"] if base == "tiny-random" else ["unet", "text_encoder", "text_encoder_2"]
        with torch.no_grad():
            g = torch.Generator().manual_seed(4)
            for name in replaced:
                for p in getattr(pipe, name).parameters():
                    if p.is_floating_point():
                        p.add_(torch.randn(p.shape, generator=g) * 0.05)
        tokens, files = [TokenSpec("sks")], {name: name for name in replaced}
    else:
        tokens, files = [TokenSpec("<sks>", learned=True, num_vectors=1, initializer="vase")], {"embeddings": EMBEDDINGS}
    method = {"lora": "lora", "db": "dreambooth", "ti": "textual_inversion"}[kind]
    concept = Concept(name=kind, method=method, tokens=tokens,
                      class_word="vase", base=fingerprint(load_base(base)), resolution=64, files=files,
                      refs=["refs/00.jpg"])

    def write(tmp: Path) -> None:
        (tmp / "refs").mkdir()
        shutil.copy(ROOT / "data/subjects/vase/00.jpg", tmp / "refs/00.jpg")
        if write_lora is not None:
            write_lora(tmp)
        elif kind == "lora":
            save_diffusers_lora(tmp, pipe.unet, pipe.text_encoder)
        elif kind == "db":
            for name in files:
                getattr(pipe, name).save_pretrained(tmp / name, safe_serialization=True)
        elif base == "tiny-random":
            vec = torch.randn(1, 32, generator=torch.Generator().manual_seed(3))
            atomic_write_bytes(tmp / EMBEDDINGS, save({"<sks>": vec}))
        else:  # SDXL: a vector per text encoder, under clip_l / clip_g
            g = torch.Generator().manual_seed(3)
            vectors = {key: torch.randn(1, getattr(pipe, name).config.hidden_size, generator=g)
                       for key, name in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"))}
            atomic_write_bytes(tmp / EMBEDDINGS, save(vectors))

    write_bundle(concept, out, write)
    return out


class Made:
    """Bundles and pipelines per (base, kind), each built on first use and kept."""

    def __init__(self, root: Path, cache: Path):
        self.root, self.cache = root, cache
        self._bundles: dict = {}
        self._pipes: dict = {}

    def bundle(self, base: str, kind: str) -> Path:
        if (base, kind) not in self._bundles:
            self._bundles[base, kind] = make_bundle(self.root, kind, base)
        return self._bundles[base, kind]

    def pipe(self, base: str, kind: str) -> LayoutRetouchPipeline:
        if (base, kind) not in self._pipes:
            self._pipes[base, kind] = LayoutRetouchPipeline.from_concept(base, self.bundle(base, kind),
                                                                         cache_dir=self.cache)
        return self._pipes[base, kind]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return Made(tmp_path_factory.mktemp("bundles"), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def bundles(made):
    return {kind: made.bundle("tiny-random", kind) for kind in ("lora", "ti", "db")}


@pytest.fixture(scope="module")
def pipes(made, bundles):
    return {kind: made.pipe("tiny-random", kind) for kind in bundles}


PROMPT = {"lora": "a photo of sks vase on the beach", "ti": "a photo of <sks> vase on the beach",
          "db": "a photo of sks vase on the beach", "reference": "a photo of vase on the beach"}


def stock_image(prompt: str, seed: int, concept: Path | None, base: str = "tiny-random") -> np.ndarray:
    """The stock pipeline of `base`'s family (`load_base`), the concept applied by `Concept.apply`."""
    pipe = load_base(base)
    if concept is not None:
        Concept.load(concept).apply(pipe)
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64, generator=generator,
                output_type="np").images[0]


def ours(pipe, prompt, seed=0, **options) -> list:
    return pipe(prompt, seeds=seed, options=GenerationOptions.of(num_inference_steps=STEPS, **options))


def as_np(image) -> np.ndarray:
    return np.asarray(image).astype(np.float32) / 255.0


@pytest.mark.parametrize("base, kind", CASES)
def test_lambda_zero_is_the_personalized_pipeline(base, kind, made):
    expected = stock_image(PROMPT[kind], 0, made.bundle(base, kind), base)
    got = as_np(ours(made.pipe(base, kind), PROMPT[kind], mode="layout", lam=0.0)[0].image)
    np.testing.assert_allclose(got, np.round(expected * 255) / 255, atol=1.5 / 255)
    # and the personalized mode is the same thing
    same = as_np(ours(made.pipe(base, kind), PROMPT[kind], mode="personalized")[0].image)
    np.testing.assert_array_equal(same, got)


@pytest.mark.parametrize("base, kind", CASES)
def test_lambda_one_is_the_vanilla_pipeline(base, kind, made):
    expected = stock_image("a photo of vase on the beach", 0, None, base)
    got = as_np(ours(made.pipe(base, kind), PROMPT[kind], mode="layout", lam=1.0)[0].image)
    np.testing.assert_allclose(got, np.round(expected * 255) / 255, atol=1.5 / 255)


@pytest.mark.parametrize("base", BASES)
def test_the_concept_matters_and_lambda_blends(base, made):
    """Sensitivity: vanilla and personalized differ, and λ=0.5 is neither."""
    pipe = made.pipe(base, "lora")
    v = as_np(ours(pipe, PROMPT["lora"], mode="vanilla")[0].image)
    p = as_np(ours(pipe, PROMPT["lora"], mode="personalized")[0].image)
    mid = as_np(ours(pipe, PROMPT["lora"], mode="layout", lam=0.5)[0].image)
    assert np.abs(v - p).mean() > 0.02
    assert np.abs(mid - p).mean() > 1e-3 and np.abs(mid - v).mean() > 1e-3


@pytest.mark.parametrize("base", BASES)
def test_swap_off_returns_the_layout(base, made):
    out = ours(made.pipe(base, "lora"), PROMPT["lora"], mode="layout-retouch", lam=0.5, swap=False)[0]
    assert np.abs(as_np(out.image) - as_np(out.layout)).max() <= 1.5 / 255


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_zero_mask_returns_the_layout_and_a_full_mask_changes_it(base, made, monkeypatch, cache):
    import lrkit.masks

    pipe = made.pipe(base, "lora")
    monkeypatch.setattr(lrkit.masks, "blend_target_mask", lambda attn, sam, sam_weight, mask_threshold: torch.zeros_like(attn))
    zero = ours(pipe, PROMPT["lora"], mode="layout-retouch", lam=0.5, cache_attention=cache)[0]
    assert np.abs(as_np(zero.image) - as_np(zero.layout)).max() <= 1.5 / 255
    monkeypatch.setattr(lrkit.masks, "blend_target_mask", lambda attn, sam, sam_weight, mask_threshold: torch.ones_like(attn))
    full = ours(pipe, PROMPT["lora"], mode="layout-retouch", lam=0.5, cache_attention=cache)[0]
    assert np.abs(as_np(full.image) - as_np(full.layout)).mean() > 1e-3


@pytest.mark.parametrize("base, kind, foreground", [
    ("tiny-random", "lora", {}), ("tiny-random", "ti", {}), ("tiny-random", "ti", dict(foreground="replace")),
    ("tiny-random", "ti", dict(reference_weight=4.0)),
    ("tiny-random-xl", "lora", {}), ("tiny-random-xl", "ti", dict(reference_weight=4.0)),
    ("tiny-random-xl", "reference", dict(foreground="replace"))])
def test_cached_attention_equals_the_batched_paths(made, base, kind, foreground):
    """Recording C in stage 1 and R once gives what running [R, C_u, C_c, X_u, X_c] per step gives, for each way
    the subject reads the reference."""
    kw = dict(mode="layout-retouch", lam=0.25, **foreground)
    pipe = made.pipe(base, kind)
    cached = pipe(PROMPT[kind], seeds=[0, 1], options=GenerationOptions.of(num_inference_steps=STEPS, **kw))
    plain = pipe(PROMPT[kind], seeds=[0, 1], options=GenerationOptions.of(num_inference_steps=STEPS,
                                                                      cache_attention=False, **kw))
    for a, b in zip(cached, plain):
        np.testing.assert_allclose(as_np(a.image), as_np(b.image), atol=1.5 / 255)
        np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
        assert np.abs(as_np(a.image) - as_np(a.layout)).mean() > 2e-4  # the swap changed the image (random weights: mildly)


def test_foreground_modes_change_what_the_subject_reads(pipes):
    """Replace and a heavier reference weight move the retouched image further from the layout than the default
    concatenation; the layout is the same in all three."""
    runs = {name: ours(pipes["ti"], PROMPT["ti"], mode="layout-retouch", lam=0.25, **kw)[0]
            for name, kw in (("concatenate", {}), ("replace", dict(foreground="replace")),
                             ("weighted", dict(reference_weight=8.0)))}
    layouts = [as_np(g.layout) for g in runs.values()]
    assert all(np.array_equal(layouts[0], other) for other in layouts[1:])
    moved = {name: np.abs(as_np(g.image) - as_np(g.layout)).mean() for name, g in runs.items()}
    assert moved["replace"] > moved["concatenate"] and moved["weighted"] > moved["concatenate"], moved


def test_correspondence_view_records_without_changing_the_image(pipes, tmp_path):
    from lrkit.inference.outputs import save_generation

    plain = ours(pipes["ti"], PROMPT["ti"], mode="layout-retouch", lam=0.25)[0]
    seen = ours(pipes["ti"], PROMPT["ti"], mode="layout-retouch", lam=0.25, correspondence=True)[0]
    np.testing.assert_array_equal(as_np(plain.image), as_np(seen.image))
    assert plain.correspondence is None and seen.correspondence.size == (2 * 64 + 4, 64)
    paths = save_generation(seen, tmp_path, intermediates=True)
    assert tmp_path / "p000_s0_correspondence.png" in paths


def test_correspondence_finds_the_reference_token_each_query_matches():
    from lrkit.inference.processors import Correspondence

    g = torch.Generator().manual_seed(0)
    n, d = 16, 16
    k_ref = torch.eye(n).expand(2, n, d) * 4  # orthogonal keys: each query matches exactly one
    order = torch.randperm(n, generator=g)
    q = k_ref[None, :, order] * 4  # target token i is reference token order[i], sharply
    corr = Correspondence(rows=[0])
    keep = torch.ones(n, dtype=torch.bool)
    corr.add(q, k_ref, keep, (4, 4))
    assert torch.equal(corr.reads_from()[0], order) and corr.grid == (4, 4)
    corr.add(q[:, :, :4], k_ref[:, :4], keep[:4], (2, 2))  # a coarser layer is left out
    assert corr.calls == 1


def test_layout_retouch_runs_batched_and_is_deterministic(pipes):
    a = pipes["ti"](PROMPT["ti"], seeds=[0, 1], options=GenerationOptions.of(num_inference_steps=STEPS, lam=0.5))
    b = pipes["ti"](PROMPT["ti"], seeds=[1], options=GenerationOptions.of(num_inference_steps=STEPS, lam=0.5))
    assert [g.seed for g in a] == [0, 1] and a[1].stem == "p000_s1"
    assert a[0].mask is not None and a[0].layout is not None and a[0].reference is not None
    np.testing.assert_allclose(as_np(a[1].image), as_np(b[0].image), atol=1.5 / 255)  # batching does not change a seed


def tree_state(root: Path) -> dict:
    """Every path under `root` with its kind, permissions, size, mtime and content hash."""
    import hashlib

    state = {}
    for path in sorted([root, *root.rglob("*")]):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        state[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return state


def test_reference_mask_is_computed_once_and_cached_outside_the_bundle(bundles, tmp_path):
    bundle = tmp_path / "ti"
    shutil.copytree(bundles["ti"], bundle)
    before = tree_state(bundle)
    pipe = LayoutRetouchPipeline.from_concept("tiny-random", bundle, cache_dir=tmp_path / "cache")
    first = ours(pipe, PROMPT["ti"], mode="layout-retouch", lam=0.5)[0]
    cached = sorted((tmp_path / "cache" / "masks").glob("*.png"))
    assert len(cached) == 1 and tree_state(bundle) == before
    stamp = cached[0].stat().st_mtime_ns
    again = ours(pipe, PROMPT["ti"], mode="layout-retouch", lam=0.5)[0]
    assert cached[0].stat().st_mtime_ns == stamp and sorted((tmp_path / "cache" / "masks").glob("*.png")) == cached
    np.testing.assert_array_equal(as_np(first.image), as_np(again.image))
    assert Concept.load(bundle).masks == {}


def test_a_read_only_bundle_serves_every_mode_and_is_never_written(bundles, tmp_path):
    """Inference treats a bundle as read-only: permissions removed on disk, every mode runs and nothing under
    the bundle changes (checked by content too: the suite may run as root, which ignores permissions)."""
    layout = tmp_path / "layout.png"
    Image.new("RGB", (64, 64), (40, 120, 200)).save(layout)
    style = tmp_path / "style.png"
    Image.new("RGB", (64, 64), (200, 60, 30)).save(style)
    for kind in ("lora", "ti", "db"):
        bundle = tmp_path / kind
        shutil.copytree(bundles[kind], bundle)
        for path in [bundle, *bundle.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        before = tree_state(bundle)
        try:
            pipe = LayoutRetouchPipeline.from_concept("tiny-random", bundle, cache_dir=tmp_path / f"cache-{kind}")
            for mode in ("vanilla", "personalized", "layout", "layout-retouch"):
                ours(pipe, PROMPT[kind], mode=mode, lam=0.5)
            ours(pipe, PROMPT[kind], mode="layout-retouch", lam=0.5, cache_attention=False)
            pipe(PROMPT[kind], options=GenerationOptions.of(num_inference_steps=STEPS, lam=0.5), layout_image=layout)
            ours(pipe, PROMPT[kind], mode="dual-reference", style_reference=str(style))
            assert tree_state(bundle) == before, kind
        finally:
            for path in [bundle, *bundle.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)


def test_prompt_without_token_is_refused(pipes):
    with pytest.raises(InferenceError, match="sks"):
        ours(pipes["lora"], "a photo of a vase", mode="layout-retouch")
    ours(pipes["lora"], "a photo of a vase", mode="vanilla")  # fine without a token


def test_bad_options_are_refused():
    with pytest.raises(InferenceError, match="mode"):
        GenerationOptions.of(mode="magic")
    with pytest.raises(InferenceError, match="retouch_start"):
        GenerationOptions.of(lam=0.5, retouch_start=0.2)


def test_concept_from_another_base_is_refused(bundles):
    from lrkit.concept import ConceptError

    with pytest.raises(ConceptError, match="tiny-random"):
        LayoutRetouchPipeline.from_concept("tiny-random:1", bundles["lora"])


def test_missing_reference_photo(bundles, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundles["ti"], broken)
    pipe = LayoutRetouchPipeline.from_concept("tiny-random", broken, cache_dir=tmp_path / "c")
    (broken / "refs/00.jpg").unlink()
    with pytest.raises(InferenceError, match="00.jpg"):
        ours(pipe, PROMPT["ti"], mode="layout-retouch", lam=0.5)


def test_dreambooth_keeps_two_unets_and_lora_shares_one(pipes):
    assert pipes["db"].vanilla_unet is not None and pipes["db"].vanilla_unet is not pipes["db"].pipe.unet
    assert pipes["lora"].vanilla_unet is None and pipes["ti"].vanilla_unet is None
    out = ours(pipes["db"], PROMPT["db"], mode="layout-retouch", lam=0.5)[0]
    assert out.image.size == (64, 64)


class BoxSegmenter:
    """A stand-in for SAM: the box it is prompted with, as the mask; records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, image, box=None):
        self.calls.append((image.size, box))
        mask = torch.zeros(image.height, image.width, dtype=torch.bool)
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = True
        return mask


def fresh_copy(bundle: Path, dest: Path) -> Path:
    """A copy of a bundle without stored reference masks."""
    from lrkit.concept import MANIFEST
    from lrkit.io import atomic_write_json

    shutil.copytree(bundle, dest)
    concept = Concept.load(dest)
    concept.masks = {}
    atomic_write_json(dest / MANIFEST, concept.to_manifest())
    shutil.rmtree(dest / "masks", ignore_errors=True)
    return dest


@pytest.mark.parametrize("base, kind", [("tiny-random", "ti"), ("tiny-random-xl", "reference")])
def test_sam_masks_are_wired_in(base, kind, made, tmp_path):
    pipe = LayoutRetouchPipeline.from_concept(base, fresh_copy(made.bundle(base, kind), tmp_path / kind),
                                              cache_dir=tmp_path / "c")
    pipe.segmenter = BoxSegmenter()
    out = ours(pipe, PROMPT[kind], mode="layout-retouch", lam=0.5, sam_weight=1.0, mask_threshold=0.5)[0]
    # first call: the reference (square crop at generation size), then the layout image
    assert [size for size, _ in pipe.segmenter.calls] == [(64, 64), (64, 64)]
    box = pipe.segmenter.calls[1][1]
    expected = torch.zeros(64, 64)
    expected[box[1]:box[3], box[0]:box[2]] = 1
    got = torch.from_numpy(np.asarray(out.mask) > 127).float()
    # sam_weight = 1: the target mask is the SAM mask (at latent resolution, upsampled for the output)
    small = torch.nn.functional.interpolate(expected[None, None], size=(16, 16), mode="area")[0, 0] >= 0.5
    torch.testing.assert_close(got, torch.nn.functional.interpolate(small[None, None].float(), size=(64, 64))[0, 0])


def test_non_square_reference_is_resized_with_a_note(bundles, tmp_path, caplog):
    from PIL import Image

    fresh_copy(bundles["ti"], tmp_path / "ti")
    Image.open(ROOT / "data/subjects/vase/00.jpg").crop((0, 0, 900, 500)).save(tmp_path / "ti/refs/00.jpg")
    pipe = LayoutRetouchPipeline.from_concept("tiny-random", tmp_path / "ti", cache_dir=tmp_path / "c")
    caplog.set_level("INFO")
    out = ours(pipe, PROMPT["ti"], mode="layout-retouch", lam=0.5)[0]
    assert out.image.size == (64, 64)
    assert "900x500" in caplog.text


@pytest.mark.parametrize("base, kind", [("tiny-random", "ti"), ("tiny-random-xl", "lora")])
def test_user_layout_image(base, kind, made, tmp_path):
    from PIL import Image

    pipe = made.pipe(base, kind)
    layout = Image.new("RGB", (64, 64), (30, 120, 200))
    layout.paste((200, 60, 40), (20, 20, 44, 52))
    out = pipe(PROMPT[kind], seeds=[0], options=GenerationOptions.of(num_inference_steps=STEPS, lam=0.5),
               layout_image=layout)[0]
    with torch.no_grad():
        vae = pipe.pipe.vae
        reconstructed = vae.decode(vae.encode(pipe.pipe.image_processor.preprocess(layout)).latent_dist.mean)
    assert out.layout is not None and out.image.size == (64, 64)
    # the layout shown is the given image through the VAE (its inversion's clean end)
    expected = pipe.pipe.image_processor.postprocess(reconstructed.sample, output_type="np")[0]
    np.testing.assert_allclose(as_np(out.layout), np.round(expected * 255) / 255, atol=1.5 / 255)
    with pytest.raises(InferenceError, match="layout-retouch"):
        pipe(PROMPT[kind], options=GenerationOptions.of(num_inference_steps=STEPS, mode="layout"), layout_image=layout)


@pytest.mark.parametrize("base", BASES)
def test_other_schedulers_match_stock(base, made):
    from diffusers import EulerDiscreteScheduler

    stock = load_base(base)
    Concept.load(made.bundle(base, "lora")).apply(stock)
    stock.scheduler = EulerDiscreteScheduler.from_config(stock.scheduler.config)
    expected = stock(PROMPT["lora"], num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    got = as_np(ours(made.pipe(base, "lora"), PROMPT["lora"], mode="personalized", scheduler="euler")[0].image)
    np.testing.assert_allclose(got, np.round(expected * 255) / 255, atol=1.5 / 255)
    with pytest.raises(InferenceError, match="ddim"):
        GenerationOptions.of(mode="layout-retouch", scheduler="euler")


def test_explicit_swap_layers(pipes, monkeypatch):
    import lrkit.masks

    monkeypatch.setattr(lrkit.masks, "blend_target_mask", lambda attn, sam, sam_weight, mask_threshold: torch.ones_like(attn))
    pipe = pipes["ti"]
    one = ["up_blocks.2.attentions.1.transformer_blocks.0.attn1.processor"]
    assert [l.name for l in pipe.swap_layers(GenerationOptions.of(swap_layers=one))] == one
    single = ours(pipe, PROMPT["ti"], lam=0.25, swap_layers=one)[0]
    default = ours(pipe, PROMPT["ti"], lam=0.25)[0]
    assert np.abs(as_np(single.image) - as_np(default.image)).mean() > 1e-4  # fewer swap layers, another image
    with pytest.raises(InferenceError, match="cross-attention"):
        ours(pipe, PROMPT["ti"], swap_layers=[one[0].replace("attn1", "attn2")])
    with pytest.raises(InferenceError, match="not an attention layer"):
        ours(pipe, PROMPT["ti"], swap_layers=["up_blocks.7.attentions.0.transformer_blocks.0.attn1.processor"])
