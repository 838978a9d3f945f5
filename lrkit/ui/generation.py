"""Generation for the web app: several modes of one prompt, side by side per seed, PNGs that carry their settings.

`Generator` keeps one `LayoutRetouchPipeline` (the base with the last concept applied) and reuses it while the
concept's files are unchanged. A run writes outputs/generate/<stamp>-<concept>/<mode>/p000_s<seed>.png (with the
`parameters` and `lrkit` text chunks of `lrkit.ui.pngmeta`) and, where the mode makes them, its `_layout`, `_mask`,
`_reference` and `_style` PNGs; the run folder is written under a temporary name and renamed when every image is
there, so a stopped or failed run leaves nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from lrkit.concept import Concept
from lrkit.inference.options import MODES, GenerationOptions, InferenceError
from lrkit.ui.pngmeta import SETTINGS_FORMAT, SettingsError, save_png
from lrkit.ui.workspace import UIError, Workspace, new_folder, stamp

logger = logging.getLogger(__name__)

INTERMEDIATES = ("layout", "mask", "reference", "style")
MAX_SEEDS = 16
STYLE_FIELDS = ("style_reference", "style_shift")
"""Fields of the dual-reference group the page sets (only for that mode)."""


@dataclass
class GeneratedImage:
    """One image of a run and its intermediates, as paths relative to the run folder."""

    mode: str
    seed: int
    image: str
    settings: dict
    intermediates: dict[str, str] = field(default_factory=dict)

    @property
    def caption(self) -> str:
        return f"seed {self.seed} · {self.mode}"


@dataclass
class GenerationRun:
    """A finished (or, while it runs, growing) run: its folder and images in page order (per seed, each mode)."""

    folder: Path
    modes: list[str]
    seeds: list[int]
    images: list[GeneratedImage] = field(default_factory=list)

    def ordered(self) -> list[GeneratedImage]:
        rank = {(m, s): (self.seeds.index(s), self.modes.index(m)) for m in self.modes for s in self.seeds}
        return sorted(self.images, key=lambda g: rank[(g.mode, g.seed)])

    def path(self, relative: str) -> Path:
        return self.folder / relative


def parse_seeds(text) -> list[int]:
    """The Generate tab's seeds: a list such as `0, 5, 7`, ranges such as `0-3` among them; each seed once, at most
    `MAX_SEEDS`."""
    seeds = []
    for part in str(text if text is not None else "").replace(" ", "").split(","):
        if not part:
            continue
        low, dash, high = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            seeds += list(range(int(low), int(high) + 1)) if dash else [int(part)]
        except ValueError:
            raise UIError(f"seeds {text!r}: give whole numbers such as 0, 5, 7 or a range such as 0-3") from None
    if not seeds:
        raise UIError("give at least one seed, e.g. 0 or 0, 1, 2")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise UIError(f"seeds {text!r} list {twice} more than once; give each seed once")
    if len(seeds) > MAX_SEEDS:
        raise UIError(f"{len(seeds)} seeds; at most {MAX_SEEDS} in one run")
    return seeds


def mode_options(modes: list[str], fields: dict, style: Path | None) -> dict[str, GenerationOptions]:
    """The `GenerationOptions` of each mode: the page's fields (by bare name), the style fields for dual-reference
    only. Every mode's options are checked before anything runs."""
    if not modes:
        raise UIError(f"choose at least one mode ({', '.join(MODES)})")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UIError(f"modes {unknown} are not among {list(MODES)}")
    if "dual-reference" in modes and style is None:
        raise UIError("mode dual-reference needs a style image: upload one under 'Style image'")
    common = {k: v for k, v in fields.items() if k not in STYLE_FIELDS}
    style_fields = {k: v for k, v in fields.items() if k in STYLE_FIELDS and k != "style_reference"}
    out = {}
    for mode in modes:
        extra = {"style_reference": str(style), **style_fields} if mode == "dual-reference" else {}
        out[mode] = GenerationOptions.of(mode=mode, **common, **extra)
    return out


class GenerationStopped(Exception):
    """The page asked a run to stop; its images were removed."""


