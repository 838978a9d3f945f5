"""The model card every concept bundle carries: `README.md`, YAML front matter in the Hugging Face model-card format
and a Markdown body that says what the concept is, how it was trained and how to load it (diffusers, lrkit,
ComfyUI, A1111).

`write_bundle` writes the card into the bundle's temporary folder before it is published, so the card arrives
with the rest of the bundle or not at all; training also puts a small grid of its last validation images beside
it (`write_card(..., validation=...)`). The card describes the bundle and is never needed to use it: `Concept.load`
does not read it, and `read_card` parses a card (perhaps someone else's) as data only, its front matter with
`yaml.safe_load`. (`concept` arguments are `lrkit.concept.Concept`s; this module does not import it, as
`write_bundle` there calls `write_card` here.)

Front matter (what the Hub reads):

- `base_model`: the base model the concept records, when that is a Hub id (`owner/name`); a built-in base
  (`toy`, `tiny-random`), a local folder or a single file is named in the body instead.
- `license`: left to the publisher, as a commented line to fill in.
- `library_name: diffusers` for bundles with weights: the Hub picks its "use this model" code by library and tags
  (`lora` -> `load_lora_weights`, `textual_inversion` -> `load_textual_inversion`, with `base_model` as the
  pipeline). A reference concept holds no weights diffusers could load: `library_name: lrkit`.
- `pipeline_tag: text-to-image`, `tags` (the method's, `lrkit`, the model family's), `instance_prompt` (the words
  that name the subject) and, with validation images, a `widget` showing them.
"""

from __future__ import annotations

import re
from pathlib import Path
from lrkit.bundle_checks import CARD, MANIFEST, read_at_most

GRID = "validation_grid.png"
"""The grid of validation images a training run puts in its bundle (beside the card)."""
GRID_CELL = 256
"""Longest side (px) of each validation image in the grid: the grid stays small beside the weights."""
GRID_IMAGES = 8
"""At most this many validation images (the first prompts) go into the grid."""
MAX_CARD_BYTES = 1 << 20
"""`read_card` reads at most this much of a card."""

METHOD_LABELS = {
    "lora": "LoRA",
    "dreambooth": "DreamBooth (full fine-tune)",
    "textual_inversion": "Textual Inversion",
    "pivotal": "pivotal tuning (Textual Inversion, then Textual Inversion and LoRA)",
    "concept_em": "multi-concept tokens with latent masks (EM)",
    "reference": "reference concept (the photos alone, no trained weights)",
}
FAMILY_TAGS = {"sd": "stable-diffusion", "sdxl": "stable-diffusion-xl"}
LICENSE_LINE = ("# license: SET-ME  # uncomment and name the license you publish this concept under (the base "
                "model's terms apply to it too)")

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


class CardError(ValueError):
    """A model card that cannot be read as front matter + Markdown; the message names the file."""


# ------------------------------------------------------------------------------------------- front matter


def hub_base_id(base_id: str) -> str | None:
    """`base_id` when it names a Hub repository (`owner/name`), else None (a built-in, a folder, a file)."""
    from lrkit.models import builtin_kind

    if builtin_kind(base_id) or not _HUB_ID.fullmatch(base_id) or ".." in base_id:
        return None
    return None if base_id.lower().endswith((".safetensors", ".ckpt")) else base_id


def method_tags(concept) -> list[str]:
    """The tags of what the bundle holds: `lora`, `dreambooth`, `textual_inversion` (the Hub's spelling, which picks
    its `load_textual_inversion` snippet)."""
    files = concept.files
    tags = []
    if "lora" in files:
        tags.append("lora")
    if "unet" in files:
        tags.append("dreambooth")
    if "embeddings" in files:
        tags.append("textual_inversion")
    if concept.method == "pivotal":
        tags.append("pivotal-tuning")
    if concept.method == "reference":
        tags.append("reference-concept")
    return tags


