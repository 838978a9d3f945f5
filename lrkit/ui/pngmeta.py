"""Generation settings inside PNG files, so an image can be dropped back in to make it again.

Two text chunks go into every PNG the web app writes:

- `parameters`: the settings in AUTOMATIC1111's form (the prompt, then `Negative prompt: ...`, then one line of
  `Key: value` pairs: `Steps`, `Sampler`, `CFG scale`, `Seed`, `Size`, `Model`, plus lrkit's mode, λ and concept),
  which A1111, ComfyUI and image viewers show;
- `lrkit`: JSON (`SETTINGS_FORMAT`) with the exact prompt, seed, concept, base and every `GenerationOptions` field.

`read_settings` prefers the `lrkit` chunk and falls back to `parameters` (a PNG from A1111 gives its prompt,
negative prompt, steps, CFG scale, seed and size). The chunks sit before the image data, so they are read from the
header without decoding the pixels.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from lrkit.io import atomic_write_bytes

SETTINGS_FORMAT = "lrkit.png-settings/1"
SETTINGS_CHUNK = "lrkit"
A1111_CHUNK = "parameters"
MAX_SETTINGS_BYTES = 64 * 1024
"""The largest settings chunk read back (a real one is a few KB)."""
MAX_PNG_BYTES = 64 * 1024 * 1024
"""The largest PNG read back for its settings."""
SAMPLER_NAMES = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpm++": "DPM++ 2M", "pndm": "PLMS"}
"""lrkit's scheduler names -> the sampler names A1111 writes."""


class SettingsError(ValueError):
    """A PNG without readable generation settings; the message says what is wrong."""


def a1111_parameters(settings: dict) -> str:
    """The `parameters` text of `settings` (a `SETTINGS_FORMAT` dict), as A1111 writes it."""
    options = settings["options"]
    size = settings.get("size") or [options.get("width"), options.get("height")]
    pairs = [
        ("Steps", options["num_inference_steps"]),
        ("Sampler", SAMPLER_NAMES.get(options["scheduler"], options["scheduler"])),
        ("CFG scale", options["guidance_scale"]),
        ("Seed", settings["seed"]),
        ("Size", f"{size[0]}x{size[1]}"),
        ("Model", settings.get("base", "")),
        ("lrkit mode", options["mode"]),
        ("lrkit lambda", options["layout"]["lam"]),
        ("lrkit concept", (settings.get("concept") or {}).get("name", "")),
    ]
    lines = [settings["prompt"]]
    if options.get("negative_prompt"):
        lines.append(f"Negative prompt: {options['negative_prompt']}")
    lines.append(", ".join(f"{key}: {_a1111_value(value)}" for key, value in pairs))
    return "\n".join(lines)


def _a1111_value(value) -> str:
    text = str(value)
    return json.dumps(text) if ("," in text or ":" in text or "\n" in text) else text


