"""Stage 2 (DESIGN §5.2): the target X leaves the layout trajectory at s0 and is denoised with the multi-source
attention swap from the reference R and adaptive mask blending.

Uncached, each step is one UNet call on [R, C_u, C_c, X_u, X_c]; with `context` (C's swap-layer outputs
recorded in stage 1) and R's memoized keys/values, it is a call on [X_u, X_c] alone. R is inverted at its own
aspect ratio (`References.from_concept(..., own_aspect=True)`); when that gives it another latent size than the
target's it cannot share the batch, and its keys/values come from their own pass (the memoized ones) uncached too:
[C_u, C_c, X_u, X_c] per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lrkit.attention import AttentionStore, processors
from lrkit.families import Conditioning
from lrkit.inference.layout import Layout
from lrkit.inference.options import GenerationOptions
from lrkit.inference.personalized import PersonalizedModel
from lrkit.inference.processors import AttentionCache, Correspondence, MultiSourceSwapProcessor, SwapState
from lrkit.inference.references import Reference, References, crop_to


def target_sam_masks(model: PersonalizedModel, layout: Layout, height: int, width: int) -> list[torch.Tensor | None]:
    """M_SAM of each layout image, prompted with the box of its subject's cross-attention (averaged over steps)."""
    if model.segmenter is None:
        return [None] * layout.latents.shape[0]
    return model.segment_latents(layout.latents, layout.maps.mean(0), height, width)


@dataclass
class Retouched:
    latents: torch.Tensor  # (B, C, h, w) X's final latents
    masks: torch.Tensor  # (B, h, w) its subject masks at the last step
    reference: Reference
    correspondence: Correspondence | None = None  # with `retouch.correspondence`


def retouch(model: PersonalizedModel, references: References, prompt: str, layout: Layout,
            options: GenerationOptions, height: int, width: int,
            context: AttentionCache | None = None) -> Retouched:
    """Stage 2 on `layout`'s trajectory."""
    from lrkit.masks import blend_target_mask

    pipe, steps, rt = model.pipe, options.num_inference_steps, options.retouch
    batch = layout.latents.shape[0]
    start, swap_from = options.retouch_step(), options.swap_step()
    pipe.scheduler.set_timesteps(steps, device=model.device)
    ref = references.from_concept(options, (height, width), own_aspect=True)
    star = layout.embeds or model.embed([prompt] * batch, model.phrase_in, options.negative_prompt, vanilla=False,
                                        height=height, width=width)
    sam = target_sam_masks(model, layout, height, width)
    grid = tuple(layout.latents.shape[-2:])
    layers = model.swap_layers(options)
    cached = context is not None
    ref_row = not cached and tuple(ref.trajectory.shape[-2:]) == grid  # R shares the batch only at X's size
    if cached:  # rows: X_u (B), X_c (B)
        x_c = batch
        pairs = [(b, None) for b in range(2 * batch)]
        embeds = star.guided()
        (ref_kv,) = references.keys_values([ref], layers, range(swap_from, steps))
        state = SwapState(ref=None, pairs=pairs, ref_mask=ref.mask, target_mask=torch.zeros(2 * batch, 1, 1),
                          ref_cache=ref_kv, context_cache=context)
    elif ref_row:  # rows: R, C_u (B), C_c (B), X_u (B), X_c (B)
        c_u, c_c, x_u, x_c = (1 + k * batch for k in range(4))
        pairs = [(x_u + b, c_u + b) for b in range(batch)] + [(x_c + b, c_c + b) for b in range(batch)]
        embeds = Conditioning.cat([ref.embeds, star.uncond, star.cond, star.uncond, star.cond])
        state = SwapState(ref=0, pairs=pairs, ref_mask=ref.mask, target_mask=torch.zeros(2 * batch, 1, 1))
    else:  # rows: C_u (B), C_c (B), X_u (B), X_c (B); R (another latent size) from its own pass
        c_u, c_c, x_u, x_c = (k * batch for k in range(4))
        pairs = [(x_u + b, c_u + b) for b in range(batch)] + [(x_c + b, c_c + b) for b in range(batch)]
        embeds = Conditioning.cat([star.uncond, star.cond, star.uncond, star.cond])
        (ref_kv,) = references.keys_values([ref], layers, range(swap_from, steps))
        state = SwapState(ref=None, pairs=pairs, ref_mask=ref.mask, target_mask=torch.zeros(2 * batch, 1, 1),
                          ref_cache=ref_kv)
    state.reference_weight, state.replace = rt.reference_weight, rt.foreground == "replace"
    if rt.correspondence:
        state.correspondence = Correspondence(rows=list(range(batch, 2 * batch)))  # the conditional pairs
    store = AttentionStore(rows=list(range(x_c, x_c + batch)), tokens=star.tokens, size=grid)
    chosen = model.store_processors(store, grid)
    if rt.swap:
        chosen.update({l.name: MultiSourceSwapProcessor(state, grid[0] / grid[1], l.name) for l in layers})
    extra = pipe.prepare_extra_step_kwargs(None, options.eta)
    x = layout.trajectory[start]
    attn = layout.maps[start] if start < steps else None
    masks = torch.zeros(batch, *grid, device=model.device)
    with processors(pipe.unet, chosen):
        for i in range(start, steps):
            t = pipe.scheduler.timesteps[i]
            masks = torch.stack([blend_target_mask(attn[b], sam[b], rt.sam_weight, rt.mask_threshold)
                                 for b in range(batch)]).to(model.device)
            state.set_target(torch.cat([masks, masks]))
            state.active = rt.swap and i >= swap_from
            state.step = i
            c = layout.trajectory[i]
            if cached:
                latent_in = torch.cat([x, x])
            elif ref_row:
                latent_in = torch.cat([ref.trajectory[i], c, c, x, x])
            else:
                latent_in = torch.cat([c, c, x, x])
            x = model.guided_step(x, t, embeds, options.guidance_scale, extra, latent_in).prev_sample
            attn = store.take()
    return Retouched(x, masks, ref, state.correspondence)


