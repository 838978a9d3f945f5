"""Subject masks: map operations, mask files, and the segmenters of Layout-and-Retouch (DESIGN §5.2).

Shared by training and inference (it imports neither). The target mask of stage 2 is

    M = [w * M_SAM + (1 - w) * A_t >= mask_threshold] (w: sam_weight)

with `M_SAM` SAM's mask of the layout image (prompted with the box of the thresholded
cross-attention of the subject word, `box_from_attention`) and `A_t` the min-max-normalised
cross-attention map of the subject token (`blend_target_mask`). Without a SAM checkpoint
sam_weight = 0 and `load_segmenter` says so.

SAM checkpoints (`sam_vit_b_01ec64.pth`, ...) are pickles: `SamSegmenter.from_checkpoint` builds
the model from config and loads the state dict with `torch.load(..., weights_only=True)` (or
safetensors), never with segment-anything's own loader. segment-anything is imported lazily, so
this module works without it.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from lrkit.crf import CRFParams, crf_refine, dense_crf  # noqa: F401  (re-exported: lrkit.masks.dense_crf)
from lrkit.io import atomic_save_png

logger = logging.getLogger("lrkit.masks")

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive

SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
# Width of the ViT image encoder's patch embedding: tells the model type from a state dict.
_SAM_EMBED_DIMS = {"vit_b": 768, "vit_l": 1024, "vit_h": 1280}
_SAM_PATCH_KEY = "image_encoder.patch_embed.proj.weight"


# ------------------------------------------------------------------------------------ map operations


def minmax(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise each map over the last two dims to [0, 1]; a constant map gives zeros.

    (h, w) or (..., h, w). Integer/bool input is returned as float32, float input keeps its dtype.
    """
    if x.ndim < 2:
        raise ValueError(f"minmax: x must have at least 2 dims (..., h, w), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    lo = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > eps, (x - lo) / span.clamp_min(eps), torch.zeros_like(x))


def resize_map(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize float map(s) (h, w) or (..., h, w) to (..., H, W); `size` is (H, W).

    Shrinking both sides: area (box average; exact block means for integer factors). Otherwise
    bilinear (align_corners=False), antialiased where one side shrinks. Keeps dtype and device.
    """
    if m.ndim < 2:
        raise ValueError(f"resize_map: m must have at least 2 dims (..., h, w), got shape {tuple(m.shape)}")
    out_h, out_w = (int(s) for s in size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"resize_map: size must be two positive ints (H, W), got {size}")
    h, w = m.shape[-2:]
    if (h, w) == (out_h, out_w):
        return m.clone()
    dtype = m.dtype if m.is_floating_point() else torch.float32
    x = m.reshape(-1, 1, h, w).float()  # (maps, 1, h, w)
    if out_h <= h and out_w <= w:
        y = F.interpolate(x, size=(out_h, out_w), mode="area")
    else:
        shrinks = out_h < h or out_w < w
        y = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=shrinks)
    return y.reshape(*m.shape[:-2], out_h, out_w).to(dtype)


def otsu_threshold(x: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold (Otsu 1979, max between-class variance) of the values in `x`.

    The values are binned in `bins` equal bins over [min, max]; the returned threshold lies
    halfway between the largest value of the lower class and the smallest of the upper one, so
    the foreground is `x > t` (and `x >= t` selects the same values). A constant `x` returns
    its value (nothing is foreground).
    """
    if bins < 2:
        raise ValueError(f"otsu_threshold: bins must be >= 2, got {bins}")
    v = x.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if v.numel() == 0:
        raise ValueError("otsu_threshold: x is empty")
    if not torch.isfinite(v).all():
        raise ValueError("otsu_threshold: x contains NaN or inf")
    lo, hi = v.min(), v.max()
    if hi <= lo:
        return float(lo)
    idx = ((v - lo) / (hi - lo) * bins).floor().long().clamp_(0, bins - 1)  # bin of each value
    hist = torch.bincount(idx, minlength=bins).double()
    centers = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w0 = hist.cumsum(0)  # weight of the lower class for a split after bin k
    w1 = v.numel() - w0
    s0 = (hist * centers).cumsum(0)
    mu0 = s0 / w0.clamp_min(1)
    mu1 = (s0[-1] - s0) / w1.clamp_min(1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1.0  # not a split
    k = int(between.argmax())  # first maximum
    upper_of_lower = v[idx <= k].max()
    lower_of_upper = v[idx > k].min()
    return float((upper_of_lower + lower_of_upper) / 2)


def largest_component(mask: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """The largest 8-connected component of a (h, w) bool mask, as the same type (numpy array or torch
    tensor, on its device); ties go to the component that comes first in raster order."""
    fg = mask.detach().cpu().bool() if torch.is_tensor(mask) else torch.from_numpy(np.asarray(mask, dtype=bool))
    h, w = fg.shape
    n = h * w
    # Each foreground pixel holds the raster index of a pixel of its component (background: n). A round takes
    # the smallest index in the 3x3 neighbourhood, then the index that pixel holds (pointer jumping); at the
    # fixed point every component holds the index of its first pixel.
    label = torch.where(fg, torch.arange(n).view(h, w), n)
    while True:
        low = -F.max_pool2d(-label[None, None].double(), 3, stride=1, padding=1)[0, 0].long()
        low = torch.where(fg, low, n).view(-1)
        low = torch.where(fg.view(-1), low[low.clamp(max=n - 1)], n).view(h, w)
        if torch.equal(low, label):
            break
        label = low
    counts = torch.bincount(label[fg], minlength=n)
    out = (label == int(counts.argmax())) if fg.any() else torch.zeros_like(fg)  # argmax: the first of equals
    return out.to(mask.device) if torch.is_tensor(mask) else out.numpy()


def box_from_attention(
    attn: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float | None = None,
    pad: float = 0.05,
) -> Box:
    """Pixel box (x0, y0, x1, y1) of the subject in an image of `image_size` = (width, height).

    The (h, w) cross-attention map is min-max normalised and thresholded (`a > threshold`,
    default Otsu); the largest connected component's bounding box is scaled to the image,
    padded by `pad` * width / height on each side, and clamped. x1, y1 are exclusive. If
    nothing passes the threshold, the whole image.
    """
    if attn.ndim != 2:
        raise ValueError(f"box_from_attention: attn must be a (h, w) map, got shape {tuple(attn.shape)}")
    width, height = (int(s) for s in image_size)
    if width < 1 or height < 1:
        raise ValueError(f"box_from_attention: image_size must be (width, height) > 0, got {image_size}")
    if pad < 0:
        raise ValueError(f"box_from_attention: pad must be >= 0, got {pad}")
    a = minmax(attn.detach().float().cpu())
    t = otsu_threshold(a) if threshold is None else float(threshold)
    fg = a > t
    if not fg.any():
        return (0, 0, width, height)
    rows, cols = torch.nonzero(largest_component(fg), as_tuple=True)
    h, w = a.shape
    sx, sy = width / w, height / h
    x0 = int(np.floor(int(cols.min()) * sx - pad * width))
    y0 = int(np.floor(int(rows.min()) * sy - pad * height))
    x1 = int(np.ceil((int(cols.max()) + 1) * sx + pad * width))
    y1 = int(np.ceil((int(rows.max()) + 1) * sy + pad * height))
    return (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))


def blend_target_mask(
    attn_map: torch.Tensor, sam_mask: torch.Tensor | None, sam_weight: float, mask_threshold: float
) -> torch.Tensor:
    """Adaptive target mask M = [sam_weight * M_SAM + (1 - sam_weight) * A_t >= mask_threshold] (DESIGN §5.2).

    `attn_map` (h, w) is min-max normalised here; `sam_mask` (H, W) bool/float is resized to
    (h, w) (area average, so boundary cells are fractional); `sam_mask=None` means sam_weight = 0.
    Returns a float {0, 1} map (h, w) on `attn_map`'s device.
    """
    if not 0.0 <= sam_weight <= 1.0:
        raise ValueError(f"blend_target_mask: sam_weight must be in [0, 1], got {sam_weight}")
    if attn_map.ndim != 2:
        raise ValueError(f"blend_target_mask: attn_map must be (h, w), got shape {tuple(attn_map.shape)}")
    a = minmax(attn_map.float())
    if sam_mask is None:
        score = a
    else:
        if sam_mask.ndim != 2:
            raise ValueError(f"blend_target_mask: sam_mask must be (H, W), got shape {tuple(sam_mask.shape)}")
        s = resize_map(sam_mask.to(device=a.device, dtype=torch.float32), tuple(a.shape))
        score = sam_weight * s + (1.0 - sam_weight) * a
    dtype = attn_map.dtype if attn_map.is_floating_point() else torch.float32
    return (score >= mask_threshold).to(dtype)


# ------------------------------------------------------------------------------------ mask files


def save_mask_png(mask: torch.Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Write a (H, W) mask as an 8-bit greyscale PNG (0 / 255), atomically.

    Bool masks are written as they are; numeric masks are foreground where >= 0.5.
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"save_mask_png: mask must be (H, W), got shape {mask.shape}")
    fg = mask if mask.dtype == np.bool_ else mask >= 0.5
    return atomic_save_png(PIL.Image.fromarray(np.where(fg, 255, 0).astype(np.uint8), mode="L"), path)


# Modes whose conversion to 8-bit greyscale keeps a 0/255 mask a 0/255 mask.
_MASK_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")


def load_mask_png(path: str | os.PathLike) -> torch.Tensor:
    """Read a mask image (as written by `save_mask_png`) -> bool (H, W), foreground where > 127."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with PIL.Image.open(path) as img:
            img.load()
            if img.mode not in _MASK_MODES:
                raise ValueError(
                    f"mask file {path}: image mode {img.mode!r} is not an 8-bit mask "
                    f"(expected one of {', '.join(_MASK_MODES)}; save_mask_png writes 'L')"
                )
            grey = np.array(img.convert("L"))
    except (PIL.UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"mask file {path} is not a readable image: {e}") from e
    return torch.from_numpy(grey > 127)


# ------------------------------------------------------------------------------------ segmenters


@runtime_checkable
class Segmenter(Protocol):
    """Subject mask of an image, optionally restricted to / prompted by a pixel box."""

    def __call__(self, image: PIL.Image.Image, box: Box | None = None) -> torch.Tensor:
        """-> bool (H, W) at the image's size."""
        ...


def _segment_anything():
    try:
        import segment_anything
    except ImportError as e:
        raise ImportError(
            "SAM masks need the segment-anything package: pip install 'lrkit[sam]'"
        ) from e
    return segment_anything


def _check_model_type(model_type: str) -> str:
    if model_type not in SAM_MODEL_TYPES:
        raise ValueError(f"SAM model_type must be one of {', '.join(SAM_MODEL_TYPES)}, got {model_type!r}")
    return model_type


def _check_box(box, width: int, height: int) -> tuple[float, float, float, float]:
    if box is None:
        return (0.0, 0.0, float(width), float(height))
    if len(box) != 4:
        raise ValueError(f"box must be (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(c) for c in box)
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"box must be (x0, y0, x1, y1) with x0 < x1 and y0 < y1, got {box!r}")
    return (x0, y0, x1, y1)


def _model_type_from_name(path: Path) -> str | None:
    found = {f"vit_{m}" for m in re.findall(r"vit[_-]([blh])(?![a-z])", path.name.lower())}
    return found.pop() if len(found) == 1 else None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, read without unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"SAM checkpoint {path} is not a readable safetensors file: {e}") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long; keep its one informative line ("Unsupported global: ...").
        tail = str(e).split("WeightsUnpickler error:")[-1].strip()
        reason = tail.splitlines()[0].split(". ")[0] if tail else type(e).__name__
        raise ValueError(
            f"SAM checkpoint {path} was refused by torch.load(weights_only=True): it is not a plain "
            f"tensor checkpoint (it pickles other objects, or is no torch checkpoint at all: {reason}). "
            f"lrkit never unpickles arbitrary objects; use a plain state dict (the official "
            f"sam_vit_*.pth files are) or a .safetensors file."
        ) from e
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"SAM checkpoint {path} is not a readable torch checkpoint: {e}") from e
    if not (isinstance(state, dict) and state and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    )):
        raise ValueError(f"SAM checkpoint {path} is not a state dict (a dict of name -> tensor)")
    return state


