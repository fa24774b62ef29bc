"""A tiny random CLIP model, tokenizer and image processor, built in code and saved to a folder.

Test helper: lets the `clip:` and `pickscore:` raters load a real CLIPModel folder offline in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from actors.models.embedded import bytes_to_unicode

TINY_IMAGE_SIZE = 32
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2's `bytes_to_unicode`, in byte order)."""
    symbols = bytes_to_unicode()
    return [symbols[byte] for byte in range(256)]


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A 514-token byte-level CLIP tokenizer with no merges: every text tokenizes, one token per byte.

    Its ids follow byte order, unlike the embedded pipelines' tokenizer (printable bytes first), and the rater
    reference scores in tests/data/raters were made with these ids, so the two are not interchangeable.
    """
    symbols = byte_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_clip_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> CLIPConfig:
    """CLIP config with 32-wide, 2-layer towers on 32x32 images (patch 8) and a 16-dim joint space."""
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": bos_token_id,
        # The text tower pools at the first eos token, so this id must match the tokenizer's.
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
    }
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": 8,
        "num_channels": 3,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)


def build_tiny_clip(folder: str | Path) -> None:
    """Save a deterministic tiny CLIPModel plus its processor (tokenizer + image processor) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    # The Pil image processor is used directly: the default CLIPImageProcessor needs torchvision, absent here.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    )
    config = tiny_clip_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    # fork_rng keeps the caller's global RNG state untouched while the weights come out the same every time.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    model.eval()
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
