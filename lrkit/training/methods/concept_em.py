"""`concept_em`: several concept tokens (optionally with LoRA) and their latent masks, learned by EM.

What trains: the new token rows (and LoRA when `concept_em.train_lora`). Extra loss terms: the
diffusion loss restricted to the union of the sampled concepts' masks (and, with
`loss_on_unclaimed`, the pixels no concept claims), plus the cross-attention loss. What is exported: the tokens (learned_embeds.safetensors), the LoRA if any, and each token's
mask in each reference image (masks/). The E-steps run in `lrkit.training.em.MaskEstimation`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lrkit.concept import LoraSpec, TokenSpec
from lrkit.training.methods.lora import add_lora, lora_groups_beside_tokens, lora_spec_of, write_lora_files
from lrkit.training.methods.textual_inversion import TextualInversionMethod


class ConceptEMMethod(TextualInversionMethod):
    name = "concept_em"
    default_lr = 1e-4

    def __init__(self, config):
        from lrkit.training.em import EMState

        super().__init__(config)
        self.em = EMState()

    @property
    def options(self):
        return self.config.concept_em

    def _token_entries(self) -> list[tuple[str, int, str]]:
        return [(c.token, c.num_vectors, c.initializer) for c in self.options.concepts]

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
        from lrkit.training.em import MaskEstimation

        return [MaskEstimation(self.config, self.em)]

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
        with processors(model.unet, {l.name: AttentionStoreProcessor(store) for l in layers}):
            loss, logs = model.diffusion_loss(batch, generators, pixel_weights=union)
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
        from lrkit.training.em import _safe

        if self.em.masks is None:
            raise RuntimeError("concept_em: no masks to export; was the model trained (MaskEstimation callback)?")
        if len(concept.refs) != len(self.em.masks):
            raise RuntimeError(f"concept_em: {len(concept.refs)} refs but masks for {len(self.em.masks)} images")
        specs = {t.token: t for t in concept.tokens}
        size = (self.config.data.resolution,) * 2
        for ref, image, masks in zip(concept.refs, self.options.images, self.em.masks):
            for k, (token, mask) in enumerate(zip(image.concepts, masks)):
                rel = f"masks/{Path(ref).stem}.{k}-{_safe(token)}.png"
                big = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
                save_mask_png(big, root / rel)
                specs[token].masks[ref] = rel
        for spec in concept.tokens:
            spec.mask = next(iter(spec.masks.values()), None)
        concept.masks = dict(concept.tokens[0].masks)
        concept.class_word = concept.class_word or (concept.tokens[0].class_word or "")