class Generator:
    """Runs generations for the page on the workspace's base and device."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self._pipeline = None
        self._key: tuple | None = None

    def pipeline(self, concept: Concept):
        """The pipeline with `concept` applied (built again when another concept, or changed files, are asked for)."""
        from lrkit.inference import LayoutRetouchPipeline

        key = (str(concept.path), concept.weights_digest())
        if self._key != key:
            self.release()
            ws = self.workspace
            self._pipeline = LayoutRetouchPipeline.from_concept(ws.base, concept, device=ws.device,
                                                                cache_dir=ws.folder("cache"))
            self._key = key
        return self._pipeline

    def release(self) -> None:
        """Drop the pipeline (and give its device memory back), e.g. before a training run needs the device."""
        if self._pipeline is None:
            return
        self._pipeline, self._key = None, None
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run(self, concept_name: str, prompt: str, modes: list[str], seeds: list[int], fields: dict,
            style: Path | None = None, stop: Callable[[], bool] = lambda: False) -> Iterator[GenerationRun]:
        """Generate `prompt` ('{}' stands for the concept's phrase) for every mode and seed; yields the run after
        each mode (the last one complete, in its final folder). `stop()` is asked after each mode: when it says so,
        the run's folder is removed and `GenerationStopped` raised."""
        from lrkit.jobs import fill_prompts
        from lrkit.runtime import cpu_threads_for

        ws = self.workspace
        concept = ws.concept(concept_name)
        if not (prompt or "").strip():
            raise UIError(f"write a prompt, e.g. 'a photo of {concept.subject_phrase()} on the beach'")
        text = fill_prompts([prompt.strip()], concept, require_token=any(m != "vanilla" for m in modes))[0]
        options = mode_options(modes, fields, style)
        pipeline = self.pipeline(concept)
        target = ws.folder("outputs") / "generate" / f"{stamp()}-{concept.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        run = GenerationRun(target, list(modes), list(seeds))
        with new_folder(target) as tmp:
            building = dataclasses.replace(run, folder=tmp)
            for mode in modes:
                with cpu_threads_for(ws.base, pipeline.device.type):
                    generations = pipeline(text, list(seeds), options[mode])
                for gen in generations:
                    building.images.append(self._save(gen, tmp, mode, options[mode], concept))
                if stop():
                    raise GenerationStopped(f"stopped after {len(building.images)} of {len(modes) * len(seeds)} "
                                            "images; the run's images were removed")
                yield building
        run.images = building.images
        yield run

    def _save(self, gen, folder: Path, mode: str, options: GenerationOptions, concept: Concept) -> GeneratedImage:
        from lrkit.io import atomic_save_png
        from lrkit.records import plain
        from lrkit.version import __version__

        stem = f"{mode}/p000_s{gen.seed}"
        (folder / mode).mkdir(exist_ok=True)
        settings = {"format": SETTINGS_FORMAT, "prompt": gen.prompt, "seed": gen.seed, "base": self.workspace.base,
                    "concept": {"name": concept.name, "folder": concept.path.name, "method": concept.method,
                                "token": concept.token},
                    "size": list(gen.image.size), "options": plain(options), "lrkit_version": __version__}
        save_png(gen.image, folder / f"{stem}.png", settings)
        saved = GeneratedImage(mode, gen.seed, f"{stem}.png", settings)
        for kind in INTERMEDIATES:
            picture = getattr(gen, kind)
            if picture is not None:
                path = folder / f"{stem}_{kind}.png"
                atomic_save_png(picture.convert("RGB") if kind != "mask" else picture, path)
                saved.intermediates[kind] = path.relative_to(folder).as_posix()
        return saved


def form_values(settings: dict) -> dict:
    """What a PNG's settings (`lrkit.ui.pngmeta.read_settings`) put back into the Generate tab: prompt, seed, mode,
    the page's option fields, concept folder and style image path (those two when the settings name them)."""
    options = settings.get("options") or {}
    if settings.get("format") == SETTINGS_FORMAT:
        try:
            GenerationOptions(**options)
        except (TypeError, InferenceError) as err:
            raise SettingsError(f"the PNG's settings hold invalid generation options ({err})") from err
    layout, retouch = options.get("layout") or {}, options.get("retouch") or {}
    dual = options.get("dual_reference") or {}
    size = settings.get("size") or [options.get("width"), options.get("height")]
    values = {
        "prompt": settings["prompt"], "seed": settings.get("seed"), "mode": options.get("mode"),
        "num_inference_steps": options.get("num_inference_steps"), "guidance_scale": options.get("guidance_scale"),
        "negative_prompt": options.get("negative_prompt"), "size": size[0] if size and size[0] == size[-1] else None,
        "lam": layout.get("lam"), "vanilla_phrase": layout.get("vanilla_phrase"),
        "reference": retouch.get("reference"), "mask_threshold": retouch.get("mask_threshold"),
        "style_shift": dual.get("style_shift"), "style_reference": dual.get("style_reference"),
        "concept": (settings.get("concept") or {}).get("folder"),
    }
    return values


__all__ = ["GeneratedImage", "GenerationRun", "GenerationStopped", "Generator", "INTERMEDIATES", "MAX_SEEDS",
           "form_values", "mode_options", "parse_seeds"]
