"""Stage 2 (DESIGN §5.2): the target X leaves the layout trajectory at s0 and is denoised with the multi-source
attention swap from the reference R and adaptive mask blending.

Uncached, each step is one UNet call on [R, C_u, C_c, X_u, X_c]; with `context` (C's swap-layer outputs
recorded in stage 1) and R's memoized keys/values, it is a call on [X_u, X_c] alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lrkit.attention import AttentionStore, processors
from lrkit.families import Conditioning
from lrkit.inference.inversion import center_square
from lrkit.inference.layout import Layout
from lrkit.inference.options import GenerationOptions, InferenceError
from lrkit.inference.personalized import PersonalizedModel
from lrkit.inference.processors import AttentionCache, Correspondence, MultiSourceSwapProcessor, SwapState
from lrkit.inference.references import Reference, References


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

    if height != width:
        raise InferenceError("layout-retouch needs a square image size (height == width)")
    pipe, steps, rt = model.pipe, options.num_inference_steps, options.retouch
    batch = layout.latents.shape[0]
    start, swap_from = options.retouch_step(), options.swap_step()
    pipe.scheduler.set_timesteps(steps, device=model.device)
    ref = references.from_concept(options, height)
    star = layout.embeds or model.embed([prompt] * batch, model.phrase_in, options.negative_prompt, vanilla=False,
                                        height=height, width=width)
    sam = target_sam_masks(model, layout, height, width)
    grid = tuple(layout.latents.shape[-2:])
    layers = model.swap_layers(options)
    cached = context is not None
    if cached:  # rows: X_u (B), X_c (B)
        x_c = batch
        pairs = [(b, None) for b in range(2 * batch)]
        embeds = star.guided()
        (ref_kv,) = references.keys_values([ref], layers, range(swap_from, steps))
        state = SwapState(ref=None, pairs=pairs, ref_mask=ref.mask, target_mask=torch.zeros(2 * batch, 1, 1),
                          ref_cache=ref_kv, context_cache=context)
    else:  # rows: R, C_u (B), C_c (B), X_u (B), X_c (B)
        c_u, c_c, x_u, x_c = (1 + k * batch for k in range(4))
        pairs = [(x_u + b, c_u + b) for b in range(batch)] + [(x_c + b, c_c + b) for b in range(batch)]
        embeds = Conditioning.cat([ref.embeds, star.uncond, star.cond, star.uncond, star.cond])
        state = SwapState(ref=0, pairs=pairs, ref_mask=ref.mask, target_mask=torch.zeros(2 * batch, 1, 1))
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
            if cached:
                latent_in = torch.cat([x, x])
            else:
                c = layout.trajectory[i]
                latent_in = torch.cat([ref.trajectory[i], c, c, x, x])
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
                        reference_mask: torch.Tensor, image: Image.Image, mask: torch.Tensor) -> Image.Image:
    """[the reference, its subject coloured by position | the image, each subject pixel in the colour of the
    reference position it reads most from]: where the swap finds each part of the subject.

    `reads_from` (h*w,) reference token per target token on `grid`; masks (h, w) at any resolution."""
    from lrkit.masks import resize_map

    size = image.size
    colors = position_colors(grid)

    def paint(base: Image.Image, codes: np.ndarray, where: torch.Tensor) -> Image.Image:
        coded = Image.fromarray(codes.reshape(*grid, 3)).resize(size, Image.Resampling.NEAREST)
        keep = resize_map(where.float().cpu(), grid) >= 0.5
        keep = Image.fromarray((keep.numpy() * 255).astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
        grey = base.convert("L").convert("RGB")
        return Image.composite(Image.blend(grey, coded, 0.75), grey, keep)

    left = paint(center_square(reference.convert("RGB"), size[0]), colors, reference_mask)  # what was inverted
    right = paint(image.convert("RGB"), colors[reads_from.cpu().numpy()], mask)
    sheet = Image.new("RGB", (2 * size[0] + 4, size[1]), "white")
    sheet.paste(left, (0, 0))
    sheet.paste(right, (size[0] + 4, 0))
    return sheet


__all__ = ["Retouched", "correspondence_view", "position_colors", "retouch", "target_sam_masks"]
