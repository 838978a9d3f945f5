"""The personalized model as the inference loops use it: the vanilla and personalized views of one diffusers
pipeline, prompt encoding with the subject's token positions, the guided denoising step, decoding."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from PIL import Image

from lrkit.attention import AttentionStore, AttentionStoreProcessor, attention_layers, cross_layers_at, decoder_self_layers
from lrkit.concept import Concept
from lrkit.inference.options import GenerationOptions, InferenceError


@dataclass
class Embeds:
    """Text embeddings of one prompt batch: unconditional and conditional rows, the subject's token positions."""

    uncond: torch.Tensor
    cond: torch.Tensor
    tokens: list[list[int]] = field(default_factory=list)  # subject token positions per row


class PersonalizedModel:
    """A stock diffusers `StableDiffusionPipeline` with a concept applied, and the base model behind it.

    For LoRA and TI concepts the vanilla and personalized models share one UNet (adapters toggled, or a
    prompt without the new token); only a full DreamBooth concept keeps the base UNet / text encoder beside it.
    """

    def __init__(self, pipe, concept: Concept, *, vanilla_unet=None, vanilla_text_encoder=None, segmenter=None):
        self.pipe = pipe
        self.concept = concept
        self.vanilla_unet = vanilla_unet
        self.vanilla_text_encoder = vanilla_text_encoder
        self.segmenter = segmenter
        self.has_lora = "lora" in concept.files

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    # ------------------------------------------------------------------ the two models

    @contextlib.contextmanager
    def vanilla(self):
        """The vanilla model: LoRA adapters off, or the base UNet / text encoder of a DreamBooth concept."""
        pipe = self.pipe
        if self.vanilla_unet is not None or self.vanilla_text_encoder is not None:
            unet, te = pipe.unet, pipe.text_encoder
            pipe.unet = self.vanilla_unet or unet
            pipe.text_encoder = self.vanilla_text_encoder or te
            try:
                yield
            finally:
                pipe.unet, pipe.text_encoder = unet, te
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
        """Positions of `phrase`'s tokens in the encoded `prompt` (TI tokens expanded as diffusers does)."""
        tok = self.pipe.tokenizer
        prompt = self.pipe.maybe_convert_prompt(prompt, tok)
        phrase = self.pipe.maybe_convert_prompt(phrase, tok)
        ids = tok(prompt, truncation=True, max_length=tok.model_max_length).input_ids
        sub = tok(phrase, add_special_tokens=False).input_ids
        for start in range(len(ids) - len(sub) + 1):
            if ids[start:start + len(sub)] == sub:
                return list(range(start, start + len(sub)))
        raise InferenceError(f"phrase {phrase!r} not found in prompt {prompt!r} after tokenization")

    def embed(self, prompts: list[str], phrase_of, negative: str, *, vanilla: bool) -> Embeds:
        """Guided embeddings of `prompts` under the vanilla or personalized text encoder; `phrase_of(prompt)` names
        the subject's words whose token positions are recorded."""
        with self.vanilla() if vanilla else contextlib.nullcontext():
            cond, uncond = self.pipe.encode_prompt(prompts, self.device, 1, True, negative_prompt=[negative] * len(prompts))
        return Embeds(uncond=uncond, cond=cond, tokens=[self.token_positions(p, phrase_of(p)) for p in prompts])

    def encode(self, prompt: str) -> torch.Tensor:
        """The conditional embedding (1, tokens, dim) of one prompt, no guidance."""
        return self.pipe.encode_prompt(prompt, self.device, 1, False)[0]

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

    def guided_step(self, x: torch.Tensor, t, embeds: torch.Tensor, guidance_scale: float, extra: dict,
                    latent_in: torch.Tensor | None = None):
        """One classifier-free-guided scheduler step of `x` (B rows). The UNet runs on `latent_in` (default
        [x, x]) whose last 2B rows are X's unconditional and conditional rows; returns the scheduler's output."""
        pipe, batch = self.pipe, x.shape[0]
        latent_in = pipe.scheduler.scale_model_input(torch.cat([x, x]) if latent_in is None else latent_in, t)
        noise = pipe.unet(latent_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
        uncond, cond = noise[-2 * batch:-batch], noise[-batch:]
        return pipe.scheduler.step(uncond + guidance_scale * (cond - uncond), t, x, **extra)

    def decode(self, latents: torch.Tensor, generators) -> list[Image.Image]:
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False, generator=generators)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])

    def segment_latents(self, latents: torch.Tensor, attn: torch.Tensor, height: int, width: int) -> list[torch.Tensor]:
        """The segmenter's subject mask of each row of `latents` (B, C, h, w), decoded, prompted with the box of
        that row's subject cross-attention `attn` (B, h, w)."""
        from lrkit.masks import box_from_attention, minmax

        images = self.decode(latents, None)
        attn = minmax(attn)
        return [self.segmenter(img, box_from_attention(attn[b], (width, height))) for b, img in enumerate(images)]


__all__ = ["Embeds", "PersonalizedModel"]
