"""Inference-only attention processors: the retouch stage's multi-source swap, recording of keys/values and
outputs for the caches, and the dual-reference processors (DESIGN §5.2, §6.1).

They change attention only through diffusers' processor API (`lrkit.attention.processors`); per-call data
lives in the state objects handed to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lrkit.attention import AttentionLayerError, project_out, self_attention, token_grid

# ---------------------------------------------------------------------------- the swap


@dataclass
class SwapState:
    """What the swap processors read during one UNet call of the retouch stage.

    Batch layout: `ref` is the reference row R; `pairs` are (target row X, context row C) for each
    guidance branch. `ref_mask` (h_R, w_R) and `target_mask` (pairs, h, w) are float maps at latent
    resolution, resized to each layer; `active` switches the swap on for this call. With the caches
    set, R's keys/values and C's outputs come from earlier passes (recorded by `RecordingProcessor`)
    and the batch holds only the target rows. R may have another size and aspect ratio than the target (its
    keys/values then always come from `ref_cache`): `ref_mask` is at R's latent grid, and R's token grid at a
    layer is told from its token count and that grid's aspect ratio (`reference_grid`).
    """

    ref: int | None
    pairs: list[tuple[int, int | None]]
    ref_mask: torch.Tensor  # (h, w)
    target_mask: torch.Tensor  # (pairs, h, w)
    active: bool = False
    step: int = 0
    ref_cache: "AttentionCache | None" = None  # R's (k, v) per (layer, step) instead of a batch row
    context_cache: "AttentionCache | None" = None  # C's attention output per (layer, step) instead of rows
    reference_weight: float = 1.0  # multiplies the softmax weight of R's kept tokens (1: plain concatenation)
    replace: bool = False  # the target's subject queries read R's kept tokens only, not their own
    correspondence: "Correspondence | None" = None  # records where the target's queries read R from
    _cache: dict = field(default_factory=dict)

    def set_target(self, mask: torch.Tensor) -> None:
        self.target_mask = mask
        self._cache = {}

    def reference_grid(self, n_ref: int) -> tuple[int, int]:
        """R's token grid (h, w) at a layer where it has `n_ref` tokens: the aspect ratio of `ref_mask`'s grid."""
        return token_grid(n_ref, self.ref_mask.shape[-2] / self.ref_mask.shape[-1])

    def masks_at(self, grid: tuple[int, int], ref_grid: tuple[int, int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference-key mask (h_R*w_R,) bool at R's token grid `ref_grid` (default: the layer's `grid`), target
        blend masks (pairs, h*w, 1) float at the layer's `grid`)."""
        ref_grid = grid if ref_grid is None else ref_grid
        if (grid, ref_grid) not in self._cache:
            ref = F.interpolate(self.ref_mask[None, None].float(), size=ref_grid, mode="nearest")[0, 0]
            tgt = F.interpolate(self.target_mask[:, None].float(), size=grid, mode="nearest")[:, 0]
            self._cache[(grid, ref_grid)] = (ref.reshape(-1) > 0.5, tgt.reshape(len(self.pairs), -1, 1))
        return self._cache[(grid, ref_grid)]


