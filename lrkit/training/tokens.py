"""New placeholder tokens: the only embedding rows that train (Textual Inversion, pivotal tuning)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrkit.concept import token_clash


class NewTokenEmbedding(nn.Module):
    """The text encoder's token embedding: a frozen vocabulary plus trainable rows for new tokens.

    Ids below `num_base` read the frozen table, ids from `num_base` on read `new_rows`. Only
    `new_rows` is a trainable parameter, so every original row stays bitwise unchanged and the
    optimizer keeps state for the new rows only.
    """

    def __init__(self, base: nn.Embedding, new_rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.num_base = base.num_embeddings
        self.new_rows = nn.Parameter(new_rows.detach().clone().float())

    @property
    def num_embeddings(self) -> int:
        return self.num_base + self.new_rows.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The full table (frozen rows, then new rows); for readers such as stock pipelines."""
        return torch.cat([self.base.weight, self.new_rows.to(self.base.weight.dtype)], dim=0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.num_base  # (batch, tokens)
        old = self.base(input_ids.clamp(max=self.num_base - 1))
        new = F.embedding((input_ids - self.num_base).clamp(min=0), self.new_rows)
        return torch.where(is_new.unsqueeze(-1), new.to(old.dtype), old)


def expanded_token_names(token: str, num_vectors: int) -> list[str]:
    """`<sks>`, `<sks>_1`, ... the names diffusers' `load_textual_inversion` registers."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_prompt(prompt: str, tokenizer) -> str:
    """Replace each multi-vector token by all its vectors' names, as diffusers does at inference."""
    for token in list(tokenizer.added_tokens_encoder):
        if f"{token}_1" not in tokenizer.added_tokens_encoder or token not in prompt:
            continue
        names = [token]
        i = 1
        while f"{token}_{i}" in tokenizer.added_tokens_encoder:
            names.append(f"{token}_{i}")
            i += 1
        prompt = prompt.replace(token, " ".join(names))
    return prompt


def add_new_tokens(tokenizer, text_encoder, tokens: list[tuple[str, int, str]]) -> NewTokenEmbedding:
    """Add `(token, num_vectors, initializer_word)` entries and make only their rows trainable.

    Every name added (`expanded_token_names`) must be new to the tokenizer in every form (`token_clash`:
    word-final `teapot</w>` included, one whitespace-free word). Each new vector starts as the mean embedding
    of the initializer word's sub-tokens.
    """
    embedding = text_encoder.get_input_embeddings()
    if isinstance(embedding, NewTokenEmbedding):
        raise ValueError("new tokens were already added to this text encoder")
    names = [n for token, num, _ in tokens for n in expanded_token_names(token, num)]
    vocab = tokenizer.get_vocab()
    for name in names:
        why = token_clash(tokenizer, name, vocab)
        if why is not None:
            suggestion = "-".join(name.strip("<>").split())
            raise ValueError(f"token {name!r} {why}; a learned token must be new to the tokenizer: choose one such "
                             f"as '<my-{suggestion}>' (data.token)")
    rows = []  # initialisers are read before the new tokens exist (a new token may spell a word)
    with torch.no_grad():
        for token, num, initializer in tokens:
            init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
            if not init_ids:
                raise ValueError(f"initializer word {initializer!r} of token {token!r} is empty after tokenization")
            vec = embedding.weight[torch.tensor(init_ids, device=embedding.weight.device)].float().mean(0)
            rows.append(vec.expand(num, -1))
    added = tokenizer.add_tokens(names)
    if added != len(names):
        raise ValueError(f"could not add tokens {names} to the tokenizer")
    module = NewTokenEmbedding(embedding, torch.cat(rows, dim=0))
    text_encoder.set_input_embeddings(module)
    return module


def token_rows(model) -> list[nn.Parameter]:
    """The new rows of every text encoder of `model` (a `ConceptModel` whose tokens were added), in its order."""
    rows = []
    for encoder in model.text_encoders:
        embedding = encoder.get_input_embeddings()
        if not isinstance(embedding, NewTokenEmbedding):
            raise ValueError("new tokens were not added to every text encoder")
        rows.append(embedding.new_rows)
    return rows


def learned_embeddings(tokenizer, text_encoder, tokens: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """{token: (num_vectors, dim)} float32 tensors, the layout diffusers' load_textual_inversion reads."""
    embedding = text_encoder.get_input_embeddings()
    if not isinstance(embedding, NewTokenEmbedding):
        raise ValueError("this text encoder has no learned tokens")
    out = {}
    for token, num in tokens:
        ids = tokenizer.convert_tokens_to_ids(expanded_token_names(token, num))
        rows = torch.tensor(ids) - embedding.num_base
        out[token] = embedding.new_rows.detach()[rows.to(embedding.new_rows.device)].float().cpu().contiguous()
    return out
