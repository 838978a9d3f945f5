"""Fidelity of a toy-world model, scored with the exact scorers: scene, class and colour of generations, the
class kept through img2img, and two-object prompts."""

from __future__ import annotations

import numpy as np
import torch

from lrkit.toyworld.pretrain.models import TOY_RESOLUTION
from lrkit.toyworld.pretrain.pool import POOL_SEED_BASE
from lrkit.toyworld.render import sample
from lrkit.toyworld.scorers import classify_object, classify_scene, object_color, objects_found, segment_object
from lrkit.toyworld.world import CLASSES, SCENE_NAMES, ObjectSpec, caption, compatible_colors


def fidelity_prompts(n: int, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """`n` (prompt, scene, class, colour): "a photo of a {colour} {class} {scene phrase}", from the
    world's caption builder, with a colour the world puts on that scene."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = SCENE_NAMES[int(rng.integers(len(SCENE_NAMES)))]
        colors = compatible_colors(scene)
        color = colors[int(rng.integers(len(colors)))]
        cls = CLASSES[int(rng.integers(len(CLASSES)))]
        out.append((caption(scene, [ObjectSpec(cls=cls, color=color)], 0), scene, cls, color))
    return out


@torch.no_grad()
def measure_fidelity(pipe, n: int = 56, seed: int = 0, steps: int = 25, guidance: float = 6.0,
                     batch: int = 8) -> dict:
    """Generate `n` prompt x seed samples and score scene, class and colour with the exact scorers."""
    items = fidelity_prompts(n, seed)
    hits = {"scene": 0, "class": 0, "color": 0}
    rows = []
    for start in range(0, n, batch):
        chunk = items[start:start + batch]
        gens = [torch.Generator().manual_seed(seed * 100_000 + start + i) for i in range(len(chunk))]
        images = pipe([c[0] for c in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      height=TOY_RESOLUTION, width=TOY_RESOLUTION, generator=gens).images
        for (prompt, scene, cls, color), image in zip(chunk, images):
            got_scene = classify_scene(image)[0]
            mask = segment_object(image, got_scene)
            got_cls = classify_object(image, mask)[0]
            got_color = object_color(image, mask) if mask.any() else None
            hits["scene"] += got_scene == scene
            hits["class"] += got_cls == cls
            hits["color"] += got_color == color
            rows.append({"prompt": prompt, "scene": got_scene, "class": got_cls, "color": got_color})
    return {"n": n, "steps": steps, "guidance": guidance,
            **{f"{k}_accuracy": v / n for k, v in hits.items()}, "samples": rows}


@torch.no_grad()
def measure_class_retention(pipe, strengths: tuple[float, ...] = (0.5, 0.7), n: int = 48, seed: int = 0,
                            steps: int = 25, guidance: float = 6.0, batch: int = 16) -> dict:
    """How long the model keeps an object's class while it denoises: rendered pictures, noised to each
    img2img `strength` and denoised with their own captions; the share whose object still scores as the
    rendered class. Where plain generation (strength 1) loses the class but strength 0.5 keeps it, the
    class is lost at the high timesteps, where the outline is laid out."""
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    samples = [sample(POOL_SEED_BASE * (seed + 1) - 1 - i) for i in range(n)]  # below every pool's seeds
    out = {"n": n, "steps": steps, "guidance": guidance}
    for strength in strengths:
        hits = 0
        for start in range(0, n, batch):
            chunk = samples[start:start + batch]
            images = img2img([s.caption for s in chunk], image=[s.image for s in chunk], strength=strength,
                             num_inference_steps=steps, guidance_scale=guidance,
                             generator=[torch.Generator().manual_seed(seed * 100_000 + start + i)
                                        for i in range(len(chunk))]).images
            for s, image in zip(chunk, images):
                mask = segment_object(image, s.scene.name)
                hits += bool(mask.any()) and classify_object(image, mask)[0] == s.objects[0].cls
        out[f"class_kept_{strength:g}"] = hits / n
    return out


def two_object_prompts(n: int, seed: int = 0) -> list[tuple[str, list[tuple[str, str]]]]:
    """`n` (prompt, [(class, colour), (class, colour)]): two objects of distinct classes and colours that the
    scene allows, "a photo of a red ball and a blue cube on the beach"."""
    rng = np.random.default_rng([seed, 2])
    out = []
    for _ in range(n):
        scene = SCENE_NAMES[int(rng.integers(len(SCENE_NAMES)))]
        colours = [str(c) for c in rng.choice(compatible_colors(scene), 2, replace=False)]
        classes = [str(c) for c in rng.choice(CLASSES, 2, replace=False)]
        wanted = list(zip(classes, colours))
        out.append((caption(scene, [ObjectSpec(cls=k, color=c) for k, c in wanted], 0), wanted))
    return out


@torch.no_grad()
def measure_two_object_fidelity(pipe, n: int = 24, seed: int = 0, steps: int = 25, guidance: float = 6.0) -> dict:
    """Generate `n` two-object prompts (`two_object_prompts`), one seed each, and count how often the picture holds
    two object regions, both prompted colours, both prompted classes (`lrkit.toyworld.scorers.objects_found`)."""
    hits = {"regions": 0, "colours": 0, "classes": 0}
    for k, (prompt, wanted) in enumerate(two_object_prompts(n, seed)):
        image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=TOY_RESOLUTION,
                     width=TOY_RESOLUTION, generator=torch.Generator().manual_seed(seed * 100_000 + k)).images[0]
        for key, ok in objects_found(image, wanted).items():
            hits[key] += ok
    return {"n": n, "steps": steps, "guidance": guidance, **{f"two_{k}": v / n for k, v in hits.items()}}


__all__ = [
    "fidelity_prompts",
    "measure_class_retention",
    "measure_fidelity",
    "measure_two_object_fidelity",
    "two_object_prompts",
]
