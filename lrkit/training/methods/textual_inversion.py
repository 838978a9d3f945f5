"""`textual_inversion`: new token vectors (one set per text encoder); only their embedding rows change."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save

from lrkit.concept import EMBEDDINGS, EMBEDDINGS_FOLDER, TokenSpec, token_embedding_files
from lrkit.io import atomic_write_bytes
from lrkit.training.methods.base import Method
from lrkit.training.options import check, check_finite
from lrkit.training.tokens import add_new_tokens, learned_embeddings, token_rows


@dataclass
class TextualInversionOptions:
    """New token embeddings (Textual Inversion)."""

    num_vectors: int = 1
    """Embedding vectors per token."""
    initializer: Optional[str] = None
    """Word whose embedding initialises the new vectors (default: the class word)."""

    def __post_init__(self) -> None:
        check_finite(self, "textual_inversion")
        check(self.num_vectors >= 1, f"textual_inversion.num_vectors must be >= 1, got {self.num_vectors}")


def embeddings_file(model, entries: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """The tensors of `learned_embeds.safetensors`: `{token: (num_vectors, dim)}` for one text encoder; with several
    (SDXL) one token's vectors per encoder under the family's `embedding_keys` (`clip_l`, `clip_g`), the layout of
    diffusers' SDXL Textual-Inversion examples and A1111 (a file holds one token)."""
    keys = model.family.embedding_keys
    if not keys:
        return learned_embeddings(model.tokenizer, model.text_encoder, entries)
    if len(entries) != 1:
        raise ValueError(f"a {model.family.label} embeddings file holds one token ({', '.join(keys)} per encoder), "
                         f"got {[t for t, _ in entries]}")
    token = entries[0][0]
    return {key: learned_embeddings(tokenizer, encoder, entries)[token]
            for key, tokenizer, encoder in zip(keys, model.tokenizers, model.text_encoders)}


class TextualInversionMethod(Method):
    name = "textual_inversion"
    options_class = TextualInversionOptions
    default_token = "<sks>"

    @property
    def _initializer(self) -> str:
        return self.config.textual_inversion.initializer or self.config.data.class_word

    def _token_entries(self) -> list[tuple[str, int, str]]:
        """(token, num_vectors, initializer) of each new token."""
        if not self._initializer:
            raise ValueError("textual_inversion.initializer is empty and data.class_word is not set; set one of them")
        return [(self.config.token, self.config.textual_inversion.num_vectors, self._initializer)]

    def configure(self, model) -> None:
        for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):  # SDXL: the token in both encoders
            add_new_tokens(tokenizer, encoder, self._token_entries())

    def embedding_group(self, model) -> dict:
        return dict(name="embeddings", params=token_rows(model), lr=self.config.optim.embedding_lr, weight_decay=0.0)

    def param_groups(self, model) -> list[dict]:
        return [self.embedding_group(model)]

    def text_encoder_frozen(self) -> bool:
        return False  # gradients flow through the text encoder into the new rows

    def concept_tokens(self) -> list[TokenSpec]:
        return [TokenSpec(token=t, learned=True, num_vectors=n, initializer=i) for t, n, i in self._token_entries()]

    def write_embeddings(self, model, root: Path) -> dict[str, str]:
        """`learned_embeds.safetensors`; several tokens on a family whose file holds one token (SDXL): a file per
        token under `embeddings/` (`token_embedding_files`; `finish_bundle` names them in the tokens)."""
        entries = [(t, n) for t, n, _ in self._token_entries()]
        if len(entries) > 1 and model.family.embedding_keys:
            files = token_embedding_files([t for t, _ in entries])
            (root / EMBEDDINGS_FOLDER).mkdir(exist_ok=True)
            for entry in entries:
                tensors = embeddings_file(model, [entry])
                atomic_write_bytes(root / files[entry[0]], save(tensors, metadata={"format": "pt"}))
            return {"embeddings": EMBEDDINGS_FOLDER}
        tensors = embeddings_file(model, entries)
        atomic_write_bytes(root / EMBEDDINGS, save(tensors, metadata={"format": "pt"}))
        return {"embeddings": EMBEDDINGS}

    def finish_bundle(self, model, root: Path, concept) -> None:
        """Each learned token names its vectors file when the tokens have a file each."""
        if concept.files.get("embeddings") == EMBEDDINGS_FOLDER:
            files = token_embedding_files([t.token for t in concept.tokens if t.learned])
            for spec in concept.tokens:
                spec.embeddings = files.get(spec.token)

    def write_files(self, model, root: Path) -> dict[str, str]:
        return self.write_embeddings(model, root)
