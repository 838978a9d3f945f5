"""`concept_em`: several concept tokens (optionally with LoRA) and their latent masks, learned by EM.

What trains: the new token rows (and LoRA when `concept_em.train_lora`). Extra loss terms: the
diffusion loss restricted to the union of the sampled concepts' masks (and, with
`loss_on_unclaimed`, the pixels no concept claims), plus the cross-attention loss. What is exported:
the tokens (learned_embeds.safetensors), the LoRA if any, and each token's mask in each reference
image (masks/). The E-steps run in `lrkit.training.em.MaskEstimation`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from lrkit.concept import LoraSpec, TokenSpec, token_file_name
from lrkit.crf import CRFParams
from lrkit.training.methods.lora import add_lora, lora_groups_beside_tokens, lora_spec_of, write_lora_files
from lrkit.training.methods.textual_inversion import TextualInversionMethod
from lrkit.training.options import check, check_finite


@dataclass
class EMConcept:
    """One concept of `concept_em`: a new token learned from the images that show it."""

    token: str = ""
    """The concept's new token in prompts, e.g. `<v1>` (must not be a word the tokenizer knows)."""
    initializer: str = ""
    """Word(s) whose mean embedding starts the token, e.g. `ball` or `red ball`."""
    class_word: str = ""
    """Optional class of the concept (`ball`, `beach`); written to the bundle for Layout-and-Retouch."""
    num_vectors: int = 1
    """Embedding vectors of the token."""


@dataclass
class EMImage:
    """One training image of `concept_em` and the concepts it shows."""

    file: str = ""
    """File name inside data.photos."""
    concepts: list[str] = field(default_factory=list)
    """Tokens of the concepts this image shows (each must be one of concept_em.concepts)."""


