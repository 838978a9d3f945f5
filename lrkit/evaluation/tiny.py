"""Tiny, seeded, randomly initialised CLIP and DINO models built from config (tests and offline smoke runs).

They have the architecture of the real metric models at a toy scale (32 px input, 2 layers) and
load through the same code path once saved: `save_tiny_metric_models(DIR)` writes `DIR/clip`
and `DIR/dino` (safetensors + processor configs), usable as `--clip_model DIR/clip
--dino_model DIR/dino`. Their scores mean nothing; the maths around them is what they test.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TINY_IMAGE_SIZE = 32
TINY_CLIP_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                      pad_token_id=49407)
TINY_VISION = dict(image_size=TINY_IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4)


def tiny_clip(seed: int = 0):
    """(CLIPModel, CLIPProcessor): a seeded tiny CLIP with the real CLIP tokenizer (shipped in lrkit)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from lrkit.models import load_clip_tokenizer

    config = CLIPConfig(text_config=TINY_CLIP_TEXT, vision_config=TINY_VISION, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                         crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=load_clip_tokenizer())


def tiny_dino(seed: int = 0):
    """(ViTModel, ViTImageProcessor): a seeded tiny DINO-architecture ViT (facebook/dino-vits16 is a ViTModel)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(ViTConfig(**TINY_VISION)).eval()
    return model, ViTImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})


def save_tiny_metric_models(out_dir: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """Write the tiny CLIP and DINO to OUT_DIR/clip and OUT_DIR/dino; returns both folders."""
    out = Path(out_dir)
    folders = []
    for name, (model, processor) in (("clip", tiny_clip(seed)), ("dino", tiny_dino(seed))):
        folder = out / name
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]


__all__ = ["save_tiny_metric_models", "tiny_clip", "tiny_dino"]
