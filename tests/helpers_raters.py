"""Tiny HPSv2 and ImageReward set-ups shared by the rater tests and by the script that made their reference scores.

The reference scores in tests/data/raters/expected.json were computed by the hpsv2 and image-reward packages' own
scoring code on the checkpoints beside them (see tests/data/raters/README.md); the tests check that seedsift's
loaders give the same numbers from the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data" / "raters"

# open_clip's model-config layout (what hpsv2 and open_clip read): ViT-H-14's shape, shrunk. 224 px input as in
# the real model, so the resize-and-pad preprocessing is the real one; vocab 514 is the tiny CLIP tokenizer's.
HPS_TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 514, "width": 32, "heads": 2, "layers": 2},
}

# ImageReward's architecture, shrunk: a BLIP ViT (224 px as in the real model) and a BERT with cross-attention.
# "text" is a BLIP med_config; its vocab is the tiny BERT tokenizer's plus ImageReward's [DEC] and [ENC].
BERT_WORDS = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    + ["a", "an", "the", "of", "on", "in", "at", "and", "with", "photo", "cat", "dog", "red", "blue", "night"]
)


def imagereward_tiny_config() -> dict:
    vocab_size = len(dict.fromkeys(BERT_WORDS)) + 2  # + [DEC] + [ENC], as 30522 + 2 in the real med_config
    return {
        "vision": {"image_size": 224, "patch_size": 32, "width": 32, "layers": 2, "heads": 2},
        "text": {
            "architectures": ["BertModel"],
            "attention_probs_dropout_prob": 0.1,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "hidden_size": 32,
            "initializer_range": 0.02,
            "intermediate_size": 37,
            "layer_norm_eps": 1e-12,
            "max_position_embeddings": 64,
            "model_type": "bert",
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "pad_token_id": 0,
            "type_vocab_size": 2,
            "vocab_size": vocab_size,
            "encoder_width": 32,
            "add_cross_attention": True,
        },
    }


def tiny_bert_tokenizer():
    """A WordPiece tokenizer over BERT_WORDS (lower-cased, like bert-base-uncased) with ImageReward's two extras."""
    from transformers import BertTokenizer

    vocab = {word: index for index, word in enumerate(dict.fromkeys(BERT_WORDS))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def rating_cases() -> dict[str, tuple[np.ndarray, list[str]]]:
    """Fixed image batches (one square, one landscape) with one prompt per image."""
    rng = np.random.default_rng(7)
    square = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    landscape = rng.integers(0, 256, (2, 48, 80, 3), dtype=np.uint8)
    return {
        "square": (square, ["a red cat on the photo", "a blue dog", "the photo of a cat at night"]),
        "landscape": (landscape, ["a red lighthouse at night", "Ünïcödé owl, with punctuation!"]),
    }
