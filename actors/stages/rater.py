"""Rating stage: the model raters' actor (CLIP, PickScore, HPSv2, ImageReward) between the generator and the sink."""

from __future__ import annotations

import numpy as np

from actors.raters.specs import is_pixel_rater, make_rater, rate_batch
from actors.stages import trace
from actors.stages.light import give_way_to_generators


class RaterStage:
    """Ray Data callable class for model raters (CLIP, PickScore, HPSv2, ImageReward): one rater per actor, which
    may hold a GPU fraction; adds a float32 `score` column to each batch (rate_batch). Pixel raters need no actor:
    the generator rates its own renders with them (RenderPlan.rates_images)."""

    def __init__(self, rater_spec: str, num_threads: int = 1) -> None:
        trace.mark("rater", "process", trace.process_started())
        trace.mark("rater", "init")
        if not is_pixel_rater(rater_spec):
            import torch  # model raters only: a pixel rater never loads torch (start-up time)

            # Ray sets OMP_NUM_THREADS=1 in workers; the caller decides how many cores this actor may use.
            torch.set_num_threads(num_threads)
        self.rater = make_rater(rater_spec)
        self.first_call = trace.FirstCall("rater")
        trace.mark("rater", "ready")
        give_way_to_generators()  # once loaded: the first image waits for this load

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.first_call:
            return rate_batch(self.rater, batch)
