"""Multi-concept tokens + latent masks by EM (DESIGN §6.3; Rahman et al., "Visual Concept-driven
Image Generation with Text-to-Image Diffusion Model").

Several concepts (subjects and backgrounds) are learned from images that each show some of them,
without user-drawn masks. The loop alternates

- **E-step** (`estimate_masks`): for each image and each of its tokens, the token's cross-attention
  map is averaged over `attention_timesteps` random timesteps of the noised image latents
  (`cross_attention_maps`; by default one caption per token); with `relative_maps` each map becomes
  the token's share of their summed attention; each map is min-max normalised, binarised (Otsu or a
  threshold) and refined with a dense CRF on the image colours (`masks_from_maps`: on a grid of side
  `crf_resolution`, at least the latent grid, then back to the latent grid); a pixel claimed by
  several tokens goes to the one with the strongest attention.
- **M-step** (`concept_em` method, `steps_per_round` optimizer steps): the tokens (optionally LoRA)
  learn with the diffusion loss inside the union of the sampled concepts' masks (with
  `loss_on_unclaimed`, also on the pixels no concept claims) plus a cross-attention loss pulling
  each token's map towards its mask.

until every mask's IoU with the previous round's reaches `convergence_iou`: then training stops, or
(`after_convergence: freeze`) the masks stay fixed while the tokens train on to `max_steps`.
`MaskEstimation` is the Lightning callback that runs the E-steps; the functions work
without Lightning. Below, `config` is a `TrainConfig` and `options` its `concept_em` options (`ConceptEMOptions`,
in `lrkit.training.methods.concept_em`, which imports this module).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F

from lrkit.attention import AttentionStore, AttentionStoreProcessor, cross_layers_at, processors
from lrkit.concept import token_file_name
from lrkit.crf import CRFParams, crf_refine
from lrkit.io import atomic_write_json
from lrkit.masks import mask_iou, minmax, otsu_threshold, resize_map, save_mask_png
from lrkit.photos import DataError, Photo
from lrkit.training.data import PhotoDataset, format_caption, sample_seed, validate_caption_template
from lrkit.training.precision import autocast_for
from lrkit.training.tokens import expanded_token_names

logger = logging.getLogger(__name__)

TOKEN_JOINER = " and "


# ---------------------------------------------------------------------------- data


def select_images(photos: list[Photo], config) -> list[Photo]:
    """The photos named in `concept_em.images`, in that order; a listed file that is missing is an error."""
    by_name = {p.name: p for p in photos}
    missing = [(i, im.file) for i, im in enumerate(config.concept_em.images) if im.file not in by_name]
    if missing:
        i, name = missing[0]
        raise DataError(f"concept_em.images[{i}].file {name!r} is not among the photos of data.photos "
                        f"({config.data.photos}); found {sorted(by_name)[:8]}")
    listed = {im.file for im in config.concept_em.images}
    unused = sorted(set(by_name) - listed)
    if unused:
        logger.warning("concept_em: %d photo(s) in %s are not listed in concept_em.images and are not used: %s",
                       len(unused), config.data.photos, ", ".join(unused[:5]))
    return [by_name[im.file] for im in config.concept_em.images]


class ConceptImageDataset(PhotoDataset):
    """Photos of several concepts: each sample names a random non-empty subset of its image's concepts.

    Item `i` adds `concepts` (indices into its image's concept list) and the caption: the image's
    template (its same-stem `.txt` caption, else `data.caption_template`) with `{token}` -> the chosen
    tokens joined by " and " (`a photo of <v1> and <v2> on the beach`), both drawn from a generator seeded
    by `(seed, i)` only (Break-a-Scene-style union sampling). A per-image template lets images of several
    scenes say where each was taken.
    """

    def __init__(self, photos: list[Photo], config):
        d = config.data
        super().__init__(photos, resolution=d.resolution, token=config.token, class_word="",
                         caption_template=d.caption_template, center_crop=True, random_flip=d.random_flip,
                         repeats=d.repeats, seed=config.seed)
        self.image_concepts = [list(im.concepts) for im in config.concept_em.images]
        for photo in self.photos:
            if photo.caption is not None:
                try:
                    validate_caption_template(photo.caption)
                except DataError as err:
                    raise DataError(f"{photo.name}: concept_em reads its caption as a template, and {err}") from None
        self.templates = [p.caption if p.caption is not None else d.caption_template for p in self.photos]

    def caption_for(self, tokens: list[str], photo_index: int) -> str:
        """The caption of image `photo_index` naming `tokens`."""
        return format_caption(self.templates[photo_index], token=TOKEN_JOINER.join(tokens), class_word="")

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        concepts = self.image_concepts[item["photo_index"]]
        rng = random.Random(sample_seed(self.seed, i) ^ 0x5EED)
        size = rng.randint(1, len(concepts))
        chosen = sorted(rng.sample(range(len(concepts)), size))
        return dict(item, concepts=chosen, caption=self.caption_for([concepts[k] for k in chosen], item["photo_index"]))

    def deterministic_variants(self, photo_index: int) -> list[dict]:
        concepts = self.image_concepts[photo_index]
        every = list(range(len(concepts)))
        return [dict(v, concepts=every, caption=self.caption_for(concepts, photo_index))
                for v in super().deterministic_variants(photo_index)]


# ---------------------------------------------------------------------------- E-step


def token_positions(ids: torch.Tensor, tokenizer, token: str) -> list[int]:
    """Positions in the encoded caption `ids` (1-D) of `token` and its extra vectors (`token_1`, ...)."""
    names = [n for n in expanded_token_names(token, 64) if n in tokenizer.added_tokens_encoder]
    wanted = {tokenizer.convert_tokens_to_ids(n) for n in names}
    positions = [j for j, t in enumerate(ids.tolist()) if t in wanted]
    if not positions:
        raise ValueError(f"token {token!r} does not occur in the encoded caption; was it added to the tokenizer?")
    return positions


def attention_layers_for(unet, options):
    return cross_layers_at(unet, options.attention_levels)


@torch.no_grad()
def cross_attention_maps(model, pixel_values: torch.Tensor, tokens: list[str], caption: str,
                         options, generator: torch.Generator, batch_size: int = 10) -> torch.Tensor:
    """Each token's cross-attention map (K, h, w) on one image, averaged over random noised timesteps.

    `pixel_values` (3, H, W) in [-1, 1]; the latent is the VAE posterior mean. Timesteps are drawn
    from [0, max_timestep_fraction * T) and noise from `generator`; maps are averaged over heads and
    the chosen cross-attention layers (resized to latent resolution), then over timesteps.
    """
    device, dtype = model.unet.device, model.unet.dtype
    px = pixel_values[None].to(model.vae.device, model.vae.dtype)
    latents = model.vae.encode(px).latent_dist.mean.float() * model.vae.config.scaling_factor  # (1, C, h, w)
    grid = tuple(latents.shape[-2:])
    ids = model.tokenize([caption])  # (1, 77)
    positions = [token_positions(ids[0], model.tokenizer, t) for t in tokens]
    cond = model.conditioning([caption])  # (1, 77, dim) states (SDXL: and pooled, time ids)
    num_train = model.noise_scheduler.config.num_train_timesteps
    top = max(1, int(options.max_timestep_fraction * num_train))
    steps = torch.randint(0, top, (options.attention_timesteps,), generator=generator)
    noise = torch.randn((options.attention_timesteps, *latents.shape[1:]), generator=generator)
    total = torch.zeros(len(tokens), *grid)
    layers = attention_layers_for(model.unet, options)
    for start in range(0, len(steps), batch_size):
        t = steps[start:start + batch_size].to(device)
        b = t.shape[0]
        noisy = model.noise_scheduler.add_noise(latents.expand(b, -1, -1, -1).to(device), noise[start:start + b].to(device), t)
        store = AttentionStore(rows=[r for r in range(b) for _ in tokens], tokens=positions * b, size=grid)
        with processors(model.unet, {l.name: AttentionStoreProcessor(store) for l in layers}):
            model.unet(noisy.to(dtype), t, **cond.expand(b).to(dtype).unet_kwargs())
        total += store.take().float().cpu().view(b, len(tokens), *grid).sum(0)  # (K, h, w)
    return total / len(steps)


def crf_params(options, factor: int = 1) -> CRFParams:
    """The CRF of `options` on a grid `factor` times finer than the latent grid: spatial ranges scaled by
    `factor` (they are given in latent pixels), kernel weights divided by `factor`² (each grid pixel is that
    share of a latent pixel), so a region's pull on a pixel does not depend on the grid."""
    area = float(factor * factor)
    return CRFParams(iterations=options.crf_iterations, appearance_weight=options.crf_appearance_weight / area,
                     smoothness_weight=options.crf_smoothness_weight / area,
                     theta_alpha=options.crf_theta_alpha * factor, theta_beta=options.crf_theta_beta,
                     theta_gamma=options.crf_theta_gamma * factor)


def crf_factor(latent: tuple[int, int], image: tuple[int, int], resolution: int) -> int:
    """Grid pixels per latent pixel of the CRF: `resolution` (at least the latent grid, at most the image)."""
    h, w = latent
    return max(1, min(resolution // max(h, w), image[0] // h, image[1] // w))


def masks_from_maps(maps: torch.Tensor, image: torch.Tensor, options) -> torch.Tensor:
    """Binary masks (K, h, w) from attention maps (K, h, w) and the image (3, H, W) in [0, 1], H >= h, W >= w.

    With `options.relative_maps` and several maps, each map is first divided by their sum (each
    token's share of the concepts' attention). Per map: min-max normalise, threshold (Otsu or
    `options.threshold`), and with `options.crf` refine with a dense CRF whose unary is `crf_confidence`
    inside the binarised map and 1 - `crf_confidence` outside, on a grid of side `options.crf_resolution`
    (`crf_factor`; the map upsampled bilinearly, the image area-resized, the result area-averaged back to
    (h, w) and kept where it covers at least half a latent pixel). A pixel in several masks keeps only the
    token with the highest normalised attention. A mask the CRF empties falls back to its binarised map.
    """
    if maps.ndim != 3 or image.ndim != 3 or image.shape[1] < maps.shape[1] or image.shape[2] < maps.shape[2]:
        raise ValueError(f"masks_from_maps: maps (K, h, w) and image (3, H, W) with H >= h, W >= w expected; got "
                         f"{tuple(maps.shape)} and {tuple(image.shape)}")
    maps = maps.float()
    grid = tuple(maps.shape[-2:])
    if options.crf:
        factor = crf_factor(grid, tuple(image.shape[-2:]), options.crf_resolution)
        fine = (grid[0] * factor, grid[1] * factor)
        colours, params = resize_map(image.float(), fine), crf_params(options, factor)
    if options.relative_maps and maps.shape[0] > 1:
        maps = maps / maps.sum(0, keepdim=True).clamp_min(1e-12)
    norm = minmax(maps)
    masks = []
    for a in norm:
        t = otsu_threshold(a) if options.threshold is None else options.threshold
        binary = a > t
        if options.crf:
            c = options.crf_confidence
            inside = resize_map(binary.float(), fine)  # 1 inside, 0 outside, a ramp across the outline
            refined = crf_refine(c * inside + (1.0 - c) * (1.0 - inside), colours, params)
            refined = resize_map(refined.float(), grid) >= 0.5
            binary = refined if refined.any() else binary
        masks.append(binary)
    masks = torch.stack(masks)  # (K, h, w)
    if masks.shape[0] > 1:
        winner = torch.where(masks, norm, torch.full_like(norm, -1.0)).argmax(0)  # (h, w)
        masks = masks & (winner[None] == torch.arange(masks.shape[0])[:, None, None])
    return masks


def image_at(pixel_values: torch.Tensor) -> torch.Tensor:
    """(3, H, W) pixels in [-1, 1] -> colours in [0, 1]."""
    return ((pixel_values.float() + 1.0) / 2.0).clamp(0, 1)


def image_seed(seed: int, image_index: int) -> int:
    """The E-step's noise seed of one image: the same every round, so rounds differ only by the tokens."""
    return sample_seed(seed, 1_000_000 + image_index)


@torch.no_grad()
def estimate_masks(model, dataset: ConceptImageDataset, config) -> list[torch.Tensor]:
    """E-step: per image, bool masks (K_i, h, w) of its concepts (in `concept_em.images` order)."""
    from tqdm.auto import tqdm

    options = config.concept_em
    out = []
    for i in tqdm(range(len(dataset.photos)), desc="E-step (masks)", leave=False, disable=len(dataset.photos) < 2):
        item = dataset.deterministic_variants(i)[0]  # center crop, not flipped
        tokens = dataset.image_concepts[i]
        if options.estep_captions == "joint":
            generator = torch.Generator().manual_seed(image_seed(config.seed, i))
            maps = cross_attention_maps(model, item["pixel_values"], tokens, item["caption"], options, generator)
        else:  # one caption per token, each with the same noise and timesteps
            maps = torch.cat([cross_attention_maps(model, item["pixel_values"], [t], dataset.caption_for([t], i), options,
                                                   torch.Generator().manual_seed(image_seed(config.seed, i)))
                              for t in tokens])
        out.append(masks_from_maps(maps, image_at(item["pixel_values"]), options))
    return out


def round_ious(previous: list[torch.Tensor], current: list[torch.Tensor]) -> list[list[float]]:
    """IoU of each (image, token) mask with the previous round's."""
    return [[mask_iou(p, c) for p, c in zip(prev, cur)] for prev, cur in zip(previous, current)]


# ---------------------------------------------------------------------------- state and callback


@dataclass
class EMState:
    """The masks of the current round and the history of rounds (what a checkpoint keeps)."""

    masks: list[torch.Tensor] | None = None  # per image: bool (K_i, h, w)
    last_step: int = -1  # optimizer step at which the masks were estimated
    rounds: list[dict] = field(default_factory=list)  # {"round", "step", "min_iou_change", "iou_change"}
    history: list[list[torch.Tensor]] = field(default_factory=list)  # masks of every round (not checkpointed)
    converged: bool = False

    def unclaimed(self, batch: dict) -> torch.Tensor:
        """(batch, 1, h, w) float: 1 where no concept of the sample's image has its mask (mirrored if flipped)."""
        out = []
        for index, flipped in zip(batch["photo_index"].tolist(), batch["flipped"].tolist()):
            m = (~self.masks[index].any(0, keepdim=True)).float()
            out.append(m.flip(-1) if flipped else m)
        return torch.stack(out)

    def batch_masks(self, batch: dict) -> list[torch.Tensor]:
        """Per sample: float masks (n_chosen, h, w) of its chosen concepts, mirrored for flipped samples."""
        if self.masks is None:
            raise RuntimeError("concept_em: no masks yet; the E-step runs at the start of training (MaskEstimation)")
        out = []
        for index, flipped, chosen in zip(batch["photo_index"].tolist(), batch["flipped"].tolist(), batch["concepts"]):
            m = self.masks[index][list(chosen)].float()
            out.append(m.flip(-1) if flipped else m)
        return out


class AfterBackward(L.Callback):
    """Calls `release()` once a step's backward is done, and when the batch ends or training stops (the
    `concept_em` loss's recording attention processors stay in place until then)."""

    def __init__(self, release: Callable[[], None]):
        self.release = release

    def on_after_backward(self, trainer, pl_module) -> None:
        self.release()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.release()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.release()


class MaskEstimation(L.Callback):
    """Runs the E-steps of `concept_em` around Lightning's loop.

    Round 0 before the first step; then after every `steps_per_round` optimizer steps (when
    `update_masks`), stopping the run once the masks converge; and once more at the end if the
    tokens changed since. Rounds are logged to OUTPUT_DIR/em/rounds.json with their masks as PNGs.
    """

    def __init__(self, config, state: EMState):
        self.config, self.state = config, state
        self.out_dir = Path(config.output_dir) / "em"

    @property
    def state_key(self) -> str:
        return "MaskEstimation"

    # -- the E-step ------------------------------------------------------------------------
    def run_estep(self, trainer, pl_module) -> None:
        state, step = self.state, trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        try:
            with autocast_for(pl_module.model, self.config.precision):
                masks = estimate_masks(pl_module.model, trainer.datamodule.instance, self.config)
        finally:
            pl_module.train(was_training)
        record = {"round": len(state.rounds), "step": step}
        if state.masks is not None:
            ious = round_ious(state.masks, masks)
            record["iou_change"] = ious
            record["min_iou_change"] = min(min(r) for r in ious)
            state.converged = record["min_iou_change"] >= self.config.concept_em.convergence_iou
        state.masks, state.last_step = masks, step
        state.rounds.append(record)
        state.history.append(masks)
        logger.info("concept_em round %d at step %d: mask IoU with the previous round %s", record["round"], step,
                    record.get("min_iou_change", "-"))
        if trainer.is_global_zero:
            self._write_round(record, masks)

    def _write_round(self, record: dict, masks: list[torch.Tensor]) -> None:
        folder = self.out_dir / f"round{record['round']:02d}"
        for i, image_masks in enumerate(masks):
            for token, m in zip(self.config.concept_em.images[i].concepts, image_masks):
                save_mask_png(m, folder / f"img{i:02d}-{token_file_name(token)}.png")
        atomic_write_json(self.out_dir / "rounds.json", self.state.rounds)

    # -- Lightning hooks -------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if self.state.masks is None:
            self.run_estep(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        options, step = self.config.concept_em, trainer.global_step
        if (not options.update_masks or self.state.converged or step % options.steps_per_round
                or step == self.state.last_step):
            return
        self.run_estep(trainer, pl_module)
        if self.state.converged and step < trainer.max_steps:
            if options.after_convergence == "stop":
                logger.info("concept_em: masks converged at step %d (IoU >= %s); stopping", step, options.convergence_iou)
                trainer.should_stop = True
            else:
                logger.info("concept_em: masks converged at step %d (IoU >= %s); they stay fixed while the tokens "
                            "train on to step %d", step, options.convergence_iou, trainer.max_steps)

    def on_train_end(self, trainer, pl_module) -> None:
        if (self.config.concept_em.update_masks and not self.state.converged
                and trainer.global_step != self.state.last_step):
            self.run_estep(trainer, pl_module)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        s = self.state
        return {"masks": list(s.masks) if s.masks is not None else [], "last_step": s.last_step,
                "rounds": [{k: v for k, v in r.items() if k != "iou_change"} for r in s.rounds],
                "converged": s.converged}

    def load_state_dict(self, state_dict: dict) -> None:
        s = self.state
        s.masks = [m.bool() for m in state_dict["masks"]] or None
        s.last_step = int(state_dict["last_step"])
        s.rounds = list(state_dict["rounds"])
        s.converged = bool(state_dict["converged"])


# ---------------------------------------------------------------------------- M-step loss


def attention_loss(maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MSE between max-normalised cross-attention maps (n, h, w) and masks (n, h, w) (Break-a-Scene, Eq. 3)."""
    norm = maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-8)
    return F.mse_loss(norm.float(), targets.float())


__all__ = [
    "AfterBackward",
    "ConceptImageDataset",
    "EMState",
    "MaskEstimation",
    "attention_loss",
    "cross_attention_maps",
    "estimate_masks",
    "masks_from_maps",
    "round_ious",
    "select_images",
    "token_positions",
]
