"""The one check every rater makes of what it is handed: a leaf, so raters of every kind share it."""

from __future__ import annotations

import numpy as np


def check_image_batch(images: np.ndarray, prompts: list[str]) -> None:
    """Raise if `images` is not a (B, H, W, 3) uint8 array with one prompt per image."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", type(images).__name__)
        raise ValueError(f"images: expected a (B, H, W, 3) array, got {shape}; stack RGB images along axis 0")
    if images.dtype != np.uint8:
        raise ValueError(f"images: expected dtype uint8 (0..255), got {images.dtype}; convert before rating")
    if len(prompts) != len(images):
        raise ValueError(f"prompts: {len(prompts)} prompts for {len(images)} images; pass one prompt per image")
