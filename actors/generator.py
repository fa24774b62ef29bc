"""Generator stage: renders the kept seeds with a diffusers pipeline, from the exact latents and the scorer's embeddings.

Sits between the scorer and the rater; one actor per GPU (or a configured count on CPU), pipeline loaded once.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from actors import diffusion
from orchestrator.embedded import resolve_model
from orchestrator.seeds import batch_noise

logger = logging.getLogger("seedsift.generator")


def device_and_dtype(dtype_name: str = "auto") -> tuple[str, torch.dtype]:
    """cuda with fp16 (or the named dtype) when a GPU is visible to this actor, else cpu with float32."""
    if torch.cuda.is_available():
        names = {"auto": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
        return "cuda", names[dtype_name]
    return "cpu", torch.float32


class GeneratorStage:
    """Ray Data callable class: one instance per generator actor."""

    def __init__(self, model: str, *, steps: int, guidance: float, height: int, width: int, num_threads: int = 1,
                 scheduler: str = "default"):
        torch.set_num_threads(max(1, num_threads))
        self.device, self.dtype = device_and_dtype()
        model_path = resolve_model(model)
        self.adapter = diffusion.load_adapter(model_path, "render", device=self.device, dtype=self.dtype,
                                            scheduler=scheduler)
        self.steps, self.guidance, self.height, self.width = steps, guidance, height, width
        self.latent_shape = diffusion.latent_shape(model_path, height, width)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["status"])
        status = np.asarray(batch["status"], dtype=object).copy()
        error = np.asarray(batch["error"], dtype=object).copy()
        images = np.zeros((count, self.height, self.width, 3), dtype=np.uint8)
        ok = np.flatnonzero(status == "ok")
        if len(ok):
            try:
                embeds = {name: batch[name][ok] for name in diffusion.EMBEDDING_KEYS if name in batch}
                seeds = [int(s) for s in batch["seed"][ok]]
                images[ok] = self.adapter.render(
                    embeds, batch_noise(seeds, self.latent_shape),
                    steps=self.steps, guidance_scale=self.guidance, height=self.height, width=self.width, seeds=seeds,
                )
            except Exception as exc:  # a batch that cannot render is recorded as failed rows, not a dead job
                logger.exception("render failed for %d rows", len(ok))
                status[ok] = "failed"
                error[ok] = f"render failed: {type(exc).__name__}: {exc}"
        out = {name: value for name, value in batch.items() if name not in diffusion.EMBEDDING_KEYS}
        out.update(status=status, error=error, image=images)
        return out
