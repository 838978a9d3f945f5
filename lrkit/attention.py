"""Attention layers: naming, installation of processors, cross-attention capture, and the stock
self-attention pieces the inference processors (`lrkit.inference.processors`) build on.

Attention is changed ONLY through diffusers' attention-processor API: `unet.set_attn_processor` with
a dict keyed by layer name. Each layer's identity (down/mid/up, block, self/cross, resolution level)
is parsed from its name; per-call data lives in explicit state objects (e.g. `AttentionStore`)
handed to the processors, never in globals or call-order counters.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

_NAME = re.compile(
    r"^(?:(?P<place>down|up)_blocks\.(?P<block>\d+)|mid_block)\.attentions\.(?P<attention>\d+)"
    r"\.transformer_blocks\.(?P<transformer>\d+)\.(?P<kind>attn1|attn2)\.processor$"
)


class AttentionLayerError(ValueError):
    """The UNet's attention layers cannot be identified or selected."""


@dataclass(frozen=True)
class AttentionLayer:
    """Identity of one attention layer, parsed from its processor name.

    `level` counts resolutions from the highest (0 = full latent resolution); a layer at level L
    sees a (latent_h / 2**L) x (latent_w / 2**L) grid.
    """

    name: str
    place: str  # "down" | "mid" | "up"
    block: int
    attention: int
    transformer: int
    kind: str  # "self" | "cross"
    level: int

    @property
    def is_self(self) -> bool:
        return self.kind == "self"

    @property
    def is_cross(self) -> bool:
        return self.kind == "cross"


def parse_layer(name: str, num_levels: int) -> AttentionLayer:
    """Parse `up_blocks.2.attentions.1.transformer_blocks.0.attn1.processor` and friends."""
    match = _NAME.match(name)
    if match is None:
        raise AttentionLayerError(
            f"cannot identify attention layer {name!r}: lrkit expects UNet2DConditionModel names such as "
            "'up_blocks.2.attentions.1.transformer_blocks.0.attn1.processor'"
        )
    place = match["place"] or "mid"
    block = int(match["block"]) if match["block"] is not None else 0
    if place == "down":
        level = block
    elif place == "up":
        level = num_levels - 1 - block
    else:
        level = num_levels - 1
    return AttentionLayer(name=name, place=place, block=block, attention=int(match["attention"]),
                          transformer=int(match["transformer"]), kind="self" if match["kind"] == "attn1" else "cross",
                          level=level)


def attention_layers(unet) -> list[AttentionLayer]:
    """Every attention layer of `unet`, identified from its name."""
    num_levels = len(unet.config.block_out_channels)
    layers = [parse_layer(name, num_levels) for name in unet.attn_processors]
    if not layers:
        raise AttentionLayerError("this UNet has no attention layers")
    return layers


def decoder_self_layers(unet, num_levels: int = 2) -> list[AttentionLayer]:
    """Default swap layers: decoder self-attention at the `num_levels` highest resolutions with attention."""
    layers = [l for l in attention_layers(unet) if l.place == "up" and l.is_self]
    levels = sorted({l.level for l in layers})[:num_levels]
    return [l for l in layers if l.level in levels]


def cross_layers_at(unet, levels: list[int] | None = None) -> list[AttentionLayer]:
    """Cross-attention layers at `levels` (default: the second-lowest resolution that has them)."""
    layers = [l for l in attention_layers(unet) if l.is_cross]
    if levels is None:
        available = sorted({l.level for l in layers})
        levels = [available[-2] if len(available) > 1 else available[-1]]
    chosen = [l for l in layers if l.level in levels]
    if not chosen:
        raise AttentionLayerError(f"no cross-attention layer at levels {levels}")
    return chosen