def card_metadata(concept, *, widget_prompts: list[str] | None = None) -> dict:
    """The front matter of `concept`'s card (without the license, which stays a commented line for the user).
    `widget_prompts`: the validation prompts shown in the grid (`GRID`), for a `widget` entry."""
    has_weights = bool(concept.files)
    data: dict = {}
    base = hub_base_id(concept.base.id)
    if base is not None:
        data["base_model"] = base
    data["library_name"] = "diffusers" if has_weights else "lrkit"
    data["pipeline_tag"] = "text-to-image"
    tags = ["text-to-image"] + (["diffusers"] if has_weights else []) + method_tags(concept)
    data["tags"] = tags + ["lrkit", FAMILY_TAGS.get(concept.base.family, "stable-diffusion")]
    data["instance_prompt"] = concept.subject_phrase()
    if widget_prompts:
        data["widget"] = [{"text": " | ".join(widget_prompts), "output": {"url": GRID}}]
    return data


def front_matter(metadata: dict) -> str:
    """`---`, the license line to fill in, the metadata as YAML (`yaml.safe_dump`), `---`."""
    import yaml

    body = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    return f"---\n{LICENSE_LINE}\n{body}---\n"


def read_card(path: "str | Path") -> tuple[dict, str]:
    """(front matter, Markdown body) of the model card at `path` (a file, or a bundle folder holding `README.md`).

    The card is data: at most `MAX_CARD_BYTES` are read, the front matter is parsed with `yaml.safe_load` (no
    Python objects, no code) and must be a mapping; a card without front matter has an empty one."""
    import yaml

    file = Path(path)
    file = file / CARD if file.is_dir() else file
    raw = read_at_most(file, MAX_CARD_BYTES, "a model card is at most 1 MiB of text", CardError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CardError(f"{file}: not UTF-8 text ({err})") from err
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        return {}, text
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        raise CardError(f"{file}: the front matter opened by '---' on line 1 is never closed by a '---' line")
    try:
        metadata = yaml.safe_load("".join(lines[1:end]))
    except yaml.YAMLError as err:
        raise CardError(f"{file}: the front matter is not valid YAML ({err})") from err
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise CardError(f"{file}: the front matter is a {type(metadata).__name__}, not a mapping of fields")
    return metadata, "".join(lines[end + 1:])


# ------------------------------------------------------------------------------------------- the body


def _code(text: str) -> str:
    """`text` as an inline code span (a longer fence when it holds backticks)."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _num(value) -> str:
    """A number as written in the card (`1e-04` stays short); anything else as its text."""
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _get(tree: dict, dotted: str, default=None):
    """The value at `a.b.c` in nested dicts, or `default` when any part is missing."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _fill(template: str, concept) -> str:
    """A caption or validation prompt template as training filled it."""
    return template.replace("{token}", concept.token).replace("{class}", concept.class_word)


def _py(text: str) -> str:
    """`text` as a Python string literal in double quotes."""
    import json

    return json.dumps(text, ensure_ascii=False)


def settings_rows(concept) -> list[tuple[str, str]]:
    """(setting, value) rows of the card's training table: the method and the options that decide the result,
    read from the manifest (`training` is the whole training config)."""
    from lrkit.families import FAMILIES

    training = concept.training
    family = FAMILIES.get(concept.base.family)
    rows = [("method", METHOD_LABELS.get(concept.method, concept.method)),
            ("base model", f"{_code(concept.base.id)} ({family.label if family else concept.base.family})"),
            ("photos", f"{len(concept.refs)} (in {_code('refs/')})"),
            ("resolution", f"{concept.resolution} px")]
    if concept.method == "reference":
        return rows
    for label, key in (("steps", "max_steps"), ("batch size (per process)", "data.batch_size"),
                       ("precision", "precision"), ("seed", "seed")):
        value = _get(training, key)
        if value is not None:
            rows.append((label, str(value)))
    lr = _get(training, "optim.lr")
    if concept.method != "textual_inversion":
        rows.append(("learning rate", "the method's default" if lr is None else _num(lr)))
    if "embeddings" in concept.files and _get(training, "optim.embedding_lr") is not None:
        rows.append(("token learning rate", _num(_get(training, 'optim.embedding_lr'))))
    optimizer, schedule = _get(training, "optim.optimizer"), _get(training, "optim.lr_scheduler")
    if optimizer is not None:
        warmup = _get(training, "optim.warmup_steps") or 0
        warm = f", {warmup} warm-up steps" if warmup else ""
        rows.append(("optimizer", f"{optimizer}, {schedule} schedule{warm}"))
    for label, key in (("min-SNR gamma", "min_snr_gamma"), ("noise offset", "noise_offset")):
        value = _get(training, key)
        if value:
            rows.append((label, _num(value)))
    template = _get(training, "data.caption_template")
    if isinstance(template, str):
        rows.append(("captions", f"{_code(_fill(template, concept))} (photos with a {_code('.txt')} file: its own)"))
    lora = concept.lora
    if lora is not None:
        text_encoder = ", ".join(lora.text_encoder_targets) if lora.text_encoder_targets else "none"
        rows.append(("LoRA", f"rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g}"
                             f"{', DoRA' if lora.dora else ''}; UNet {', '.join(lora.unet_targets)}; "
                             f"text encoder {text_encoder}"))
    for spec in concept.tokens:
        if spec.learned:
            start = f", initialised from {_code(spec.initializer)}" if spec.initializer else ""
            rows.append(("token", f"{_code(spec.token)}: {spec.num_vectors} vector(s){start}"))
    if concept.method == "dreambooth":
        prior = _get(training, "dreambooth.prior_preservation")
        if prior is not None:
            count = _get(training, "dreambooth.num_class_images")
            weight = _get(training, "dreambooth.prior_loss_weight")
            rows.append(("prior preservation", f"{_num(count)} class images, loss weight {_num(weight)}" if prior
                         else "off"))
        rows.append(("text encoder trained", "yes" if any(k.startswith("text_encoder") for k in concept.files)
                     else "no"))
    if concept.method == "pivotal" and _get(training, "pivotal.ti_fraction") is not None:
        rows.append(("tokens-only phase", f"{_num(_get(training, 'pivotal.ti_fraction'))} of the steps"))
    return rows


def _example_prompt(concept) -> str:
    return f"a photo of {concept.subject_phrase()} on the beach"


def diffusers_code(concept) -> str | None:
    """Python that loads the bundle into a stock diffusers pipeline, or None when it holds no weights."""
    from lrkit.families import FAMILIES

    files = concept.files
    if not files:
        return None
    family = FAMILIES.get(concept.base.family) or FAMILIES["sd"]
    pipeline = family.pipeline_class_name
    base = hub_base_id(concept.base.id) or "BASE_MODEL"
    lines = ["import torch", f"from diffusers import {pipeline}"]
    replaced = [name for name in ("unet", *family.text_encoders) if name in files]
    if replaced:
        classes = dict(zip(family.text_encoders, family.text_encoder_classes))
        lines[-1] = f"from diffusers import {pipeline}, UNet2DConditionModel"
        if any(name != "unet" for name in replaced):
            used = sorted({classes[name] for name in replaced if name != "unet"})
            lines.append(f"from transformers import {', '.join(used)}")
    if "embeddings" in files and (family.embedding_keys or concept.method == "concept_em"):
        lines.append("from safetensors.torch import load_file")
    lines += ["", "concept = \"path/to/this/folder\"  # or: huggingface_hub.snapshot_download(\"OWNER/REPO\")"]
    if base == "BASE_MODEL":
        lines.append(f"BASE_MODEL = \"...\"  # the base it was trained on: {concept.base.id}")
    parts = ""
    if replaced:
        for name in replaced:
            cls = "UNet2DConditionModel" if name == "unet" else dict(zip(family.text_encoders,
                                                                          family.text_encoder_classes))[name]
            lines.append(f"{name} = {cls}.from_pretrained(f\"{{concept}}/{files[name]}\", torch_dtype=torch.float16)")
        parts = "".join(f", {name}={name}" for name in replaced)
    base_arg = _py(base) if base != "BASE_MODEL" else "BASE_MODEL"
    lines.append(f"pipe = {pipeline}.from_pretrained({base_arg}{parts}, torch_dtype=torch.float16).to(\"cuda\")")
    if "embeddings" in files:
        embeddings = f"f\"{{concept}}/{files['embeddings']}\""
        per_token = concept.token_files()
        if family.embedding_keys:  # a file holds one token, its vectors per text encoder
            calls = [f"pipe.load_textual_inversion(state[\"{key}\"], token=token, text_encoder=pipe.{encoder}, "
                     f"tokenizer=pipe.{tokenizer})"
                     for key, encoder, tokenizer in zip(family.embedding_keys, family.text_encoders, family.tokenizers)]
            if per_token:  # several tokens: a file each
                lines += [f"for token, file in {_py(per_token)}.items():",
                          "    state = load_file(f\"{concept}/{file}\")", *(f"    {call}" for call in calls)]
            else:
                lines += [f"token, state = {_py(concept.token)}, load_file({embeddings})", *calls]
        elif concept.method == "concept_em":  # several tokens in one file: one call each
            lines += [f"for token, vectors in load_file({embeddings}).items():",
                      "    pipe.load_textual_inversion({token: vectors}, token=token)"]
        else:
            lines.append(f"pipe.load_textual_inversion({embeddings})")
    if "lora" in files:
        lines.append(f"pipe.load_lora_weights(concept, weight_name=\"{files['lora']}\")")
    lines.append(f"image = pipe({_py(_example_prompt(concept))}).images[0]")
    return "\n".join(lines)


def lrkit_code(concept) -> tuple[str, str]:
    """(Python, shell) that use the bundle through lrkit: applied to a base pipeline, and Layout-and-Retouch."""
    base = concept.base.id
    python = "\n".join([
        "import lrkit",
        "",
        f"pipe = lrkit.load_base({_py(base)}, dtype=\"fp16\", device=\"cuda\")",
        "concept = lrkit.Concept.load(\"path/to/this/folder\")",
        "concept.apply(pipe)  # checks the base model, then loads the weights" if concept.files
        else "concept.apply(pipe)  # no weights: prompts name the subject by its class word",
        "image = pipe(f\"a photo of {concept.subject_phrase()} on the beach\").images[0]",
    ])
    shell = ("lrkit generate --concept path/to/this/folder --prompt \"a photo of {} on the beach\" "
             "--seeds \"[0,1,2,3]\" --out images")
    return python, shell


def tool_lines(concept) -> list[str]:
    """How ComfyUI and A1111 / Forge take the bundle (Markdown paragraphs, a blank line between them)."""
    files = concept.files
    paragraphs = []
    if "kohya" in files:
        kohya = files["kohya"]
        tag = f"<lora:{kohya.removesuffix('.safetensors')}:1>"
        paragraphs.append(
            f"Use {_code(kohya)}, the LoRA in the kohya layout these tools read (not "
            f"{_code(files.get('lora', 'pytorch_lora_weights.safetensors'))}):\n\n"
            f"- ComfyUI: copy it into {_code('models/loras/')} and load it with a *LoraLoader* node.\n"
            f"- A1111 / Forge: copy it into {_code('models/Lora/')} and add {_code(tag)} to the prompt, e.g. "
            f"{_code(f'{_example_prompt(concept)} {tag}')}.")
    elif "lora" in files:
        paragraphs.append("This LoRA has no kohya-layout file (DoRA: no kohya loader keeps its magnitudes), so "
                          "ComfyUI and A1111 cannot load it; use diffusers or lrkit.")
    per_token = concept.token_files()
    if per_token:
        paragraphs.append(
            f"Textual-Inversion vectors, a file per token ({', '.join(_code(f) for f in per_token.values())}): copy "
            f"them to {_code('embeddings/')} (A1111) or {_code('models/embeddings/')} (ComfyUI) and write each file's "
            f"name (A1111) or {_code('embedding:NAME')} (ComfyUI) where prompts here write its token; lrkit does not "
            "test these two tools.")
    elif "embeddings" in files and sum(t.learned for t in concept.tokens) > 1:
        paragraphs.append(f"{_code(files['embeddings'])} holds several tokens; A1111 and ComfyUI read one token per "
                          "embedding file, so they do not take it as it is.")
    elif "embeddings" in files:
        paragraphs.append(
            f"Textual-Inversion vectors: copy {_code(files['embeddings'])} to {_code('embeddings/NAME.safetensors')} "
            f"(A1111) or {_code('models/embeddings/')} (ComfyUI) and write {_code('NAME')} (A1111) or "
            f"{_code('embedding:NAME')} (ComfyUI) where prompts here write {_code(concept.token)}; lrkit does not "
            "test these two tools.")
    if any(key in files for key in ("unet", "text_encoder", "text_encoder_2")):
        paragraphs.append("The DreamBooth weights are diffusers model folders; ComfyUI and A1111 load single-file "
                          "checkpoints and do not take these folders as they are.")
    if not files:
        paragraphs.append("A reference concept holds no weights: use it through lrkit (layout-retouch, "
                          "dual-reference).")
    return "\n\n".join(paragraphs).split("\n")


def file_lines(concept, grid: bool) -> list[str]:
    """The bundle's files, one Markdown list item each."""
    described = {
        "lora": "the LoRA in the diffusers layout (diffusers, lrkit)",
        "kohya": "the same LoRA in the kohya layout (ComfyUI, A1111 / Forge)",
        "embeddings": "the learned token vectors",
        "unet": "the fine-tuned UNet (diffusers folder)",
        "text_encoder": "the fine-tuned text encoder (transformers folder)",
        "text_encoder_2": "the fine-tuned second text encoder (transformers folder)",
    }
    lines = [f"- {_code(MANIFEST)}: the manifest lrkit reads (tokens, base model, training config)"]
    shown = dict(concept.files)
    if concept.token_files():  # the folder of the tokens' files
        described["embeddings"] = "the learned token vectors, a file per token"
        shown["embeddings"] += "/"
    lines += [f"- {_code(rel)}: {described.get(key, key)}" for key, rel in shown.items()]
    lines.append(f"- {_code('refs/')}: the {len(concept.refs)} training photo(s), the references Layout-and-Retouch "
                 "reads")
    if concept.masks or any(t.masks for t in concept.tokens):
        lines.append(f"- {_code('masks/')}: the subject masks of the references")
    if grid:
        lines.append(f"- {_code(GRID)}: validation images from the end of training")
    return lines


def card_text(concept, *, grid: dict | None = None) -> str:
    """The whole `README.md` of `concept`. `grid`: {"step": int, "prompts": [...]} when `GRID` is in the bundle."""
    from lrkit.families import FAMILIES

    prompts = list(grid["prompts"]) if grid else None
    family = FAMILIES.get(concept.base.family)
    label = family.label if family else concept.base.family
    out = [front_matter(card_metadata(concept, widget_prompts=prompts)), f"# {concept.name}", ""]
    method = METHOD_LABELS.get(concept.method, concept.method)
    if concept.method == "concept_em":
        named = ", ".join(_code(t.token) for t in concept.tokens)
        out.append(f"A concept made with lrkit {concept.lrkit_version}: {method}, the tokens {named} learned from "
                   f"{len(concept.refs)} picture(s), for {label} ({_code(concept.base.id)}).")
    else:
        out.append(f"A concept made with lrkit {concept.lrkit_version}: {method}, from {len(concept.refs)} photo(s) "
                   f"of the subject (class {_code(concept.class_word)}), for {label} ({_code(concept.base.id)}).")
    out += ["", f"Prompts name the subject as {_code(concept.subject_phrase())}, e.g. "
                f"{_code(_example_prompt(concept))}.", ""]
    out += ["## How it was made", "", "| setting | value |", "|---|---|"]
    out += [f"| {name} | {_cell(value)} |" for name, value in settings_rows(concept)]
    out += ["", f"The whole configuration is {_code('training')} in {_code(MANIFEST)}.", ""]
    if grid:
        out += ["## Validation images", "", f"![validation images]({GRID})", "",
                f"Step {grid['step']}; prompts, left to right and top to bottom: "
                + "; ".join(_code(p) for p in prompts) + ".", ""]
    out += ["## Use it", ""]
    code = diffusers_code(concept)
    if code is not None:
        out += ["### diffusers", "", "```python", code, "```", ""]
    python, shell = lrkit_code(concept)
    out += ["### lrkit", "", "```python", python, "```", "",
            "Layout-and-Retouch (a diverse layout from the base model, the subject retouched in from a reference "
            "photo), writing images and their layouts:", "", "```bash", shell, "```", ""]
    out += ["### ComfyUI and A1111 / Forge", "", *tool_lines(concept), ""]
    out += ["## Files", "", *file_lines(concept, grid is not None), ""]
    out += ["## License", "",
            "Not set. Name the license you publish this concept under in the front matter (the commented "
            f"{_code('license:')} line); the base model's license applies to what it generates as well.", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- writing


def validation_grid(folder: "str | Path"):
    """(grid image, step, image count) of a training run's last validation images (`validation/stepNNNNNN_KK.png`),
    each at most `GRID_CELL` px and at most `GRID_IMAGES` of them, up to four a row; None when there are none."""
    from PIL import Image

    folder = Path(folder)
    found: dict[int, list[Path]] = {}
    for path in sorted(folder.glob("step*_*.png")) if folder.is_dir() else []:
        match = re.fullmatch(r"step(\d+)_(\d+)\.png", path.name)
        if match and path.is_file():
            found.setdefault(int(match.group(1)), []).append(path)
    if not found:
        return None
    step = max(found)
    cells = []
    for path in found[step][:GRID_IMAGES]:
        with Image.open(path) as image:
            cell = image.convert("RGB")
        cell.thumbnail((GRID_CELL, GRID_CELL), Image.Resampling.LANCZOS)
        cells.append(cell)
    columns = min(4, len(cells))
    rows = -(-len(cells) // columns)
    width, height = max(c.width for c in cells), max(c.height for c in cells)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for k, cell in enumerate(cells):
        grid.paste(cell, ((k % columns) * width, (k // columns) * height))
    return grid, step, len(cells)


def write_card(concept, root: "str | Path", *, validation: "str | Path | None" = None) -> Path:
    """Write `concept`'s card into the bundle folder `root` (a bundle about to be published by `write_bundle`), and
    with `validation` (a training run's validation/ folder) the grid of its last validation images (`GRID`).
    Returns the card's path."""
    from lrkit.io import atomic_save_png, atomic_write_text

    root = Path(root)
    grid = None
    made = validation_grid(validation) if validation is not None else None
    if made is not None:
        image, step, count = made
        atomic_save_png(image, root / GRID)
        prompts = [_fill(p, concept) for p in _get(concept.training, "validation.prompts", [])
                   if isinstance(p, str)][:count]
        grid = {"step": step, "prompts": prompts}
    return atomic_write_text(root / CARD, card_text(concept, grid=grid))


__all__ = ["CARD", "CardError", "GRID", "card_metadata", "card_text", "hub_base_id", "read_card",
           "validation_grid", "write_card"]