def save_png(image: Image.Image, path: str | os.PathLike, settings: dict) -> Path:
    """Write `image` as a PNG at `path` (atomically) with `settings` in its `parameters` and `lrkit` chunks."""
    import io

    info = PngImagePlugin.PngInfo()
    info.add_text(A1111_CHUNK, a1111_parameters(settings))
    info.add_text(SETTINGS_CHUNK, json.dumps(settings, ensure_ascii=True, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return atomic_write_bytes(path, buffer.getvalue())


def read_settings(path: str | os.PathLike, name: str | None = None) -> dict:
    """The settings a PNG carries: the `lrkit` chunk's dict, else what its `parameters` chunk says, as
    `{"format": "a1111", "prompt", "seed", "options": {...}, "size"}`. Raises `SettingsError` naming the file."""
    path = Path(path)
    name = name or path.name
    try:
        size = path.stat().st_size
    except OSError as err:
        raise SettingsError(f"{name}: cannot be read ({err.strerror or err})") from err
    if size > MAX_PNG_BYTES:
        raise SettingsError(f"{name}: {size / 2**20:.0f} MiB is over the {MAX_PNG_BYTES // 2**20} MiB read for "
                            "settings")
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise SettingsError(f"{name}: a {image.format or 'non-image'} file; drop a PNG made by lrkit or A1111")
            chunks = {k: v for k, v in image.info.items() if isinstance(v, str)}
    except SettingsError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SettingsError(f"{name}: not a readable PNG ({err})") from err
    if SETTINGS_CHUNK in chunks:
        return _lrkit_settings(chunks[SETTINGS_CHUNK], name)
    if A1111_CHUNK in chunks:
        return parse_a1111(chunks[A1111_CHUNK], name)
    raise SettingsError(f"{name}: holds no generation settings (no {SETTINGS_CHUNK!r} or {A1111_CHUNK!r} text chunk)")


def _lrkit_settings(text: str, name: str) -> dict:
    if len(text.encode("utf-8")) > MAX_SETTINGS_BYTES:
        raise SettingsError(f"{name}: its {SETTINGS_CHUNK!r} chunk is over {MAX_SETTINGS_BYTES} bytes")
    try:
        data = json.loads(text)
    except ValueError as err:
        raise SettingsError(f"{name}: its {SETTINGS_CHUNK!r} chunk is not JSON ({err})") from err
    if not isinstance(data, dict) or data.get("format") != SETTINGS_FORMAT:
        raise SettingsError(f"{name}: its {SETTINGS_CHUNK!r} chunk is not {SETTINGS_FORMAT!r} settings")
    if not isinstance(data.get("options"), dict) or not isinstance(data.get("prompt"), str) \
            or not isinstance(data.get("seed"), int):
        raise SettingsError(f"{name}: its {SETTINGS_CHUNK!r} chunk lacks the prompt, seed or options")
    return data


_PAIR = re.compile(r'\s*([\w \-+()/]+):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)')


def parse_a1111(text: str, name: str = "parameters") -> dict:
    """The prompt, negative prompt, steps, CFG scale, seed and size of an A1111 `parameters` text."""
    if len(text.encode("utf-8")) > MAX_SETTINGS_BYTES:
        raise SettingsError(f"{name}: its {A1111_CHUNK!r} chunk is over {MAX_SETTINGS_BYTES} bytes")
    lines = text.strip().split("\n")
    pairs_line = lines[-1] if len(lines) > 1 and "Steps:" in lines[-1] else ""
    body = lines[:-1] if pairs_line else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line.removeprefix("Negative prompt:").strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    pairs = {}
    for match in _PAIR.finditer(pairs_line):
        value = match.group(2).strip()
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        pairs[match.group(1).strip()] = value
    options: dict = {"negative_prompt": "\n".join(negative_lines).strip()}
    settings: dict = {"format": "a1111", "prompt": "\n".join(prompt_lines).strip(), "options": options}
    try:
        if "Steps" in pairs:
            options["num_inference_steps"] = int(pairs["Steps"])
        if "CFG scale" in pairs:
            options["guidance_scale"] = float(pairs["CFG scale"])
        if "Seed" in pairs:
            settings["seed"] = int(pairs["Seed"])
        if "Size" in pairs:
            width, height = (int(v) for v in str(pairs["Size"]).lower().split("x"))
            settings["size"] = [width, height]
        if "lrkit mode" in pairs:
            options["mode"] = pairs["lrkit mode"]
        if "lrkit lambda" in pairs:
            options["layout"] = {"lam": float(pairs["lrkit lambda"])}
    except ValueError as err:
        raise SettingsError(f"{name}: its {A1111_CHUNK!r} chunk has a malformed value ({err})") from err
    if not settings["prompt"]:
        raise SettingsError(f"{name}: its {A1111_CHUNK!r} chunk holds no prompt")
    return settings


__all__ = ["A1111_CHUNK", "SETTINGS_CHUNK", "SETTINGS_FORMAT", "SettingsError", "a1111_parameters", "parse_a1111",
           "read_settings", "save_png"]