@contextlib.contextmanager
def processors(unet, chosen: dict[str, Callable]) -> Iterator[None]:
    """Install `chosen` processors (by layer name) for the duration of the block, the default elsewhere.

    Raises if a name is unknown or nothing is chosen: a hook that silently attaches to zero layers is
    a bug. The previous processors are restored on exit.
    """
    previous = unet.attn_processors
    unknown = sorted(set(chosen) - set(previous))
    if unknown:
        raise AttentionLayerError(f"unknown attention layer(s) {unknown[:3]}")
    if not chosen:
        raise AttentionLayerError("no attention layer was selected to hook")
    default = AttnProcessor2_0()
    unet.set_attn_processor({name: chosen.get(name, default) for name in previous})
    try:
        yield
    finally:
        unet.set_attn_processor(previous)


# ---------------------------------------------------------------------------- math helpers


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # (batch, heads, tokens, head_dim)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (batch, tokens, channels)


def token_grid(n: int, aspect: float) -> tuple[int, int]:
    """(h, w) of a token grid with n tokens and the latent's aspect ratio h / w."""
    w = round(math.sqrt(n / aspect))
    h = n // max(w, 1)
    if h * w != n:
        raise AttentionLayerError(f"cannot lay out {n} tokens as a grid with aspect {aspect}")
    return h, w


def check_plain(attn) -> None:
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
        raise AttentionLayerError("lrkit's attention processors support transformer-block attention layers only")


# ---------------------------------------------------------------------------- capture


@dataclass
class AttentionStore:
    """Cross-attention probabilities of chosen token positions, averaged over heads and layers.

    `rows`: batch rows to record (e.g. the conditional rows); `tokens[r]`: token positions for row
    r. Each UNet call adds into `maps` (rows, h, w) at the store's `size`; `take()` returns the mean
    over the layers of that call and clears it.
    """

    rows: list[int]
    tokens: list[list[int]]
    size: tuple[int, int]
    enabled: bool = True
    _sum: torch.Tensor | None = None
    _count: int = 0

    def add(self, probs: torch.Tensor, grid: tuple[int, int]) -> None:
        """probs: (len(rows), heads, h*w, tokens) of one layer."""
        maps = torch.stack([probs[i, :, :, idx].sum(-1).mean(0) for i, idx in enumerate(self.tokens)])
        maps = maps.view(len(self.rows), 1, *grid).float()  # (rows, 1, h, w)
        if grid != self.size:
            maps = F.interpolate(maps, size=self.size, mode="bilinear", align_corners=False)
        maps = maps[:, 0]
        self._sum = maps if self._sum is None else self._sum + maps
        self._count += 1

    def take(self) -> torch.Tensor | None:
        if self._sum is None:
            return None
        out = self._sum / self._count
        self._sum, self._count = None, 0
        return out


class AttentionStoreProcessor:
    """Default attention (bitwise the stock `AttnProcessor2_0` output) plus recording into a store."""

    def __init__(self, store: AttentionStore, aspect: float = 1.0):
        self.store = store
        self.aspect = aspect
        self.default = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.default(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if self.store.enabled and encoder_hidden_states is not None:
            check_plain(attn)
            rows = self.store.rows
            q = split_heads(attn.to_q(hidden_states[rows]), attn.heads)
            context = encoder_hidden_states[rows]
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            k = split_heads(attn.to_k(context), attn.heads)
            probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (rows, heads, h*w, tokens)
            self.store.add(probs, token_grid(q.shape[2], self.aspect))
        return out


def self_attention(attn, hidden_states):
    """q, k, v (batch, heads, tokens, head_dim) and softmax(qk^T)v, as the stock processor computes them."""
    check_plain(attn)
    q = split_heads(attn.to_q(hidden_states), attn.heads)
    k = split_heads(attn.to_k(hidden_states), attn.heads)
    v = split_heads(attn.to_v(hidden_states), attn.heads)
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    return q, k, v, F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)


def project_out(attn, out, dtype):
    hidden = merge_heads(out).to(dtype)
    hidden = attn.to_out[0](hidden)
    hidden = attn.to_out[1](hidden)
    return hidden / attn.rescale_output_factor
