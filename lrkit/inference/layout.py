"""Stage 1 (DESIGN §5.1): a diverse layout — the vanilla model on y for the first λ·T steps, the personalized
model on y* after, classifier-free guidance in both — or a user's layout image, DDIM-inverted."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from lrkit.attention import AttentionStore, processors
from lrkit.inference.inversion import ddim_invert, encode_image
from lrkit.inference.options import GenerationOptions, InferenceError
from lrkit.inference.personalized import Embeds, PersonalizedModel
from lrkit.inference.processors import AttentionCache, RecordingProcessor


@dataclass
class Layout:
    latents: torch.Tensor  # (B, C, h, w) final
    trajectory: torch.Tensor  # (T+1, B, C, h, w): z_0 .. z_T
    maps: torch.Tensor | None  # (T, B, h, w) subject cross-attention per step (conditional rows), if recorded
    embeds: Embeds | None = None  # y* embeddings of the personalized phase, reused by stage 2


def draw_layout(model: PersonalizedModel, prompts: list[str], plain_prompts: list[str], generators,
                options: GenerationOptions, lam: float, height: int, width: int, vanilla_phrase: str,
                context: AttentionCache | None = None, record_maps: bool = False) -> Layout:
    """Step-blended denoising: ε(z, y) for i < λ·T, then ε*(z, y*). `record_maps` keeps the subject's
    cross-attention per step; `context` records the swap layers' outputs of the personalized steps (C for a
    cached stage 2)."""
    pipe, steps, batch = model.pipe, options.num_inference_steps, len(prompts)
    switch = options.step_index(lam)
    negative = options.negative_prompt
    size = dict(height=height, width=width)
    star = model.embed(prompts, model.phrase_in, negative, vanilla=False, **size) if switch < steps else None
    vanilla = model.embed(plain_prompts, lambda p: vanilla_phrase, negative, vanilla=True, **size) if switch > 0 else None
    dtype = (star or vanilla).cond.states.dtype
    pipe.scheduler.set_timesteps(steps, device=model.device)
    latents = pipe.prepare_latents(batch, pipe.unet.config.in_channels, height, width, dtype, model.device, generators)
    extra = pipe.prepare_extra_step_kwargs(generators, options.eta)
    grid = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    store = AttentionStore(rows=list(range(batch, 2 * batch)), tokens=[], size=grid)
    trajectory, maps = [latents], []

    with contextlib.ExitStack() as hooks:
        for unet in model.unets():
            chosen = model.store_processors(store, grid) if record_maps else {}
            if context is not None and unet is pipe.unet:  # record C for stage 2 (personalized steps only)
                chosen.update({l.name: RecordingProcessor(context, l.name, "out") for l in model.swap_layers(options)})
            if chosen:
                hooks.enter_context(processors(unet, chosen))
        for phase, embeds, indices in (("vanilla", vanilla, range(switch)), ("personalized", star, range(switch, steps))):
            if not indices:
                continue
            with model.vanilla() if phase == "vanilla" else contextlib.nullcontext():  # adapters switched once
                both = embeds.guided()
                store.tokens = embeds.tokens
                for i in indices:
                    if context is not None:
                        context.step = i
                    t = pipe.scheduler.timesteps[i]
                    latents = model.guided_step(latents, t, both, options.guidance_scale, extra).prev_sample
                    trajectory.append(latents)
                    if record_maps:
                        maps.append(store.take())
    return Layout(latents=latents, trajectory=torch.stack(trajectory), maps=torch.stack(maps) if record_maps else None,
                  embeds=star)


def given_layout(model: PersonalizedModel, image, prompt: str, batch: int, options: GenerationOptions,
                 height: int, width: int) -> Layout:
    """C from a user's layout image: DDIM-inverted with ε* and y*; the subject map from one pass at s0."""
    if height != width:
        raise InferenceError("layout-retouch needs a square image size (height == width)")
    if not isinstance(image, Image.Image):
        path = Path(image)
        if not path.is_file():
            raise InferenceError(f"layout image {str(path)!r} does not exist")
        image = Image.open(path)
    pipe, steps = model.pipe, options.num_inference_steps
    latents = encode_image(pipe, image.convert("RGB"), height).to(model.device)
    cond = model.encode(prompt, height)
    pipe.scheduler.set_timesteps(steps, device=model.device)
    trajectory = ddim_invert(pipe, latents, cond, steps).to(cond.states.dtype)  # (T+1, 1, C, h, w)
    grid = tuple(latents.shape[-2:])
    store = AttentionStore(rows=[0], tokens=[model.token_positions(prompt, model.phrase_in(prompt))], size=grid)
    start = min(options.retouch_step(), steps - 1)
    with processors(pipe.unet, model.store_processors(store, grid)):
        pipe.unet(trajectory[start], pipe.scheduler.timesteps[start], **cond.unet_kwargs())
    maps = store.take().expand(steps, batch, *grid)
    trajectory = trajectory.expand(-1, batch, -1, -1, -1)
    return Layout(latents=trajectory[-1], trajectory=trajectory, maps=maps)


__all__ = ["Layout", "draw_layout", "given_layout"]
