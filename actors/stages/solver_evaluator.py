"""The solver search's evaluator: one Ray actor holding a pipeline, the search's prompts and initial noises, and
the reference it measures against. It renders a candidate schedule for every (prompt, seed) pair and returns,
per pair, the latent RMSE to the reference and the rater's score of the decoded image.

Used by the search-solver job (orchestrator/search/solver_search.py), several at once through Ray's ActorPool.
"""

from __future__ import annotations

import numpy as np

from actors.stages import trace


class SolverEvaluator:
    """Renders candidate schedules on fixed prompts and noises. Model loaded in __init__, as every stage's."""

    def __init__(self, model: str, prompts: list[str], seeds: list[int], guidance: float, height: int, width: int,
                 rater: str = "", batch_size: int = 8, num_threads: int = 1):
        import torch

        from actors.models import diffusion, families
        from actors.models.embedded import resolve_model
        from actors.models.seeds import batch_noise
        from actors.raters.specs import make_rater

        trace.mark("solver-evaluator", "init")
        torch.set_num_threads(max(1, num_threads))
        model_path = resolve_model(model)
        text = diffusion.load_adapter(model_path, "text")  # CPU float32, as the scorer stage embeds
        self.embeds = text.encode(list(prompts), guidance)
        self.embeds.pop("truncated", None)
        del text
        self.render = diffusion.load_renderer(model_path)
        self.own_config = dict(self.render.pipe.scheduler.config)
        self.prompts = list(prompts)
        self.guidance, self.height, self.width = guidance, height, width
        self.latents = batch_noise(list(seeds), families.latent_shape(model_path, height, width))
        self.rater = make_rater(rater) if rater else None
        self.batch_size = max(1, batch_size)
        self.reference: np.ndarray | None = None

    def _final_latents(self, schedule) -> np.ndarray:
        """The final latents of every pair under a SolverSchedule, rendered in batches of batch_size."""
        from actors.models.unified_solver import UnifiedSolverScheduler

        finals = []
        for start in range(0, len(self.prompts), self.batch_size):
            rows = list(range(start, min(start + self.batch_size, len(self.prompts))))
            self.render.pipe.scheduler = UnifiedSolverScheduler.for_pipeline(self.own_config, schedule)
            conditioning = self.render.conditioning({k: v[rows] for k, v in self.embeds.items()}, self.guidance,
                                                    self.height, self.width)
            state = self.render.start(self.latents[rows], schedule.calls)
            finals.append(self.render.denoise(state, conditioning).latents.float().cpu().numpy())
        return np.concatenate(finals)

    def reference_latents(self, steps: int) -> np.ndarray:
        """The reference: DPM-Solver++(2M) at `steps` calls on the model's own timesteps (as diffusers spaces them)."""
        from actors.models.unified_solver import dpm_solver_pp_schedule, solver_timesteps

        return self._final_latents(dpm_solver_pp_schedule(solver_timesteps(self.own_config, steps)))

    def set_reference(self, latents: np.ndarray) -> None:
        if latents.shape != tuple(self.latents.shape):
            raise ValueError(f"reference latents of shape {latents.shape}, expected {tuple(self.latents.shape)}")
        self.reference = np.asarray(latents, dtype=np.float32)

    def evaluate(self, schedule: dict) -> dict:
        """{"digest", "rmse": [per pair], "score": [per pair, or none without a rater]} of a schedule's dict."""
        from actors.models.unified_solver import SolverSchedule

        if self.reference is None:
            raise ValueError("set_reference first")
        parsed = SolverSchedule.from_dict(schedule)
        final = self._final_latents(parsed)
        axes = tuple(range(1, final.ndim))
        rmse = np.sqrt(((final - self.reference) ** 2).mean(axis=axes))
        return {"digest": parsed.digest, "rmse": [float(x) for x in rmse], "score": self.rate(final)}

    def rate(self, latents: np.ndarray) -> list[float]:
        """The rater's score of each pair's image decoded from `latents` ([] without a rater)."""
        if self.rater is None:
            return []
        import torch

        scores: list[float] = []
        for start in range(0, len(latents), self.batch_size):
            chunk = np.ascontiguousarray(latents[start:start + self.batch_size])
            images = self.render.decode(torch.from_numpy(chunk).to(self.render.device))
            scores += [float(s) for s in self.rater.score(images, self.prompts[start:start + self.batch_size])]
        return scores