def position_colors(grid: tuple[int, int]) -> np.ndarray:
    """(h*w, 3) uint8: a colour per token of a grid coding its position (red grows to the right, green down)."""
    h, w = grid
    ys, xs = np.mgrid[0:h, 0:w]
    red = xs / max(w - 1, 1) * 255
    green = ys / max(h - 1, 1) * 255
    return np.stack([red, green, np.full_like(red, 96.0)], -1).reshape(-1, 3).astype(np.uint8)


def correspondence_view(reads_from: torch.Tensor, grid: tuple[int, int], reference: Image.Image,
                        reference_mask: torch.Tensor, image: Image.Image, mask: torch.Tensor,
                        ref_grid: tuple[int, int] | None = None) -> Image.Image:
    """[the reference as inverted, its subject coloured by position | the image, each subject pixel in the colour
    of the reference position it reads most from]: where the swap finds each part of the subject.

    `reads_from` (h*w,) reference token per target token on `grid`; `ref_grid` R's token grid at those layers
    (default: `grid` scaled by R's latent size over the target's, `reference_mask` (h_R, w_R) over `mask` (h, w));
    masks at any resolution of their image's aspect ratio. The reference panel has the image's height."""
    from lrkit.masks import resize_map

    size = image.size
    ref_h, ref_w = reference_mask.shape[-2:]
    if ref_grid is None:
        scale = (grid[0] / mask.shape[-2], grid[1] / mask.shape[-1])
        ref_grid = (max(1, round(ref_h * scale[0])), max(1, round(ref_w * scale[1])))
    ref_size = (max(1, round(size[1] * ref_w / ref_h)), size[1])

    def paint(base: Image.Image, codes: np.ndarray, on: tuple[int, int], where: torch.Tensor) -> Image.Image:
        coded = Image.fromarray(codes.reshape(*on, 3)).resize(base.size, Image.Resampling.NEAREST)
        keep = resize_map(where.float().cpu(), on) >= 0.5
        keep = Image.fromarray((keep.numpy() * 255).astype(np.uint8)).resize(base.size, Image.Resampling.NEAREST)
        grey = base.convert("L").convert("RGB")
        return Image.composite(Image.blend(grey, coded, 0.75), grey, keep)

    colors = position_colors(ref_grid)
    left = paint(crop_to(reference.convert("RGB"), *ref_size), colors, ref_grid, reference_mask)  # what was inverted
    right = paint(image.convert("RGB"), colors[reads_from.cpu().numpy()], grid, mask)
    sheet = Image.new("RGB", (ref_size[0] + 4 + size[0], size[1]), "white")
    sheet.paste(left, (0, 0))
    sheet.paste(right, (ref_size[0] + 4, 0))
    return sheet


__all__ = ["Retouched", "correspondence_view", "position_colors", "retouch", "target_sam_masks"]
