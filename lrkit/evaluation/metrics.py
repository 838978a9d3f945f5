"""Quality metrics of personalized generation (DESIGN §8).

- CLIP-I: cosine of the CLIP image embeddings of a generated image and a reference photo of the
  subject, averaged over the reference photos (DreamBooth's subject fidelity).
- CLIP-T: cosine of the CLIP embeddings of a generated image and its prompt, the prompt written with
  the class word instead of the concept token (CLIP does not know `<sks>`; prompt fidelity).
- DINO: as CLIP-I, with the CLS-token embedding of a self-supervised DINO ViT (ViT-S/16 by
  default), which tells apart subjects of one class better than CLIP.
- Layout diversity sigma^2_avg: per prompt, the variance of the subject's centre point over seeds
  (Var(cx) + Var(cy), centres normalised to [0, 1]), averaged over prompts (the seed paper's
  Figure 1). Centres come from subject masks (SAM, cross-attention, the toy segmenter) or boxes.
- DINO diversity: per prompt, the mean DINO cosine distance 1 - cos over all pairs of seeds.

All cosines are raw cosines in [-1, 1] (DreamBooth's convention), not CLIP-Score's
`100 * max(cos, 0)`.

Why not torchmetrics' `CLIPScore`: it loads only the hub ids it lists (a local folder or a tiny
test model is refused unless wrapped in a callable), returns one batch mean (no per-image
scores, no image-to-reference averaging), re-embeds the references on every call, and (torchmetrics
1.9 with transformers 5) fails outright, because `CLIPModel.get_image_features` now returns a
`ModelOutput` rather than a tensor. lrkit embeds each image once with transformers' `CLIPModel`
and takes the cosines with torchmetrics' `pairwise_cosine_similarity`.

Model weights load from a hub id or a local folder, safetensors only unless `allow_pickle=True`
(then transformers reads `pytorch_model.bin` with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import PIL.Image
import torch
from torchmetrics.functional import pairwise_cosine_similarity
from tqdm.auto import tqdm

from lrkit.toyworld.scorers import center_and_scale
from lrkit.toyworld.scorers import layout_diversity as _layout_diversity

logger = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_BATCH_SIZE = 32

ImageLike = PIL.Image.Image | str | os.PathLike


class MetricModelError(ValueError):
    """A metric model could not be loaded; the message names it and says what to do."""


# ------------------------------------------------------------------------------------ loading


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(names)}")
    return names[dtype]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def load_pretrained(what: str, option: str, name_or_path: str | os.PathLike, loaders, *, allow_pickle: bool = False):
    """Load `loaders` (callables `f(name, **kwargs)`) from a hub id or a local folder.

    `what` names the model in messages ("CLIP model"), `option` the CLI option that picks it
    ("--clip_model"). Failures become a `MetricModelError` naming the id and how to use a local copy.
    """
    name = str(name_or_path)
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise MetricModelError(f"{what} folder {name!r} ({option}) does not exist")
        if not (path / "config.json").is_file():
            raise MetricModelError(
                f"{what} folder {name!r} ({option}) has no config.json: it is not a transformers model folder "
                "(save one with model.save_pretrained(DIR) and processor.save_pretrained(DIR))"
            )
        name = str(path)
    kwargs = {"use_safetensors": None if allow_pickle else True}
    try:
        return [load(name, **kwargs) if takes_weights else load(name) for load, takes_weights in loaders]
    except (OSError, ValueError) as err:  # hub/offline errors are OSErrors; bad configs ValueErrors
        tail = name.rstrip("/").split("/")[-1]
        pickle_hint = ("" if allow_pickle else " Weights load from safetensors only; for a model with only "
                       "pytorch_model.bin pass allow_pickle=True (CLI: --allow_pickle true).")
        if _looks_like_path(name):
            hint = pickle_hint.strip()
        else:
            hint = (f"If this machine is offline, download it elsewhere (`hf download {name} --local-dir ./{tail}`) "
                    f"and pass the local folder instead ({option} ./{tail}).{pickle_hint}")
        raise MetricModelError(f"could not load the {what} {name!r} ({type(err).__name__}: {err}). {hint}") from err


def _open(image: ImageLike) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    with PIL.Image.open(image) as opened:
        return opened.convert("RGB")


def _batches(items: Sequence, size: int, desc: str) -> Iterable[Sequence]:
    starts = range(0, len(items), size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=len(starts) < 4, leave=False):
        yield items[start:start + size]


def _features(output) -> torch.Tensor:
    """Projected features from `get_*_features`: a tensor (transformers 4) or a ModelOutput (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float().cpu()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class _Embedder:
    """A transformers model and its processor on one device and dtype, run in batches of `batch_size`."""

    def __init__(self, model, processor, *, device=None, dtype=None, batch_size: int = DEFAULT_BATCH_SIZE):
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.processor = processor
        self.batch_size = batch_size

    def _embed_images(self, images: Sequence[ImageLike], what: str, features) -> torch.Tensor:
        """`features(pixel_values)` per batch of images, normalised and concatenated."""
        out = []
        for batch in _batches(list(images), self.batch_size, what):
            pixels = self.processor(images=[_open(i) for i in batch], return_tensors="pt")["pixel_values"]
            out.append(_normalize(features(pixels.to(self.device, self.dtype))))
        return torch.cat(out) if out else None


class ClipEmbedder(_Embedder):
    """Unit-norm CLIP embeddings of images and texts (transformers' `CLIPModel` + `CLIPProcessor`)."""

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = DEFAULT_CLIP, *, device=None, dtype=None,
                        batch_size: int = DEFAULT_BATCH_SIZE, allow_pickle: bool = False) -> "ClipEmbedder":
        """Load a CLIP model and its processor from a hub id or a local folder."""
        from transformers import CLIPModel, CLIPProcessor

        model, processor = load_pretrained("CLIP model", "--clip_model", name_or_path,
                                           [(CLIPModel.from_pretrained, True), (CLIPProcessor.from_pretrained, False)],
                                           allow_pickle=allow_pickle)
        return cls(model, processor, device=device, dtype=dtype, batch_size=batch_size)

    @torch.no_grad()
    def embed_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """(n, d) float32 unit vectors, one per image (PIL images or paths)."""
        out = self._embed_images(images, "CLIP images",
                                 lambda pixels: _features(self.model.get_image_features(pixel_values=pixels)))
        return out if out is not None else torch.empty(0, self.model.config.projection_dim)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, d) float32 unit vectors, one per text (truncated to CLIP's 77 tokens)."""
        out = []
        for batch in _batches(list(texts), self.batch_size, "CLIP texts"):
            tokens = self.processor(text=list(batch), return_tensors="pt", padding=True, truncation=True,
                                    max_length=self.model.config.text_config.max_position_embeddings)
            out.append(_normalize(_features(self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)))))
        return torch.cat(out) if out else torch.empty(0, self.model.config.projection_dim)