@dataclass
class ConceptEMOptions:
    """Multi-concept tokens + latent masks learned by EM (DESIGN §6.3)."""

    concepts: list[EMConcept] = field(default_factory=list)
    """The concepts: token, initializer word(s), optional class word."""
    images: list[EMImage] = field(default_factory=list)
    """Which concepts each image of data.photos shows; images not listed are not used."""
    steps_per_round: int = 50
    """Optimizer steps of one M-step; the masks are re-estimated (E-step) before each round."""
    convergence_iou: float = 0.95
    """The masks have converged when every mask's IoU with the previous round's is at least this (1.0: only
    once no mask changes)."""
    after_convergence: str = "stop"
    """Once the masks converge: `stop` training there (DESIGN §6.3), or `freeze` the masks and train the
    tokens on to max_steps (the masks of a few rounds can settle long before the tokens have learned)."""
    update_masks: bool = True
    """False: estimate the masks once, before training, and keep them (the non-EM baseline)."""
    attention_timesteps: int = 50
    """Random timesteps of noised latents whose cross-attention maps are averaged per E-step."""
    max_timestep_fraction: float = 1.0
    """E-step timesteps are drawn from [0, fraction * num_train_timesteps)."""
    attention_levels: Optional[list[int]] = None
    """Resolution levels of the cross-attention layers to read (0 = latent resolution). Default:
    the second-lowest level that has cross-attention (as Layout-and-Retouch)."""
    estep_captions: str = "separate"
    """E-step captions: `separate` (one caption per token: in a causal CLIP text encoder a later token
    also carries the earlier ones, so a joint caption biases its map) or `joint` (all the image's tokens)."""
    relative_maps: bool = False
    """For images with several concepts, binarise each token's share of the attention (its map divided by
    the sum over the image's tokens) instead of its raw map."""
    threshold: Optional[float] = None
    """Binarisation threshold of the min-max-normalised maps; None: Otsu per map."""
    crf: bool = True
    """Refine each binarised map with a dense CRF on the image colours (see `crf_resolution`)."""
    crf_resolution: int = 64
    """Side of the grid the CRF runs on: at least the latent grid, at most the picture, in whole latent-pixel
    steps. It is the same CRF (ranges in latent pixels) sampled finer; the mask is averaged back to the latent grid."""
    crf_confidence: float = 0.7
    """CRF unary: P(foreground) inside the binarised map (1 - this outside)."""
    crf_iterations: int = CRFParams.iterations
    """Mean-field iterations."""
    crf_appearance_weight: float = CRFParams.appearance_weight
    """Weight of the CRF's appearance (colour + position) kernel."""
    crf_smoothness_weight: float = CRFParams.smoothness_weight
    """Weight of the CRF's smoothness (position) kernel."""
    crf_theta_alpha: float = CRFParams.theta_alpha
    """Spatial range of the appearance kernel, in latent pixels."""
    crf_theta_beta: float = CRFParams.theta_beta
    """Colour range of the appearance kernel (colours in [0, 1])."""
    crf_theta_gamma: float = CRFParams.theta_gamma
    """Spatial range of the smoothness kernel, in latent pixels."""
    attention_loss_weight: float = 0.1
    """Weight of the cross-attention loss (MSE between each token's normalised map and its mask)."""
    masked_loss: bool = True
    """Diffusion loss only inside the union of the masks of the concepts in the caption."""
    loss_on_unclaimed: bool = True
    """With masked_loss, also count the pixels no concept of the image claims (the background the caption's
    other words describe), so only the pixels of the concepts left out of the caption are excluded."""
    train_lora: bool = False
    """Also train LoRA (options under `lora`) together with the tokens: on the UNet, and on the text encoder
    too when lora.train_text_encoder."""

    def __post_init__(self) -> None:
        check_finite(self, "concept_em")
        check(self.steps_per_round >= 1, f"concept_em.steps_per_round must be >= 1, got {self.steps_per_round}")
        check(0.0 <= self.convergence_iou <= 1.0,
               f"concept_em.convergence_iou must be in [0, 1], got {self.convergence_iou}")
        check(self.attention_timesteps >= 1,
               f"concept_em.attention_timesteps must be >= 1, got {self.attention_timesteps}")
        check(0.0 < self.max_timestep_fraction <= 1.0,
               f"concept_em.max_timestep_fraction must be in (0, 1], got {self.max_timestep_fraction}")
        check(self.after_convergence in ("stop", "freeze"),
               f"concept_em.after_convergence must be 'stop' or 'freeze', got {self.after_convergence!r}")
        check(self.estep_captions in ("separate", "joint"),
               f"concept_em.estep_captions must be 'separate' or 'joint', got {self.estep_captions!r}")
        check(self.threshold is None or 0.0 < self.threshold < 1.0,
               f"concept_em.threshold must be in (0, 1) or null (Otsu), got {self.threshold}")
        check(0.5 < self.crf_confidence < 1.0, f"concept_em.crf_confidence must be in (0.5, 1), got {self.crf_confidence}")
        check(self.crf_resolution >= 1, f"concept_em.crf_resolution must be >= 1, got {self.crf_resolution}")
        check(self.crf_iterations >= 0, f"concept_em.crf_iterations must be >= 0, got {self.crf_iterations}")
        for name in ("crf_theta_alpha", "crf_theta_beta", "crf_theta_gamma"):
            check(getattr(self, name) > 0, f"concept_em.{name} must be > 0, got {getattr(self, name)}")
        for name in ("crf_appearance_weight", "crf_smoothness_weight", "attention_loss_weight"):
            check(getattr(self, name) >= 0, f"concept_em.{name} must be >= 0, got {getattr(self, name)}")

    def validate(self) -> None:
        """Checks that need the whole concept list (run when method is concept_em)."""
        check(bool(self.concepts), "concept_em.concepts is empty; list the concepts, e.g. "
                                    "[{token: '<v1>', initializer: ball}, {token: '<v2>', initializer: vase}]")
        check(bool(self.images), "concept_em.images is empty; list each image with the concepts it shows, "
                                  "e.g. [{file: scene.png, concepts: ['<v1>', '<v2>']}]")
        tokens = [c.token for c in self.concepts]
        for i, c in enumerate(self.concepts):
            check(bool(c.token) and c.token == c.token.strip() and " " not in c.token,
                   f"concept_em.concepts[{i}].token must be one word without spaces, got {c.token!r}")
            check(bool(c.initializer.strip()),
                   f"concept_em.concepts[{i}] ({c.token}): initializer is empty; give a word such as 'ball'")
            check(c.num_vectors >= 1, f"concept_em.concepts[{i}].num_vectors must be >= 1, got {c.num_vectors}")
        for i, a in enumerate(tokens):
            for b in tokens[i + 1:]:
                check(a != b, f"concept_em.concepts: token {a!r} is listed twice; tokens must be unique")
                check(a not in b and b not in a,
                       f"concept_em.concepts: tokens {a!r} and {b!r} overlap (one contains the other), so "
                       f"prompts cannot tell them apart; rename one, e.g. '<v1>' and '<v2>'")
        used: set[str] = set()
        for i, image in enumerate(self.images):
            name = image.file or f"images[{i}]"
            check(bool(image.file), f"concept_em.images[{i}].file is empty; give a file name inside data.photos")
            check(bool(image.concepts), f"concept_em.images[{i}] ({name}) lists no concept; every image must "
                                         f"show at least one of {tokens} (or leave the image out)")
            unknown = [t for t in image.concepts if t not in tokens]
            check(not unknown, f"concept_em.images[{i}] ({name}) lists {unknown}, which are not in "
                                f"concept_em.concepts {tokens}")
            check(len(set(image.concepts)) == len(image.concepts),
                   f"concept_em.images[{i}] ({name}) lists a concept twice: {image.concepts}")
            used.update(image.concepts)
        files = [image.file for image in self.images]
        dupes = sorted({f for f in files if files.count(f) > 1})
        check(not dupes, f"concept_em.images lists {dupes} more than once; list each image once with all its concepts")
        unused = [t for t in tokens if t not in used]
        check(not unused, f"concept_em.concepts {unused} are shown by no image; add them to an image's "
                           f"concepts in concept_em.images or remove them")