def _state_dict_misfit(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """'' if `found` loads strictly into a model whose state dict is `expected`, else a short summary."""

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [
        f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({some(unexpected)})")
    if reshaped:
        parts.append(f"{len(reshaped)} shape mismatches, checkpoint vs model ({some(reshaped)})")
    return "; ".join(parts)


class SamSegmenter:
    """segment-anything's SamPredictor with a box prompt (Kirillov et al. 2023).

    The image embedding of the last image is kept, so several boxes on one image cost one
    encoder pass.
    """

    def __init__(self, sam_model, device=None):
        predictor_cls = _segment_anything().SamPredictor
        if device is not None:
            sam_model = sam_model.to(device)
        self.model = sam_model.eval()
        self.predictor = predictor_cls(self.model)
        self._image: np.ndarray | None = None  # the image the predictor holds the embedding of
        self.source: str | None = None  # where the weights came from (a cache key part of the masks it makes)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, model_type: str | None = None, device=None
    ) -> "SamSegmenter":
        """Build SAM from config and load a state dict (`.pth` with weights_only=True, or safetensors).

        `model_type` (vit_b / vit_l / vit_h) is read from the file name if not given, else from
        the width of the weights.
        """
        sam = _segment_anything()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SAM checkpoint not found: {path}")
        if model_type is not None:
            _check_model_type(model_type)
        state = _read_state_dict(path)
        patch = state.get(_SAM_PATCH_KEY)
        found = next((t for t, d in _SAM_EMBED_DIMS.items() if patch is not None and patch.shape[0] == d), None)
        model_type = model_type or _model_type_from_name(path) or found
        if model_type is None:
            raise ValueError(
                f"cannot tell the SAM model type of {path}: the name has no vit_b / vit_l / vit_h and "
                f"the weights have no recognisable {_SAM_PATCH_KEY}; pass model_type"
            )
        if found is not None and found != model_type:
            raise ValueError(
                f"SAM checkpoint {path} holds {found} weights (patch embedding width {patch.shape[0]}), "
                f"not {model_type}; pass model_type={found!r} or the right file"
            )
        model = sam.sam_model_registry[model_type](checkpoint=None)  # never SAM's own (pickle) loader
        misfit = _state_dict_misfit(model.state_dict(), state)
        if misfit:
            raise ValueError(
                f"SAM checkpoint {path} does not fit segment-anything's {model_type} model "
                f"(is it a segment-anything state dict of that type?): {misfit}"
            )
        model.load_state_dict(state, strict=True)
        segmenter = cls(model, device=device)
        segmenter.source = f"{model_type}:{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
        return segmenter

    @classmethod
    def from_config(cls, model_type: str = "vit_b", seed: int = 0, device=None) -> "SamSegmenter":
        """SAM with random weights from `seed` (tests, benchmarks); the global RNG is left as it was."""
        sam = _segment_anything()
        _check_model_type(model_type)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = sam.sam_model_registry[model_type](checkpoint=None)
        segmenter = cls(model, device=device)
        segmenter.source = f"{model_type}:random:{seed}"
        return segmenter

    def __call__(self, image: PIL.Image.Image, box: Box | None = None) -> torch.Tensor:
        """bool (H, W) mask of the object in `box` (default: the whole image)."""
        rgb = np.array(image.convert("RGB"))  # (H, W, 3) uint8
        height, width = rgb.shape[:2]
        xyxy = np.array(_check_box(box, width, height), dtype=np.float32)
        if self._image is None or self._image.shape != rgb.shape or not np.array_equal(self._image, rgb):
            self.predictor.set_image(rgb)
            self._image = rgb
        masks, _, _ = self.predictor.predict(box=xyxy, multimask_output=False)  # (1, H, W) bool
        return torch.from_numpy(np.ascontiguousarray(masks[0])).bool()


class AttentionSegmenter:
    """No SAM: the mask is the thresholded (Otsu) cross-attention map, upsampled to the image.

    The normalised map is resized (bilinear) to the image and compared with the Otsu threshold
    of the map itself; a box keeps only the mask inside it.
    """

    def __init__(self, attn_map: torch.Tensor):
        if attn_map.ndim != 2:
            raise ValueError(f"AttentionSegmenter: attn_map must be (h, w), got shape {tuple(attn_map.shape)}")
        self.attn_map = minmax(attn_map.detach().float().cpu())
        self.threshold = otsu_threshold(self.attn_map)

    def __call__(self, image: PIL.Image.Image, box: Box | None = None) -> torch.Tensor:
        width, height = image.size
        mask = resize_map(self.attn_map, (height, width)) > self.threshold
        if box is not None:
            x0, y0, x1, y1 = _check_box(box, width, height)
            inside = torch.zeros_like(mask)
            inside[max(int(np.floor(y0)), 0) : int(np.ceil(y1)), max(int(np.floor(x0)), 0) : int(np.ceil(x1))] = True
            mask &= inside
        return mask


def load_segmenter(sam_checkpoint: str | os.PathLike | None, device=None) -> SamSegmenter | None:
    """A SAM segmenter from a checkpoint, or None (with a warning) when no checkpoint is given."""
    if sam_checkpoint is None:
        import importlib.util

        installed = importlib.util.find_spec("segment_anything") is not None
        install = "" if installed else "install segment-anything (pip install 'lrkit[sam]') and "
        logger.warning(
            "No SAM checkpoint given: Layout-and-Retouch target masks come from cross-attention alone (sam_weight = 0). "
            f"For SAM masks, {install}pass sam_checkpoint=<path to sam_vit_b_01ec64.pth, sam_vit_l_*.pth or "
            "sam_vit_h_*.pth> (CLI: --sam_checkpoint)."
        )
        return None
    return SamSegmenter.from_checkpoint(sam_checkpoint, device=device)


# ------------------------------------------------------------------------------------ mask comparison
# (The dense CRF lives in lrkit/crf.py, pure torch, and is re-exported at the top of this module.)


def mask_iou(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Intersection over union of two bool masks of the same shape (two empty masks: 1.0)."""
    a, b = torch.as_tensor(a).bool(), torch.as_tensor(b).bool()
    if a.shape != b.shape:
        raise ValueError(f"mask_iou: masks must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union