@dataclass
class Correspondence:
    """Where the target's queries read the reference from: at the swap layers of the finest token grid, the
    attention of each target row's queries over R's tokens (renormalised over R, averaged over heads), summed
    over layers and steps. `rows` are the positions among the swap pairs to record (the conditional ones)."""

    rows: list[int]
    grid: tuple[int, int] | None = None
    ref_grid: tuple[int, int] | None = None  # R's token grid at those layers (the target's, unless R's size differs)
    weights: torch.Tensor | None = None  # (rows, n, n_ref) summed
    calls: int = 0

    def add(self, q, k_ref, ref_keep, grid: tuple[int, int], ref_grid: tuple[int, int] | None = None) -> None:
        """Add one swap layer's call: `q` (pairs, heads, n, d) the target's queries on `grid`, `k_ref`
        (heads, n_ref, d) and `ref_keep` (n_ref,) R's keys and subject on `ref_grid` (default: `grid`).
        Renormalised over R's subject, the reference weight and the target's own tokens cancel out, so only q·k_R
        matters."""
        if not bool(ref_keep.any()) or (self.grid is not None and grid[0] * grid[1] < self.grid[0] * self.grid[1]):
            return
        if self.grid is None or grid != self.grid:  # a finer grid than the one so far: start over there
            self.grid, self.weights, self.calls = grid, None, 0
            self.ref_grid = grid if ref_grid is None else ref_grid
        logits = (q[self.rows] @ k_ref.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (rows, heads, n, n_ref)
        on_ref = logits.masked_fill(~ref_keep.to(q.device), float("-inf")).softmax(-1).mean(1)  # (rows, n, n_ref)
        self.weights = on_ref if self.weights is None else self.weights + on_ref
        self.calls += 1

    def reads_from(self) -> torch.Tensor | None:
        """(rows, n) the reference token (an index on `ref_grid`) each target token (on `grid`) reads most from."""
        return None if self.weights is None else self.weights.argmax(-1)


def reference_attention(q, k_ref, v_ref, k_x, v_x, ref_keep, *, weight: float = 1.0, replace: bool = False,
                        return_weights: bool = False):
    """fg = Attention(Q_X, [K_R ⊙ M_R ; K_X], [V_R ⊙ M_R ; V_X]): reference keys outside M_R excluded.

    `weight` multiplies the softmax weight of R's kept tokens (1: plain concatenation); `replace` drops the
    target's own tokens, fg = Attention(Q_X, K_R ⊙ M_R, V_R ⊙ M_R) (MasaCtrl-style), unless M_R keeps no token
    at this layer, when the concatenation stands. q, k_x, v_x: (pairs, heads, n, d); k_ref, v_ref:
    (heads, n_ref, d); ref_keep: (n_ref,) bool. Returns (pairs, heads, n, d), and the attention weights
    (pairs, heads, n, n_ref + n) if asked.
    """
    source = (k_ref, v_ref, ref_keep, weight)
    if replace and bool(ref_keep.any()):
        return multi_source_attention(q, [source], k_x[:, :, :0], v_x[:, :, :0], return_weights=return_weights)
    return multi_source_attention(q, [source], k_x, v_x, return_weights=return_weights)


class MultiSourceSwapProcessor:
    """Self-attention with the subject's appearance from the reference (DESIGN §5.2).

    For each target row X and its context row C::

        fg = Attention(Q_X, [K_R ⊙ M_R ; K_X], [V_R ⊙ M_R ; V_X])   reference keys outside M_R excluded
        bg = Attention(Q_C, K_C, V_C)                                the context's own output
        out_X = M ⊙ fg + (1 − M) ⊙ bg

    `SwapState.reference_weight` scales R's share of fg's softmax; `SwapState.replace` reads R alone.
    R's keys/values enter as a set of tokens: R may have another token grid than X (a reference of another
    aspect ratio, inverted at its own size), and `M_R` is taken on R's own grid.

    Every other row gets ordinary self-attention. With the swap inactive this is exactly the stock
    processor's computation.
    """

    def __init__(self, state: SwapState, aspect: float = 1.0, name: str = ""):
        self.state = state
        self.aspect = aspect
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None:
            raise AttentionLayerError("MultiSourceSwapProcessor belongs on self-attention layers (attn1)")
        q, k, v, out = self_attention(attn, hidden_states)
        state = self.state
        if state.active:
            grid = token_grid(q.shape[2], self.aspect)
            xs = [x for x, _ in state.pairs]
            if state.ref_cache is not None:
                k_ref, v_ref = state.ref_cache.get(self.name, state.step)
            else:
                k_ref, v_ref = k[state.ref], v[state.ref]
            ref_grid = state.reference_grid(k_ref.shape[-2])
            ref_keep, blend = state.masks_at(grid, ref_grid)  # (n_ref,), (pairs, n, 1)
            if state.context_cache is not None:
                (bg,) = state.context_cache.get(self.name, state.step)
            else:
                bg = out[[c for _, c in state.pairs]]
            fg = reference_attention(q[xs], k_ref, v_ref, k[xs], v[xs], ref_keep, weight=state.reference_weight,
                                     replace=state.replace)
            if state.correspondence is not None:
                state.correspondence.add(q[xs], k_ref, ref_keep, grid, ref_grid)
            m = blend.to(out.dtype).unsqueeze(1)  # (pairs, 1, n, 1)
            out = out.clone()
            out[xs] = m * fg + (1 - m) * bg.to(out.dtype)
        return project_out(attn, out, q.dtype)


@dataclass
class AttentionCache:
    """Tensors per (layer, step) recorded in one pass and read in a later one.

    `rows` are the batch rows to record; `steps` the steps to record (the loop sets `step`).
    """

    rows: list[int]
    steps: range
    step: int = 0
    data: dict = field(default_factory=dict)

    def get(self, layer: str, step: int) -> tuple[torch.Tensor, ...]:
        if (layer, step) not in self.data:
            raise KeyError(f"nothing recorded for layer {layer!r} at step {step}")
        return self.data[(layer, step)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for v in self.data.values() for t in v)


class RecordingProcessor:
    """Stock self-attention that records, for the cache's rows and steps, either the keys and values
    (`what="kv"`, the reference path) or the attention output before the projection (`what="out"`,
    the context path)."""

    def __init__(self, cache: AttentionCache, name: str, what: str):
        if what not in ("kv", "out"):
            raise ValueError(f"what must be 'kv' or 'out', got {what!r}")
        self.cache, self.name, self.what = cache, name, what

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None:
            raise AttentionLayerError("RecordingProcessor belongs on self-attention layers (attn1)")
        q, k, v, out = self_attention(attn, hidden_states)
        cache = self.cache
        if cache.step in cache.steps:
            rows = cache.rows
            if self.what == "kv":
                entry = (k[rows[0]].detach(), v[rows[0]].detach())
            else:
                entry = (out[rows].detach(),)
            cache.data[(self.name, cache.step)] = entry
        return project_out(attn, out, q.dtype)


# ---------------------------------------------------------------------------- dual reference (DESIGN §6.1)


def multi_source_attention(q, sources, k_x, v_x, *, return_weights: bool = False):
    """Attention(Q_X, [K_1 ⊙ M_1 ; … ; K_n ⊙ M_n ; K_X], [V_1 ⊙ M_1 ; … ; V_n ⊙ M_n ; V_X]).

    The target attends to its own tokens and to the tokens of each source (a reference image) that
    its mask keeps; a source token outside its mask gets a −∞ bias, i.e. exactly zero weight.
    q, k_x, v_x: (rows, heads, n, d); `sources`: (k, v, keep) or (k, v, keep, weight) with k, v
    (heads, n_s, d), keep (n_s,) bool and weight > 0 (default 1) multiplying the softmax weight of
    the source's kept tokens before normalisation (a log(weight) bias). Returns (rows, heads, n, d),
    and the weights (rows, heads, n, Σ n_s + n), columns in source order then the target's own, if asked.
    """
    rows = q.shape[0]
    keys, values, bias = [], [], []
    for k, v, keep, *weight in sources:
        keys.append(k.expand(rows, -1, -1, -1))
        values.append(v.expand(rows, -1, -1, -1))
        log_weight = math.log(weight[0]) if weight else 0.0
        bias.append(torch.full(keep.shape, log_weight, dtype=q.dtype, device=q.device)
                    .masked_fill(~keep.to(q.device), float("-inf")))
    keys, values = torch.cat(keys + [k_x], dim=2), torch.cat(values + [v_x], dim=2)  # (rows, heads, N, d)
    bias = torch.cat(bias + [torch.zeros(k_x.shape[2], dtype=q.dtype, device=q.device)])[None]  # (1, N)
    if not return_weights:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)
    weights = (q @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias).softmax(-1)  # (rows, heads, n, N)
    return weights @ values, weights