class ConceptEMMethod(TextualInversionMethod):
    """Tokens from `concept_em.concepts`; LoRA (with `train_lora`) as in `lora` (options there)."""

    name = "concept_em"
    options_class = ConceptEMOptions
    default_lr = 1e-4
    default_token = "sks"

    def __init__(self, config):
        # lrkit.training.em (Lightning, attention capture) is imported when a concept_em run needs it
        from lrkit.training.em import EMState

        super().__init__(config)
        self.em = EMState()
        self._hooks = contextlib.ExitStack()  # the loss's attention processors, until its backward is done

    # the config -------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config) -> None:
        config.concept_em.validate()
        check(config.data.center_crop, "method concept_em needs data.center_crop=true (the masks are estimated "
                                       "on the center crop of each image)")

    @classmethod
    def option_groups(cls, config) -> list[str]:
        return ["concept_em", "lora"] if config.concept_em.train_lora else ["concept_em"]

    @classmethod
    def token_of(cls, config) -> str:
        """The first concept's token."""
        concepts = config.concept_em.concepts
        return concepts[0].token if concepts else super().token_of(config)

    def prompt_tokens(self) -> list[str]:
        return [c.token for c in self.options.concepts]

    def _token_entries(self) -> list[tuple[str, int, str]]:
        return [(c.token, c.num_vectors, c.initializer) for c in self.options.concepts]

    # the data -----------------------------------------------------------------------------
    def select_photos(self, photos):
        """The photos listed in `concept_em.images`, in that order (the masks follow it)."""
        from lrkit.training.em import select_images

        return select_images(photos, self.config)

    def instance_dataset(self, photos):
        from lrkit.training.em import ConceptImageDataset

        return ConceptImageDataset(photos, self.config)

    @property
    def _te(self) -> bool:
        """Text-encoder LoRA: with train_lora, when lora.train_text_encoder asks for it."""
        return self.options.train_lora and self.config.lora.train_text_encoder

    # what trains -------------------------------------------------------------------------
    def configure(self, model) -> None:
        if self.options.train_lora:
            # LoRA first: peft's add_adapter freezes every non-LoRA parameter, new token rows included.
            add_lora(model, self.config.lora, text_encoder=self._te)
        super().configure(model)

    def param_groups(self, model) -> list[dict]:
        if not self.options.train_lora:
            return [self.embedding_group(model)]
        return lora_groups_beside_tokens(model, self.embedding_group(model), self.config.optim.lr or self.default_lr,
                                         self.config.optim.weight_decay, text_encoder=self._te)

    def callbacks(self) -> list:
        from lrkit.training.em import AfterBackward, MaskEstimation

        return [MaskEstimation(self.config, self.em), AfterBackward(self.release_hooks)]

    def release_hooks(self) -> None:
        """Put the UNet's attention processors back (after the backward of the last `loss`)."""
        self._hooks.close()

    # the loss: masked diffusion loss + cross-attention loss -------------------------------
    def loss(self, model, batch: dict, generators):
        from lrkit.attention import AttentionStore, AttentionStoreProcessor, processors
        from lrkit.training.em import attention_layers_for, attention_loss, token_positions

        masks = self.em.batch_masks(batch)  # per sample (n_chosen, h, w)
        grid = tuple(masks[0].shape[-2:])
        concepts = [self.options.images[i].concepts for i in batch["photo_index"].tolist()]
        tokens = [[names[k] for k in chosen] for names, chosen in zip(concepts, batch["concepts"])]
        ids = model.tokenize(list(batch["caption"]))  # (batch, 77)
        rows = [b for b, toks in enumerate(tokens) for _ in toks]
        positions = [token_positions(ids[b], model.tokenizer, t) for b, toks in enumerate(tokens) for t in toks]
        store = AttentionStore(rows=rows, tokens=positions, size=grid)
        layers = attention_layers_for(model.unet, self.options)
        union = None
        if self.options.masked_loss:
            union = torch.stack([m.amax(0, keepdim=True) for m in masks])
            if self.options.loss_on_unclaimed:
                union = torch.maximum(union, self.em.unclaimed(batch))
        # The recording processors stay in place through the backward: with gradient checkpointing it runs the UNet
        # blocks again and must see the forward's processors (`release_hooks`, called after the backward).
        self.release_hooks()
        self._hooks.enter_context(processors(model.unet, {l.name: AttentionStoreProcessor(store) for l in layers}))
        try:
            loss, logs = model.diffusion_loss(batch, generators, pixel_weights=union)
        except BaseException:
            self.release_hooks()
            raise
        if self.options.attention_loss_weight > 0:
            maps = store.take()  # (sum of n_chosen, h, w)
            targets = torch.cat(masks).to(maps.device)
            attn = attention_loss(maps, targets)
            loss = loss + self.options.attention_loss_weight * attn
            logs["loss/attention"] = attn.detach()
        return loss, logs

    # what is exported --------------------------------------------------------------------
    def concept_tokens(self) -> list[TokenSpec]:
        return [TokenSpec(token=c.token, learned=True, num_vectors=c.num_vectors, initializer=c.initializer,
                          class_word=c.class_word or None) for c in self.options.concepts]

    def lora_spec(self) -> LoraSpec | None:
        return lora_spec_of(self.config.lora, text_encoder=self._te) if self.options.train_lora else None

    def write_files(self, model, root: Path) -> dict[str, str]:
        files = self.write_embeddings(model, root)
        if self.options.train_lora:
            files.update(write_lora_files(model, root, self.config.concept_name, text_encoder=self._te,
                                          dora=self.config.lora.dora))
        return files

    def finish_bundle(self, model, root: Path, concept) -> None:
        """masks/<ref>.<k>-<token>.png per (reference, token), at the training resolution; listed per token."""
        from lrkit.masks import save_mask_png

        super().finish_bundle(model, root, concept)
        if self.em.masks is None:
            raise RuntimeError("concept_em: no masks to export; was the model trained (MaskEstimation callback)?")
        if len(concept.refs) != len(self.em.masks):
            raise RuntimeError(f"concept_em: {len(concept.refs)} refs but masks for {len(self.em.masks)} images")
        specs = {t.token: t for t in concept.tokens}
        size = (self.config.data.resolution,) * 2
        for ref, image, masks in zip(concept.refs, self.options.images, self.em.masks):
            for k, (token, mask) in enumerate(zip(image.concepts, masks)):
                rel = f"masks/{Path(ref).stem}.{k}-{token_file_name(token)}.png"
                big = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
                save_mask_png(big, root / rel)
                specs[token].masks[ref] = rel
        for spec in concept.tokens:
            spec.mask = next(iter(spec.masks.values()), None)
        concept.masks = dict(concept.tokens[0].masks)
        concept.class_word = concept.class_word or (concept.tokens[0].class_word or "")