class DinoEmbedder(_Embedder):
    """Unit-norm DINO embeddings: the CLS token of the last hidden state (ViT / Dinov2 models)."""

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = DEFAULT_DINO, *, device=None, dtype=None,
                        batch_size: int = DEFAULT_BATCH_SIZE, allow_pickle: bool = False) -> "DinoEmbedder":
        """Load a DINO ViT (`ViTModel`, `Dinov2Model`, ...) and its image processor."""
        from transformers import AutoImageProcessor, AutoModel

        model, processor = load_pretrained("DINO model", "--dino_model", name_or_path,
                                           [(AutoModel.from_pretrained, True), (AutoImageProcessor.from_pretrained, False)],
                                           allow_pickle=allow_pickle)
        return cls(model, processor, device=device, dtype=dtype, batch_size=batch_size)

    @torch.no_grad()
    def embed_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """(n, d) float32 unit vectors, one per image."""
        # the CLS token of the last hidden state (b, tokens, d)
        out = self._embed_images(images, "DINO images",
                                 lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0])
        return out if out is not None else torch.empty(0, self.model.config.hidden_size)


# ------------------------------------------------------------------------------------ embedding metrics


def _check_2d(name: str, x: torch.Tensor) -> None:
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (n, d) tensor of embeddings, got shape {tuple(x.shape)}")


