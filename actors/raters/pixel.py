"""The raters that need no model: colourfulness and sharpness, computed from the pixels alone.

Stand-ins so the pipeline runs end to end without weights; neither looks at the prompt, neither measures what people
prefer (actors/raters/specs.py says what each rewards). They run inside the generator (RenderPlan.rates_images).
"""

from __future__ import annotations

import numpy as np

from actors.raters.images import check_image_batch


def colorfulness(image: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of one (H, W, 3) RGB image on 0..255 values; 0 for any grey image."""
    rgb = image.astype(np.float64)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = red - green
    yb = 0.5 * (red + green) - blue
    spread = np.sqrt(rg.std() ** 2 + yb.std() ** 2)
    offset = np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return float(spread + 0.3 * offset)


def laplacian_variance(image: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the BT.601 luma of one (H, W, 3) image (needs H, W >= 3)."""
    rgb = image.astype(np.float64)
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    # Valid region only: padding would invent an edge at the image border.
    centre = luma[1:-1, 1:-1]
    laplacian = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4.0 * centre
    return float(laplacian.var())


class ColorfulnessRater:
    """Hasler & Suesstrunk colourfulness per image; ignores the prompt (a stand-in, see the module docstring)."""

    def __init__(self, name: str = "colorfulness") -> None:
        self.name = name

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        check_image_batch(images, prompts)
        # One image at a time keeps the float64 copy small for large batches.
        return np.array([colorfulness(image) for image in images], dtype=np.float32)


class SharpnessRater:
    """Laplacian-variance sharpness per image; ignores the prompt (a stand-in, see the module docstring)."""

    def __init__(self, name: str = "sharpness") -> None:
        self.name = name

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        check_image_batch(images, prompts)
        if images.shape[1] < 3 or images.shape[2] < 3:
            raise ValueError(f"images: sharpness needs at least 3x3 pixels, got {images.shape[1:3]}")
        return np.array([laplacian_variance(image) for image in images], dtype=np.float32)
