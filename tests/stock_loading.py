"""A bundle loaded into a stock diffusers pipeline the way users are told to (docs/concept-bundle.md, the model
card's code): what lrkit's `Concept.apply` is compared with."""

from __future__ import annotations

import re
from pathlib import Path

from safetensors.torch import load_file


def load_stock_embeddings(pipe, concept) -> None:
    """`pipe.load_textual_inversion` for every learned token of `concept`: an SD file `{token: vectors}` by its path
    (several tokens: one call per token); an SDXL file (one token: `clip_l` / `clip_g`) once per text encoder, from the token's own file when the
    bundle has a file per token (`embeddings/<token>.safetensors`)."""
    for spec in [t for t in concept.tokens if t.learned]:
        file = concept.path / (spec.embeddings or concept.files["embeddings"])
        state = load_file(file)
        if list(state) == [spec.token]:  # the documented call: the file's path
            pipe.load_textual_inversion(str(file))
            continue
        if "clip_l" not in state:
            pipe.load_textual_inversion({spec.token: state[spec.token]}, token=spec.token)
            continue
        pipe.load_textual_inversion(state["clip_l"], token=spec.token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=spec.token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)


def diffusers_block(body: str) -> str:
    return re.search(r"### diffusers\n\n```python\n(.*?)```", body, re.S).group(1)


def run_card_code(code: str, bundle: Path, base_folder: Path):
    """The card's diffusers code as a user runs it, on this machine: the bundle's folder, the saved tiny base, the
    CPU in float32, and the last line (50 steps at the base's size) left out. Returns its `pipe`."""
    code = code.replace('concept = "path/to/this/folder"', f"concept = {str(bundle)!r}")
    code = re.sub(r'BASE_MODEL = "\.\.\."', f"BASE_MODEL = {str(base_folder)!r}", code)
    code = code.replace("torch.float16", "torch.float32").replace('.to("cuda")', "")
    assert code.rstrip().splitlines()[-1].startswith("image = pipe(")
    scope: dict = {}
    exec("\n".join(code.rstrip().splitlines()[:-1]), scope)
    return scope["pipe"]