def reference_similarity(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(n,) mean cosine of each generated embedding to the reference embeddings (CLIP-I, DINO)."""
    _check_2d("generated", generated)
    _check_2d("references", references)
    return pairwise_cosine_similarity(generated.float(), references.float()).mean(dim=1)


def text_similarity(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """(n,) cosine of image i with text i (CLIP-T)."""
    _check_2d("images", images)
    _check_2d("texts", texts)
    if images.shape != texts.shape:
        raise ValueError(f"images and texts must pair up: shapes {tuple(images.shape)} and {tuple(texts.shape)}")
    a, b = _normalize(images), _normalize(texts)
    return (a * b).sum(dim=-1)


def pairwise_diversity(embeddings: torch.Tensor) -> float:
    """Mean cosine distance 1 - cos over all unordered pairs (e.g. the seeds of one prompt); 0 for one image."""
    _check_2d("embeddings", embeddings)
    n = embeddings.shape[0]
    if n < 2:
        return 0.0
    cos = pairwise_cosine_similarity(embeddings.float())  # (n, n), zero diagonal
    return float((1.0 - cos)[torch.triu_indices(n, n, offset=1).unbind()].mean())


def clip_i(clip: ClipEmbedder, images: Sequence[ImageLike], references: Sequence[ImageLike]) -> torch.Tensor:
    """(n,) CLIP-I of each image against the reference photos."""
    return reference_similarity(clip.embed_images(images), clip.embed_images(references))


def clip_t(clip: ClipEmbedder, images: Sequence[ImageLike], prompts: Sequence[str]) -> torch.Tensor:
    """(n,) CLIP-T of each image against its prompt (give prompts with the class word, not the token)."""
    return text_similarity(clip.embed_images(images), clip.embed_texts(prompts))


def dino(dino_model: DinoEmbedder, images: Sequence[ImageLike], references: Sequence[ImageLike]) -> torch.Tensor:
    """(n,) DINO score of each image against the reference photos."""
    return reference_similarity(dino_model.embed_images(images), dino_model.embed_images(references))


# ------------------------------------------------------------------------------------ layout


def mask_center(mask) -> tuple[float, float] | None:
    """Normalised (cx, cy) of the mask's bounding box (as the toy world measures it); None if empty."""
    if isinstance(mask, PIL.Image.Image):
        mask = np.asarray(mask.convert("L")) > 127
    mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    mask = mask.astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"mask_center: mask must be (H, W), got shape {mask.shape}")
    if not mask.any():
        return None
    cx, cy, _ = center_and_scale(mask)
    return cx, cy


def box_center(box: Sequence[float], size: tuple[int, int]) -> tuple[float, float]:
    """Normalised (cx, cy) of a pixel box (x0, y0, x1, y1) in an image of `size` = (width, height)."""
    if len(box) != 4:
        raise ValueError(f"box_center: box must be (x0, y0, x1, y1), got {box}")
    x0, y0, x1, y1 = (float(v) for v in box)
    width, height = size
    if not (x1 > x0 and y1 > y0) or width <= 0 or height <= 0:
        raise ValueError(f"box_center: need x1 > x0, y1 > y0 and a positive size, got box {box} in {size}")
    return (x0 + x1) / 2 / width, (y0 + y1) / 2 / height


def layout_diversity(centers_by_prompt: dict[str, list[tuple[float, float]]]) -> float:
    """sigma^2_avg: over prompts, the mean of Var(cx) + Var(cy) over seeds (population variance)."""
    return _layout_diversity(centers_by_prompt)


__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_DINO",
    "ClipEmbedder",
    "DinoEmbedder",
    "MetricModelError",
    "box_center",
    "clip_i",
    "clip_t",
    "dino",
    "layout_diversity",
    "load_pretrained",
    "mask_center",
    "pairwise_diversity",
    "reference_similarity",
    "text_similarity",
]
