"""The personalized model as the inference loops use it: the vanilla and personalized views of one diffusers
pipeline, prompt encoding with the subject's token positions, the guided denoising step, decoding."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from PIL import Image

from lrkit.attention import AttentionStore, AttentionStoreProcessor, attention_layers, cross_layers_at, decoder_self_layers
from lrkit.concept import Concept
from lrkit.families import Conditioning, family_of
from lrkit.inference.inversion import vae_precision
from lrkit.inference.options import GenerationOptions, InferenceError


@dataclass
class Embeds:
    """Conditioning of one prompt batch: unconditional and conditional rows, the subject's token positions."""

    uncond: Conditioning
    cond: Conditioning
    tokens: list[list[int]] = field(default_factory=list)  # subject token positions per row

    def guided(self) -> Conditioning:
        """The rows of one guided UNet call: [unconditional, conditional]."""
        return Conditioning.cat([self.uncond, self.cond])


class PersonalizedModel:
    """A stock diffusers pipeline of a model family (`lrkit.families`: SD or SDXL) with a concept applied, and the
    base model behind it.

    For LoRA and TI concepts the vanilla and personalized models share one UNet (adapters toggled, or a
    prompt without the new token); only a full DreamBooth concept keeps the base UNet / text encoders beside it
    (`vanilla_modules`: pipeline component name -> the base's module, e.g. `unet`, `text_encoder_2`).
    """

    def __init__(self, pipe, concept: Concept, *, vanilla_unet=None, vanilla_text_encoder=None,
                 vanilla_modules: dict | None = None, segmenter=None):
        self.pipe = pipe
        self.concept = concept
        self.family = family_of(pipe)
        modules = dict(vanilla_modules or {})
        if vanilla_unet is not None:
            modules["unet"] = vanilla_unet
        if vanilla_text_encoder is not None:
            modules["text_encoder"] = vanilla_text_encoder
        unknown = sorted(set(modules) - {"unet", *self.family.text_encoders})
        if unknown:
            raise InferenceError(f"vanilla_modules: {unknown[0]!r} is not a UNet or text encoder of a "
                                 f"{self.family.label} pipeline ({', '.join(['unet', *self.family.text_encoders])})")
        self.vanilla_modules = modules
        self.segmenter = segmenter
        self.has_lora = "lora" in concept.files

    @property
    def vanilla_unet(self):
        return self.vanilla_modules.get("unet")

    @property
    def vanilla_text_encoder(self):
        return self.vanilla_modules.get("text_encoder")

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    # ------------------------------------------------------------------ the two models

    @contextlib.contextmanager
    def vanilla(self):
        """The vanilla model: LoRA adapters off, or the base UNet / text encoders of a DreamBooth concept."""
        pipe = self.pipe
        if self.vanilla_modules:
            current = {name: getattr(pipe, name) for name in self.vanilla_modules}
            for name, module in self.vanilla_modules.items():
                setattr(pipe, name, module)
            try:
                yield
            finally:
                for name, module in current.items():
                    setattr(pipe, name, module)
        elif self.has_lora:
            pipe.disable_lora()
            try:
                yield
            finally:
                pipe.enable_lora()
        else:
            yield

    def unets(self) -> list:
        """The distinct UNets (personalized first)."""
        return list({id(u): u for u in (self.pipe.unet, self.vanilla_unet) if u is not None}.values())

    # ------------------------------------------------------------------ prompts

    def subject_phrase(self) -> str:
        return self.concept.subject_phrase()

    def vanilla_prompt(self, prompt: str, phrase: str | None) -> str:
        """y from y*: the concept phrase (`<tok> <class>`, or the bare token) -> the vanilla phrase."""
        phrase = phrase or self.concept.class_word
        if self.subject_phrase() in prompt:
            return prompt.replace(self.subject_phrase(), phrase)
        return prompt.replace(self.concept.token, phrase)

    def phrase_in(self, prompt: str) -> str:
        """The words standing for the subject in `prompt`: `<token> <class>` if present, else the token."""
        return self.subject_phrase() if self.subject_phrase() in prompt else self.concept.token

    def token_positions(self, prompt: str, phrase: str) -> list[int]:
        """Positions of `phrase`'s tokens in the encoded `prompt` (TI tokens expanded as diffusers does). SDXL's two
        tokenizers split text alike (CLIP BPE); the positions are the first one's."""
        tok = self.pipe.tokenizer
        prompt = self.pipe.maybe_convert_prompt(prompt, tok)
        phrase = self.pipe.maybe_convert_prompt(phrase, tok)
        ids = tok(prompt, truncation=True, max_length=tok.model_max_length).input_ids
        sub = tok(phrase, add_special_tokens=False).input_ids
        for start in range(len(ids) - len(sub) + 1):
            if ids[start:start + len(sub)] == sub:
                return list(range(start, start + len(sub)))
        raise InferenceError(f"phrase {phrase!r} not found in prompt {prompt!r} after tokenization")

    def embed(self, prompts: list[str], phrase_of, negative: str, *, vanilla: bool, height: int,
              width: int) -> Embeds:
        """Guided conditioning of `prompts` at `height` x `width` under the vanilla or personalized text encoders;
        `phrase_of(prompt)` names the subject's words whose token positions are recorded."""
        with self.vanilla() if vanilla else contextlib.nullcontext():
            cond, uncond = self.family.conditioning(self.pipe, prompts, [negative] * len(prompts), height=height,
                                                    width=width)
        return Embeds(uncond=uncond, cond=cond, tokens=[self.token_positions(p, phrase_of(p)) for p in prompts])

    def encode(self, prompt: str, size: int) -> Conditioning:
        """The conditional conditioning (one row) of one prompt for a `size` x `size` image, no guidance."""
        return self.family.conditioning(self.pipe, [prompt], None, height=size, width=size, guidance=False)[0]

    # ------------------------------------------------------------------ attention

    def store_processors(self, store: AttentionStore, grid) -> dict:
        """Cross-attention capture into `store` at the UNet's cross-attention layers."""
        aspect = grid[0] / grid[1]
        return {l.name: AttentionStoreProcessor(store, aspect) for l in cross_layers_at(self.pipe.unet)}

    def swap_layers(self, options: GenerationOptions):
        """The self-attention layers the reference enters: `retouch.swap_layers`, else the decoder's at
        `retouch.swap_levels` resolutions."""
        names, levels = options.retouch.swap_layers, options.retouch.swap_levels
        if not names:
            return decoder_self_layers(self.pipe.unet, levels)
        layers = {l.name: l for l in attention_layers(self.pipe.unet)}
        unknown = [n for n in names if n not in layers]
        if unknown:
            raise InferenceError(f"swap_layers: {unknown[0]!r} is not an attention layer of this UNet")
        cross = [n for n in names if not layers[n].is_self]
        if cross:
            raise InferenceError(f"swap_layers: {cross[0]!r} is a cross-attention layer; the swap needs self-attention (attn1)")
        return [layers[n] for n in names]

    # ------------------------------------------------------------------ denoising and pixels

    def guided_step(self, x: torch.Tensor, t, cond: Conditioning, guidance_scale: float, extra: dict,
                    latent_in: torch.Tensor | None = None):
        """One classifier-free-guided scheduler step of `x` (B rows). The UNet runs on `latent_in` (default
        [x, x]) with `cond`'s rows, whose last 2B are X's unconditional and conditional rows; returns the
        scheduler's output."""
        pipe, batch = self.pipe, x.shape[0]
        latent_in = pipe.scheduler.scale_model_input(torch.cat([x, x]) if latent_in is None else latent_in, t)
        noise = pipe.unet(latent_in, t, **cond.unet_kwargs(), return_dict=False)[0]
        uncond, cond = noise[-2 * batch:-batch], noise[-batch:]
        return pipe.scheduler.step(uncond + guidance_scale * (cond - uncond), t, x, **extra)

    def decode(self, latents: torch.Tensor, generators) -> list[Image.Image]:
        vae = self.pipe.vae
        with vae_precision(self.pipe) as dtype:  # SDXL's fp16 VAE runs in float32, as its stock pipeline does
            image = vae.decode(latents.to(dtype) / vae.config.scaling_factor, return_dict=False,
                               generator=generators)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])

    def segment_latents(self, latents: torch.Tensor, attn: torch.Tensor, height: int, width: int) -> list[torch.Tensor]:
        """The segmenter's subject mask of each row of `latents` (B, C, h, w), decoded, prompted with the box of
        that row's subject cross-attention `attn` (B, h, w)."""
        from lrkit.masks import box_from_attention, minmax

        images = self.decode(latents, None)
        attn = minmax(attn)
        return [self.segmenter(img, box_from_attention(attn[b], (width, height))) for b, img in enumerate(images)]


__all__ = ["Embeds", "PersonalizedModel"]