DUAL_PHASES = ("off", "customize", "stylize")


@dataclass
class DualReferenceState:
    """What the dual-reference processors read during one UNet call (DESIGN §6.1, DRP-Diff).

    Every batch row is a target row (X_u and X_c of each seed). The references' keys/values per
    (layer, step) were recorded beforehand by `RecordingProcessor(what="kv")`: `custom` for the
    customization reference, `style` for the style reference. Masks are float maps at latent
    resolution, resized to each layer's grid with nearest neighbour and read as `> 0.5`:
    `custom_mask`, `style_mask` (h, w) the references' subjects (foregrounds), `target_mask`
    (rows, h, w) the target's subject. `phase` is "off", "customize" (early) or "stylize" (late).
    `custom_weight` / `style_weight` multiply the softmax weight of every token of that reference
    (1: plain concatenation). With `record_weights`, each processor stores its attention weights in
    `weights[layer name]`.
    """

    custom: AttentionCache
    style: AttentionCache
    custom_mask: torch.Tensor  # (h, w)
    style_mask: torch.Tensor  # (h, w)
    target_mask: torch.Tensor  # (rows, h, w)
    phase: str = "off"
    step: int = 0
    custom_weight: float = 1.0
    style_weight: float = 1.0
    record_weights: bool = False
    weights: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict)

    def set_target(self, mask: torch.Tensor) -> None:
        self.target_mask = mask
        self._cache = {}

    def set_phase(self, phase: str) -> None:
        if phase not in DUAL_PHASES:
            raise ValueError(f"phase must be one of {list(DUAL_PHASES)}, got {phase!r}")
        self.phase = phase

    def masks_at(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(customization foreground (h*w,) bool, style foreground (h*w,) bool, target (rows, h*w, 1) float)."""
        if grid not in self._cache:
            def resized(m: torch.Tensor) -> torch.Tensor:  # (..., h, w) -> (..., h*w) at the layer's grid
                m = F.interpolate(m.reshape(-1, 1, *m.shape[-2:]).float(), size=grid, mode="nearest")
                return m.reshape(m.shape[0], -1)

            target = (resized(self.target_mask) > 0.5).float()
            self._cache[grid] = (resized(self.custom_mask)[0] > 0.5, resized(self.style_mask)[0] > 0.5,
                                 target.reshape(self.target_mask.shape[0], -1, 1))
        return self._cache[grid]


class DualReferenceProcessor:
    """Self-attention of the target with both references' features (DESIGN §6.1, DRP-Diff).

    With M the target's subject mask, M_C / M_S the customization / style references' subject masks:

    customize (early steps)::

        fg = Attention(Q_X, [K_C ⊙ M_C ; K_X], [V_C ⊙ M_C ; V_X])                  the subject's texture
        bg = Attention(Q_X, [K_C ⊙ M_C ; K_S ⊙ M_S ; K_X], [V_C ⊙ M_C ; V_S ⊙ M_S ; V_X])
                                     customized texture-disentangled matrix: only foreground textures
                                     of both references, so neither reference's background leaks in
        out_X = M ⊙ fg + (1 − M) ⊙ bg

    stylize (late steps)::

        fg = Attention(Q_X, [K_S ⊙ (1 − M_S) ; K_X], [V_S ⊙ (1 − M_S) ; V_X])
                                     style-disentangled matrix: the style reference's background only
        out_X = M ⊙ fg + (1 − M) ⊙ Attention(Q_X, K_X, V_X)

    Every token of C (of S) enters the softmax with its weight multiplied by the state's
    `custom_weight` (`style_weight`), 1 by default. With the phase "off" this is exactly the stock
    processor's computation.
    """

    def __init__(self, state: DualReferenceState, aspect: float = 1.0, name: str = ""):
        self.state = state
        self.aspect = aspect
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None:
            raise AttentionLayerError("DualReferenceProcessor belongs on self-attention layers (attn1)")
        q, k, v, out = self_attention(attn, hidden_states)
        state = self.state
        if state.phase != "off":
            custom_fg, style_fg, blend = state.masks_at(token_grid(q.shape[2], self.aspect))
            k_s, v_s = state.style.get(self.name, state.step)
            recorded = {}

            def attend(part: str, sources):
                if not state.record_weights:
                    return multi_source_attention(q, sources, k, v)
                result, recorded[part] = multi_source_attention(q, sources, k, v, return_weights=True)
                return result

            if state.phase == "customize":
                k_c, v_c = state.custom.get(self.name, state.step)
                subject = (k_c, v_c, custom_fg, state.custom_weight)
                fg = attend("fg", [subject])
                bg = attend("bg", [subject, (k_s, v_s, style_fg, state.style_weight)])
            else:
                fg = attend("fg", [(k_s, v_s, ~style_fg, state.style_weight)])
                bg = out
            if state.record_weights:
                state.weights[self.name] = recorded
            m = blend.to(out.dtype).unsqueeze(1)  # (rows, 1, n, 1)
            out = m * fg + (1 - m) * bg
        return project_out(attn, out, q.dtype)
