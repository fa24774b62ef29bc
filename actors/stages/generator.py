"""Generator stage: renders the kept seeds with a diffusers pipeline, from the exact latents and the scorer's embeddings.

Sits between the scorer and the rater; one actor per GPU (or a configured count on CPU), pipeline loaded once. With
the preview policy it runs the preview cascade: each prompt's candidates denoise the first steps together, their
predicted final images are rated, and only the best continues from where it stands to the end of the schedule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from actors.models import families
from actors.models.embedded import resolve_model
from actors.models.seeds import batch_noise
from actors.raters.specs import make_rater, rate_batch
from actors.stages import trace
from actors.stages.settings import RenderPlan

if TYPE_CHECKING:  # torch and the model libraries load in the actor, not in the driver that builds the graph
    from actors.models import diffusion

logger = logging.getLogger("seedsift.generator")
PREVIEW_INPUTS = ("preview_seeds", "preview_predicted")  # scorer -> generator only; preview_candidates stays


def preview_steps_spent(previewed: int, preview_steps: int, steps: int) -> int:
    """Denoising steps one image of the preview policy costs: M previews of T steps, then the rest for the best."""
    return previewed * preview_steps + steps - preview_steps


def preview_columns(rows: int, previewed: int) -> dict[str, np.ndarray]:
    """The generator's preview columns, as they leave for rows it did not render (rendered rows overwrite them).

    Every batch of a preview run carries them, with the same dtypes, whether or not it rendered anything: a batch
    of only skipped or quarantined rows (a rerun's tallies) once left without them, and Ray Data, merging it with a
    rendered batch, filled the missing tensor column with nulls that its numpy conversion cannot read ("buffer is
    too small for requested array" in the sink, which failed the job)."""
    return {"preview_scores": np.full((rows, previewed), np.nan, dtype=np.float64),
            "preview_steps": np.zeros(rows, dtype=np.int32), "steps_spent": np.zeros(rows, dtype=np.int32)}


def denoise_with_previews(adapter: diffusion.PipelineAdapter, state: diffusion.Denoising,
                          conditioning: diffusion.Conditioning, at_steps: list[int],
                          rate: Callable[[np.ndarray], np.ndarray]) -> tuple[diffusion.Denoising, dict[int, np.ndarray]]:
    """Denoise up to each step count in `at_steps` in turn; after each, decode the solver's estimate of the final
    image (its predicted original sample) and rate it. Returns the state at the last of them and {step: scores}.
    Each step runs once, however many previews are taken along the way."""
    scores = {}
    for step in sorted(at_steps):
        state = adapter.denoise(state, conditioning, until=step)
        if state.predicted_original is None:
            raise ValueError(f"{type(state.scheduler).__name__} gives no predicted final image to preview")
        scores[step] = np.asarray(rate(adapter.decode(state.predicted_original)), dtype=np.float64)
    return state, scores


class GeneratorStage:
    """Ray Data callable class: one instance per generator actor."""

    def __init__(self, plan: RenderPlan, num_threads: int = 1):
        trace.mark("generator", "process", trace.process_started())
        trace.mark("generator", "init")
        import torch

        from actors.models import diffusion

        trace.mark("generator", "imports")
        torch.set_num_threads(max(1, num_threads))
        model_path = resolve_model(plan.model)
        self.plan = plan
        self.adapter = diffusion.load_renderer(model_path, plan.scheduler, plan.solver_schedule, plan.attention)
        self.latent_shape = tuple(plan.latent_shape)
        self.rater = None
        if plan.preview or plan.rates_images:  # the run's own rater, here on this actor
            self.rater = make_rater(plan.rater)
        self.first_call = trace.FirstCall("generator")
        trace.mark("generator", "ready")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.first_call:
            return self._call(batch)

    def _call(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["status"])
        status = np.asarray(batch["status"], dtype=object).copy()
        error = np.asarray(batch["error"], dtype=object).copy()
        images = np.zeros((count, self.plan.height, self.plan.width, 3), dtype=np.uint8)
        out = {name: value for name, value in batch.items()
               if name not in families.EMBEDDING_KEYS and name not in PREVIEW_INPUTS}
        ok = np.flatnonzero(status == "ok")
        if self.plan.preview:  # every batch carries the preview columns, rendered rows or not (preview_columns)
            out.update(preview_columns(count, np.asarray(batch["preview_seeds"]).shape[1]))
        if len(ok):
            try:
                embeds = {name: batch[name][ok] for name in families.EMBEDDING_KEYS if name in batch}
                if self.plan.preview:
                    images[ok] = self._preview_and_render(batch, ok, embeds, out)
                else:
                    seeds = [int(s) for s in batch["seed"][ok]]
                    images[ok] = self._render(embeds, seeds)
            except Exception as exc:  # a batch that cannot render is recorded as failed rows, not a dead job
                logger.exception("render failed for %d rows", len(ok))
                status[ok] = "failed"
                error[ok] = f"render failed: {type(exc).__name__}: {exc}"
        out.update(status=status, error=error, image=images)
        return rate_batch(self.rater, out) if self.plan.rates_images else out

    def _render(self, embeds: dict[str, np.ndarray], seeds: list[int]) -> np.ndarray:
        plan = self.plan
        return self.adapter.render(embeds, batch_noise(seeds, self.latent_shape), steps=plan.steps,
                                   guidance_scale=plan.guidance, height=plan.height, width=plan.width, seeds=seeds)

    def _preview_and_render(self, batch, ok: np.ndarray, embeds: dict[str, np.ndarray], out: dict) -> np.ndarray:
        """The preview cascade for the prompts of rows `ok`: each row carries its prompt's M candidates; the row
        leaves with the winner's seed, index and predicted score, all M preview scores and the steps it cost."""
        plan, count = self.plan, len(batch["status"])
        candidates = np.asarray(batch["preview_seeds"])[ok]  # (rows, M)
        rows, previewed = candidates.shape
        flat_seeds = [int(s) for s in candidates.reshape(-1)]
        owner = np.repeat(np.arange(rows), previewed)  # the row each previewed candidate belongs to
        prompts = [str(p) for p in np.asarray(batch["prompt"])[ok]]
        conditioning = self.adapter.conditioning({k: v[owner] for k, v in embeds.items()}, plan.guidance,
                                                 plan.height, plan.width)
        state = self.adapter.start(batch_noise(flat_seeds, self.latent_shape), plan.steps, flat_seeds)
        state, scores = denoise_with_previews(self.adapter, state, conditioning, [plan.preview_steps],
                                              lambda images: self.rater.score(images, [prompts[o] for o in owner]))
        preview_scores = scores[plan.preview_steps].reshape(rows, previewed)
        best = preview_scores.argmax(axis=1)
        winners = [row * previewed + int(best[row]) for row in range(rows)]
        state = self.adapter.denoise(state.rows(winners), conditioning.rows(winners))  # to the end, nothing redone
        images = self.adapter.decode(state.latents)

        picked = np.arange(rows), best
        for column, values in (("seed", candidates[picked]),
                               ("candidate_index", np.asarray(batch["preview_candidates"])[ok][picked]),
                               ("predicted_score", np.asarray(batch["preview_predicted"])[ok][picked])):
            column_values = np.asarray(batch[column]).copy()  # rows not rendered keep what they had
            column_values[ok] = values
            out[column] = column_values
        out["preview_scores"][ok] = preview_scores
        out["preview_steps"][ok] = plan.preview_steps
        out["steps_spent"][ok] = preview_steps_spent(previewed, plan.preview_steps, plan.steps)
        return images
