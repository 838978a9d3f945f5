"""Dual-reference personalization: a subject from a customization reference, a look from a style reference.

DESIGN §6.1, after DRP-Diff ("Taming Text Alignment for Personalization: Disentangling Foreground
Customization and Background Style"). Inputs: the concept with one of its reference photos (or any
photo of the subject, `custom_reference`) as the customization reference C, a style image S
(`style_reference`), and a prompt y* with the concept token.

The target X is denoised like the personalized pipeline (ε*, y*, classifier-free guidance). Both
references are DDIM-inverted with ε* (cached on disk like the retouch stage's reference) and their
self-attention keys/values are recorded at the dual layers (`swap_levels` / `swap_layers`, the
retouch stage's layers) for every step, once per reference. In those layers, with M the target's
subject mask and M_C, M_S the references' subject masks (`DualReferenceProcessor`):

- customize, steps 1 <= i < s: the target's foreground queries attend to [K_C ⊙ M_C ; K_X] (the
  subject's texture); its background queries are reconstructed with keys built from the foreground
  textures of BOTH references, [K_C ⊙ M_C ; K_S ⊙ M_S ; K_X] ("customized texture-disentangled
  matrix"): no reference background is reachable, so the prompt decides the background;
- stylize, steps s <= i < T: the target's foreground queries attend to [K_S ⊙ (1 − M_S) ; K_X]
  with the matching values ("style-disentangled matrix"): the style image's background (its
  palette and texture) goes onto the subject, its content does not; background queries keep their
  own attention.

`custom_weight` / `style_weight` (default 1) multiply the softmax weight of every token of C / S
before normalisation (a log-weight bias): 1 is the plain concatenation above; a large style weight
rebuilds the subject's queries from the style image's background alone.

The switch step s comes from the references' information entropy (`entropy_switch`):

    H(I) = −Σ_k p_k log2 p_k      p_k: share of pixels with grey level k (PIL "L": L = (299 R + 587 G
                                  + 114 B) / 1000, 256 levels), of the square crop that is inverted
    s / T = clamp(H_C / (H_C + H_S), switch_min, switch_max)      (0.5 when H_C + H_S = 0)

i.e. ρ / (1 + ρ) for the entropy ratio ρ = H_C / H_S: a busier subject gets more customization
steps, a busier style more style steps; the clamp (default [0.2, 0.8]) keeps both phases. The
`switch` option overrides it. The target mask M at step i is the min-max-normalised
cross-attention of the subject token in X's conditional row at step i − 1, thresholded at `mask_threshold`
(`lrkit.masks.blend_target_mask` with sam_weight = 0); step 0 has no map yet and runs without control.
With a segmenter (SAM, `sam_checkpoint`), from the switch step on M is the retouch stage's blend
[w · M_SAM + (1 − w) · A >= mask_threshold] (w: `sam_weight`), M_SAM segmenting the image predicted at the switch step
(x̂0 of step s − 1, decoded) inside the box of its subject's cross-attention.

`style_shift` (lrkit's addition, 0 = off = the paper's method): in the style phase, after each step
from `style_shift_start` (default 0.9 of T; the last step always), the channel means of the subject's
latents (inside M of the switch step) move that fraction of the way to the style background's latent
means at the same noise level (`shift_to_style`).
Reference masks come from `lrkit.inference.references`: the concept's reference mask, and for other images the phrase's cross-attention box prompting SAM, or the thresholded map
(`AttentionSegmenter`) without SAM. A style image without `style_subject` has no foreground: all
of it counts as style.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from lrkit.attention import AttentionStore, processors
from lrkit.inference.inversion import center_square
from lrkit.inference.options import GenerationOptions, InferenceError
from lrkit.inference.personalized import PersonalizedModel
from lrkit.inference.processors import DualReferenceProcessor, DualReferenceState
from lrkit.inference.references import Reference, References, open_image

logger = logging.getLogger(__name__)

GREY_LEVELS = 256


# ---------------------------------------------------------------------------- the switch step


def image_entropy(image: PIL.Image.Image) -> float:
    """Shannon entropy in bits of the grey-level histogram: H = −Σ_k p_k log2 p_k over 256 PIL "L" levels."""
    grey = np.asarray(image.convert("L"))
    counts = np.bincount(grey.reshape(-1), minlength=GREY_LEVELS)
    p = counts[counts > 0] / grey.size
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no -0.0 for a constant image


def entropy_switch(custom_entropy: float, style_entropy: float, low: float = 0.2, high: float = 0.8) -> float:
    """Switch fraction s / T = clamp(H_C / (H_C + H_S), low, high); 0.5 (then clamped) when both are 0."""
    if custom_entropy < 0 or style_entropy < 0:
        raise ValueError(f"entropies must be >= 0, got {custom_entropy} and {style_entropy}")
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    total = custom_entropy + style_entropy
    share = custom_entropy / total if total > 0 else 0.5
    return min(max(share, low), high)


def switch_step(options: GenerationOptions, custom_image: PIL.Image.Image, style_image: PIL.Image.Image) -> int:
    """The first step of the style phase: `options.switch`, else the entropy rule, as a step index."""
    dual = options.dual_reference
    if dual.switch is not None:
        fraction = dual.switch
    else:
        h_c, h_s = image_entropy(custom_image), image_entropy(style_image)
        fraction = entropy_switch(h_c, h_s, dual.switch_min, dual.switch_max)
        logger.info("dual-reference: entropy H_C = %.3f bits, H_S = %.3f bits -> switch at %.3f of the steps",
                    h_c, h_s, fraction)
    return options.step_index(fraction)


def phase_at(step: int, switch: int, options: GenerationOptions) -> str:
    """The dual processors' phase at `step`: off at step 0 (no target mask yet), customize before `switch`,
    stylize from it on; a phase turned off in the options is "off"."""
    if step == 0:
        return "off"
    if step < switch:
        return "customize" if options.dual_reference.customize else "off"
    return "stylize" if options.dual_reference.stylize else "off"


# ---------------------------------------------------------------------------- references


def custom_reference(model: PersonalizedModel, references: References, options: GenerationOptions,
                     size: int) -> Reference:
    """C: `custom_reference` (inverted with `a photo of <token> <class>`), else the concept's reference photo
    `retouch.reference` (the retouch stage's R: same inversion cache and mask)."""
    dual = options.dual_reference
    if dual.custom_reference is not None:
        image = open_image(dual.custom_reference, "custom_reference")
        phrase = model.subject_phrase()
        return references.from_image(image, f"a photo of {phrase}", phrase, options, size)
    ref = references.from_concept(options, size)
    return Reference(center_square(ref.image, size), ref.trajectory, ref.embeds, (ref.mask >= 0.5).float(), ref.key)


def style_reference(references: References, options: GenerationOptions, size: int) -> Reference:
    """S: `style_reference`, inverted with `a photo of a <style_subject>` (or the empty prompt)."""
    dual = options.dual_reference
    if dual.style_reference is None:
        raise InferenceError("mode 'dual-reference' needs a style reference image: set style_reference "
                             "(CLI: --options.dual_reference.style_reference PATH; Python: style_reference='style.png')")
    image = open_image(dual.style_reference, "style_reference")
    subject = dual.style_subject
    prompt = f"a photo of a {subject}" if subject else ""
    return references.from_image(image, prompt, subject, options, size)


# ---------------------------------------------------------------------------- the loop


def shift_to_style(latents: torch.Tensor, target_masks: torch.Tensor, style_latents: torch.Tensor,
                   style_region: torch.Tensor, strength: float) -> torch.Tensor:
    """`style_shift`: inside each target mask, add strength * (μ_S − μ_X) per channel, where μ_X is the mean of
    that row's latents over its mask and μ_S the mean of `style_latents` (C, h, w) over `style_region` (h, w),
    both at the same noise level. Rows with an empty mask, or an empty style region, are left as they are.
    With strength 1 the subject's channel means become the style region's."""
    region = style_region > 0.5
    if not region.any():
        return latents
    mu_s = style_latents[:, region].mean(-1).to(latents.dtype)  # (C,)
    out = latents.clone()
    for b in range(latents.shape[0]):
        m = target_masks[b] > 0.5
        if m.any():
            mu_x = latents[b][:, m].mean(-1)
            out[b][:, m] += (strength * (mu_s - mu_x))[:, None]
    return out


@dataclass
class DualResult:
    latents: torch.Tensor  # (B, C, h, w) final
    masks: torch.Tensor  # (B, h, w) the target's subject mask at the last step
    custom: Reference
    style: Reference
    switch: int  # first step of the style phase
    shift_masks: torch.Tensor | None = None  # (B, h, w) the subject masks style_shift used (those of step `switch`)


@torch.no_grad()
def denoise_dual_reference(model: PersonalizedModel, references: References, prompt: str, generators,
                           options: GenerationOptions, height: int, width: int) -> DualResult:
    """The dual-reference loop (module docstring): personalized denoising of X with the dual processors."""
    from lrkit.masks import blend_target_mask

    if height != width:
        raise InferenceError(f"dual-reference needs a square image size (height == width), got {height}x{width}")
    pipe, steps, batch = model.pipe, options.num_inference_steps, len(generators)
    dual, rt = options.dual_reference, options.retouch
    pipe.scheduler.set_timesteps(steps, device=model.device)
    style = style_reference(references, options, height)  # first: a missing style image fails before any inversion
    custom = custom_reference(model, references, options, height)
    switch = switch_step(options, custom.image, style.image)
    layers = model.swap_layers(options)
    custom_kv, style_kv = references.keys_values([custom, style], layers, range(steps))

    star = model.embed([prompt] * batch, model.phrase_in, options.negative_prompt, vanilla=False, height=height,
                       width=width)
    embeds = star.guided()  # rows: X_u (B), X_c (B)
    latents = pipe.prepare_latents(batch, pipe.unet.config.in_channels, height, width, embeds.states.dtype,
                                   model.device, generators)
    extra = pipe.prepare_extra_step_kwargs(generators, options.eta)
    grid = tuple(latents.shape[-2:])
    store = AttentionStore(rows=list(range(batch, 2 * batch)), tokens=star.tokens, size=grid)
    state = DualReferenceState(custom=custom_kv, style=style_kv, custom_mask=custom.mask, style_mask=style.mask,
                               target_mask=torch.zeros(2 * batch, *grid, device=model.device),
                               custom_weight=dual.custom_weight, style_weight=dual.style_weight)
    chosen = model.store_processors(store, grid)
    chosen.update({l.name: DualReferenceProcessor(state, grid[0] / grid[1], l.name) for l in layers})
    masks = torch.zeros(batch, *grid, device=model.device)
    shift_masks = None  # style_shift: the subject masks of the first style step
    shift_from = min(options.step_index(dual.style_shift_start), steps - 1)  # style_shift's first step
    attn = None
    sam: list = [None] * batch  # the segmenter's masks of the predicted image at the switch step
    x0 = None
    with processors(pipe.unet, chosen):
        for i, t in enumerate(pipe.scheduler.timesteps):
            if attn is not None:  # M from the previous call's subject map (and, from the switch on, the segmenter's)
                if i == switch and model.segmenter is not None:  # M_SAM of the predicted x̂0, as in retouch
                    sam = model.segment_latents(x0, attn, height, width)
                masks = torch.stack([blend_target_mask(attn[b], sam[b], rt.sam_weight, rt.mask_threshold)
                                     for b in range(batch)]).to(model.device)
            state.set_target(torch.cat([masks, masks]))
            state.set_phase(phase_at(i, switch, options))
            state.step = i
            stepped = model.guided_step(latents, t, embeds, options.guidance_scale, extra)
            latents, x0 = stepped.prev_sample, stepped.pred_original_sample
            if state.phase == "stylize" and dual.style_shift > 0:
                # The subject region is fixed where the style phase starts: re-reading it every step lets the
                # recoloured pixels move the attention map and the shift wander over the background.
                shift_masks = masks if shift_masks is None else shift_masks
                if i >= shift_from:
                    latents = shift_to_style(latents, shift_masks, style.trajectory[i + 1][0], 1.0 - style.mask,
                                             dual.style_shift)
            attn = store.take()
    return DualResult(latents=latents, masks=masks, custom=custom, style=style, switch=switch, shift_masks=shift_masks)


__all__ = ["DualResult", "custom_reference", "denoise_dual_reference", "entropy_switch", "image_entropy", "phase_at",
           "shift_to_style", "style_reference", "switch_step"]
